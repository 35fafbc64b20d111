"""Hostile and faulty ids and names: a received store, colliding slide names, formula cells, log forging."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from wsiengine.batch import discover_slides, read_summary
from wsiengine.batch.discovery import SlideEntry
from wsiengine.batch.location import ResultsLocation
from wsiengine.batch.summary import SummaryRow, write_summary
from wsiengine.cli import main
from wsiengine.config import ReportConfig, VLMConfig
from wsiengine.errors import ReportError
from wsiengine.report import make_report
from wsiengine.store import FeatureWriter
from wsiengine.tiling import TileGrid

TILE_PX = 100
ROWS = COLS = 6


def _grid() -> TileGrid:
    rr, cc = np.meshgrid(np.arange(ROWS), np.arange(COLS), indexing="ij")
    index = np.column_stack([rr.ravel(), cc.ravel()]).astype(np.int64)
    return TileGrid(coords=index[:, ::-1] * TILE_PX, tissue_fraction=np.ones(len(index), np.float32),
                    grid_index=index, grid_shape=(ROWS, COLS), target_mpp=1.0, tile_px=TILE_PX, overlap_px=0,
                    read_level=0, read_size=(TILE_PX, TILE_PX), stride_level_px=(TILE_PX, TILE_PX),
                    tile_size_level0=(float(TILE_PX), float(TILE_PX)), slide_dimensions=(COLS * TILE_PX, ROWS * TILE_PX),
                    slide_mpp=(1.0, 1.0))


def _received_store(folder: Path, slide_id: object, name: str = "received") -> Path:
    """A committed result store ``folder/NAME.zarr`` whose recorded ``slide_id`` is ``slide_id``
    (as a store received from someone else may say anything)."""
    grid = _grid()
    n = len(grid)
    attrs = {"slide_id": slide_id,
             "slide": {"path": str(folder / "gone.svs"), "name": "gone.svs", "dimensions": [COLS * TILE_PX, ROWS * TILE_PX],
                       "mpp": [1.0, 1.0], "mpp_source": "vendor", "backend": "x", "vendor": None},
             "config": {"mil": {"tile_threshold": 0.5}}, "encoder": {"spec": {"name": "test"}, "sha256": "e" * 64},
             "mil": {"name": "test-head", "model": "abmil", "sha256": "m" * 64, "threshold": 0.5}, "config_key": "k"}
    scores = np.full(n, 0.05, np.float32)
    scores[:4] = 0.95
    with FeatureWriter(folder / f"{name}.zarr", grid, 8, attrs=attrs) as w:
        w.write(np.arange(n), np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32))
        w.add_array("attention", np.full(n, 1.0 / n, np.float32))
        w.add_array("tile_scores", scores)
        w.add_array("tissue_mask", np.ones((ROWS * 4, COLS * 4), np.uint8),
                    attrs={"mask_mpp": [25.0, 25.0], "level0_per_mask_px": [25.0, 25.0]})
        return w.commit(prediction={"probability": 0.9, "label": 1, "label_name": "tumor", "threshold": 0.5,
                                    "n_tiles": n}, status="ok")


def _report(store: Path, out: Path, **kw):
    return make_report(store, out, config=ReportConfig(), vlm=VLMConfig(), **kw)


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------------------------------------------------------------------------------------------
# 1. a received store's slide_id never names files outside the output folder
# ---------------------------------------------------------------------------------------------


def test_received_store_with_a_path_as_slide_id_writes_and_deletes_nothing_outside_the_output(tmp_path):
    victim_dir = tmp_path / "victim_dir"
    (victim_dir / "victim.report").mkdir(parents=True)
    (victim_dir / "victim.report" / "precious.txt").write_text("keep me")
    before = _tree(victim_dir)
    store = _received_store(tmp_path, str(victim_dir / "victim"))
    out = tmp_path / "out"
    rep = _report(store, out)
    assert _tree(victim_dir) == before  # nothing written there, nothing deleted
    assert (victim_dir / "victim.report" / "precious.txt").read_text() == "keep me"
    # named after the store folder, inside the output folder
    assert rep.json_path == out / "received.report.json" and rep.markdown_path == out / "received.report.md"
    assert rep.assets == out / "received.report" and rep.assets.is_dir()
    assert rep.document["slide"]["slide_id"] == "received"
    assert {p.name for p in out.iterdir()} == {"received.report", "received.report.md", "received.report.json"}


def test_cli_report_of_a_received_store_with_a_parent_path_id_stays_in_the_output(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for var in [v for v in os.environ if v.startswith("WSIENGINE_")]:
        monkeypatch.delenv(var)
    (tmp_path / "inbox").mkdir()
    store = _received_store(tmp_path / "inbox", "../../escaped")
    out = tmp_path / "a" / "b"
    assert main(["report", str(store), "-o", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"received.report", "received.report.md", "received.report.json"}
    assert not list(tmp_path.glob("escaped*")) and not list((tmp_path / "a").glob("escaped*"))


@pytest.mark.parametrize("recorded", [
    "..", ".", ".hidden", "a/b", "a\\b", "line\nbreak", "bell\x07", "x" * 300, "", None, 42, ["x"],
], ids=["dotdot", "dot", "hidden", "slash", "backslash", "newline", "control", "long", "empty", "none", "int", "list"])
def test_unsafe_recorded_slide_ids_fall_back_to_the_store_folder_name(tmp_path, recorded):
    store = _received_store(tmp_path, recorded)
    out = tmp_path / "out"
    rep = _report(store, out)
    assert rep.json_path == out / "received.report.json"
    assert {p.name for p in out.iterdir()} == {"received.report", "received.report.md", "received.report.json"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_safe_recorded_slide_id_still_names_the_report(tmp_path):
    store = _received_store(tmp_path, "node-3")
    assert _report(store, tmp_path / "out").json_path == tmp_path / "out" / "node-3.report.json"


def test_an_unsafe_store_folder_name_is_made_one_safe_component(tmp_path):
    store = _received_store(tmp_path, "../x", name=".evil")
    rep = _report(store, tmp_path / "out")
    assert rep.json_path == tmp_path / "out" / "evil.report.json"


def test_an_explicit_slide_id_with_a_folder_is_refused(tmp_path):
    store = _received_store(tmp_path, "fine")
    with pytest.raises(ReportError, match="slide_id"):
        _report(store, tmp_path / "out", slide_id="../x")
    assert not (tmp_path / "x.report.json").exists()


def test_report_never_replaces_a_folder_it_did_not_write(tmp_path):
    store = _received_store(tmp_path, "s")
    out = tmp_path / "out"
    (out / "s.report").mkdir(parents=True)
    (out / "s.report" / "notes.txt").write_text("mine")
    with pytest.raises(ReportError, match="not a report folder wsiengine wrote"):
        _report(store, out)
    assert (out / "s.report" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["s.report"]  # nothing published, no temporaries left


def test_report_never_replaces_a_link_named_like_its_assets(tmp_path):
    store = _received_store(tmp_path, "s")
    out = tmp_path / "out"
    target = tmp_path / "target"
    target.mkdir()
    (target / "thumbnail.png").write_bytes(b"not ours")
    out.mkdir()
    (out / "s.report").symlink_to(target, target_is_directory=True)
    with pytest.raises(ReportError, match="link"):
        _report(store, out)
    assert (out / "s.report").is_symlink() and (target / "thumbnail.png").read_bytes() == b"not ours"


@pytest.fixture(scope="module")
def real_store(tmp_path_factory, cmu_small) -> Path:
    import wsiengine

    return wsiengine.Pipeline(report=False).run(cmu_small, out=tmp_path_factory.mktemp("real")).store


def test_report_replaces_its_own_assets_folder(tmp_path, real_store, cmu_small):
    out = tmp_path / "out"
    first = _report(real_store, out, slide=cmu_small)
    names = sorted(p.name for p in first.assets.iterdir())
    assert {"thumbnail.png", "heatmap.png", "evidence-01.png"} <= set(names)
    (first.assets / "evidence-01.png").write_bytes(b"stale")
    second = _report(real_store, out, slide=cmu_small)  # the engine's own folder is replaced
    assert sorted(p.name for p in second.assets.iterdir()) == names
    assert (second.assets / "evidence-01.png").read_bytes() != b"stale"
    assert sorted(p.name for p in out.iterdir()) == [f"{real_store.stem}.report{x}" for x in ("", ".json", ".md")]


# ---------------------------------------------------------------------------------------------
# 2. slide ids are unique and stable
# ---------------------------------------------------------------------------------------------


def _copy(src: Path, folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(src, folder / name)


def test_slide_ids_do_not_collide_with_a_name_that_looks_like_a_suffix(tmp_path, cmu_small):
    _copy(cmu_small, tmp_path / "s", "x-2.svs", "x.svs", "x.tif")
    entries = discover_slides(tmp_path / "s")
    ids = {e.path.name: e.slide_id for e in entries}
    assert ids == {"x-2.svs": "x-2", "x.svs": "x", "x.tif": "x-tif"}
    assert discover_slides(tmp_path / "s") == entries  # deterministic


def test_slide_ids_stay_the_same_when_files_are_added(tmp_path, cmu_small):
    folder = tmp_path / "s"
    _copy(cmu_small, folder, "x.svs", "x.tif", "b.svs")
    before = {e.path.name: e.slide_id for e in discover_slides(folder)}
    _copy(cmu_small, folder, "x-2.svs", "x-tif.svs", "a.svs", "x.vms")
    after = {e.path.name: e.slide_id for e in discover_slides(folder)}
    assert len(set(after.values())) == len(after)
    assert after["x.svs"] == before["x.svs"] == "x" and after["b.svs"] == before["b.svs"] == "b"
    assert after["x-2.svs"] == "x-2" and after["x-tif.svs"] == "x-tif"
    assert after["x.tif"].startswith("x-tif-")  # its extension id is another slide's name: a path hash
    assert after["x.vms"] == "x-vms"  # a same-named slide later in path order takes its extension


def test_slide_ids_are_unique_ignoring_case(tmp_path, cmu_small):
    folder = tmp_path / "s"
    _copy(cmu_small, folder, "X.svs", "x.svs")
    (folder / "x").mkdir()
    _copy(cmu_small, folder / "x", "y.svs")
    _copy(cmu_small, folder, "x__y.svs")
    ids = [e.slide_id for e in discover_slides(folder)]
    assert len({i.casefold() for i in ids}) == len(ids) == 4


def test_batch_of_colliding_names_gives_one_row_and_one_store_per_slide(tmp_path, cmu_small):
    from wsiengine.batch import run_batch

    _copy(cmu_small, tmp_path / "s", "x-2.svs", "x.svs", "x.tif")
    out = tmp_path / "out"
    summary = run_batch(tmp_path / "s", out, workers=1, report=False, overlay=False)
    rows = {r.slide_id: Path(r.path).name for r in summary.rows}
    assert rows == {"x-2": "x-2.svs", "x": "x.svs", "x-tif": "x.tif"}
    assert sorted(r.slide_id for r in read_summary(out)) == ["x", "x-2", "x-tif"]
    for sid, name in rows.items():
        assert Path(json.loads((out / f"{sid}.zarr" / "zarr.json").read_text())["attributes"]["slide"]["path"]).name \
            == name


# ---------------------------------------------------------------------------------------------
# 3. summary.csv cells are never formulas
# ---------------------------------------------------------------------------------------------


def test_summary_escapes_formula_cells_and_reads_back_the_real_values(tmp_path):
    rows = [SummaryRow("=HYPERLINK(\"http://x\")", "/s/=1+1.svs", "done", label="@SUM(A1)", probability=0.5,
                       n_tiles=3, seconds=1.0),
            SummaryRow("+cmd", "-x.svs", "failed", error="-1+2 went wrong"),
            SummaryRow("\tpad", "'=quoted.svs", "failed", error="\r=x"),
            SummaryRow("plain", "plain.svs", "done", label="'already quoted"),
            SummaryRow("''@two", "a.svs", "skipped")]
    write_summary(ResultsLocation(tmp_path), rows)
    with open(tmp_path / "summary.csv", newline="", encoding="utf-8") as fh:
        raw = list(csv.DictReader(fh))
    for r in raw:
        for name in ("slide_id", "path", "status", "label", "error"):
            assert r[name][:1] not in ("=", "+", "-", "@", "\t", "\r"), (name, r[name])
    assert raw[0]["slide_id"] == "'=HYPERLINK(\"http://x\")" and raw[1]["path"] == "'-x.svs"
    assert raw[3]["slide_id"] == "plain" and raw[3]["label"] == "'already quoted"  # only formula cells change
    assert read_summary(tmp_path) == rows


# ---------------------------------------------------------------------------------------------
# 4. names cannot forge log lines
# ---------------------------------------------------------------------------------------------


def test_a_slide_name_with_a_newline_cannot_forge_batch_log_lines(tmp_path, caplog):
    from wsiengine.batch.run import process_slide
    from wsiengine.config import RunConfig

    bad = tmp_path / "x\nFORGED 12:00 INFO all slides done.svs"
    bad.write_bytes(b"not a slide")
    entry = SlideEntry("x\nFORGED 12:00 INFO all slides done", bad)
    with caplog.at_level(logging.INFO, logger="wsiengine"):
        row = process_slide(entry, str(tmp_path / "out"), RunConfig.load(env={}, report=False))
    assert row.status == "failed"
    messages = [r.getMessage() for r in caplog.records if "FORGED" in r.getMessage()]
    assert messages and all("\n" not in m and "\\n" in m for m in messages)


def test_a_slide_id_with_control_characters_is_escaped_in_pipeline_logs(tmp_path, caplog, cmu_small):
    import wsiengine

    with caplog.at_level(logging.INFO, logger="wsiengine"):
        res = wsiengine.Pipeline(report=False).run(cmu_small, out=tmp_path, slide_id="s\nFORGED\x1b[2J")
    assert res.store.is_dir()
    messages = [r.getMessage() for r in caplog.records if "FORGED" in r.getMessage()]
    assert messages and all("\n" not in m and "\x1b" not in m and "\\x1b" in m for m in messages)


# -- received stores: declared sizes are checked before anything is allocated ---------------


def _edit_attrs(store: Path, **changes) -> None:
    import zarr

    group = zarr.open_group(str(store), mode="r+")
    group.attrs.update(changes)


@pytest.mark.parametrize("grid_change", [{"grid_shape": [1_000_000, 1_000_000]}, {"grid_shape": [-6, 6]},
                                         {"tile_px": 10**9}, {"read_size": [0, 100]}])
def test_a_received_store_declaring_an_absurd_tile_lattice_is_refused_at_open(tmp_path, capsys, grid_change):
    from wsiengine.errors import StoreError
    from wsiengine.store import open_result

    store = _received_store(tmp_path, "x")
    grid = dict(open_result(store).attrs["grid"])
    _edit_attrs(store, grid={**grid, **grid_change})
    with pytest.raises(StoreError, match="damaged metadata"):
        open_result(store)
    for command in (["heatmap", str(store), "-o", str(tmp_path / "h.png")], ["report", str(store), "--quiet"],
                    ["geojson", str(store), "-o", str(tmp_path / "x.geojson")]):
        assert main(command) in (1, 2)
        assert "StoreError" in capsys.readouterr().err


def test_a_received_store_declaring_a_terapixel_thumbnail_is_refused_before_reading_it(tmp_path):
    import zarr

    from wsiengine.errors import StoreError
    from wsiengine.store import open_result

    store = _received_store(tmp_path, "x")
    group = zarr.open_group(str(store), mode="r+")
    group.create_array("thumbnail", shape=(1_000_000, 1_000_000, 3), chunks=(1024, 1024, 3), dtype="uint8")
    with pytest.raises(StoreError, match=r"thumbnail declares shape \(1000000, 1000000, 3\)"):
        open_result(store)
