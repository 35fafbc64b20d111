"""Heatmaps: tile values -> stride-lattice raster -> multiscale Zarr (OME-NGFF) and PNG overlays."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import zarr
from PIL import Image

from wsiengine import detect_tissue, open_slide, plan_tiles
from wsiengine.errors import ConfigError, StoreError
from wsiengine.heatmap import (
    COLORMAPS,
    HeatmapRaster,
    colormap,
    downsample_nanmean,
    list_heatmaps,
    read_heatmap,
    render_overlay,
    save_overlay_png,
    tile_raster,
    write_heatmap,
)
from wsiengine.testing import make_pyramidal_slide
from wsiengine.tiling import TileGrid

from .conftest import require_tissue_source


def hand_grid(index, grid_shape, *, tile: int = 8, stride: int = 8, level0_per_px: float = 1.0) -> TileGrid:
    """A TileGrid on a lattice of ``stride`` px with tiles of ``tile`` px at ``grid_index`` (row, col)."""
    index = np.asarray(index, np.int64).reshape(-1, 2)
    n = len(index)
    coords = np.round(index[:, ::-1] * stride * level0_per_px).astype(np.int64)
    rows, cols = grid_shape
    return TileGrid(coords=coords, tissue_fraction=np.ones(n, np.float32), grid_index=index, grid_shape=(rows, cols),
                    target_mpp=1.0, tile_px=tile, overlap_px=tile - stride, read_level=0, read_size=(tile, tile),
                    stride_level_px=(stride, stride), tile_size_level0=(tile * level0_per_px, tile * level0_per_px),
                    slide_dimensions=(int((cols - 1) * stride + tile), int((rows - 1) * stride + tile)), slide_mpp=(0.5, 0.5))


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A 2048x1536 pyramidal TIFF at 1 µm/px (levels 1, 4) with real H&E texture on glass."""
    require_tissue_source()
    s = make_pyramidal_slide(tmp_path_factory.mktemp("slide") / "s.tiff", width=2048, height=1536, mpp=1.0, levels=(1, 4), seed=1)
    with open_slide(s.path) as sl:
        yield sl


@pytest.fixture(scope="module")
def mask(slide):
    return detect_tissue(slide)


@pytest.fixture(scope="module")
def grid(slide, mask):
    """Tiles of 32 px at 4 µm/px, read from level 1: 128 level-0 px, no overlap."""
    g = plan_tiles(slide, mask, target_mpp=4.0, tile_px=32, overlap_px=0, min_tissue=0.25)
    assert g.read_level == 1 and g.stride_level0 == (128.0, 128.0) and len(g) > 10
    return g


def store(tmp_path):
    return zarr.open_group(str(tmp_path / "r.zarr"), mode="w", zarr_format=3)


# -- scattering -------------------------------------------------------------------------------


