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
    assert thumb.shape == (round(2967 * 0.499 / 4), round(2220 * 0.499 / 4), 3)
    assert mpp == pytest.approx((4.0, 4.0), rel=0.01)
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
