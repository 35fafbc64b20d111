"""TileGrid planning: bounds, order, tissue fraction, ROI, level choice."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import shapely
from shapely.geometry import box

from wsiengine import TilingConfig, detect_tissue, errors, open_slide, plan_tiles
from wsiengine.tiling import tissue_fractions
from wsiengine.tissue import TissueMask, mask_to_polygons


@pytest.fixture(scope="module")
def cmu(cmu_small):
    return open_slide(cmu_small)


@pytest.fixture(scope="module")
def cmu_mask(cmu):
    return detect_tissue(cmu)


def test_grid_is_in_bounds_row_major_and_deterministic(cmu, cmu_mask):
    grid = plan_tiles(cmu, cmu_mask, target_mpp=0.5, tile_px=224)
    assert len(grid) > 50
    w, h = cmu.dimensions
    boxes = grid.boxes()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    order = np.lexsort((grid.coords[:, 0], grid.coords[:, 1]))
    np.testing.assert_array_equal(order, np.arange(len(grid)))
    again = plan_tiles(cmu, cmu_mask, target_mpp=0.5, tile_px=224)
    np.testing.assert_array_equal(grid.coords, again.coords)
    assert grid.coords.dtype == np.int64 and grid.coords.shape == (len(grid), 2)
    assert grid.read_level == 0 and grid.read_size == (224, 224) and not grid.resamples


def test_tissue_fraction_matches_the_mask(cmu, cmu_mask):
    grid = plan_tiles(cmu, cmu_mask, min_tissue=0.0)
    assert (grid.tissue_fraction > 0).all()
    sx, sy = cmu_mask.level0_per_mask_px
    for i in range(0, len(grid), max(1, len(grid) // 25)):
        x, y = grid.coords[i]
        x0, y0 = int(np.floor(x / sx + 0.5)), int(np.floor(y / sy + 0.5))
        x1 = int(np.floor((x + grid.tile_size_level0[0]) / sx + 0.5))
        y1 = int(np.floor((y + grid.tile_size_level0[1]) / sy + 0.5))
        expected = cmu_mask.raster[y0:y1, x0:x1].mean()
        assert grid.tissue_fraction[i] == pytest.approx(expected, abs=1e-6)
    strict = plan_tiles(cmu, cmu_mask, min_tissue=0.9)
    assert len(strict) < len(grid) and (strict.tissue_fraction >= 0.9).all()


def test_overlap_sets_the_stride(cmu):
    plain = plan_tiles(cmu, None, tile_px=224, overlap_px=0, min_tissue=0)
    overlapped = plan_tiles(cmu, None, tile_px=224, overlap_px=112, min_tissue=0)
    assert plain.stride_level_px == (224, 224) and overlapped.stride_level_px == (112, 112)
    assert plain.grid_shape == ((2967 - 224) // 224 + 1, (2220 - 224) // 224 + 1)
    assert len(overlapped) == ((2967 - 224) // 112 + 1) * ((2220 - 224) // 112 + 1)
    assert (plain.tissue_fraction == 1).all()


def test_coarser_target_reads_more_and_resamples_once(cmu):
    grid = plan_tiles(cmu, None, target_mpp=1.0, tile_px=224, min_tissue=0)
    assert grid.read_level == 0
    assert grid.read_size == (round(224 * 1.0 / 0.499),) * 2 and grid.resamples
    assert grid.tile_size_level0[0] == pytest.approx(449)


def test_pyramid_level_is_used_when_it_resolves_the_target(no_mpp_slide):
    slide = open_slide(no_mpp_slide, mpp=0.25)
    grid = plan_tiles(slide, None, target_mpp=0.5, tile_px=224, min_tissue=0)
    assert grid.read_level == 1 and grid.read_size == (224, 224)
    lw, lh = slide.level_dimensions[1]
    assert grid.grid_shape == ((lh - 224) // 224 + 1, (lw - 224) // 224 + 1)
    assert (grid.boxes()[:, 2] <= slide.dimensions[0]).all()


def test_target_finer_than_level0_is_refused(cmu):
    with pytest.raises(errors.ResolutionError):
        plan_tiles(cmu, None, target_mpp=0.25)
    grid = plan_tiles(cmu, None, config=TilingConfig(target_mpp=0.25, allow_upsample=True), min_tissue=0)
    assert grid.read_size == (112, 112)


def test_roi_include_and_exclude_by_tile_centre(cmu):
    full = plan_tiles(cmu, None, min_tissue=0)
    include = box(0, 0, 1100, 1500)
    exclude = box(0, 0, 500, 500)
    grid = plan_tiles(cmu, None, min_tissue=0, include=include, exclude=exclude)
    centres = grid.centres()
    assert shapely.contains_xy(include, centres[:, 0], centres[:, 1]).all()
    assert not shapely.contains_xy(exclude, centres[:, 0], centres[:, 1]).any()
    all_centres = full.centres()
    expected = shapely.contains_xy(include, *all_centres.T) & ~shapely.contains_xy(exclude, *all_centres.T)
    assert len(grid) == int(expected.sum()) > 0


def test_empty_mask_gives_an_empty_grid_or_raises(cmu, caplog):
    raster = np.zeros((50, 40), bool)
    empty = TissueMask(raster, (8.0, 8.0), (2220 / 40, 2967 / 50), mask_to_polygons(raster), (2220, 2967))
    with caplog.at_level(logging.WARNING, logger="wsiengine"):
        grid = plan_tiles(cmu, empty)
    assert len(grid) == 0 and grid.coords.shape == (0, 2)
    assert "no tile" in caplog.text
    with pytest.raises(errors.NoTissueError):
        plan_tiles(cmu, empty, config=TilingConfig(on_no_tiles="raise"))


def test_tissue_fractions_of_known_boxes():
    raster = np.zeros((10, 10), bool)
    raster[2:6, 2:6] = True
    mask = TissueMask(raster, (8.0, 8.0), (10.0, 10.0), mask_to_polygons(raster, (10.0, 10.0)), (100, 100))
    coords = np.array([[20, 20], [0, 0], [60, 60], [30, 30]])
    np.testing.assert_allclose(tissue_fractions(mask, coords, (40.0, 40.0)), [1.0, 0.25, 0.0, 0.5625])
