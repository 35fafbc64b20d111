"""MIL heads in torch (wsiengine.models.training.mil) and their ONNX export (wsiengine.models.training.mil_export):
they learn the digits-bags task (Ilse et al. 2018's MNIST-bags protocol), attention sums to 1,
and the exported graph reproduces torch within 1e-4 on bags of any size."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from sklearn.metrics import roc_auc_score  # noqa: E402

from wsiengine.errors import ModelError  # noqa: E402
from wsiengine.models.training.mil import ABMIL, CLAMSB, build_mil, smooth_top1_svm_loss  # noqa: E402
from wsiengine.models.training.mil_export import MAX_ABS_DIFF, export_mil_onnx, save_mil_head  # noqa: E402

from wsiengine.testing.digits_bags import make_digits_bags  # noqa: E402

MIN_TEST_AUC = 0.95


def train_bags(model, bags, *, epochs: int = 50, accumulate: int = 8, lr: float = 3e-3, seed: int = 0):
    """Adam on one bag at a time, gradients averaged over ``accumulate`` bags; fixed seeds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest and deterministic
    try:
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
        for _ in range(epochs):
            model.train()
            opt.zero_grad()
            for j, i in enumerate(rng.permutation(len(bags))):
                x, label, _ = bags[i]
                loss, _ = model.loss(torch.from_numpy(x), label)
                (loss / accumulate).backward()
                if (j + 1) % accumulate == 0 or j + 1 == len(bags):
                    opt.step()
                    opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def digits_bags():
    return make_digits_bags(n_train=200, n_test=100, bag_min=5, bag_max=15, seed=0)


@pytest.fixture(scope="module", params=["abmil", "clam_sb"])
def trained(request, digits_bags):
    train, _ = digits_bags
    torch.manual_seed(0)
    model = build_mil(request.param, 64, hidden_dim=64, attn_dim=32, dropout=0.25)
    start = time.perf_counter()
    train_bags(model, train)
    return model, time.perf_counter() - start


def _outputs(model, bags):
    with torch.no_grad():
        return [tuple(t.numpy() for t in model(torch.from_numpy(x))) for x, _, _ in bags]


def test_digits_bags_protocol(digits_bags):
    train, test = digits_bags
    assert len(train) == 200 and len(test) == 100
    for x, label, tiles in train + test:
        assert x.dtype == np.float32 and x.shape[1] == 64 and 5 <= len(x) <= 15
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert label == int(tiles.any())
    labels = [b[1] for b in test]
    assert 0.2 < np.mean(labels) < 0.8  # both classes well represented


def test_mil_learns_digits_bags(trained, digits_bags):
    model, seconds = trained
    _, test = digits_bags
    outs = _outputs(model, test)
    probs = [float(1 / (1 + np.exp(-o[0][0]))) for o in outs]
    auc = roc_auc_score([b[1] for b in test], probs)
    print(f"{model.name}: digits-bags test AUC {auc:.4f}, trained in {seconds:.1f} s")
    assert auc >= MIN_TEST_AUC, f"{model.name} test AUC {auc:.4f} < {MIN_TEST_AUC}"
    # The per-tile score finds the 9s, though it never saw a tile label.
    tile_auc = roc_auc_score(np.concatenate([b[2] for b in test]), np.concatenate([o[2] for o in outs]))
    print(f"{model.name}: tile-score AUC for 'is a 9' {tile_auc:.4f}")
    assert tile_auc >= 0.8


def test_attention_sums_to_one_and_scores_in_range(trained, digits_bags):
    model, _ = trained
    for (x, _, _), (logit, attention, tiles) in zip(digits_bags[1], _outputs(model, digits_bags[1])):
        assert logit.shape == (1,) and attention.shape == (len(x),) and tiles.shape == (len(x),)
        assert abs(float(attention.astype(np.float64).sum()) - 1.0) < 1e-5
        assert (attention >= 0).all() and (tiles >= 0).all() and (tiles <= 1).all()


def test_onnx_export_matches_torch(trained, digits_bags, tmp_path):
    model, _ = trained
    report = export_mil_onnx(model, tmp_path / "head.onnx", 64)
    assert report.max_abs_diff <= MAX_ABS_DIFF and report.bag_sizes == (1, 7, 1000)
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["features"]
    assert [o.name for o in session.get_outputs()] == ["probability", "attention", "tile_scores"]
    worst = 0.0
    for (x, _, _), (logit, attention, tiles) in zip(digits_bags[1], _outputs(model, digits_bags[1])):
        prob, att, ts = session.run(None, {"features": x})
        assert prob.shape == (1,) and att.shape == (len(x),) and ts.shape == (len(x),)
        assert abs(float(att.astype(np.float64).sum()) - 1.0) < 1e-5
        want_prob = 1 / (1 + np.exp(-logit.astype(np.float64)))
        worst = max(worst, np.abs(prob - want_prob).max(), np.abs(att - attention).max(), np.abs(ts - tiles).max())
    assert worst <= 1e-4


