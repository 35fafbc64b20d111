"""wsiengine.testing.mosaic: pyramidal TIFF slides tiled with real PCam patches, with lesion ground truth."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import wsiengine as we
from wsiengine.testing import (
    PATCH_PX,
    PCAM_MPP,
    MosaicSlide,
    PatchPool,
    load_mosaic_dataset,
    make_mosaic_dataset,
    make_mosaic_slide,
)

from .conftest import shared_file

BACKENDS = ("tifffile", "openslide", "tiffslide")


@pytest.fixture(scope="module")
def pcam_root() -> Path:
    return shared_file("pcam")


@pytest.fixture(scope="module")
def valid_pool(pcam_root) -> PatchPool:
    return PatchPool.from_pcam(pcam_root, "valid")


@pytest.fixture(scope="module")
def slides(tmp_path_factory, valid_pool) -> dict[int, MosaicSlide]:
    """A positive and a negative slide from PCam valid, by label."""
    folder = tmp_path_factory.mktemp("mosaic")
    return {
        1: make_mosaic_slide(folder / "positive.tiff", valid_pool, label=1, seed=7),
        0: make_mosaic_slide(folder / "negative.tiff", valid_pool, label=0, seed=8),
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, valid_pool) -> tuple[Path, list[MosaicSlide]]:
    out = tmp_path_factory.mktemp("mosaic-dataset")
    return out, make_mosaic_dataset(out, valid_pool, 14, positive_fraction=0.6, seed=3, workers=2)


def _source_patch(root: Path, source: str) -> np.ndarray:
    with Image.open(root / source) as im:
        return np.asarray(im.convert("RGB"))


def _level0(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        return tif.pages[0].asarray()


# -- the pool -----------------------------------------------------------------------------------
def test_pool_lists_sorted_patches_of_one_split(valid_pool, pcam_root):
    assert (len(valid_pool.normal), len(valid_pool.tumour)) == (1500, 1500)
    assert list(valid_pool.normal) == sorted(valid_pool.normal)
    assert all(p.parent == pcam_root.resolve() / "valid" / "1" for p in valid_pool.tumour)
    assert "normal=1500" in repr(valid_pool) and len(repr(valid_pool)) < 200


def test_pool_from_missing_split_names_the_path(pcam_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="nosuchsplit"):
        PatchPool.from_pcam(pcam_root, "nosuchsplit")
    (tmp_path / "train" / "0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'train' / '0'} holds no .jpg")):
        PatchPool.from_pcam(tmp_path, "train")
    Image.new("RGB", (PATCH_PX, PATCH_PX)).save(tmp_path / "train" / "0" / "patch0000000.jpg")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "train" / "1"))):
        PatchPool.from_pcam(tmp_path, "train")


# -- one slide ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_slides_open_with_every_backend_at_pcam_mpp_and_cells_hold_their_patch(slides, backend, pcam_root):
    for mosaic in slides.values():
        with we.open_slide(mosaic.path, backend=backend) as slide:
            assert slide.backend_name == backend
            assert slide.mpp == pytest.approx((PCAM_MPP, PCAM_MPP), rel=1e-5)
            assert slide.dimensions == mosaic.dimensions
            assert slide.level_count == 3
            assert slide.level_downsamples == pytest.approx((1, 4, 16))
            for k in np.linspace(0, mosaic.n_cells - 1, 4).astype(int):
                x, y = mosaic.cell_xy[k]
                pixels = slide.read_region((int(x), int(y)), 0, (PATCH_PX, PATCH_PX)).astype(np.int16)
                source = _source_patch(pcam_root, mosaic.cell_source[k]).astype(np.int16)
                assert np.abs(pixels - source).mean() < 6, (backend, mosaic.slide_id, k)


def test_slide_record_matches_the_file(slides):
    positive, negative = slides[1], slides[0]
    assert (positive.label, negative.label) == (1, 0)
    assert positive.slide_id == "positive" and positive.mpp == PCAM_MPP
    for mosaic in slides.values():
        w, h = mosaic.dimensions
        assert w % PATCH_PX == 0 and h % PATCH_PX == 0
        assert mosaic.cell_xy.dtype == np.int64 and mosaic.cell_label.dtype == np.int8
        assert (mosaic.cell_xy % PATCH_PX == 0).all()
        assert (mosaic.cell_xy >= 0).all() and (mosaic.cell_xy[:, 0] < w).all() and (mosaic.cell_xy[:, 1] < h).all()
        assert 190 <= mosaic.n_cells <= 410
        assert mosaic.tissue.area == mosaic.n_cells * PATCH_PX**2
        # glass around the tissue: no cell on the slide's border
        assert mosaic.cell_xy.min() >= 2 * PATCH_PX
        assert (mosaic.cell_xy[:, 0] <= w - 3 * PATCH_PX).all() and (mosaic.cell_xy[:, 1] <= h - 3 * PATCH_PX).all()


def test_glass_is_near_white(slides):
    mosaic = slides[0]
    corner = _level0(mosaic.path)[: PATCH_PX * 2, : PATCH_PX * 2].reshape(-1, 3).astype(np.float64)
    assert np.allclose(corner.mean(0), (240, 240, 238), atol=4)
    assert 0.3 < corner.std(0).mean() < 4


@pytest.mark.parametrize("label", [1, 0])
def test_tissue_grid_at_slide_mpp_coincides_with_cells(slides, label):
    mosaic = slides[label]
    with we.open_slide(mosaic.path) as slide:
        mask = we.detect_tissue(slide)
        grid = we.plan_tiles(slide, mask, target_mpp=slide.mpp[0], tile_px=PATCH_PX)
    assert grid.read_level == 0 and grid.read_size == (PATCH_PX, PATCH_PX) and not grid.resamples
    index = mosaic.cell_index(grid.coords)
    assert (index >= 0).all(), f"tiles off the cells: {grid.coords[index < 0][:5]}"
    kept = len(np.unique(index)) / mosaic.n_cells
    assert kept >= 0.85, f"only {kept:.0%} of cells tiled"
    assert (mosaic.labels_at(grid.coords) == mosaic.cell_label[index]).all()


def test_lesion_polygons_are_the_tumour_cells(slides):
    positive, negative = slides[1], slides[0]
    assert 4 <= positive.n_tumour_cells <= 113
    assert positive.lesions.area == positive.n_tumour_cells * PATCH_PX**2
    assert len(positive.lesions.geoms) == 1  # one connected lesion
    assert positive.tissue.contains(positive.lesions)
    assert (positive.labels_at(positive.cell_xy) == positive.cell_label).all()
    assert (positive.labels_at(positive.cell_xy + 10, tile_px=PATCH_PX - 20) == positive.cell_label).all()
    assert negative.lesions.is_empty and negative.n_tumour_cells == 0
    assert (negative.labels_at(negative.cell_xy) == 0).all()
    assert negative.lesion_geojson() == {"type": "FeatureCollection", "features": []}


def test_lesion_geojson_is_qupath_tumor_annotations(slides):
    positive = slides[1]
    geojson = json.loads(json.dumps(positive.lesion_geojson()))
    assert geojson["type"] == "FeatureCollection" and len(geojson["features"]) == 1
    feature = geojson["features"][0]
    assert feature["properties"]["classification"]["name"] == "Tumor"
    assert feature["properties"]["objectType"] == "annotation"
    import shapely.geometry

    assert shapely.geometry.shape(feature["geometry"]).equals(positive.lesions.geoms[0])


def test_no_patch_repeats_within_a_slide_and_labels_match_sources(slides):
    for mosaic in slides.values():
        assert len(set(mosaic.cell_source)) == mosaic.n_cells
        folders = {src.rsplit("/", 1)[0] for src in mosaic.cell_source}
        assert folders <= {"valid/0", "valid/1"}
        assert all(src.startswith(f"valid/{lab}/") for src, lab in zip(mosaic.cell_source, mosaic.cell_label))


def test_same_seed_same_slide(slides, valid_pool, tmp_path):
    again = make_mosaic_slide(tmp_path / "again.tiff", valid_pool, label=1, seed=7)
    first = slides[1]
    assert again.cell_source == first.cell_source
    assert np.array_equal(again.cell_xy, first.cell_xy) and again.dimensions == first.dimensions
    assert np.array_equal(_level0(again.path), _level0(first.path))
    other = make_mosaic_slide(tmp_path / "other.tiff", valid_pool, label=1, seed=9, n_tissue_cells=(100, 120))
    assert other.cell_source != first.cell_source


def test_splits_draw_from_their_own_pool(pcam_root, slides, tmp_path):
    test_pool = PatchPool.from_pcam(pcam_root, "test")
    mosaic = make_mosaic_slide(tmp_path / "t.tiff", test_pool, label=1, seed=7, n_tissue_cells=(100, 120))
    assert all(src.startswith("test/") for src in mosaic.cell_source)
    valid_files = {pcam_root / src for m in slides.values() for src in m.cell_source}
    assert not valid_files & {pcam_root / src for src in mosaic.cell_source}


def test_pool_too_small_for_a_slide_is_an_error(valid_pool, tmp_path):
    pool = PatchPool(normal=valid_pool.normal[:40], tumour=valid_pool.tumour[:8], root=valid_pool.root, split="valid")
    with pytest.raises(ValueError, match="distinct patches"):
        make_mosaic_slide(tmp_path / "big.tiff", pool, label=0, seed=1, n_tissue_cells=(60, 60), min_stained=0.0)


# -- datasets -----------------------------------------------------------------------------------
def test_dataset_files_and_labels(dataset):
    out, mosaics = dataset
    assert [m.slide_id for m in mosaics] == [f"mosaic-{i:03d}" for i in range(14)]
    assert sum(m.label for m in mosaics) == round(14 * 0.6)
    with open(out / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["slide_id"], int(r["label"])) for r in rows] == [(m.slide_id, m.label) for m in mosaics]
    for m in mosaics:
        assert m.path == out / f"{m.slide_id}.tiff" and m.path.is_file()
        geojson = out / f"{m.slide_id}.lesions.geojson"
        assert geojson.is_file() == bool(m.label)
        if m.label:
            assert json.loads(geojson.read_text()) == json.loads(json.dumps(m.lesion_geojson()))
    assert not list(out.glob(".*tmp"))
    labels = [m.label for m in mosaics]
    assert labels != sorted(labels) and labels != sorted(labels, reverse=True)  # shuffled


def test_dataset_lesion_sizes_vary_widely(dataset):
    _, mosaics = dataset
    sizes = [m.n_tumour_cells for m in mosaics if m.label]
    assert min(sizes) >= 1 and max(sizes) >= 4 * min(sizes), sizes
    assert all(m.n_tumour_cells == 0 for m in mosaics if not m.label)


def test_dataset_reads_back(dataset):
    out, mosaics = dataset
    loaded = load_mosaic_dataset(out)
    assert len(loaded) == len(mosaics)
    for a, b in zip(loaded, mosaics):
        assert (a.slide_id, a.label, a.dimensions, a.seed, a.level_downsamples) == (b.slide_id, b.label, b.dimensions, b.seed, b.level_downsamples)
        assert a.mpp == pytest.approx(b.mpp)
        assert np.array_equal(a.cell_xy, b.cell_xy) and np.array_equal(a.cell_label, b.cell_label)
        assert a.cell_source == b.cell_source
        assert a.lesions.area == b.lesions.area and (a.lesions.is_empty or a.lesions.equals(b.lesions))


def test_dataset_is_deterministic(valid_pool, tmp_path):
    options = dict(positive_fraction=0.5, seed=5, n_tissue_cells=(60, 80), lesion_cells=(2, 20))
    first = make_mosaic_dataset(tmp_path / "a", valid_pool, 4, workers=2, **options)
    again = make_mosaic_dataset(tmp_path / "b", valid_pool, 4, workers=1, **options)
    assert [m.label for m in first] == [m.label for m in again]
    for a, b in zip(first, again):
        assert a.cell_source == b.cell_source and np.array_equal(a.cell_xy, b.cell_xy)
        assert np.array_equal(_level0(a.path), _level0(b.path))
    assert (tmp_path / "a" / "cells.csv").read_bytes() == (tmp_path / "b" / "cells.csv").read_bytes()
    other = make_mosaic_dataset(tmp_path / "c", valid_pool, 4, workers=2, **{**options, "seed": 6})
    assert [m.cell_source for m in other] != [m.cell_source for m in first]


def test_dataset_draws_the_pool_without_replacement_before_reusing(valid_pool, tmp_path):
    pool = PatchPool(normal=valid_pool.normal[:150], tumour=valid_pool.tumour[:40], root=valid_pool.root, split="valid")
    mosaics = make_mosaic_dataset(tmp_path, pool, 4, positive_fraction=0.0, seed=0, n_tissue_cells=(60, 70),
                                  regions=(1, 2), min_stained=0.0)
    used = [m.cell_source for m in mosaics]
    counts = np.cumsum([len(u) for u in used])
    for u in used:
        assert len(set(u)) == len(u)
    first_cycle = [s for u in used for s in u][:150]
    assert len(set(first_cycle)) == 150  # every patch once before any repeats
    assert counts[-1] > 150


def test_dataset_rejects_bad_options(valid_pool, tmp_path):
    with pytest.raises(TypeError, match="unknown slide options"):
        make_mosaic_dataset(tmp_path, valid_pool, 1, lesion_size=3)
    with pytest.raises(ValueError, match="lesion_cells"):
        make_mosaic_dataset(tmp_path, valid_pool, 1, lesion_cells=(0, 5))
