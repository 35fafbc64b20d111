"""benchmarks/camelyon16_reproduce.py, run for real on a tiny stand-in CAMELYON16 folder.

The stand-in has the official layout (training/normal, training/tumor, testing/images,
testing/reference.csv without a header) filled with small generated pyramidal TIFFs whose
texture is drawn here (pale sparse-nuclei tissue for "normal", dense purple for "tumour"), so
nothing from ../shared is needed. The script tiles, embeds with the shipped default encoder,
trains ABMIL on two folds and reports; a rerun resumes; a broken layout and a corrupt slide
are handled as documented. The AUC itself is not the point here, only that the real pipeline
runs end to end and reports what it promises.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("matplotlib")

from wsiengine import MILHead, open_store, read_features  # noqa: E402

from ._scripts import load_script as _load_script  # noqa: E402
from ._scripts import make_standin_slide, run_main  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "camelyon16_reproduce.py"
N_NORMAL, N_TUMOR = 6, 6
TEST_LABELS = {"test_001": "Tumor", "test_002": "Normal", "test_003": "Tumor", "test_004": "Normal"}
BUDGET = 12  # tiles per slide in the stand-in run, below most slides' tissue tiles, so the budget path runs


def load_script():
    """The script as a module (benchmarks/ is not a package)."""
    return _load_script(SCRIPT)


def make_slide(path: Path, seed: int, tumour: bool) -> None:
    make_standin_slide(path, seed, tumour, side=1536, jitter=60, radii=(460, 600))


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    """A CAMELYON16-shaped folder: 6 normal (+ a corrupt normal_007), 6 tumour, 4 test slides."""
    root = tmp_path_factory.mktemp("CAMELYON16")
    for i in range(1, N_NORMAL + 1):
        make_slide(root / "training" / "normal" / f"normal_{i:03d}.tif", seed=i, tumour=False)
    (root / "training" / "normal" / "normal_007.tif").write_bytes(b"this is not a TIFF" + bytes(range(256)) * 64)
    for i in range(1, N_TUMOR + 1):
        make_slide(root / "training" / "tumor" / f"tumor_{i:03d}.tif", seed=100 + i, tumour=True)
    rows = []
    for k, (slide_id, label) in enumerate(TEST_LABELS.items()):
        make_slide(root / "testing" / "images" / f"{slide_id}.tif", seed=200 + k, tumour=label == "Tumor")
        rows.append(f"{slide_id},Tumor,Macro,Primary" if label == "Tumor" else f"{slide_id},Normal,,")
    (root / "testing" / "reference.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def first_run(script, standin, tmp_path_factory):
    """The script on the stand-in, 2 folds x 3 epochs, with a small per-slide tile budget."""
    work = tmp_path_factory.mktemp("work")
    saved = script.MAX_TILES_PER_SLIDE
    script.MAX_TILES_PER_SLIDE = BUDGET
    try:
        rc, out, err, seconds = run_main(script, [str(standin), "--work", str(work), "--folds", "2",
                                                  "--max-epochs", "3", "--threads", "1", "--device", "cpu"])
    finally:
        script.MAX_TILES_PER_SLIDE = saved
    return {"rc": rc, "out": out, "err": err, "work": work, "seconds": seconds}


def _valid_ids() -> list[str]:
    return ([f"normal_{i:03d}" for i in range(1, N_NORMAL + 1)] + [f"tumor_{i:03d}" for i in range(1, N_TUMOR + 1)]
            + list(TEST_LABELS))


def test_the_whole_pipeline_runs_and_reports_next_to_the_anchors(first_run):
    assert first_run["rc"] == 0, first_run["err"]
    work = first_run["work"]
    for slide_id in _valid_ids():
        store = open_store(work / "features" / f"{slide_id}.zarr")  # complete, readable
        assert 0 < store["features"].shape[0] <= BUDGET and store["features"].shape[1] == 1280

    with open(work / "labels.csv", newline="") as fh:
        labels = {r["slide_id"]: (int(r["label"]), r["part"]) for r in csv.DictReader(fh)}
    assert set(labels) == set(_valid_ids())
    assert labels["tumor_003"] == (1, "train") and labels["normal_002"] == (0, "train")
    assert labels["test_001"] == (1, "test") and labels["test_002"] == (0, "test")

    head = MILHead.load(work / "mil")
    _, feats = read_features(work / "features" / "test_001.zarr")
    pred = head.predict(feats)
    assert 0.0 <= pred.probability <= 1.0 and pred.attention.shape == (len(feats),)
    for fold in ("fold0", "fold1"):
        assert (work / "mil" / "folds" / fold / "model.onnx").is_file()
        assert (work / "splits" / f"{fold}.csv").is_file()

    res = json.loads((work / "results.json").read_text())
    assert [f["split"] for f in res["folds"]] == ["fold0", "fold1"]
    for f in res["folds"]:
        assert 0.0 <= f["test_auc"] <= 1.0 and f["n_test"] == len(TEST_LABELS)
        assert f["n_train"] + f["n_val"] == N_NORMAL + N_TUMOR
    assert 0.0 <= res["ensemble"]["auc"] <= 1.0
    assert set(res["ensemble"]["probabilities"]) == set(TEST_LABELS)
    assert res["test_auc_across_splits"]["mean"] == pytest.approx(np.mean([f["test_auc"] for f in res["folds"]]))
    assert {a["test_auc"] for a in res["anchors"]} == {0.936, 0.931, 0.946}
    assert res["encoder"]["name"] == "lymphnode-lite0" and res["protocol"]["tile_px"] == 96  # the default encoder's own
    assert res["slides"]["counts"] == {"train": {"normal": N_NORMAL, "tumor": N_TUMOR}, "test": {"normal": 2, "tumor": 2}}
    assert res["tiles_per_slide"]["embedded"]["max"] <= BUDGET

    table = first_run["out"]
    for text in ("0.936", "0.931", "0.946", "CLAM", "TransMIL", "DTFD", "ensemble", "mean ± sd", "fold0", "fold1"):
        assert text in table, text
    assert res["date"][:10] in table and "lymphnode-lite0" in table


def test_the_fold_partition_is_stratified_and_the_test_set_is_the_official_one(first_run):
    with open(first_run["work"] / "splits.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    val = {fold: {r["slide_id"] for r in rows if r["fold"] == fold and r["split"] == "val"} for fold in ("fold0", "fold1")}
    assert not val["fold0"] & val["fold1"]
    assert val["fold0"] | val["fold1"] == {s for s in _valid_ids() if not s.startswith("test_")}
    for ids in val.values():
        assert sum(s.startswith("tumor_") for s in ids) == N_TUMOR // 2
    for fold in ("fold0", "fold1"):
        assert {r["slide_id"] for r in rows if r["fold"] == fold and r["split"] == "test"} == set(TEST_LABELS)


def test_a_slide_over_the_budget_gets_a_seeded_uniform_subset(first_run, script):
    with open(first_run["work"] / "tiles.csv", newline="") as fh:
        rows = {r["slide_id"]: r for r in csv.DictReader(fh)}
    capped = [r for r in rows.values() if r["status"] == "embedded" and int(r["tissue_tiles"]) > BUDGET]
    assert capped, "the stand-in slides should exceed the test budget"
    assert all(int(r["tiles"]) == BUDGET for r in capped)

    from wsiengine import detect_tissue, open_slide, plan_tiles

    with open_slide(_slide_path(first_run, capped[0]["slide_id"])) as slide:
        grid = plan_tiles(slide, detect_tissue(slide), target_mpp=0.5, tile_px=224, min_tissue=0.25)
    a, b = script.budget(grid, "tumor_001", BUDGET), script.budget(grid, "tumor_001", BUDGET)
    np.testing.assert_array_equal(a.coords, b.coords)
    assert len(a) == BUDGET and set(map(tuple, a.coords)) <= set(map(tuple, grid.coords))
    assert script.budget(grid, "tumor_001", len(grid) + 1) is grid


def _slide_path(first_run, slide_id: str) -> Path:
    attrs = dict(open_store(first_run["work"] / "features" / f"{slide_id}.zarr").attrs)
    return Path(attrs["slide"]["path"])


def test_a_corrupt_slide_is_reported_and_skipped(first_run):
    assert first_run["rc"] == 0
    assert "normal_007" in first_run["err"]  # logged when it fails
    work = first_run["work"]
    assert not (work / "features" / "normal_007.zarr").exists()
    res = json.loads((work / "results.json").read_text())
    assert list(res["slides"]["failed"]) == ["normal_007"]
    assert "normal_007" in first_run["out"].split("published anchors")[1]  # listed at the end
    with open(work / "tiles.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["slide_id"] == "normal_007")
    assert row["status"] == "failed" and row["error"]
    assert "normal_007" not in (work / "labels.csv").read_text()


def test_a_rerun_resumes_without_embedding_again(first_run, script, standin):
    work = first_run["work"]
    stores = {s: work / "features" / f"{s}.zarr" for s in _valid_ids()}
    before = {s: (p.stat().st_mtime_ns, (p / "zarr.json").stat().st_mtime_ns) for s, p in stores.items()}
    rc, out, err, _ = run_main(script, [str(standin), "--work", str(work), "--folds", "2", "--max-epochs", "2",
                                        "--threads", "1", "--device", "cpu", "--quiet"])
    assert rc == 0, err
    assert {s: (p.stat().st_mtime_ns, (p / "zarr.json").stat().st_mtime_ns) for s, p in stores.items()} == before
    res = json.loads((work / "results.json").read_text())
    assert res["slides"]["resumed"] == len(stores) and res["slides"]["embedded_now"] == 0
    assert list(res["slides"]["failed"]) == ["normal_007"]  # retried, still failing, still not fatal
    assert res["tiles_per_slide"]["embedded"]["max"] <= BUDGET  # resumed stores keep their budget
    assert "0.936" in out and "[1/" not in out  # --quiet: the table, no per-slide lines


def test_a_folder_not_in_the_camelyon16_layout_is_a_clear_error(script, tmp_path):
    (tmp_path / "training" / "normal").mkdir(parents=True)
    rc, out, err, _ = run_main(script, [str(tmp_path), "--work", str(tmp_path / "work")])
    assert rc == 2
    assert "not a CAMELYON16 copy" in err
    for missing in ("training/tumor", "testing/images", "testing/reference.csv", "slides (*.tif) in training/normal"):
        assert missing in err, missing
    assert not (tmp_path / "work" / "features").exists()

    rc, _, err, _ = run_main(script, [str(tmp_path / "nowhere"), "--work", str(tmp_path / "work")])
    assert rc == 2 and "is not a folder" in err


def test_a_test_slide_without_a_reference_row_is_named(script, tmp_path):
    for sub, name in (("training/normal", "normal_001.tif"), ("training/tumor", "tumor_001.tif"),
                      ("testing/images", "test_001.tif"), ("testing/images", "test_002.tif")):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        (tmp_path / sub / name).write_bytes(b"x")
    (tmp_path / "testing" / "reference.csv").write_text("test_001,Tumor,Macro,Primary\n")
    rc, _, err, _ = run_main(script, [str(tmp_path), "--work", str(tmp_path / "work")])
    assert rc == 2 and "test_002" in err and "no row" in err


def test_reference_csv_is_read_with_or_without_a_header(script, tmp_path):
    plain = tmp_path / "reference.csv"
    plain.write_text("Test_001,Tumor,Macro,Primary\ntest_002,Normal,,\n\ntest_003.tif,Tumor,Micro,Primary\n")
    assert script.read_reference(plain) == {"test_001": 1, "test_002": 0, "test_003": 1}
    header = tmp_path / "with_header.csv"
    header.write_text("image,type,metastasis,origin\ntest_001,Tumor,Macro,Primary\ntest_002,Normal,,\n")
    assert script.read_reference(header) == {"test_001": 1, "test_002": 0}
    other = tmp_path / "other_order.csv"
    other.write_text("class,slide_id\nnormal,test_005\ntumor,test_006\n")
    assert script.read_reference(other) == {"test_005": 0, "test_006": 1}
    bad = tmp_path / "bad.csv"
    bad.write_text("test_001,Tumor\ntest_002,maybe\n")
    with pytest.raises(script.LayoutError, match="unreadable row"):
        script.read_reference(bad)


def test_the_protocol_constants_match_the_official_split(script):
    assert len(script.OFFICIAL_TRAIN_NORMAL) == 160 and len(script.OFFICIAL_TRAIN_TUMOR) == 111
    assert len(script.OFFICIAL_TEST) == 130
    assert set(script.EXCLUDED_SLIDES) <= set(script.KNOWN_ISSUES)
    assert (script.TARGET_MPP, script.TILE_PX, script.MIN_TISSUE) == (0.5, 224, 0.25)
    assert script.MAX_TILES_PER_SLIDE == 40_000 and script.TRAIN_MAX_TILES == 8192
    assert {a["test_auc"] for a in script.ANCHORS} == {0.936, 0.931, 0.946}
    for cite in ("Nature Biomedical Engineering", "TransMIL", "NeurIPS 2021", "DTFD-MIL", "CVPR 2022"):
        assert cite in script.__doc__


def test_resuming_with_another_encoder_or_tiling_is_refused(first_run, script):
    from wsiengine.errors import ConfigError

    store = first_run["work"] / "features" / "tumor_001.zarr"
    info = dict(open_store(store).attrs)["encoder"]
    assert script._check_existing(store, info, 0.972, 96) <= BUDGET
    with pytest.raises(ConfigError, match="encoder 'lymphnode-lite0'.*instead of 'uni'"):
        script._check_existing(store, {**info, "spec": {**info["spec"], "name": "uni"}}, 0.972, 96)
    with pytest.raises(ConfigError, match="96 px at 0.972 µm/px instead of 256 px"):
        script._check_existing(store, info, 0.972, 256)
