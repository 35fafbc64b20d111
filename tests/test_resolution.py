"""mpp resolution order: vendor -> TIFF tags -> user override -> error."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from wsiengine import errors, open_slide, read_mpp_csv
from wsiengine.resolution import lookup_mpp, mpp_from_tiff_tags

from .conftest import shared_file


def _write_tiff(path, *, resolution=None, unit="CENTIMETER"):
    image = np.full((512, 512, 3), 230, np.uint8)
    kwargs = {}
    if resolution is not None:
        kwargs = {"resolution": resolution, "resolutionunit": unit}
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", **kwargs)
    return path


def test_vendor_metadata_comes_first(cmu_small):
    slide = open_slide(cmu_small, backend="openslide")
    assert slide.mpp == pytest.approx((0.499, 0.499))
    assert slide.mpp_source == "vendor"
    assert open_slide(cmu_small, backend="tiffslide").mpp_source == "vendor"


def test_dicom_pixel_spacing_is_vendor_metadata():
    slide = open_slide(shared_file("ez-wsi-dicomweb/multiframe_camelyon_challenge_image.dcm"))
    assert slide.mpp == pytest.approx((28.969, 28.968), rel=1e-4)
    assert slide.mpp_source == "vendor"


def test_user_mpp_does_not_override_vendor_unless_forced(cmu_small, caplog):
    slide = open_slide(cmu_small, mpp=0.25)
    assert slide.mpp == pytest.approx((0.499, 0.499)) and slide.mpp_source == "vendor"
    assert "force_mpp" in caplog.text
    forced = open_slide(cmu_small, mpp=0.25, force_mpp=True)
    assert forced.mpp == (0.25, 0.25) and forced.mpp_source == "user-forced"


def test_tiff_resolution_tags_come_second(tmp_path):
    path = _write_tiff(tmp_path / "tagged.tif", resolution=(1e4 / 0.5, 1e4 / 0.5))
    assert mpp_from_tiff_tags(path) == pytest.approx((0.5, 0.5))
    slide = open_slide(path)
    assert slide.mpp == pytest.approx((0.5, 0.5)) and slide.mpp_source == "tiff-resolution"
    inch = _write_tiff(tmp_path / "inch.tif", resolution=(25_400 / 0.25, 25_400 / 0.25), unit="INCH")
    assert open_slide(inch).mpp == pytest.approx((0.25, 0.25))


def test_implausible_72_dpi_tags_are_ignored():
    boxes = shared_file("openslide-python/boxes.tiff")  # 72 dpi placeholder -> 352.8 µm/px
    with pytest.raises(errors.MissingMppError):
        open_slide(boxes)


def test_implausible_72_dpi_tags_of_a_written_tiff_are_ignored(tmp_path):
    path = _write_tiff(tmp_path / "72dpi.tif", resolution=(72, 72), unit="INCH")  # 352.8 µm/px
    assert mpp_from_tiff_tags(path) is None
    with pytest.raises(errors.MissingMppError):
        open_slide(path)


def test_user_override_comes_third_and_error_names_it(no_mpp_slide):
    with pytest.raises(errors.MissingMppError, match=r"mpp=.*--mpp-csv"):
        open_slide(no_mpp_slide)
    slide = open_slide(no_mpp_slide, mpp=(0.25, 0.26))
    assert slide.mpp == (0.25, 0.26) and slide.mpp_source == "user"
    lazy = open_slide(no_mpp_slide, require_mpp=False)
    assert not lazy.has_mpp and lazy.mpp_source is None
    with pytest.raises(errors.MissingMppError):
        lazy.mpp


def test_mpp_csv_lookup_by_name_stem_or_path(tmp_path, no_mpp_slide):
    csv = tmp_path / "mpp.csv"
    csv.write_text("slide,mpp\nno-mpp,0.2527\nother.svs,0.5\n")
    table = read_mpp_csv(csv)
    assert lookup_mpp(table, no_mpp_slide) == (0.2527, 0.2527)
    assert lookup_mpp(table, tmp_path / "sub" / "other.svs") == (0.5, 0.5)
    assert lookup_mpp(table, "missing.svs") is None
    bad = tmp_path / "bad.csv"
    bad.write_text("name,resolution\nx,1\n")
    with pytest.raises(errors.ConfigError, match="slide,mpp"):
        read_mpp_csv(bad)


@pytest.mark.parametrize("value", [0, -1, float("nan"), (0.5, 0.5, 0.5)])
def test_invalid_user_mpp_is_rejected(no_mpp_slide, value):
    with pytest.raises(errors.ConfigError):
        open_slide(no_mpp_slide, mpp=value)
