"""Slide: opening, errors, resolution-aware reads."""

from __future__ import annotations

import numpy as np
import pytest

from wsiengine import errors, open_slide
from wsiengine.slide import MPP_TOLERANCE, resize_area

from .conftest import record_read_sizes, shared_file


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(errors.SlideNotFoundError, match="does not exist"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(errors.SlideNotFoundError, match="not a file"):
        open_slide(tmp_path)


def test_unsupported_dicom_names_every_backends_reason():
    path = shared_file("pathml/small_dicom.dcm")
    with pytest.raises(errors.UnsupportedFormatError) as info:
        open_slide(path)
    message = str(info.value)
    assert "small_dicom.dcm" in message
    assert "openslide:" in message and "tiffslide:" in message
    assert set(info.value.reasons) == {"tifffile", "openslide", "tiffslide"}


def test_non_slide_file_is_unsupported(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a slide")
    with pytest.raises(errors.UnsupportedFormatError, match="not a supported slide format"):
        open_slide(path)


def test_empty_file_is_corrupt(tmp_path):
    path = tmp_path / "empty.svs"
    path.touch()
    with pytest.raises(errors.CorruptSlideError, match="empty"):
        open_slide(path)


@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.9, 0.995])
def test_truncated_real_slide_is_a_clear_error(cmu_small, tmp_path, fraction):
    data = cmu_small.read_bytes()
    path = tmp_path / "truncated.svs"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(errors.CorruptSlideError, match="truncated"):
        open_slide(path)


def test_unknown_backend_is_a_config_error(cmu_small):
    with pytest.raises(errors.ConfigError, match="unknown backend"):
        open_slide(cmu_small, backend="bioformats")


def test_read_at_target_mpp_within_tolerance_does_not_resample(cmu_small):
    slide = open_slide(cmu_small)
    assert slide.mpp == pytest.approx((0.499, 0.499))
    plan = slide.plan_read((224, 224), 0.5)
    assert plan.level == 0 and not plan.resamples
    patch = slide.read_at_mpp((100, 200), (224, 224), 0.5)
    np.testing.assert_array_equal(patch, slide.read_region((100, 200), 0, (224, 224)))


def test_read_at_coarser_mpp_area_averages_once(cmu_small):
    slide = open_slide(cmu_small)
    plan = slide.plan_read((112, 112), 0.998)
    assert plan.level == 0 and plan.read_size == (224, 224)
    patch = slide.read_at_mpp((100, 200), (112, 112), 0.998)
    full = slide.read_region((100, 200), 0, (224, 224)).astype(np.float64)
    block_mean = full.reshape(112, 2, 112, 2, 3).mean(axis=(1, 3))
    assert patch.shape == (112, 112, 3)
    assert np.abs(patch - block_mean).max() <= 1.0  # exact 2x2 area average, rounded


def test_lowest_sufficient_level_is_chosen(no_mpp_slide):
    slide = open_slide(no_mpp_slide, mpp=0.25)
    assert slide.level_downsamples[1] == pytest.approx(2.0, rel=1e-3)
    assert slide.best_level_for_mpp(0.25) == 0
    assert slide.best_level_for_mpp(0.49) == 0  # level 1 is 0.50: not enough
    assert slide.best_level_for_mpp(0.5) == 1  # level 1 is exactly 0.50
    assert slide.best_level_for_mpp(2.0) == 1
    plan = slide.plan_read((224, 224), 1.0)
    assert plan.level == 1 and plan.read_size == (448, 448) and plan.resamples


def test_target_finer_than_level0_is_an_error_unless_allowed(cmu_small):
    slide = open_slide(cmu_small)
    slide.check_target_mpp(0.499 * (1 - MPP_TOLERANCE / 2))  # within tolerance: fine
    with pytest.raises(errors.ResolutionError, match="finer than level 0"):
        slide.plan_read((224, 224), 0.25)
    plan = slide.plan_read((224, 224), 0.25, allow_upsample=True)
    assert plan.read_size == (112, 112)
    assert slide.read_at_mpp((0, 0), (224, 224), 0.25, allow_upsample=True).shape == (224, 224, 3)


