"""The shipped default MIL head: it loads without torch, and on PCam-mosaic slides run through
the real pipeline it separates positive from negative slides, attends to the lesion, and its
tile scores are higher inside lesions than outside."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from wsiengine import Encoder, MILHead
from wsiengine.aggregate import default_head_path
from wsiengine.cli import main

from .conftest import shared_file


def test_default_head_is_shipped_and_loads_without_torch():
    script = ("import sys, wsiengine as we; h = we.MILHead.load('default'); "
              "assert 'torch' not in sys.modules; print(h.in_dim, h.encoder, h.threshold)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    in_dim, encoder, threshold = out.stdout.split()
    assert int(in_dim) == Encoder.load("default").embed_dim == 1280 and encoder == "lymphnode-lite0"
    assert 0.0 < float(threshold) < 1.0
    root = default_head_path()
    assert (root / "model.onnx").stat().st_size < 8 << 20  # small
    config = json.loads((root / "config.json").read_text())
    metrics = config["metrics"]
    assert metrics["mosaic_test"]["auc"] >= 0.85 and metrics["pcam_test_patches"]["auc"] >= 0.85
    assert config["training"]["script"] == "python -m wsiengine.models.training.train_default_mil"


def test_default_head_card_states_data_input_figures_and_limits():
    from pathlib import Path

    import wsiengine.models

    card = (Path(wsiengine.models.__file__).parent / "cards" / "mil-default.md").read_text()
    config = json.loads((default_head_path() / "config.json").read_text())
    for phrase in ("PatchCamelyon", "CC0", "0.97 µm/px", "PCam test patches", "mosaic test slides", "not a diagnostic"):
        assert phrase in card, phrase
    assert f"{config['metrics']['mosaic_test']['auc']:.3f}" in card
    assert f"{config['threshold']:.3f}" in card


@pytest.fixture(scope="module")
def mosaic_stores(tmp_path_factory):
    """Four PCam-test mosaic slides (two with large lesions) through the real pipeline."""
    shared_file("pcam/test/1")
    pytest.importorskip("torch", reason="the mosaic helpers live in the [train] extra's training script")
    from wsiengine.models.training.train_default_mil import embed_slides
    from wsiengine.testing.mosaic import PatchPool, make_mosaic_dataset

    root = tmp_path_factory.mktemp("mosaic")
    pool = PatchPool.from_pcam(shared_file("pcam"), "test")
    slides = make_mosaic_dataset(root / "slides", pool, 4, seed=7, prefix="t", n_tissue_cells=(150, 200),
                                 lesion_cells=(40, 60))
    embed_slides(slides, root / "features", Encoder.load("default"))
    return slides, root / "features"


def test_default_head_on_mosaic_slides(mosaic_stores):
    from wsiengine.store import read_features

    slides, features = mosaic_stores
    head = MILHead.load("default")
    probs = {}
    for s in slides:
        coords, x = read_features(features / f"{s.slide_id}.zarr")
        pred = head.predict(x)
        probs[s.slide_id] = pred.probability
        assert pred.attention.sum() == pytest.approx(1.0, abs=1e-4)
        if s.label:
            inside = s.labels_at(coords).astype(bool)
            assert inside[int(pred.attention.argmax())], f"{s.slide_id}: top-attention tile outside the lesion"
            assert pred.tile_scores[inside].mean() > pred.tile_scores[~inside].mean() + 0.3
            assert pred.label == 1
    positives = [probs[s.slide_id] for s in slides if s.label]
    negatives = [probs[s.slide_id] for s in slides if not s.label]
    assert min(positives) > max(negatives), probs


def test_cli_predict_with_the_default_head(mosaic_stores, capsys):
    slides, features = mosaic_stores
    stores = [str(features / f"{s.slide_id}.zarr") for s in slides]
    assert main(["predict", *stores, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["slide_id"] for r in rows] == [s.slide_id for s in slides]
    assert all(r["label"] in ("normal", "metastasis") for r in rows)


def test_tile_classifier_folds_standardisation_into_one_layer():
    torch = pytest.importorskip("torch")
    from wsiengine.models.training.train_default_mil import fit_tile_classifier

    rng = np.random.default_rng(0)
    x = rng.normal(5.0, [0.1, 10.0, 1.0], size=(600, 3)).astype(np.float32)
    y = (x[:, 0] - 5.0 + 0.01 * (x[:, 1] - 5.0) > 0).astype(np.int64)
    clf = fit_tile_classifier(x[:400], y[:400], x[400:], y[400:])
    with torch.no_grad():
        scores = torch.sigmoid(clf.linear(torch.from_numpy(x[400:])).squeeze(-1)).numpy()
    assert clf.val_auc > 0.95 and ((scores > 0.5) == y[400:]).mean() > 0.9
    assert set(clf.grid) == {f"{v:g}" for v in (1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0)}


def test_default_head_warns_about_features_tiled_differently():
    head = MILHead.load("default")
    assert (head.target_mpp, head.tile_px) == (0.972, 96)
    assert head.tiling_mismatch(0.972, 96) is None and head.tiling_mismatch(None, None) is None
    message = head.tiling_mismatch(0.5, 224)
    assert "0.5 µm/px instead of 0.972" in message and "--target-mpp 0.972 --tile-px 96" in message