def test_known_tile_value_lands_at_its_level0_position(tmp_path, grid):
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 1, len(grid))
    group = store(tmp_path)
    write_heatmap(group, "tile_scores", tile_raster(grid, values), min_size=2)
    level0, level1 = read_heatmap(group, "tile_scores", 0), read_heatmap(group, "tile_scores", 1)
    datasets = dict(group["heatmaps/tile_scores"].attrs)["multiscales"][0]["datasets"]

    for i in (0, len(grid) // 2, len(grid) - 1):
        cx, cy = grid.centres()[i]
        # level 0: the pixel-corner transform's inverse puts the tile centre in the tile's cell, holding its value
        col, row, _ = np.floor(np.linalg.inv(level0.transform()) @ [cx, cy, 1.0]).astype(int)
        assert (row, col) == tuple(grid.grid_index[i])
        assert level0.values[row, col] == np.float32(values[i])
        assert np.allclose(level0.transform() @ [col, row, 1.0], [*grid.coords[i], 1.0])  # cell corner = tile corner
        # level 1: the 2x2 parent, the NaN-aware mean of its children
        col1, row1, _ = np.floor(np.linalg.inv(level1.transform()) @ [cx, cy, 1.0]).astype(int)
        assert (row1, col1) == (row // 2, col // 2)
        children = level0.values[2 * row1:2 * row1 + 2, 2 * col1:2 * col1 + 2]
        assert level1.values[row1, col1] == pytest.approx(float(np.nanmean(children)), rel=1e-6)
        # the NGFF transforms (pixel-centre convention, level-0 pixel centres) give the same pixels
        for k, (r_k, c_k) in enumerate([(row, col), (row1, col1)]):
            scale = dict((t["type"], t) for t in datasets[k]["coordinateTransformations"])["scale"]["scale"]
            trans = dict((t["type"], t) for t in datasets[k]["coordinateTransformations"])["translation"]["translation"]
            assert scale == [128.0 * 2**k, 128.0 * 2**k]
            assert trans == [scale[0] / 2 - 0.5, scale[1] / 2 - 0.5]
            idx = np.round((np.array([cy, cx]) - 0.5 - np.array(trans)) / np.array(scale) - 1e-9).astype(int)
            assert tuple(idx) == (r_k, c_k)


def test_overlapping_tiles_are_averaged_in_the_cells_they_share(slide, mask):
    grid = plan_tiles(slide, mask, target_mpp=4.0, tile_px=32, overlap_px=8, min_tissue=0.25)
    assert grid.stride_level_px == (24, 24)  # 32-px tiles every 24 px: each covers 2x2 cells
    values = np.random.default_rng(1).uniform(0, 1, len(grid))
    raster = tile_raster(grid, values)

    # Expected, from geometry alone: a cell holds the mean of every tile whose level-0 box overlaps it.
    sx, sy = raster.cell_size_level0
    total, count = np.zeros(raster.shape), np.zeros(raster.shape)
    for (x0, y0, x1, y1), v in zip(grid.boxes(), values):
        for r in range(int(y0 // sy), min(raster.shape[0], int(np.ceil(y1 / sy)))):
            for c in range(int(x0 // sx), min(raster.shape[1], int(np.ceil(x1 / sx)))):
                total[r, c] += v
                count[r, c] += 1
    expected = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    np.testing.assert_allclose(raster.values, expected, rtol=1e-6)
    assert (count > 1).sum() > 0  # some cells really are shared


def test_overlap_mean_on_a_hand_made_grid():
    # four 8-px tiles every 4 px: cell (1, 1) is covered by all four, edges by two, corners by one
    grid = hand_grid([(0, 0), (0, 1), (1, 0), (1, 1)], (2, 2), tile=8, stride=4)
    raster = tile_raster(grid, np.array([1.0, 2.0, 3.0, 6.0]))
    assert raster.shape == (2, 2)  # the lattice of the grid (2x2 strides)
    np.testing.assert_allclose(raster.values, [[1.0, 1.5], [2.0, 3.0]])
    grid3 = hand_grid([(0, 0), (0, 1), (1, 0), (1, 1)], (3, 3), tile=8, stride=4)
    np.testing.assert_allclose(tile_raster(grid3, np.array([1.0, 2.0, 3.0, 6.0])).values,
                               [[1.0, 1.5, 2.0], [2.0, 3.0, 4.0], [3.0, 4.5, 6.0]])


def test_tissue_free_cells_are_nan(grid, mask):
    raster = tile_raster(grid, np.full(len(grid), 0.7))
    assert raster.shape == grid.grid_shape
    covered = np.zeros(grid.grid_shape, bool)
    covered[grid.grid_index[:, 0], grid.grid_index[:, 1]] = True
    assert np.isnan(raster.values[~covered]).all() and (~covered).sum() > 0
    np.testing.assert_allclose(raster.values[covered], 0.7)
    # NaN cells are the ones without tissue: their level-0 centre is (mostly) glass in the mask
    rows, cols = np.nonzero(~covered)
    mx = ((cols + 0.5) * raster.cell_size_level0[0] / mask.level0_per_mask_px[0]).astype(int)
    my = ((rows + 0.5) * raster.cell_size_level0[1] / mask.level0_per_mask_px[1]).astype(int)
    inside = (my < mask.raster.shape[0]) & (mx < mask.raster.shape[1])
    assert mask.raster[my[inside], mx[inside]].mean() < 0.25


def test_nan_tiles_raise_or_are_left_out():
    grid = hand_grid([(0, 0), (0, 1)], (1, 2))
    with pytest.raises(ConfigError, match="NaN or infinite.*nan='ignore'"):
        tile_raster(grid, np.array([1.0, np.nan]))
    raster = tile_raster(grid, np.array([1.0, np.inf]), nan="ignore")
    assert raster.values[0, 0] == 1.0 and np.isnan(raster.values[0, 1])


def test_values_of_the_wrong_length_or_kind_are_refused():
    grid = hand_grid([(0, 0), (0, 1)], (1, 2))
    with pytest.raises(ConfigError, match=r"shape \(3,\), expected \(2,\)"):
        tile_raster(grid, np.zeros(3))
    with pytest.raises(ConfigError, match="expected"):
        tile_raster(grid, np.zeros((2, 3)))
    with pytest.raises(ConfigError, match="real numbers"):
        tile_raster(grid, np.array(["a", "b"]))
    with pytest.raises(ConfigError, match="nan must be"):
        tile_raster(grid, np.zeros(2), nan="zero")
    bad = hand_grid([(0, 0), (0, 5)], (1, 2))
    with pytest.raises(ConfigError, match="outside grid_shape"):
        tile_raster(bad, np.zeros(2))
    with pytest.raises(ConfigError, match="2-D"):
        HeatmapRaster(np.zeros(4), (1.0, 1.0))
    with pytest.raises(ConfigError, match="cell_size_level0"):
        HeatmapRaster(np.zeros((2, 2)), (0.0, 1.0))


def test_a_million_tiles_scatter_quickly():
    import time

    side = 1000
    r, c = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    grid = hand_grid(np.column_stack([r.ravel(), c.ravel()]), (side, side), tile=16, stride=8)
    values = (r + c).ravel().astype(np.float64)
    start = time.perf_counter()
    raster = tile_raster(grid, values)
    assert time.perf_counter() - start < 10.0
    # interior cell (i, j) averages tiles (i-1..i, j-1..j): mean of (i+j) - 1 over the four
    assert raster.values[500, 700] == pytest.approx(1199.0)
    assert raster.values[0, 0] == 0.0


# -- pyramid and metadata -------------------------------------------------------------------


def test_nan_aware_downsampling_on_a_hand_made_example():
    nan = np.nan
    a = np.array([[1.0, 3.0, nan],
                  [nan, 5.0, 7.0],
                  [nan, nan, 2.0]])
    out = downsample_nanmean(a)
    assert out.dtype == np.float32 and out.shape == (2, 2)
    np.testing.assert_allclose(out, [[3.0, 7.0], [nan, 2.0]])


def test_pyramid_halves_until_both_sides_fit_min_size(tmp_path):
    values = np.arange(100 * 40, dtype=np.float32).reshape(100, 40)
    values[:10] = np.nan
    group = store(tmp_path)
    write_heatmap(group, "v", HeatmapRaster(values, (224.0, 224.0)), min_size=16, chunks=32)
    hm = group["heatmaps/v"]
    assert [hm[str(k)].shape for k in range(4)] == [(100, 40), (50, 20), (25, 10), (13, 5)]
    assert "4" not in hm
    np.testing.assert_array_equal(hm["1"][...], downsample_nanmean(values))
    np.testing.assert_array_equal(hm["3"][...], downsample_nanmean(downsample_nanmean(downsample_nanmean(values))))
    assert hm["0"].chunks == (32, 32)
    assert np.isnan(hm["2"][0, 0]) and np.isfinite(hm["2"][-1, -1])


def test_ome_ngff_metadata_is_valid_and_round_trips(tmp_path):
    rng = np.random.default_rng(2)
    values = rng.uniform(0, 1, (70, 50)).astype(np.float32)
    values[rng.uniform(size=values.shape) < 0.3] = np.nan
    raster = HeatmapRaster(values, cell_size_level0=(96.0, 112.0), origin_level0=(16.0, 8.0), slide_mpp=(0.25, 0.26))
    group = store(tmp_path)
    write_heatmap(group, "attention", raster, min_size=9, attrs={"description": "ABMIL attention"})
    write_heatmap(group, "tile_scores", raster, min_size=64)

    assert list_heatmaps(group) == ["attention", "tile_scores"]
    reopened = zarr.open_group(str(tmp_path / "r.zarr"), mode="r")
    hm = reopened["heatmaps/attention"]
    attrs = json.loads(json.dumps(dict(hm.attrs)))  # JSON-clean: no NaN, no numpy types
    (ms,) = attrs["multiscales"]
    assert ms["version"] == "0.4" and ms["name"] == "attention"
    assert ms["axes"] == [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    paths = [d["path"] for d in ms["datasets"]]
    assert paths == ["0", "1", "2", "3"]  # 70x50 -> 35x25 -> 18x13 -> 9x7
    arrays = {name for name, _ in hm.arrays()}
    assert set(paths) == arrays
    for k, d in enumerate(ms["datasets"]):
        arr = hm[d["path"]]
        assert arr.dtype == np.float32 and np.isnan(arr.fill_value)
        assert [t["type"] for t in d["coordinateTransformations"]] == ["scale", "translation"]
        scale, trans = (t[t["type"]] for t in d["coordinateTransformations"])
        assert scale == [112.0 * 2**k, 96.0 * 2**k]  # (y, x)
        assert trans == [8.0 + scale[0] / 2 - 0.5, 16.0 + scale[1] / 2 - 0.5]
    assert attrs["ome"]["version"] == "0.5" and attrs["ome"]["multiscales"][0]["datasets"] == ms["datasets"]
    meta = attrs["wsiengine"]
    assert meta["unit"] == "level-0 pixel" and meta["value"] == "attention"
    assert meta["slide_mpp"] == [0.25, 0.26]
    assert meta["transform_level0"] == raster.transform().tolist()
    assert meta["range"] == [float(np.nanmin(values)), float(np.nanmax(values))]
    assert attrs["description"] == "ABMIL attention"

    back = read_heatmap(tmp_path / "r.zarr", "attention")  # a path works too
    np.testing.assert_array_equal(back.values, values)
    assert back.cell_size_level0 == raster.cell_size_level0
    assert back.origin_level0 == raster.origin_level0
    assert back.slide_mpp == raster.slide_mpp
    coarse = read_heatmap(reopened, "attention", 2)
    assert coarse.cell_size_level0 == (384.0, 448.0) and coarse.origin_level0 == (16.0, 8.0)
    # a coarse pixel covers exactly its children's level-0 area
    assert np.allclose(coarse.transform() @ [1, 1, 1], back.transform() @ [4, 4, 1])


def test_rewriting_a_heatmap_replaces_it_and_errors_are_clear(tmp_path):
    group = store(tmp_path)
    write_heatmap(group, "s", HeatmapRaster(np.zeros((200, 200)), (1.0, 1.0)))
    write_heatmap(group, "s", HeatmapRaster(np.full((4, 4), np.nan), (1.0, 1.0)))
    hm = group["heatmaps/s"]
    assert sorted(n for n, _ in hm.arrays()) == ["0"] and hm["0"].shape == (4, 4)
    assert dict(hm.attrs)["wsiengine"]["range"] == [None, None]  # all NaN
    with pytest.raises(StoreError, match="no heatmap named 'x'.*'s'"):
        read_heatmap(group, "x")
    with pytest.raises(ConfigError, match="levels 0..0"):
        read_heatmap(group, "s", level=1)
    with pytest.raises(ConfigError, match="may not set"):
        write_heatmap(group, "t", HeatmapRaster(np.zeros((2, 2)), (1.0, 1.0)), attrs={"multiscales": []})
    with pytest.raises(ConfigError, match="name"):
        write_heatmap(group, "a/b", HeatmapRaster(np.zeros((2, 2)), (1.0, 1.0)))
    assert list_heatmaps(zarr.open_group(str(tmp_path / "empty.zarr"), mode="w", zarr_format=3)) == []


# -- colour maps and overlays ---------------------------------------------------------------


def test_colormaps_are_256_rgb_luts_with_the_right_ends():
    for name in COLORMAPS:
        lut = colormap(name)
        assert lut.shape == (256, 3) and lut.dtype == np.uint8
        np.testing.assert_array_equal(colormap(name + "_r"), lut[::-1])
    turbo = colormap("turbo")
    assert tuple(turbo[0]) == (35, 23, 27) and tuple(turbo[255]) == (144, 13, 0)  # Google's polynomial at 0 and 1
    assert turbo[30, 2] > turbo[30, 0]  # blue low, green middle, red high
    assert turbo[128, 1] == turbo[128].max()
    assert turbo[215, 0] == turbo[215].max()
    assert tuple(colormap("viridis")[0]) == (0x44, 0x01, 0x54) and tuple(colormap("viridis")[255]) == (0xFD, 0xE7, 0x25)
    assert tuple(colormap("inferno")[0]) == (0, 0, 4) and tuple(colormap("inferno")[255]) == (0xFC, 0xFF, 0xA4)
    assert colormap()[128].tolist() == turbo[128].tolist()
    with pytest.raises(ConfigError, match="unknown colormap 'jet'"):
        colormap("jet")


def test_overlay_colours_the_heatmap_keeps_nan_areas_and_adds_a_colour_bar():
    thumb = np.full((80, 100, 3), 200, np.uint8)
    thumb[:, ::7] = 120  # some texture
    values = np.zeros((4, 5), np.float32)  # 80 level-0 px cells: 320 x 400 level-0 px = 4x the thumbnail
    values[:, 3:] = 1.0
    values[0, :] = np.nan
    raster = HeatmapRaster(values, (80.0, 80.0))
    out = render_overlay(thumb, 4.0, raster, vmin=0.0, vmax=1.0, cmap="turbo", alpha=0.5, label="tumour probability")
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.shape[1] > 100 and out.shape[0] >= 80
    body = out[:80, :100].astype(int)
    np.testing.assert_array_equal(body[:20], thumb[:20])  # NaN row: the thumbnail untouched
    lut = colormap("turbo").astype(float)
    np.testing.assert_allclose(body[40, 1], np.round(0.5 * 200 + 0.5 * lut[0]), atol=1)
    np.testing.assert_allclose(body[40, 90], np.round(0.5 * 200 + 0.5 * lut[255]), atol=1)
    assert np.abs(body[40, 90] - body[40, 1]).sum() > 60  # high values look different
    # the cells end where the level-0 geometry says: column 3 starts at level-0 x 240 = thumbnail x 60
    assert (body[40, 59] == body[40, 1]).all() and (body[40, 60] == body[40, 90]).all()
    margin = out[:, 100:]
    assert (margin != 255).any(axis=2).sum() > 200  # the bar and its ticks are drawn
    pixels = margin.reshape(-1, 3).astype(int)
    for entry in (0, 128, 255):  # the ramp runs through the whole colour map
        assert np.abs(pixels - lut[entry]).sum(axis=1).min() <= 40


def test_overlay_on_a_real_thumbnail(slide, grid, tmp_path):
    values = np.linspace(0, 1, len(grid))
    raster = tile_raster(grid, values)
    thumb, thumb_mpp = slide.thumbnail(16.0)
    ds = (thumb_mpp[0] / slide.mpp[0], thumb_mpp[1] / slide.mpp[1])
    out = render_overlay(thumb, ds, raster, vmin=None, vmax=None, cmap="viridis", alpha=0.6, label="attention")
    h, w = thumb.shape[:2]
    assert out.shape[1] > w
    # where the raster is NaN (no tile), the thumbnail shows through unchanged
    ys, xs = (np.arange(h) + 0.5) * ds[1], (np.arange(w) + 0.5) * ds[0]
    rows, cols = np.broadcast_arrays(*raster.index_at(xs[None, :], ys[:, None]))
    inside = (rows < raster.shape[0]) & (cols < raster.shape[1])
    nan = np.ones((h, w), bool)
    nan[inside] = np.isnan(raster.values[rows[inside], cols[inside]])
    assert nan.any() and (~nan).any()
    np.testing.assert_array_equal(out[:h, :w][nan], thumb[nan])
    assert (out[:h, :w][~nan] != thumb[~nan]).any(axis=1).mean() > 0.9
    path = save_overlay_png(tmp_path / "x.heatmap.png", out)
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), out)


def test_overlay_rejects_bad_options():
    raster = HeatmapRaster(np.zeros((2, 2)), (8.0, 8.0))
    thumb = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ConfigError, match="vmin must be below vmax"):
        render_overlay(thumb, 4.0, raster, vmin=1.0, vmax=1.0)
    with pytest.raises(ConfigError, match="alpha"):
        render_overlay(thumb, 4.0, raster, alpha=1.5)
    with pytest.raises(ConfigError, match="thumbnail_downsample"):
        render_overlay(thumb, 0.0, raster)
    with pytest.raises(ConfigError, match="uint8"):
        render_overlay(thumb.astype(np.float32), 4.0, raster)
    with pytest.raises(ConfigError, match="unknown colormap"):
        render_overlay(thumb, 4.0, raster, cmap="nope")
    # a tiny thumbnail still gets a readable colour bar (the canvas grows downwards)
    out = render_overlay(thumb, 4.0, raster, label="x")
    assert out.shape[0] > 4 and out.shape[1] > 4
    np.testing.assert_array_equal(out[4:, :4], 255)


def test_png_is_written_atomically(tmp_path, monkeypatch):
    image = np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    path = save_overlay_png(tmp_path / "out" / "s.heatmap.png", image)
    assert path == tmp_path / "out" / "s.heatmap.png"
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
    assert os.listdir(path.parent) == ["s.heatmap.png"]

    # a failure while writing leaves the previous file intact and no temporary behind
    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_overlay_png(path, np.zeros((5, 5, 3), np.uint8))
    monkeypatch.undo()
    assert os.listdir(path.parent) == ["s.heatmap.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
    with pytest.raises(ConfigError, match="uint8"):
        save_overlay_png(tmp_path / "bad.png", image.astype(np.float64))
    assert not (tmp_path / "bad.png").exists()