@pytest.mark.parametrize("cls", [ABMIL, CLAMSB])
def test_export_dynamic_bag_sizes_untrained(cls, tmp_path):
    torch.manual_seed(0)
    model = cls(1280)
    report = export_mil_onnx(model, tmp_path / "m.onnx", 1280, bag_sizes=(1, 2, 7, 1000, 5000))
    assert report.max_abs_diff <= MAX_ABS_DIFF


def test_export_rejects_wrong_in_dim_and_suffix(tmp_path):
    model = ABMIL(64)
    with pytest.raises(ModelError, match="D=64"):
        export_mil_onnx(model, tmp_path / "m.onnx", 1280)
    with pytest.raises(ModelError, match=".onnx"):
        export_mil_onnx(model, tmp_path / "m.bin", 64)


def test_save_mil_head_writes_directory(tmp_path):
    torch.manual_seed(0)
    report = save_mil_head(CLAMSB(32), tmp_path / "head", 32, 0.3, "tiny",
                           {"encoder": "efficientnet-lite0", "metrics": {"auc": np.float64(0.9)}})
    files = sorted(p.name for p in (tmp_path / "head").iterdir())
    assert files == ["config.json", "model.onnx"]
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["format"] == "wsiengine.mil_head" and config["format_version"] == 1
    assert config["in_dim"] == 32 and config["threshold"] == 0.3 and config["model"] == "clam_sb"
    assert config["name"] == "tiny" and config["encoder"] == "efficientnet-lite0"
    assert config["class_names"] == ["negative", "positive"] and config["metrics"] == {"auc": 0.9}
    assert config["sha256"] == report.sha256


def test_clam_instance_loss_svm_and_ce():
    torch.manual_seed(0)
    x = torch.randn(20, 16)
    for kind in ("svm", "ce"):
        model = CLAMSB(16, k_sample=4, instance_loss=kind, subtyping=True).train()
        for label in (0, 1):
            loss, (logit, attention, tiles) = model.loss(x, label)
            assert torch.isfinite(loss) and loss.requires_grad
            loss.backward()
            assert model.instance_classifiers[label].weight.grad is not None
    # A bag of one tile has no top-k/bottom-k split: only the bag loss remains.
    model = CLAMSB(16).train()
    out, h, _ = model._forward(x[:1])
    assert float(model.instance_loss(h, out[1], 1)) == 0.0


def test_smooth_top1_svm_loss_value():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    target = torch.tensor([0, 1])
    # row 0: log(e^2 + e^1) - 2; row 1: log(e^1 + e^0) - 0
    want = ((np.log(np.exp(2) + np.exp(1)) - 2) + np.log(np.e + 1)) / 2
    assert float(smooth_top1_svm_loss(logits, target)) == pytest.approx(want, rel=1e-6)


def test_build_mil_unknown_name():
    with pytest.raises(ValueError, match="abmil"):
        build_mil("transmil", 64)


def test_ensemble_with_tile_classifier_exports_and_agrees(tmp_path):
    """The shipped head's structure: an ABMIL ensemble plus a linear tile classifier, one graph."""
    from wsiengine.aggregate import MILHead
    from wsiengine.models.training.mil import MILEnsemble, MILWithTileClassifier

    torch.manual_seed(0)
    members = [ABMIL(32, hidden_dim=16, attn_dim=8, tile_head=False, embed_layers=2) for _ in range(3)]
    model = MILWithTileClassifier(MILEnsemble(members), torch.nn.Linear(32, 1)).eval()
    x = torch.randn(50, 32)
    with torch.no_grad():
        logit, attention, tiles = model(x)
        want = torch.stack([torch.sigmoid(m(x)[0]) for m in members]).mean()
        assert float(torch.sigmoid(logit)) == pytest.approx(float(want), abs=1e-6)
        assert float(attention.sum()) == pytest.approx(1.0, abs=1e-6)
        assert torch.allclose(tiles, torch.sigmoid(model.tile_classifier(x).squeeze(-1)))
    report = save_mil_head(model, tmp_path / "head", 32, 0.4, "ensemble")
    assert report.max_abs_diff <= MAX_ABS_DIFF
    pred = MILHead.load(tmp_path / "head").predict(x.numpy())
    assert pred.probability == pytest.approx(float(want), abs=1e-5)
    assert MILHead.load(tmp_path / "head").model == "abmil-ensemble3+tile"
    with pytest.raises(ValueError, match="different embedding sizes"):
        MILEnsemble([ABMIL(32), ABMIL(16)])
    with pytest.raises(ValueError, match="D=32 -> 1"):
        MILWithTileClassifier(ABMIL(32), torch.nn.Linear(16, 1))
