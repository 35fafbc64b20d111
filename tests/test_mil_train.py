"""train-mil: labels and feature stores in, cross-validated heads, metrics and an ONNX head out.

The training loop learns the digits-bags task (Ilse et al.'s MNIST-bags protocol) through the
real API, thresholds come from validation slides only, missing features are listed, and the
command writes a head that MILHead runs without torch."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("matplotlib")
from sklearn.metrics import roc_auc_score  # noqa: E402

from wsiengine import MILHead  # noqa: E402
from wsiengine.cli import main  # noqa: E402
from wsiengine.config import MILTrainConfig  # noqa: E402
from wsiengine.errors import ConfigError, MissingFeaturesError, TrainingDataError  # noqa: E402
from wsiengine.models.training.mil_data import (  # noqa: E402
    FeatureBags,
    Split,
    read_labels_csv,
    read_split_files,
    stratified_kfold_splits,
    write_splits_csv,
)
from wsiengine.models.training.mil_metrics import (  # noqa: E402
    binary_metrics,
    calibration_table,
    roc_auc,
    roc_curve,
    select_threshold,
)
from wsiengine.models.training.mil_train import train_fold, train_mil, train_mil_from_stores  # noqa: E402
from wsiengine.store import FeatureWriter  # noqa: E402
from wsiengine.tiling import TileGrid  # noqa: E402

from wsiengine.testing.digits_bags import make_digits_bags  # noqa: E402

FAST = dict(max_epochs=6, min_epochs=2, patience=3, lr=3e-3, hidden_dim=32, attn_dim=16, threads=1)


def write_store(path: Path, features: np.ndarray, encoder: str = "digits") -> Path:
    """A committed feature store holding ``features`` (tiles on a 1-row lattice), via FeatureWriter."""
    n = len(features)
    coords = np.column_stack([np.arange(n) * 8, np.zeros(n)]).astype(np.int64)
    grid = TileGrid(coords=coords, tissue_fraction=np.ones(n, np.float32),
                    grid_index=np.column_stack([np.zeros(n), np.arange(n)]).astype(np.int64), grid_shape=(1, n),
                    target_mpp=1.0, tile_px=8, overlap_px=0, read_level=0, read_size=(8, 8), stride_level_px=(8, 8),
                    tile_size_level0=(8.0, 8.0), slide_dimensions=(8 * n, 8), slide_mpp=(1.0, 1.0))
    attrs = {"encoder": {"spec": {"name": encoder}, "file": "x.onnx"}}  # as Encoder.describe() writes it
    with FeatureWriter(path, grid, features.shape[1], attrs=attrs) as writer:
        writer.write(np.arange(n), features)
        return writer.commit()


@pytest.fixture(scope="module")
def digits():
    """Digits-bags as {slide_id: features}, {slide_id: label}; ids d000.. train pool, t000.. test pool."""
    train, test = make_digits_bags(n_train=200, n_test=100, seed=0)
    bags = {f"d{i:03d}": x for i, (x, _, _) in enumerate(train)} | {f"t{i:03d}": x for i, (x, _, _) in enumerate(test)}
    labels = {f"d{i:03d}": y for i, (_, y, _) in enumerate(train)} | {f"t{i:03d}": y for i, (_, y, _) in enumerate(test)}
    return bags, labels


@pytest.fixture(scope="module")
def digits_stores(tmp_path_factory, digits):
    """60 digits bags written as Zarr stores, with labels.csv."""
    bags, labels = digits
    root = tmp_path_factory.mktemp("features")
    ids = sorted(bags)[:60]
    for s in ids:
        write_store(root / f"{s}.zarr", bags[s])
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "label"])
        w.writerows([(s, labels[s]) for s in ids])
    return root


# -- metrics ---------------------------------------------------------------------------------

def test_auc_and_roc_match_scikit_learn_with_ties():
    from sklearn.metrics import roc_curve as sk_roc

    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 120)
        p = np.round(rng.random(120) * (0.4 + 0.6 * y), 1)  # heavy ties
        assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        fpr, tpr, _ = roc_curve(y, p)
        want_fpr, want_tpr, _ = sk_roc(y, p, drop_intermediate=False)
        np.testing.assert_allclose(fpr, want_fpr)
        np.testing.assert_allclose(tpr, want_tpr)


def test_select_threshold_maximises_youden_and_sits_between_scores():
    probs = np.array([0.05, 0.1, 0.2, 0.35, 0.6, 0.7, 0.9, 0.3])
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    t = select_threshold(probs, labels)
    assert 0.3 < t < 0.35  # the only perfect cut
    m = binary_metrics(probs, labels, t)
    assert m.sensitivity == 1.0 and m.specificity == 1.0 and m.balanced_accuracy == 1.0
    assert select_threshold(probs, labels, rule="fixed") == 0.5
    with pytest.raises(ValueError, match="both classes"):
        select_threshold(probs[:3], labels[:3])


def test_binary_metrics_and_calibration_table_by_hand():
    probs = np.array([0.1, 0.4, 0.8, 0.9, 0.6, 0.2])
    labels = np.array([0, 0, 1, 1, 0, 1])
    m = binary_metrics(probs, labels, 0.5)
    assert (m.sensitivity, m.specificity) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert m.accuracy == pytest.approx(4 / 6) and m.n == 6 and m.n_positive == 3
    assert m.brier == pytest.approx(np.mean((probs - labels) ** 2))
    table = calibration_table(probs, labels, bins=2)
    assert [b.count for b in table] == [3, 3]
    assert table[0].fraction_positive == pytest.approx(1 / 3) and table[1].mean_probability == pytest.approx(23 / 30)


# -- data, labels, splits --------------------------------------------------------------------

def test_labels_csv_reads_names_and_rejects_bad_rows(tmp_path):
    good = tmp_path / "labels.csv"
    good.write_text("slide_id,label,notes\nA,tumor,x\nB,normal,\nC,1,\nD,0,\n")
    assert read_labels_csv(good) == {"A": 1, "B": 0, "C": 1, "D": 0}
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,label\nA,maybe\nB,0\nB,1\n")
    with pytest.raises(TrainingDataError, match="'A' has label 'maybe'.*'B' is listed again"):
        read_labels_csv(bad)
    one = tmp_path / "one.csv"
    one.write_text("slide_id,label\nA,1\nB,1\n")
    with pytest.raises(TrainingDataError, match="only one class"):
        read_labels_csv(one)
    (tmp_path / "cols.csv").write_text("slide,y\nA,1\n")
    with pytest.raises(TrainingDataError, match="slide_id,label"):
        read_labels_csv(tmp_path / "cols.csv")


def test_labels_naming_slides_without_features_list_them_all(digits_stores, tmp_path):
    labels = tmp_path / "labels.csv"
    rows = ["slide_id,label", "d000,1", "d001,0", "ghost-a,1", "ghost-b,0"]
    (digits_stores / "half.zarr.partial").mkdir(exist_ok=True)
    rows.append("half,0")
    labels.write_text("\n".join(rows) + "\n")
    with pytest.raises(MissingFeaturesError) as info:
        train_mil_from_stores(digits_stores, labels, tmp_path / "out", MILTrainConfig(**FAST))
    message = str(info.value)
    assert "3 of 5 labelled slides" in message
    assert "ghost-a" in message and "ghost-b" in message and "incomplete" in message and "half" in message
    assert sorted(info.value.slide_ids) == ["ghost-a", "ghost-b", "half"]
    assert not (tmp_path / "out").exists()


def test_stores_of_different_dimensions_are_refused(tmp_path):
    write_store(tmp_path / "a.zarr", np.zeros((3, 4), np.float32))
    write_store(tmp_path / "b.zarr", np.zeros((3, 5), np.float32))
    with pytest.raises(TrainingDataError, match="different sizes"):
        FeatureBags.from_stores(tmp_path, {"a": 0, "b": 1})


def test_stratified_kfold_splits_partition_and_stratify():
    ids = [f"s{i}" for i in range(47)]
    labels = np.array([1] * 17 + [0] * 30)
    splits = stratified_kfold_splits(ids, labels, 5, seed=3)
    tests = [s for sp in splits for s in sp.test]
    assert sorted(tests) == sorted(ids)  # every slide tested exactly once
    lab = dict(zip(ids, labels))
    for sp in splits:
        sp.check(lab)
        assert set(sp.train) | set(sp.val) | set(sp.test) == set(ids)
        assert abs(sum(lab[s] for s in sp.test) - 17 / 5) <= 1  # stratified
        assert 0.1 < len(sp.val) / (len(sp.train) + len(sp.val)) < 0.3
    assert splits == stratified_kfold_splits(ids, labels, 5, seed=3)
    assert splits != stratified_kfold_splits(ids, labels, 5, seed=4)
    with pytest.raises(TrainingDataError, match="at least 6 slides of each class"):
        stratified_kfold_splits(ids[:20], np.array([1] * 4 + [0] * 16), 5)


def test_split_files_long_wide_and_round_trip(tmp_path):
    splits = [Split("fold0", ("a", "b"), ("c", "d"), ("e",)), Split("fold1", ("c", "e"), ("a", "b"), ("d",))]
    write_splits_csv(splits, tmp_path / "splits.csv")
    assert read_split_files([tmp_path / "splits.csv"]) == splits
    (tmp_path / "splits_0.csv").write_text(",train,val,test\n0,a,c,e\n1,b,d,\n")  # CLAM's layout
    (clam,) = read_split_files([tmp_path / "splits_0.csv"])
    assert (clam.train, clam.val, clam.test) == (("a", "b"), ("c", "d"), ("e",))
    with pytest.raises(MissingFeaturesError, match="zz"):
        (tmp_path / "x.csv").write_text("slide_id,split\nzz,train\n")
        read_split_files([tmp_path / "x.csv"], ["a"])
    with pytest.raises(TrainingDataError, match="in both train and val"):
        Split("bad", ("a", "b"), ("b", "c")).check({"a": 0, "b": 1, "c": 0})


# -- training --------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["abmil", "clam_sb"])
def test_train_mil_learns_digits_bags(digits, model):
    """The MNIST-bags protocol on scikit-learn's digits through the real training loop: test AUC >= 0.90.

    The same seed gives different floats on different CPUs (SIMD paths): on the 2-core CI machine
    of 2026-12-06 seeds 0-2 gave test AUC 0.943 / 0.957 / 0.929 (ABMIL) and 0.951 / 0.937 / 0.937
    (CLAM-SB), where an earlier machine gave >= 0.95 for seed 0; the bar is "learns", not a figure."""
    bags, labels = digits
    data = FeatureBags.from_arrays(bags, labels)
    train_ids = sorted(s for s in bags if s.startswith("d"))
    split = Split("digits", tuple(train_ids[:160]), tuple(train_ids[160:]), tuple(sorted(s for s in bags if s[0] == "t")))
    config = MILTrainConfig(model=model, max_epochs=40, min_epochs=10, patience=10, lr=1e-3, hidden_dim=64,
                            attn_dim=32, threads=1, seed=0)
    result = train_mil(data, [split], config)
    (fold,) = result.folds
    assert fold.test.auc >= 0.90, fold.summary()
    assert fold.test.balanced_accuracy >= 0.85
    assert fold.best_epoch <= fold.epochs_run <= 40


def test_threshold_and_early_stopping_use_validation_only(digits):
    bags, labels = digits
    ids = sorted(bags)[:90]
    split = Split("s", tuple(ids[:50]), tuple(ids[50:70]), tuple(ids[70:]))
    config = MILTrainConfig(**FAST)
    flipped = dict(labels) | {s: 1 - labels[s] for s in split.test}
    a = train_fold(FeatureBags.from_arrays(bags, {s: labels[s] for s in ids}), split, config)
    b = train_fold(FeatureBags.from_arrays(bags, {s: flipped[s] for s in ids}), split, config)
    assert a.threshold == b.threshold and a.best_epoch == b.best_epoch
    assert a.history == b.history
    np.testing.assert_array_equal(a.predictions["test"][2], b.predictions["test"][2])
    assert a.test.auc == pytest.approx(1 - b.test.auc)  # only the test metrics see the test labels
    assert a.threshold == select_threshold(a.predictions["val"][2], a.predictions["val"][1])


def test_training_is_reproducible_with_a_seed(digits):
    bags, labels = digits
    ids = sorted(bags)[:80]
    data = FeatureBags.from_arrays(bags, {s: labels[s] for s in ids})
    splits = stratified_kfold_splits(data.slide_ids, data.labels, 2, seed=0)
    runs = [train_mil(data, splits, MILTrainConfig(**FAST, seed=s)) for s in (0, 0, 1)]
    for fa, fb in zip(runs[0].folds, runs[1].folds):
        np.testing.assert_array_equal(fa.predictions["test"][2], fb.predictions["test"][2])
        assert fa.history == fb.history
    assert not np.array_equal(runs[0].folds[0].predictions["test"][2], runs[2].folds[0].predictions["test"][2])


def test_class_balanced_sampling_draws_classes_equally():
    from wsiengine.models.training.mil_train import _epoch_order

    labels = np.array([1] * 10 + [0] * 90)
    rng = np.random.default_rng(0)
    drawn = np.concatenate([labels[_epoch_order(labels, True, rng)] for _ in range(200)])
    assert drawn.mean() == pytest.approx(0.5, abs=0.02)
    plain = labels[_epoch_order(labels, False, rng)]
    assert plain.mean() == pytest.approx(0.1) and sorted(_epoch_order(labels, False, rng)) == list(range(100))


def test_cli_train_mil_writes_head_metrics_and_roc(digits_stores, tmp_path, capsys):
    out = tmp_path / "mil_model"
    argv = ["train-mil", "--features", str(digits_stores), "--labels", str(digits_stores / "labels.csv"),
            "--model", "abmil", "--folds", "3", "--seed", "0", "-o", str(out), "--max-epochs", "6", "--min-epochs", "2",
            "--patience", "3", "--lr", "0.003", "--hidden-dim", "32", "--threads", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "fold0" in printed and "test pooled: AUC" in printed
    for name in ("model.onnx", "config.json", "metrics.json", "predictions.csv", "splits.csv", "roc.png",
                 "reference.npz"):
        assert (out / name).is_file(), name
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["splits"]) == 3 and metrics["encoder"] == "digits"
    for fold in metrics["splits"]:
        for key in ("auc", "balanced_accuracy", "sensitivity", "specificity", "threshold"):
            assert fold["test"][key] is not None
    overall = metrics["overall"]["test"]
    assert overall["pooled"]["n"] == 60 and len(overall["calibration"]) == 10
    assert sum(b["count"] for b in overall["calibration"]) == 60
    assert {"mean", "sd"} <= set(overall["across_splits"]["auc"])

    head = MILHead.load(out)
    assert head.encoder == "digits" and head.config["selected_split"] == metrics["selected_split"]
    assert (head.target_mpp, head.tile_px) == (1.0, 8)  # the stores' tiling travels with the head
    # deposit rules from the validation slides' labels only: no negative validation slide's
    # tiles would seed a focus beyond the 90th-percentile slide
    rules = head.config["deposit_rules"]
    assert rules["fitted_on"].startswith("slide labels only") and rules["smoothing"] == 0.5
    assert 0 <= rules["grow_threshold"] <= rules["seed_threshold"] <= 1 and head.tile_calibration is None
    from wsiengine.config import RunConfig
    from wsiengine.resolve import resolve_config

    resolved = resolve_config(RunConfig.load(env={}, mil=str(out), encoder="default"))
    assert resolved.mil.seed_threshold == rules["seed_threshold"] and resolved.mil.tile_threshold == rules["grow_threshold"]
    chosen = next(f for f in metrics["splits"] if f["split"] == metrics["selected_split"])
    assert head.threshold == pytest.approx(chosen["threshold"])
    assert chosen["val"]["auc"] == max(f["val"]["auc"] for f in metrics["splits"])
    from wsiengine.store import read_features

    _, x = read_features(digits_stores / "d000.zarr")
    pred = head.predict(x)
    assert pred.attention.sum() == pytest.approx(1.0, abs=1e-5) and pred.tile_scores.shape == (len(x),)

    # the embedding reference: every tile of the selected split's training slides
    with open(out / "splits.csv", newline="") as fh:
        train_ids = [r["slide_id"] for r in csv.DictReader(fh)
                     if r["split"] == "train" and r["fold"] == metrics["selected_split"]]
    ref = head.reference
    assert ref is not None and ref.dim == head.in_dim == x.shape[1] and ref.encoder == "digits"
    assert ref.n_tiles == sum(len(read_features(digits_stores / f"{s}.zarr")[1]) for s in train_ids)
    assert f"{len(train_ids)} training slides of split {metrics['selected_split']!r}" in ref.source
    assert 0.0 <= ref.outlier_fraction(x) < 0.5
    assert ref.outlier_fraction(np.random.default_rng(0).random(x.shape, np.float32)) > 0.9  # noise, not digits
    assert MILHead.load(out / "folds" / metrics["selected_split"]).reference is None  # only the output head

    # the same partition again from splits.csv, and a second run refuses to overwrite silently
    again = tmp_path / "again"
    assert main([*argv[:7], "--split", str(out / "splits.csv"), "-o", str(again), *argv[13:]]) == 0
    assert json.loads((again / "metrics.json").read_text())["overall"] == metrics["overall"]
    assert main(argv) == 2
    assert "exists" in capsys.readouterr().err

    assert main(["predict", str(digits_stores / "d000.zarr"), "--mil", str(out), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["probability"] == pytest.approx(pred.probability, abs=1e-6) and row["tiles"] == len(x)


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="model"):
        MILTrainConfig(model="transmil")
    with pytest.raises(ConfigError, match="val_fraction"):
        MILTrainConfig(val_fraction=1.5)
