"""Numba kernels: each against a plain NumPy / SciPy / scikit-image reference, and the tissue
pipeline against the reference pipeline and on real pen, glass and tissue images."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu as sk_threshold_otsu
from skimage.measure import label as sk_label

from wsiengine import kernels
from wsiengine.kernels import (
    TissueSegmentParams,
    bin_centers,
    binary_closing,
    binary_dilation,
    binary_erosion,
    binary_opening,
    box_mean,
    box_sum,
    fill_holes,
    glass_mask,
    histogram,
    integral_image,
    label_components,
    pen_mask,
    remove_small_objects,
    rgb_to_optical_density,
    rgb_to_saturation,
    segment_tissue,
    segment_tissue_detailed,
    threshold_otsu,
)

from . import _reference_tissue as ref
from .conftest import SAMPLE_REGIONS, SAMPLE_SLIDE, data_file, data_params, missing_reason, sample_region

PEN_IMAGES = [
    "histolab/pen-images/tcga-green-pen.png",
    "histolab/pen-images/tcga-red-pen.png",
    "histolab/pen-images/wsi-blue-pen.png",
    "histolab/pen-images/diagnostic-slide-thumb-rgb.png",
    "histolab/tiles/high-nuclei-score-red-pen-level1.png",
    "histolab/tiles/medium-nuclei-score-green-pen-level1.png",
    "histolab/tiles/no-tissue-green-pen.png",
    "histolab/tiles/no-tissue-red-pen.png",
    "histolab/tiles/very-low-nuclei-score-red-pen-level1.png",
]
#: H&E without pen.
CLEAN_HE = [
    "histolab/pen-images/tcga-lung-rgb.png",
    "histolab/tiles/tissue-level0-4302-10273-4814-10785.png",
    "histolab/tiles/tissue-level0-7352-11762-7864-12274.png",
    "histolab/tiles/tissue-level2-1784-6289-5880-10386.png",
    "histolab/tiles/tissue-level2-3000-7666-7096-11763.png",
    "histolab/tiles/tissue-level2-4640-4649-8736-8746.png",
    "histolab/tiles/tissue-level2-4760-5241-8856-9338.png",
    "histolab/tiles/high-nuclei-score-level0.png",
    "histolab/tiles/high-nuclei-score-level2.png",
    "histolab/tiles/medium-nuclei-score-level0.png",
    "histolab/tiles/medium-nuclei-score-level1.png",
    "histolab/tiles/medium-nuclei-score-level1-2.png",
    "histolab/tiles/medium-nuclei-score-level2.png",
    "histolab/tiles/low-nuclei-score-level0.png",
    "histolab/tiles/low-nuclei-score-level1.png",
    "histolab/tiles/very-low-nuclei-score-level0.png",
    "tiatoolbox/TCGA-HE-7130-01Z-00-DX1.png",
    "tiatoolbox/source_image.png",
    "tiatoolbox/kather1.tif",
    "tiatoolbox/kather2.tif",
    "stardist-wheel/histo.jpg",
    "wsidicom-data/test_tile.png",
]
#: Glass only (or nearly), and glass with pen but no tissue.
BACKGROUND = [
    "histolab/tiles/no-tissue.png",
    "histolab/tiles/no-tissue2.png",
    "histolab/tiles/no-tissue-line.png",
    "histolab/tiles/no-tissue-green-pen.png",
    "histolab/tiles/no-tissue-red-pen.png",
    "histolab/tiles/almost-white-1.png",
    "histolab/tiles/almost-white-2.png",
    "histolab/tiles/almost-white-ihc.png",
]
OTHER = ["skimage/ihc.png", "histolab/tiles/kidney-ihc-level0-310-500-360-530.png"]
ALL_IMAGES = PEN_IMAGES + CLEAN_HE + BACKGROUND + OTHER
#: Real images cut from the sample slide (tests/conftest.py SAMPLE_REGIONS): present on every
#: checkout once ``python examples/get_sample_slide.py`` has run; the images above are optional
#: data from ../shared/data or $WSIENGINE_TEST_DATA (tests/README.md).
SAMPLE_IMAGES = list(SAMPLE_REGIONS)
SAMPLE_HE = ["sample-tissue", "sample-tissue-2"]


def _short(name: str) -> str:
    return Path(name).stem


def _relative(name: str) -> str:
    """The data file an image comes from (as under ../shared/data)."""
    return SAMPLE_SLIDE if name in SAMPLE_REGIONS else name


def images(names: list[str]) -> list:
    """Parameters for the images present, and one skipped case naming the absent ones."""
    return data_params(names, relative=_relative, ids=_short)


_CACHE: dict[Path, np.ndarray] = {}


def _read_rgb(name: str) -> np.ndarray:
    if name in SAMPLE_REGIONS:
        return sample_region(name)
    path = data_file(name)
    if path is None:
        pytest.skip(missing_reason(name))
    if path not in _CACHE:
        from skimage import io

        _CACHE[path] = np.ascontiguousarray(io.imread(path)[..., :3])
    return _CACHE[path]


@pytest.fixture
def load():
    """Read a real image by name: a file as under ../shared/data (skips naming it when absent), or
    one of the sample slide's regions (``SAMPLE_IMAGES``)."""
    return _read_rgb