def test_thumbnail_respects_the_read_budget(cmu_small):
    slide = open_slide(cmu_small)
    calls = record_read_sizes(slide)
    thumb, mpp = slide.thumbnail(4.0, read_budget_px=300 * 300)
    # 4.0 / 0.499 -> an integer shrink by 8 of the only level: ceil(size / 8) px at exactly 8 x 0.499 µm/px
    assert thumb.shape == (-(-2967 // 8), -(-2220 // 8), 3)
    assert mpp == pytest.approx((8 * 0.499, 8 * 0.499), rel=1e-6)
    assert len(calls) > 1 and max(calls) <= 300 * 300
    # the pieces join without seams: compare with a one-shot read
    whole, _ = slide.thumbnail(4.0)
    assert np.abs(thumb.astype(int) - whole.astype(int)).mean() < 1.0


def test_resize_area_is_identity_at_same_size():
    image = np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    assert resize_area(image, (12, 10)) is image


def test_slide_pickles_as_a_reopen(cmu_small):
    import pickle

    slide = open_slide(cmu_small, backend="tiffslide")
    clone = pickle.loads(pickle.dumps(slide))
    assert clone.backend_name == "tiffslide" and clone.mpp == slide.mpp
    np.testing.assert_array_equal(clone.read_region((0, 0), 0, (32, 32)), slide.read_region((0, 0), 0, (32, 32)))


# -- the thumbnail: one integer area-averaging shrink of one level, whole stored tiles ---------------


def area_average(image: np.ndarray, fx: int, fy: int) -> np.ndarray:
    """Plain NumPy block mean: each output pixel the mean of the (up to) fy x fx level pixels of its
    block; the blocks at the right and bottom edges average the pixels they hold."""
    h, w = image.shape[:2]
    oh, ow = -(-h // fy), -(-w // fx)
    total = np.zeros((oh * fy, ow * fx, 3))
    count = np.zeros((oh * fy, ow * fx, 1))
    total[:h, :w], count[:h, :w] = image, 1
    sums = total.reshape(oh, fy, ow, fx, 3).sum(axis=(1, 3))
    return sums / count.reshape(oh, fy, ow, fx, 1).sum(axis=(1, 3))


def write_pyramid(path, width, height, *, tile=128, downsamples=(1, 4), ome=False, mpp=0.5, seed=0):
    """A tiled JPEG pyramid of smooth random colour with odd level sizes: generic (levels as further
    pages) or OME-TIFF (levels as SubIFDs)."""
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    level0 = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))
    levels = [level0 if d == 1 else np.asarray(Image.fromarray(level0).reduce(d)) for d in downsamples]
    options = dict(tile=(tile, tile), photometric="rgb", compression="jpeg", resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path, ome=ome) as writer:
        if ome:
            writer.write(levels[0], subifds=len(levels) - 1, resolution=(1e4 / mpp, 1e4 / mpp),
                         metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}, **options)
            for d, image in zip(downsamples[1:], levels[1:]):
                writer.write(image, subfiletype=1, resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)), **options)
        else:
            for n, (d, image) in enumerate(zip(downsamples, levels)):
                writer.write(image, subfiletype=0 if n == 0 else 1, resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)),
                             metadata=None, **options)
    return path


@pytest.mark.parametrize("mpp", [1.0, 1.5, 4.0, 8.1])
def test_thumbnail_is_the_area_average_of_its_level_on_the_sample_slide(cmu_small, mpp):
    slide = open_slide(cmu_small)
    thumb, (tx, ty) = slide.thumbnail(mpp)
    f = int(mpp / 0.499 * 1.02)
    assert (tx, ty) == pytest.approx((f * 0.499, f * 0.499))
    level = slide.read_region((0, 0), 0, slide.dimensions)
    expected = area_average(level, f, f)
    assert thumb.shape == expected.shape  # ceil(2967 / f) x ceil(2220 / f): odd edges kept, not dropped
    assert np.abs(thumb - expected).max() <= 1.0  # equal up to rounding
    # and close to the old thumbnail (a box resize of the level to round(size x level mpp / mpp)):
    # both brought to one coarse grid (about 16 µm/px), same slide area, small mean difference
    from PIL import Image

    old = resize_area(level, (round(2220 * 0.499 / mpp), round(2967 * 0.499 / mpp)))
    common = (round(2220 * 0.499 / 32), round(2967 * 0.499 / 32))
    coarse_old, coarse_new = (np.asarray(Image.fromarray(a).resize(common, Image.Resampling.BOX)).astype(int) for a in (old, thumb))
    assert np.abs(coarse_new - coarse_old).mean() < 4  # measured 0.3 (1 µm/px) to 2.9 (8 µm/px) of 255


