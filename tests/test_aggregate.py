"""MILHead (wsiengine.aggregate): ONNX Runtime inference of a head directory, without torch at
run time. The head used here is exported in a session fixture when torch is installed (the
[train] extra); otherwise these tests skip."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from wsiengine.aggregate import MILHead, SlidePrediction
from wsiengine.errors import ConfigError, ModelError, WsiEngineError

IN_DIM = 1280
ENCODER = "efficientnet-lite0"


@pytest.fixture(scope="session")
def head_dir(tmp_path_factory) -> Path:
    """An ABMIL head for 1280-d features, exported with save_mil_head (random weights, seed 0)."""
    torch = pytest.importorskip("torch", reason="exporting a test head needs torch (the [train] extra)")
    from wsiengine.models.training.mil import ABMIL
    from wsiengine.models.training.mil_export import save_mil_head

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("mil") / "head"
    save_mil_head(ABMIL(IN_DIM), out, IN_DIM, 0.5, "test-abmil", {"encoder": ENCODER})
    return out


@pytest.fixture(scope="session")
def head(head_dir) -> MILHead:
    return MILHead.load(head_dir, threads=2)


def _copy(head_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(head_dir, tmp_path / "copy"))


def test_predict_returns_slide_prediction(head):
    features = np.random.default_rng(0).random((37, IN_DIM), dtype=np.float32)
    pred = head.predict(features)
    assert isinstance(pred, SlidePrediction) and pred.n_tiles == 37
    assert 0.0 <= pred.probability <= 1.0 and pred.threshold == 0.5
    assert pred.label == int(pred.probability >= pred.threshold)
    assert pred.attention.shape == (37,) and pred.tile_scores.shape == (37,)
    assert pred.attention.dtype == np.float32 and pred.tile_scores.dtype == np.float32
    assert abs(float(pred.attention.astype(np.float64).sum()) - 1.0) < 1e-5
    assert (pred.tile_scores >= 0).all() and (pred.tile_scores <= 1).all()
    with pytest.raises(AttributeError):
        pred.probability = 0.0  # frozen


def test_head_metadata(head):
    assert head.in_dim == IN_DIM and head.encoder == ENCODER and head.model == "abmil"
    assert head.class_names == ["negative", "positive"] and head.name == "test-abmil"
    assert "in_dim=1280" in repr(head)


def test_single_tile_bag_and_float64_input(head):
    pred = head.predict(np.ones((1, IN_DIM)))  # float64 is converted
    assert pred.attention.tolist() == [1.0]


def test_predict_matches_torch(head_dir, head):
    torch = pytest.importorskip("torch")
    from wsiengine.models.training.mil import ABMIL

    torch.manual_seed(0)
    model = ABMIL(IN_DIM).eval()  # the same seed-0 weights as the fixture
    x = np.random.default_rng(1).standard_normal((300, IN_DIM)).astype(np.float32)
    with torch.no_grad():
        logit, attention, tiles = model(torch.from_numpy(x))
    pred = head.predict(x)
    assert abs(pred.probability - float(torch.sigmoid(logit))) <= 1e-4
    assert np.abs(pred.attention - attention.numpy()).max() <= 1e-4
    assert np.abs(pred.tile_scores - tiles.numpy()).max() <= 1e-4


def test_wrong_feature_dimension_is_explained(head):
    with pytest.raises(ConfigError) as err:
        head.predict(np.zeros((10, 1024), np.float32))
    message = str(err.value)
    assert "expects D=1280" in message and ENCODER in message and "got 1024" in message


def test_empty_bag_is_explained(head):
    with pytest.raises(ConfigError, match="empty bag"):
        head.predict(np.zeros((0, IN_DIM), np.float32))


def test_non_finite_features_are_rejected(head):
    x = np.zeros((20_000, IN_DIM), np.float32)
    x[12_345, 7] = np.nan
    with pytest.raises(ConfigError, match="12345"):
        head.predict(x)
    x[12_345, 7] = np.inf
    with pytest.raises(ConfigError, match="NaN or infinite"):
        head.predict(x)


@pytest.mark.parametrize("bad", [np.zeros(IN_DIM, np.float32), np.zeros((2, 3, IN_DIM), np.float32)])
def test_wrong_rank_is_rejected(head, bad):
    with pytest.raises(ConfigError, match=r"\(N, D\)"):
        head.predict(bad)


def test_missing_directory_and_files(head_dir, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        MILHead.load(tmp_path / "nope")
    with pytest.raises(ModelError, match="not the file"):
        MILHead.load(head_dir / "model.onnx")
    no_config = _copy(head_dir, tmp_path / "a")
    (no_config / "config.json").unlink()
    with pytest.raises(ModelError, match="no config.json"):
        MILHead.load(no_config)
    no_model = _copy(head_dir, tmp_path / "b")
    (no_model / "model.onnx").unlink()
    with pytest.raises(ModelError, match="no model.onnx"):
        MILHead.load(no_model)


@pytest.mark.parametrize("change, match", [
    ({"threshold": 1.5}, "threshold"),
    ({"in_dim": "1280"}, "in_dim"),
    ({"in_dim": 1024}, "in_dim=1024"),
    ({"format_version": 99}, "upgrade"),
    ({"class_names": ["a"]}, "class_names"),
])
def test_invalid_config_is_rejected(head_dir, tmp_path, change, match):
    root = _copy(head_dir, tmp_path)
    config = json.loads((root / "config.json").read_text())
    config.update(change)
    (root / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=match):
        MILHead.load(root)


def test_unreadable_config_and_graph(head_dir, tmp_path):
    root = _copy(head_dir, tmp_path)
    (root / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot read"):
        MILHead.load(root)
    root2 = _copy(head_dir, tmp_path / "x")
    (root2 / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(WsiEngineError, match="cannot load"):
        MILHead.load(root2)


def test_100k_tile_bag_in_bounded_memory(head_dir):
    """A 100,000 x 1280 bag (488 MiB of features) predicts with memory linear in N: the
    process's peak RSS grows by well under 1 GiB during predict (an N x N tensor would be 37 GiB)."""
    script = textwrap.dedent(f"""
        import resource, numpy as np
        from wsiengine.aggregate import MILHead
        head = MILHead.load({str(head_dir)!r}, threads=2)
        x = np.random.default_rng(0).random((100_000, {IN_DIM}), dtype=np.float32)
        head.predict(x[:10])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        pred = head.predict(x)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert pred.attention.shape == (100_000,) and pred.tile_scores.shape == (100_000,)
        assert abs(float(pred.attention.astype(np.float64).sum()) - 1.0) < 1e-4
        print((after - before) / 1024)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    growth_mib = float(result.stdout.strip().splitlines()[-1])
    print(f"peak RSS growth during a 100k-tile predict: {growth_mib:.0f} MiB")
    assert growth_mib < 1024


# -- tile calibration ----------------------------------------------------------------------
def test_tile_calibration_is_applied_to_tile_scores_only(head_dir, tmp_path, head):
    from wsiengine.aggregate import TileCalibration

    features = np.random.default_rng(3).normal(size=(40, head.in_dim)).astype(np.float32)
    raw = head.predict(features)
    path = _copy(head_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["tile_calibration"] = {"method": "platt", "slope": 0.5, "intercept": -1.0}
    (path / "config.json").write_text(json.dumps(config))
    calibrated = MILHead.load(path, threads=2)
    assert calibrated.tile_calibration == TileCalibration(0.5, -1.0)
    out = calibrated.predict(features)
    assert out.probability == raw.probability and np.array_equal(out.attention, raw.attention)
    s = np.clip(raw.tile_scores.astype(np.float64), 1e-6, 1 - 1e-6)
    expected = 1 / (1 + np.exp(-(0.5 * np.log(s / (1 - s)) - 1.0)))
    np.testing.assert_allclose(out.tile_scores, expected, atol=1e-6)
    assert (np.argsort(out.tile_scores, kind="stable") == np.argsort(raw.tile_scores, kind="stable")).all()


@pytest.mark.parametrize("value, match", [
    ({"method": "isotonic"}, "platt"), ("platt", "platt"), ({"method": "platt", "slope": "x", "intercept": 0}, "numeric"),
    ({"method": "platt", "slope": 0, "intercept": 0}, "slope"), ({"method": "platt", "slope": 1e9, "intercept": 0}, "slope"),
    ({"method": "platt", "slope": 1, "intercept": float("nan")}, "slope"), ({"method": "platt", "slope": 1}, "numeric")])
def test_malformed_tile_calibration_is_refused(head_dir, tmp_path, value, match):
    path = _copy(head_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["tile_calibration"] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=match):
        MILHead.load(path, threads=2)


def test_tile_calibration_saturates_without_overflow():
    from wsiengine.aggregate import TileCalibration

    out = TileCalibration(100.0, 100.0).apply(np.array([0.0, 0.5, 1.0], np.float32))
    assert np.isfinite(out).all() and out.dtype == np.float32 and out[0] < out[1] <= out[2]