def _present(names: list[str]) -> list[str]:
    return [n for n in names if n in SAMPLE_REGIONS or data_file(n) is not None]


def _random_rgb(rng: np.random.Generator, shape=(37, 53)) -> np.ndarray:
    return rng.integers(0, 256, (*shape, 3)).astype(np.uint8)


def _random_masks(seed: int, count: int):
    """Random masks of mixed size and density, some blobby (smoothed noise)."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        h, w = (int(v) for v in rng.integers(1, 48, 2))
        if rng.random() < 0.5:
            yield rng.random((h, w)) < rng.uniform(0.05, 0.95)
        else:
            field = ndi.uniform_filter(rng.random((h, w)), size=int(rng.integers(2, 7)))
            yield field > np.quantile(field, rng.uniform(0.2, 0.8))


# --- colour transforms -------------------------------------------------------------------


def test_saturation_and_optical_density_match_numpy_formulas_on_every_8bit_colour():
    rng = np.random.default_rng(0)
    rgb = np.concatenate(
        [_random_rgb(rng, (64, 64)).reshape(-1, 3), np.array([[0, 0, 0], [255, 255, 255], [0, 0, 1], [7, 7, 7]], np.uint8)]
    )[None]
    sat = rgb_to_saturation(rgb)
    assert sat.dtype == np.float32 and sat.shape == rgb.shape[:2]
    np.testing.assert_array_equal(sat, ref.saturation(rgb))
    np.testing.assert_array_equal(rgb_to_optical_density(rgb), ref.optical_density(rgb))
    assert sat[0, -4] == 0.0 and sat[0, -1] == 0.0  # black and grey have no saturation
    od = rgb_to_optical_density(rgb)
    assert od[0, -3] == 0.0 and od[0, -4] == pytest.approx(np.log10(256), rel=1e-6)


def test_saturation_lookup_table_equals_the_division_for_all_max_min_pairs():
    mx, mn = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    ok = mn <= mx
    rgb = np.stack([mx[ok], mn[ok], mn[ok]], axis=-1).astype(np.uint8)[None]
    keys = (mx[ok] * 256 + (mx[ok] - mn[ok])).astype(np.int64)
    np.testing.assert_array_equal(kernels.pixel_classes.saturation_lut()[keys], rgb_to_saturation(rgb)[0])


def test_colour_transforms_accept_rgba_and_non_contiguous_views(load):
    rgb = load("sample-tissue")
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    view = rgb[::2, ::3]
    assert not view.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(rgb_to_saturation(rgba), rgb_to_saturation(rgb))
    np.testing.assert_array_equal(rgb_to_saturation(view), ref.saturation(view))
    np.testing.assert_array_equal(glass_mask(view), ref.glass(view, 225, 0.05))
    np.testing.assert_array_equal(pen_mask(view), ref.pen(view))


def test_colour_kernels_reject_wrong_dtype_and_shape():
    with pytest.raises(TypeError, match="uint8"):
        rgb_to_saturation(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        pen_mask(np.zeros((4, 4), np.uint8))


# --- histogram and Otsu -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_histogram_equals_numpy_histogram_including_edges_nan_and_mask(dtype):
    rng = np.random.default_rng(1)
    values = rng.uniform(-0.2, 1.2, 5000).astype(dtype)
    values[:40] = np.linspace(0.0, 1.0, 40)  # many exact bin edges
    values[40:45] = [np.nan, 1.0, 0.0, np.inf, -np.inf]
    mask = rng.random(values.size) < 0.6
    for nbins in (1, 7, 64, 256):
        np.testing.assert_array_equal(
            histogram(values, nbins, (0.0, 1.0)), np.histogram(values[np.isfinite(values)], nbins, range=(0.0, 1.0))[0]
        )
        finite = mask & np.isfinite(values)
        np.testing.assert_array_equal(
            histogram(values, nbins, (0.0, 1.0), mask=mask), np.histogram(values[finite], nbins, range=(0.0, 1.0))[0]
        )
    np.testing.assert_array_equal(
        histogram(values.reshape(50, 100), 10, (0.25, 0.75)),
        np.histogram(values[np.isfinite(values)], 10, range=(0.25, 0.75))[0],
    )


def test_otsu_matches_scikit_image_on_the_same_bins(load):
    rng = np.random.default_rng(2)
    for nbins in (2, 3, 16, 256):
        for _ in range(30):
            counts = rng.integers(0, 1000, nbins) * (rng.random(nbins) < 0.7)
            if np.count_nonzero(counts) < 2:
                continue
            assert threshold_otsu(hist=counts) == sk_threshold_otsu(hist=(counts, bin_centers(nbins)))
            lo, hi = -3.0, 5.5
            assert threshold_otsu(hist=counts, value_range=(lo, hi)) == sk_threshold_otsu(
                hist=(counts, bin_centers(nbins, (lo, hi)))
            )
    sat = rgb_to_saturation(load("sample-thumbnail"))
    counts = np.histogram(sat, 256, range=(0.0, 1.0))[0]
    assert threshold_otsu(sat) == sk_threshold_otsu(hist=(counts, bin_centers(256)))


def test_otsu_of_summed_chunk_histograms_equals_otsu_of_the_whole_image(load):
    sat = rgb_to_saturation(load("sample-thumbnail"))  # 370 rows
    chunks = [sat[:100], sat[100:300], sat[300:]]
    summed = sum(histogram(c) for c in chunks)
    np.testing.assert_array_equal(summed, histogram(sat))
    assert threshold_otsu(hist=summed) == threshold_otsu(sat)


def test_otsu_is_defined_for_empty_and_constant_input():
    assert threshold_otsu(hist=np.zeros(256, np.int64)) == 1.0  # empty: upper end of the range
    assert threshold_otsu(np.full((5, 5), 0.3)) == bin_centers()[76]  # one bin: its centre
    assert threshold_otsu(np.full((5, 5), 0.3), value_range=(0.0, 0.2)) == 0.2  # nothing in range
    assert not (np.full((5, 5), 0.3) > threshold_otsu(hist=np.zeros(8, np.int64))).any()
    with pytest.raises(ValueError):
        threshold_otsu()
    with pytest.raises(ValueError):
        threshold_otsu(hist=np.array([1, -1]))


# --- morphology ---------------------------------------------------------------------------


def test_dilation_erosion_closing_opening_match_scipy_with_scikit_image_borders():
    rng = np.random.default_rng(3)
    for mask in _random_masks(4, 120):
        r = int(rng.integers(0, 9))
        np.testing.assert_array_equal(binary_dilation(mask, r), ref.dilation(mask, r))
        np.testing.assert_array_equal(binary_erosion(mask, r), ref.erosion(mask, r))
        np.testing.assert_array_equal(binary_closing(mask, r), ref.closing(mask, r))
        np.testing.assert_array_equal(binary_opening(mask, r), ref.opening(mask, r))


def test_morphology_equals_scikit_image_binary_functions_with_disk_footprint():
    for i, mask in enumerate(_random_masks(5, 24)):
        r = i % 6
        for op, fn in (
            ("dilation", binary_dilation),
            ("erosion", binary_erosion),
            ("closing", binary_closing),
            ("opening", binary_opening),
        ):
            np.testing.assert_array_equal(fn(mask, r), ref.skimage_binary(op, mask, r), err_msg=f"{op} r={r}")


def test_erosion_does_not_eat_objects_from_the_image_border_and_dilation_does_not_wrap():
    full = np.ones((9, 11), bool)
    assert binary_erosion(full, 3).all()  # outside counts as True for erosion
    dot = np.zeros((9, 11), bool)
    dot[0, 0] = True
    grown = binary_dilation(dot, 2)
    assert grown.sum() == 6 and grown[2, 0] and grown[0, 2] and grown[1, 1] and not grown[-1, -1]


def test_morphology_with_large_radius_and_its_16_bit_path_matches_reference():
    rng = np.random.default_rng(6)
    mask = rng.random((40, 300)) < 0.002
    mask[7, 11] = True

    def edt_dilation(m, r):  # disk dilation = Euclidean distance to the set <= r (outside: nothing)
        return ndi.distance_transform_edt(~m) <= r

    np.testing.assert_array_equal(edt_dilation(mask, 15), ref.dilation(mask, 15))
    for r in (0, 15, 41, 130, 400):  # from 128 on, distances no longer fit in uint8
        np.testing.assert_array_equal(binary_dilation(mask, r), edt_dilation(mask, r))
        np.testing.assert_array_equal(binary_erosion(~mask, r), ~edt_dilation(mask, r))


def test_morphology_accepts_non_contiguous_and_integer_masks_and_rejects_bad_radius():
    mask = np.random.default_rng(7).random((60, 80)) < 0.3
    view = mask[::2, ::-3]
    np.testing.assert_array_equal(binary_closing(view, 2), ref.closing(np.ascontiguousarray(view), 2))
    np.testing.assert_array_equal(binary_dilation(mask.astype(np.uint8) * 7, 1), ref.dilation(mask, 1))
    with pytest.raises(ValueError):
        binary_dilation(mask, -1)
    with pytest.raises(ValueError):
        binary_dilation(mask, 1.5)


# --- connected components ----------------------------------------------------------------


def test_labels_equal_scikit_image_label_in_numbering_and_count():
    for mask in _random_masks(8, 80):
        for connectivity in (1, 2):
            labels, n = label_components(mask, connectivity)
            expected = sk_label(mask, connectivity=connectivity)
            assert labels.dtype == np.int32 and n == expected.max()
            np.testing.assert_array_equal(labels, expected)


def test_remove_small_objects_keeps_areas_at_least_min_size_like_scikit_image_max_size():
    rng = np.random.default_rng(9)
    for mask in _random_masks(10, 80):
        min_size = int(rng.integers(0, 30))
        for connectivity in (1, 2):
            np.testing.assert_array_equal(
                remove_small_objects(mask, min_size, connectivity), ref.remove_small_objects(mask, min_size, connectivity)
            )
    square = np.zeros((6, 6), bool)
    square[1:3, 1:3] = True
    assert remove_small_objects(square, 4).sum() == 4 and remove_small_objects(square, 5).sum() == 0


def test_fill_holes_equals_scipy_binary_fill_holes_and_respects_max_hole_size():
    rng = np.random.default_rng(11)
    for mask in _random_masks(12, 80):
        np.testing.assert_array_equal(fill_holes(mask), ndi.binary_fill_holes(mask))
        limit = int(rng.integers(0, 12))
        np.testing.assert_array_equal(fill_holes(mask, limit), ref.fill_holes(mask, limit))
    ring = np.ones((7, 7), bool)
    ring[2:5, 2:5] = False  # a 9-pixel hole
    assert not fill_holes(ring, 8)[3, 3] and fill_holes(ring, 9).all()


# --- integral images ---------------------------------------------------------------------


def test_integral_image_and_box_mean_match_brute_force_sums_with_outside_as_zero():
    rng = np.random.default_rng(13)
    mask = rng.random((23, 31)) < 0.4
    table = integral_image(mask)
    assert table.shape == (24, 32) and table.dtype == np.int64
    assert (table[0] == 0).all() and (table[:, 0] == 0).all() and table[-1, -1] == mask.sum()
    y0 = rng.integers(-10, 25, 200)
    x0 = rng.integers(-10, 33, 200)
    y1 = y0 + rng.integers(1, 20, 200)
    x1 = x0 + rng.integers(1, 20, 200)
    padded = np.zeros((23 + 60, 31 + 60))
    padded[30:53, 30:61] = mask
    expected = np.array(
        [padded[a + 30 : b + 30, c + 30 : d + 30].sum() for a, c, b, d in zip(y0, x0, y1, x1)], dtype=np.float64
    )
    np.testing.assert_array_equal(box_sum(table, y0, x0, y1, x1), expected)
    np.testing.assert_allclose(box_mean(table, y0, x0, y1, x1), expected / ((y1 - y0) * (x1 - x0)), rtol=0, atol=1e-15)
    assert box_mean(integral_image(np.ones((4, 4), bool)), 2, 2, 6, 6) == 0.25  # hangs off the image
    values = rng.random((5, 6))
    np.testing.assert_allclose(box_sum(integral_image(values), 1, 2, 4, 6), values[1:4, 2:6].sum())
    with pytest.raises(ValueError, match="empty"):
        box_mean(table, [0, 3], [0, 3], [2, 3], [2, 5])


# --- pen and glass on real images --------------------------------------------------------


@pytest.mark.parametrize("name", images(ALL_IMAGES + SAMPLE_IMAGES))
def test_pen_and_glass_masks_equal_reference_rules(load, name):
    rgb = load(name)
    np.testing.assert_array_equal(pen_mask(rgb), ref.pen(rgb))
    np.testing.assert_array_equal(glass_mask(rgb), ref.glass(rgb, 225, 0.05))
    np.testing.assert_array_equal(
        glass_mask(rgb, white_min=200, grey_max_saturation=0.1), ref.glass(rgb, 200, 0.1)
    )


@pytest.mark.parametrize(
    ("name", "min_fraction"),
    data_params([
        ("histolab/pen-images/tcga-green-pen.png", 0.05),
        ("histolab/pen-images/tcga-red-pen.png", 0.15),
        ("histolab/pen-images/wsi-blue-pen.png", 0.015),
        ("histolab/pen-images/diagnostic-slide-thumb-rgb.png", 0.10),
        ("histolab/tiles/no-tissue-green-pen.png", 0.6),
        ("histolab/tiles/no-tissue-red-pen.png", 0.2),
        ("histolab/tiles/medium-nuclei-score-green-pen-level1.png", 0.2),
        ("histolab/tiles/very-low-nuclei-score-red-pen-level1.png", 0.1),
        ("histolab/tiles/high-nuclei-score-red-pen-level1.png", 0.02),
    ], relative=lambda case: case[0], ids=lambda case: _short(case[0])),
)
def test_pen_ink_is_flagged_on_real_pen_images(load, name, min_fraction):
    assert pen_mask(load(name)).mean() >= min_fraction


def test_blue_ink_is_flagged_where_the_marker_is_and_nowhere_else(load):
    rgb = load("histolab/pen-images/wsi-blue-pen.png").astype(np.int32)
    ink = pen_mask(rgb.astype(np.uint8))
    strongly_blue = (rgb[..., 2] - rgb[..., 0] > 80) & (rgb[..., 2] > 150)
    assert ink[strongly_blue].mean() > 0.95
    assert ink[~strongly_blue].mean() < 0.01


@pytest.mark.parametrize("name", images(CLEAN_HE + SAMPLE_HE))
def test_he_without_pen_is_not_flagged_and_purple_nuclei_are_not_blue_ink(load, name):
    rgb = load(name)
    ink = pen_mask(rgb)
    assert ink.mean() < 0.015  # wsidicom's sharp JPEG tile: 1 %, its darkest nuclei and colour fringes
    a = rgb.astype(np.int32)
    purple = (a[..., 2] == a.max(axis=-1)) & (a[..., 0] > a[..., 1]) & (a.max(axis=-1) > 35)  # haematoxylin hues
    darkest = a.max(axis=-1) <= np.percentile(a.max(axis=-1), 10)
    assert ink[purple].mean() < 0.005
    assert ink[darkest & (a.max(axis=-1) > 35)].mean() < 0.01
    assert segment_tissue_detailed(rgb).pen.mean() < 0.015  # the reddest red-blood-cell clusters


def test_glass_mask_covers_background_tiles_and_spares_stained_tissue(load):
    # the images present (the sample slide's glass always is)
    for name in _present(["histolab/tiles/no-tissue.png", "histolab/tiles/almost-white-1.png",
                          "histolab/tiles/no-tissue2.png", "sample-glass"]):
        assert glass_mask(load(name)).mean() > 0.98
    for name in _present(["tiatoolbox/kather1.tif", "stardist-wheel/histo.jpg",
                          "histolab/tiles/medium-nuclei-score-level1-2.png"]):
        assert glass_mask(load(name)).mean() < 0.02


# --- the tissue pipeline ------------------------------------------------------------------


@pytest.mark.parametrize("name", images(ALL_IMAGES + SAMPLE_IMAGES))
def test_segment_tissue_equals_reference_pipeline_on_real_images(load, name):
    rgb = load(name)
    params = TissueSegmentParams()
    mask, threshold = segment_tissue(rgb, params, return_threshold=True)
    expected, expected_threshold = ref.segment_tissue(rgb, params)
    assert mask.dtype == np.bool_ and mask.shape == rgb.shape[:2]
    assert threshold == expected_threshold
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("name", images(PEN_IMAGES + CLEAN_HE[:3] + ["sample-thumbnail", "sample-border"]))
def test_detailed_result_reports_the_glass_mask_pen_zone_and_thresholds_of_the_reference(load, name):
    rgb = load(name)
    params = TissueSegmentParams()
    result = segment_tissue_detailed(rgb, params)
    np.testing.assert_array_equal(result.glass, glass_mask(rgb))
    np.testing.assert_array_equal(result.pen, ref.pen_zone(rgb, params.min_pen_object_px, params.pen_dilation_px))
    np.testing.assert_array_equal(result.mask, segment_tissue(rgb, params))
    assert params.min_threshold <= result.threshold <= params.max_threshold
    assert result.threshold == min(max(result.otsu_threshold, params.min_threshold), params.max_threshold)


@pytest.mark.parametrize(
    "params",
    [
        TissueSegmentParams(reject_pen=False),
        TissueSegmentParams(closing_radius_px=5, opening_radius_px=0, max_hole_px=0, min_object_px=0),
        TissueSegmentParams(closing_radius_px=0, opening_radius_px=4, max_hole_px=10**9, min_object_px=50,
                            pen_dilation_px=6, min_pen_object_px=0, nbins=64, min_threshold=0.0, max_threshold=1.0),
        TissueSegmentParams(white_min=200, grey_max_saturation=0.1, min_threshold=0.2, max_threshold=0.3),
        TissueSegmentParams(weak_threshold_ratio=1.0, opening_by_reconstruction=False),
        TissueSegmentParams(weak_threshold_ratio=1.0),
        TissueSegmentParams(opening_by_reconstruction=False, weak_threshold_ratio=0.0),
        TissueSegmentParams(opening_radius_px=0, weak_threshold_ratio=0.7, reject_pen=False),
    ],
    ids=["no-pen", "closing-only", "opening-fill-all", "strict-glass", "before-issue-14", "reconstruction-only",
         "plain-opening-full-hysteresis", "no-opening-hysteresis-no-pen"],
)
@pytest.mark.parametrize(
    "name",
    images(["histolab/pen-images/diagnostic-slide-thumb-rgb.png", "histolab/tiles/no-tissue-red-pen.png",
            "wsidicom-data/test_tile.png", "sample-thumbnail", "sample-border"]),
)
def test_segment_tissue_equals_reference_pipeline_with_other_parameters(load, name, params):
    rgb = load(name)
    mask, threshold = segment_tissue(rgb, params, return_threshold=True)
    expected, expected_threshold = ref.segment_tissue(rgb, params)
    assert threshold == expected_threshold
    np.testing.assert_array_equal(mask, expected)


def test_segment_tissue_equals_reference_on_random_noise_images():
    rng = np.random.default_rng(14)
    for params in (TissueSegmentParams(min_object_px=5, max_hole_px=6, min_pen_object_px=3),
                   TissueSegmentParams(min_object_px=5, max_hole_px=6, min_pen_object_px=3, opening_radius_px=1,
                                       weak_threshold_ratio=0.0, opening_by_reconstruction=False)):
        for shape in ((1, 1), (3, 5), (17, 4), (64, 48)):
            rgb = _random_rgb(rng, shape)
            mask, threshold = segment_tissue(rgb, params, return_threshold=True)
            expected, expected_threshold = ref.segment_tissue(rgb, params)
            assert threshold == expected_threshold
            np.testing.assert_array_equal(mask, expected)


def _tissue_on_glass(pale_rim: bool) -> np.ndarray:
    """A 120 x 120 thumbnail: glass, a 60 x 60 square of stained tissue (saturation 0.5) and,
    optionally, a 6-px pale rim (saturation 0.09, below the 0.15 threshold) along its right side."""
    rgb = np.full((120, 120, 3), 240, np.uint8)
    rgb[30:90, 30:90] = (200, 100, 170)
    if pale_rim:
        rgb[30:90, 90:96] = (232, 211, 225)
    return rgb


def test_opening_by_reconstruction_keeps_the_corners_the_plain_opening_rounds_off():
    rgb = _tissue_on_glass(False)
    old = segment_tissue(rgb, TissueSegmentParams(opening_by_reconstruction=False, weak_threshold_ratio=1.0,
                                                  opening_radius_px=4, min_object_px=0))
    new = segment_tissue(rgb, TissueSegmentParams(opening_radius_px=4, min_object_px=0))
    square = np.zeros((120, 120), bool)
    square[30:90, 30:90] = True
    assert not old[30, 30] and old.sum() < square.sum()  # the plain opening rounds the corners
    np.testing.assert_array_equal(new, square)


def test_hysteresis_keeps_a_pale_rim_joined_to_tissue_but_not_pale_specks_on_glass():
    rgb = _tissue_on_glass(True)
    rgb[5:12, 5:12] = (232, 211, 225)  # a pale speck on its own: no seed
    rgb[100:103, 100:103] = (200, 100, 170)  # a stained speck narrower than the opening disk
    params = TissueSegmentParams(min_object_px=0, max_hole_px=0, min_threshold=0.15)  # as on a real thumbnail
    mask, threshold = segment_tissue(rgb, params, return_threshold=True)
    assert threshold == 0.15
    assert mask[30:90, 30:96].all(), "the pale rim joined to the tissue is kept"
    assert not mask[:, 96:].any() and not mask[:30].any() and not mask[90:].any(), "glass and specks stay out"
    old = segment_tissue(rgb, TissueSegmentParams(min_object_px=0, max_hole_px=0, min_threshold=0.15,
                                                  weak_threshold_ratio=1.0))
    assert not old[30:90, 90:96].any()


def test_hysteresis_does_not_follow_the_halo_of_pen_ink():
    # a black marker line touching the tissue, in a pale brownish halo (weak: saturation 0.06,
    # not glass, not an ink class) that also touches the tissue: the halo is not grown into
    rgb = _tissue_on_glass(False)
    rgb[20:100, 90:118] = (226, 214, 212)
    rgb[40:80, 90:100] = (20, 20, 25)
    params = TissueSegmentParams(min_object_px=0, max_hole_px=0, min_threshold=0.15)
    mask = segment_tissue(rgb, params)
    np.testing.assert_array_equal(mask, ref.segment_tissue(rgb, params)[0])
    assert mask[30:90, 30:88].all()
    assert not mask[:, 90:].any()
    assert segment_tissue(rgb, dataclasses.replace(params, reject_pen=False))[:, 100:].any()  # weak, as claimed


@pytest.mark.parametrize("name", images(PEN_IMAGES))
def test_pen_is_excluded_from_tissue_on_real_pen_images(load, name):
    rgb = load(name)
    result = segment_tissue_detailed(rgb)
    ink = pen_mask(rgb)
    assert not (result.mask & result.pen).any()
    assert result.pen[ink].mean() > 0.9  # the zone covers the ink (all but stray specks)
    assert (ink & result.mask).sum() <= 0.06 * ink.sum()


@pytest.mark.parametrize("name", images(BACKGROUND + ["sample-glass"]))
def test_background_tiles_give_almost_no_tissue(load, name):
    fraction = segment_tissue(load(name)).mean()
    # no-tissue-red-pen keeps a thin, blurred brownish halo around a black-and-red smear
    assert fraction < (0.12 if "red-pen" in name else 0.05)


@pytest.mark.parametrize("name", images([n for n in CLEAN_HE if "/tissue-" in n or "tiatoolbox" in n] + SAMPLE_HE))
def test_tissue_tiles_give_tissue(load, name):
    assert segment_tissue(load(name)).mean() > 0.4


def test_tissue_on_a_slide_thumbnail_with_pen_marks_stays_inside_the_outline(load):
    rgb = load("histolab/pen-images/diagnostic-slide-thumb-rgb.png")
    result = segment_tissue_detailed(rgb)
    assert 0.3 < result.mask.mean() < 0.6
    assert 0.15 < result.pen.mean() < 0.3
    assert not result.mask[:10].any() and not result.mask[-10:].any()  # glass margins
    labels, n = label_components(result.mask)
    assert np.bincount(labels.ravel())[1:].max() > 0.9 * result.mask.sum()  # one main piece


def test_white_black_constant_and_tiny_images_give_empty_masks_without_error():
    for value in (255, 240, 0):
        rgb = np.full((40, 30, 3), value, np.uint8)
        mask, threshold = segment_tissue(rgb, return_threshold=True)
        assert not mask.any() and 0.0 <= threshold <= 1.0
    pink = np.broadcast_to(np.array([220, 120, 180], np.uint8), (40, 30, 3))  # read-only, constant
    assert segment_tissue(pink, TissueSegmentParams(min_object_px=0)).shape == (40, 30)
    for shape in ((1, 1, 3), (3, 5, 3), (0, 4, 3), (2, 2, 4)):
        rgb = np.random.default_rng(15).integers(0, 256, shape).astype(np.uint8)
        assert segment_tissue(rgb).shape == shape[:2]


@pytest.mark.parametrize("name", images(["histolab/pen-images/tcga-green-pen.png", "sample-thumbnail"]))
def test_segment_tissue_gives_the_same_mask_for_views_rgba_and_copies(load, name):
    rgb = load(name)
    view = rgb[::-1, ::2]
    rgba = np.dstack([rgb, np.zeros(rgb.shape[:2], np.uint8)])
    np.testing.assert_array_equal(segment_tissue(view), segment_tissue(np.ascontiguousarray(view)))
    np.testing.assert_array_equal(segment_tissue(rgba), segment_tissue(rgb))


def test_segment_params_are_validated():
    with pytest.raises(ValueError, match="closing_radius_px"):
        TissueSegmentParams(closing_radius_px=-1)
    with pytest.raises(ValueError, match="min_object_px"):
        TissueSegmentParams(min_object_px=2.5)
    with pytest.raises(ValueError, match="threshold"):
        TissueSegmentParams(min_threshold=0.5, max_threshold=0.2)
    with pytest.raises(ValueError, match="nbins"):
        TissueSegmentParams(nbins=1)


def test_kernels_have_no_dependency_beyond_numpy_and_numba():
    import ast

    root = Path(kernels.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in {"numpy", "numba", "math", "dataclasses", "__future__"}, (path.name, name)


def test_public_api_is_listed_in_all():
    for name in kernels.__all__:
        assert callable(getattr(kernels, name)), name
    assert {"segment_tissue", "box_mean", "integral_image", "threshold_otsu", "pen_mask"} <= set(kernels.__all__)


def test_segment_tissue_gives_the_same_masks_from_parallel_threads(load):
    from concurrent.futures import ThreadPoolExecutor

    rgbs = [load(name) for name in _present(PEN_IMAGES[:4] + ["sample-thumbnail", "sample-border"])]
    expected = [segment_tissue(image) for image in rgbs]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(segment_tissue, rgbs * 3))
    for i, mask in enumerate(results):
        np.testing.assert_array_equal(mask, expected[i % len(rgbs)])
