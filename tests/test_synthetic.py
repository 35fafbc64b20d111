"""wsiengine.testing.synthetic: tiled pyramidal TIFFs with real tissue texture, for tests and benchmarks."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import shapely
from shapely.geometry import Point

from wsiengine.testing import Ellipse, SyntheticSlide, load_default_source, make_pyramidal_slide, truncated_copy

W, H, MPP = 4096, 3072, 0.25


@pytest.fixture(scope="session")
def he_source() -> np.ndarray:
    try:
        return load_default_source()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def pen_slide(tmp_path_factory, he_source) -> SyntheticSlide:
    return make_pyramidal_slide(
        tmp_path_factory.mktemp("synthetic") / "pen.tiff", width=W, height=H, mpp=MPP, source=he_source, pen=True, seed=3
    )


def _read(path, backend: str, location, level: int, size) -> np.ndarray:
    if backend == "openslide":
        import openslide

        with openslide.OpenSlide(str(path)) as s:
            return np.asarray(s.read_region(location, level, size).convert("RGB"))
    import tiffslide

    with tiffslide.TiffSlide(str(path)) as s:
        return np.asarray(s.read_region(location, level, size, as_array=True))[..., :3]


def _deep_point(geometry, margin: float) -> tuple[int, int]:
    inner = geometry.buffer(-margin)
    assert not inner.is_empty, "geometry too thin for the margin"
    p = inner.representative_point()
    return int(p.x), int(p.y)


def _glass_point(slide: SyntheticSlide, margin: float = 200) -> tuple[int, int]:
    avoid = shapely.union_all([slide.tissue_polygons_level0, slide.pen_polygons_level0]).buffer(margin)
    for x in np.linspace(margin, slide.width - 2 * margin, 17):
        for y in np.linspace(margin, slide.height - 2 * margin, 13):
            if not avoid.intersects(shapely.box(x, y, x + 64, y + 64)):
                return int(x), int(y)
    raise AssertionError("no glass on the slide")


def test_openslide_opens_it_as_generic_tiff_with_levels_and_mpp(pen_slide):
    import openslide

    with openslide.OpenSlide(str(pen_slide.path)) as s:
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert s.level_dimensions == ((W, H), (W // 4, H // 4), (W // 16, H // 16))
        assert s.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(MPP)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(MPP)


def test_tiffslide_opens_it_with_levels_and_mpp(pen_slide):
    import tiffslide

    with tiffslide.TiffSlide(str(pen_slide.path)) as s:
        assert s.level_dimensions == ((W, H), (W // 4, H // 4), (W // 16, H // 16))
        assert float(s.properties["tiffslide.mpp-x"]) == pytest.approx(MPP)
        assert float(s.properties["tiffslide.mpp-y"]) == pytest.approx(MPP)


def test_wsiengine_reads_the_mpp_from_the_resolution_tags(pen_slide):
    import wsiengine as we

    with we.open_slide(pen_slide.path) as slide:
        assert slide.mpp == pytest.approx((MPP, MPP))
        assert slide.mpp_source == "tiff-resolution"
        assert slide.level_count == 3


def test_returned_geometry_describes_the_slide(pen_slide):
    assert pen_slide.width == W and pen_slide.height == H and pen_slide.mpp == MPP
    assert pen_slide.level_dimensions == ((W, H), (W // 4, H // 4), (W // 16, H // 16))
    tissue, pen = pen_slide.tissue_polygons_level0, pen_slide.pen_polygons_level0
    assert tissue.geom_type == pen.geom_type == "MultiPolygon"
    assert tissue.is_valid and pen.is_valid
    assert len(tissue.geoms) == 3
    assert 0.05 < pen_slide.tissue_fraction < 0.6
    # Each stroke runs over glass and partly over tissue.
    assert pen.intersection(tissue).area > 0
    assert pen.difference(tissue).area > 0.3 * pen.area


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_a_pixel_inside_a_blob_is_tissue_coloured_and_glass_is_near_white(pen_slide, backend):
    tissue_only = pen_slide.tissue_polygons_level0.difference(pen_slide.pen_polygons_level0.buffer(100))
    x, y = _deep_point(tissue_only, 150)
    patch = _read(pen_slide.path, backend, (x - 32, y - 32), 0, (64, 64)).astype(np.float64)
    mean = patch.reshape(-1, 3).mean(axis=0)
    assert mean.mean() < 215, f"tissue should be stained, got mean RGB {mean}"
    assert mean[0] > mean[1] and mean[2] > mean[1], f"H&E is pink/purple (R, B > G), got {mean}"

    gx, gy = _glass_point(pen_slide)
    glass = _read(pen_slide.path, backend, (gx, gy), 0, (64, 64)).astype(np.float64)
    assert glass.min() >= 225 and glass.max() <= 252, (glass.min(), glass.max())
    assert abs(glass.mean() - 240) <= 4
    assert glass.std() < 4


def test_pen_ink_over_glass_is_green_or_blue(pen_slide):
    ink_on_glass = pen_slide.pen_polygons_level0.difference(pen_slide.tissue_polygons_level0.buffer(200))
    x, y = _deep_point(ink_on_glass, 20)
    mean = _read(pen_slide.path, "tiffslide", (x - 8, y - 8), 0, (16, 16)).reshape(-1, 3).mean(axis=0)
    r, g, b = mean
    assert mean.mean() < 180, f"ink is dark, got {mean}"
    assert (g > r and g > b) or (b > r and b > g), f"ink is green or blue, got {mean}"


def test_stained_pixels_match_the_returned_polygons(pen_slide):
    """Rendering and geometry agree: what the polygons call tissue or pen is stained, the rest is glass."""
    level = 1
    d = pen_slide.level_downsamples[level]
    w, h = pen_slide.level_dimensions[level]
    image = _read(pen_slide.path, "openslide", (0, 0), level, (w, h)).astype(np.int16)
    stained = (image.max(axis=2) - image.min(axis=2) > 20) | (image.min(axis=2) < 200)
    ys, xs = np.mgrid[0:h, 0:w]
    cx, cy = (xs.ravel() + 0.5) * d, (ys.ravel() + 0.5) * d
    covered = shapely.union_all([pen_slide.tissue_polygons_level0, pen_slide.pen_polygons_level0])
    inside = shapely.contains_xy(covered, cx, cy).reshape(h, w)
    # Glass is glass everywhere; tissue texture has a few white gaps (lumens), so mostly stained.
    assert (~stained[~inside]).mean() > 0.995
    assert stained[inside].mean() > 0.85


def test_lower_levels_are_downsampled_views_of_level_zero(pen_slide):
    from PIL import Image

    x, y = _deep_point(pen_slide.tissue_polygons_level0, 300)
    x, y = x - x % 16 - 256, y - y % 16 - 256
    level0 = _read(pen_slide.path, "tiffslide", (x, y), 0, (512, 512))
    level1 = _read(pen_slide.path, "tiffslide", (x, y), 1, (128, 128)).astype(np.float64)
    reduced = np.asarray(Image.fromarray(level0).resize((128, 128), Image.Resampling.BOX)).astype(np.float64)
    aligned = np.abs(reduced - level1).mean()
    shifted = np.abs(reduced[:, 1:] - level1[:, :-1]).mean()
    assert aligned < 10  # JPEG noise on busy texture (about 0.4 with lossless tiles)
    assert aligned < shifted / 2  # and the same geometry: one pixel off is far worse


def test_same_seed_gives_the_same_slide_and_another_seed_another(tmp_path, he_source):
    a = make_pyramidal_slide(tmp_path / "a.tiff", width=2048, height=2048, source=he_source, seed=7, levels=(1, 4))
    b = make_pyramidal_slide(tmp_path / "b.tiff", width=2048, height=2048, source=he_source, seed=7, levels=(1, 4))
    c = make_pyramidal_slide(tmp_path / "c.tiff", width=2048, height=2048, source=he_source, seed=8, levels=(1, 4))
    assert a.tissue_polygons_level0.equals(b.tissue_polygons_level0)
    assert not a.tissue_polygons_level0.equals(c.tissue_polygons_level0)
    assert a.pen_polygons_level0.is_empty
    assert _read(a.path, "tiffslide", (0, 0), 1, (512, 512)).tobytes() == _read(b.path, "tiffslide", (0, 0), 1, (512, 512)).tobytes()


def test_explicit_blobs_lossless_compression_and_partial_edge_tiles(tmp_path, he_source):
    blob = Ellipse(cx=900, cy=700, rx=400, ry=250, angle=0.3)
    slide = make_pyramidal_slide(
        tmp_path / "z.tiff", width=2000, height=1500, tile=256, levels=(1, 2), source=he_source,
        tissue=[blob], compression="zlib",
    )
    assert slide.tissue_polygons_level0.area == pytest.approx(np.pi * 400 * 250, rel=0.01)
    import tiffslide

    with tiffslide.TiffSlide(str(slide.path)) as s:
        assert s.level_dimensions == ((2000, 1500), (1000, 750))
        corner = s.read_region((1990, 1490), 0, (10, 10), as_array=True)  # inside a partial edge tile
    assert corner.min() >= 225
    assert Point(900, 700).within(slide.tissue_polygons_level0)


def test_rejects_bad_arguments(tmp_path, he_source):
    with pytest.raises(ValueError, match="levels"):
        make_pyramidal_slide(tmp_path / "x.tiff", width=512, height=512, levels=(2, 4), source=he_source)
    with pytest.raises(ValueError, match="tile"):
        make_pyramidal_slide(tmp_path / "x.tiff", width=512, height=512, tile=100, source=he_source)
    with pytest.raises(ValueError, match="source"):
        make_pyramidal_slide(tmp_path / "x.tiff", width=512, height=512, source=np.zeros((64, 64), np.uint8))


def test_truncated_copy_keeps_a_prefix_and_the_engine_calls_it_corrupt(tmp_path, pen_slide):
    import wsiengine as we

    dst = truncated_copy(pen_slide.path, tmp_path / "cut.tiff", 0.5)
    data, original = dst.read_bytes(), pen_slide.path.read_bytes()
    assert len(data) == int(len(original) * 0.5)
    assert original.startswith(data)
    with pytest.raises(we.errors.CorruptSlideError):
        we.open_slide(dst)
    with pytest.raises(ValueError):
        truncated_copy(pen_slide.path, tmp_path / "x.tiff", 1.0)


@pytest.mark.slow
def test_a_large_slide_is_written_with_bounded_memory(tmp_path, he_source):
    """16384 x 16384 px (768 MiB of raw RGB) in well under 400 MB peak RSS: tiles are streamed."""
    script = textwrap.dedent(
        f"""
        from wsiengine.testing.synthetic import make_pyramidal_slide
        make_pyramidal_slide({str(tmp_path / 'big.tiff')!r}, width=16384, height=16384, pen=True)
        # VmHWM: this process's own peak (ru_maxrss would inherit pytest's across fork + exec)
        print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    peak_mb = int(result.stdout.split()[-1]) / 1024
    assert peak_mb < 400, f"peak RSS {peak_mb:.0f} MB"