@pytest.mark.parametrize("ome", [False, True], ids=["generic-tiff", "ome-tiff"])
def test_thumbnail_is_the_area_average_of_the_coarsest_resolving_level(tmp_path, ome):
    path = write_pyramid(tmp_path / ("p.ome.tif" if ome else "p.tif"), 1001, 777, ome=ome)
    slide = open_slide(path)
    assert slide.backend_name == "tifffile" and slide.level_dimensions == ((1001, 777), (251, 195))
    # 6.1 µm/px: level 1 (about 2 µm/px) resolves it, shrunk by 3; the right edge blocks average 2 columns
    thumb, mpp = slide.thumbnail(6.1)
    assert mpp == pytest.approx((6.0, 6.0), rel=0.01)
    level = slide.read_region((0, 0), 1, (251, 195))
    expected = area_average(level, 3, 3)
    assert thumb.shape == (65, 84, 3) == expected.shape
    assert np.abs(thumb - expected).max() <= 1.0
    np.testing.assert_allclose(thumb[-1, -1], level[192:, 249:].mean(axis=(0, 1)), atol=1.0)  # a 2 x 3 px corner block
    # the level at its own resolution is returned as stored
    same, mpp1 = slide.thumbnail(2.0)
    assert mpp1 == pytest.approx((2.0, 2.0), rel=0.01)
    np.testing.assert_array_equal(same, level)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_thumbnail_is_the_same_through_every_backend(cmu_small, backend):
    reference, mpp = open_slide(cmu_small, backend="tifffile").thumbnail(4.0)
    thumb, other_mpp = open_slide(cmu_small, backend=backend).thumbnail(4.0)
    assert other_mpp == mpp and thumb.shape == reference.shape
    assert np.abs(thumb.astype(int) - reference).mean() < 0.5


def test_thumbnail_reads_whole_stored_tiles_each_once_with_the_tifffile_backend(cmu_small):
    slide = open_slide(cmu_small)
    backend = slide.backend
    assert slide.backend_name == "tifffile" and backend.tile_grid(0) == (240, 240)
    decoded, reads = [], []
    tile, read = backend._tile, backend.read_region
    backend._tile = lambda level, index: decoded.append((level, index)) or tile(level, index)
    backend.read_region = lambda x, y, level, w, h: reads.append((x, y, w, h)) or read(x, y, level, w, h)
    backend._cache.max_bytes = 0  # no help from the cache: each decode is counted
    slide.thumbnail(4.0, read_budget_px=1000 * 1000)
    across, down = -(-2220 // 240), -(-2967 // 240)
    assert sorted(decoded) == [(0, i) for i in range(across * down)]  # every tile once
    for x, y, w, h in reads:  # tile-aligned (lcm(240, 8) = 240), within the budget
        assert x % 240 == 0 and y % 240 == 0 and w * h <= 1000 * 1000
        assert w % 240 == 0 or x + w == 2220
        assert h % 240 == 0 or y + h == 2967


def test_thumbnail_needing_too_many_reads_is_refused_before_any_read(cmu_small):
    slide = open_slide(cmu_small)
    calls = record_read_sizes(slide)
    with pytest.raises(errors.SlideReadError, match=r"would need 130 reads of level 0 .* over the limit of 129"):
        slide.thumbnail(0.5, read_budget_px=240 * 240, max_reads=129)  # ceil(2220 / 240) x ceil(2967 / 240) = 10 x 13
    assert calls == []


def test_damaged_tile_in_the_thumbnail_area_raises_naming_it(cmu_small, tmp_path):
    from .test_hostile_slides import damaged_copy, early_end_of_image

    path = damaged_copy(cmu_small, tmp_path / "damaged.svs", early_end_of_image, tile=23)
    for workers in (1, 4):
        with open_slide(path) as slide, pytest.raises(errors.SlideReadError, match=r"tile 23 \(row 2, column 3\) of level 0"):
            slide.thumbnail(4.0, workers=workers)


def test_thumbnail_without_a_tile_grid_reads_factor_aligned_pieces_to_the_same_image(cmu_small):
    slide = open_slide(cmu_small)
    tiled, mpp = slide.thumbnail(1.5, read_budget_px=700 * 700)
    slide.backend.tile_grid = lambda level: None  # as a backend that cannot tell its stored tiles
    calls = record_read_sizes(slide)
    pieces, piece_mpp = slide.thumbnail(1.5, read_budget_px=700 * 700, workers=3)
    assert piece_mpp == mpp and len(calls) > 1 and max(calls) <= 700 * 700
    np.testing.assert_array_equal(pieces, tiled)
