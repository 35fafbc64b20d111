"""Direct tile backend: decode a TIFF pyramid's stored tiles with tifffile + imagecodecs.

A region is served by reading the raw bytes of the stored tiles it touches (``os.pread``,
thread-safe and without the GIL) and decoding them with imagecodecs (libjpeg-turbo, OpenJPEG,
zlib, ...), each tile at most once thanks to a small per-slide cache of decoded tiles. There
is no alpha compositing and no sub-pixel drawing: level coordinates are
``round(level-0 / downsample)``, as in the tiffslide backend.

It reads tiled, 8-bit RGB TIFF pyramids of three flavours whose pixels are exactly their
stored tiles: Aperio SVS (JPEG, JPEG 2000), OME-TIFF and generic tiled TIFF. Anything else
(strips, DICOM, MIRAX, NDPI, Philips, Leica SCN, Ventana BIF with its overlapping tiles, ...) is
refused at open, and ``auto`` goes on to OpenSlide. On 2 cores it streams CMU-1-Small-Region
tiles about 3x faster than OpenSlide (see ``benchmarks/bench_tiling.py``).

Hostile and damaged files
-------------------------
Nothing is decoded before its size is known to be sane:

* At open, a level whose declared tile (TileWidth x TileLength x samples) would decode to more
  than :data:`MAX_TILE_BYTES` is refused (``ValueError`` naming the size; ``auto`` goes on to
  OpenSlide, an explicit ``backend="tifffile"`` gets an :class:`~wsiengine.errors.UnsupportedFormatError`).
* Before a stored tile is decoded its own header is checked against the TIFF: a JPEG tile must
  start with SOI, carry a frame header (SOF) no larger than the declared tile, hold no marker
  other than restart markers inside a baseline scan, and end with EOI; a JPEG 2000 tile's SIZ
  size must fit the declared tile. A JPEG whose SOF claims 65000 x 65000 px is therefore refused
  without allocating anything, where the decoder would have asked for 12 GB.
* Sparse tiles (byte count 0) are background and allocate nothing.

A read that touches a damaged tile (bad header, size mismatch, early end-of-image, truncated
data, decoder error, decoded shape other than the declared tile) raises
:class:`~wsiengine.errors.SlideReadError` naming the level, the tile index, its row and
column and what is wrong; it is never served silently, and nothing of it is cached. A batch records
such a slide as failed with that message. Damage the JPEG decoder itself cannot see (libjpeg
decodes random bytes inside an entropy-coded scan without complaint when they form no marker)
is not detected: OpenSlide, which treats libjpeg warnings as errors, is stricter there.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..errors import SlideReadError
from .base import SlideBackend

__all__ = ["TiffTileBackend", "MAX_TILE_BYTES", "check_jpeg_tile"]

#: the most bytes one decoded tile may take (the declared TileWidth x TileLength x samples);
#: a level with larger tiles is refused at open.
MAX_TILE_BYTES = 256 * 1024 * 1024

#: TIFF compression codes whose tiles are JPEG / JPEG 2000 streams checked before decoding
_JPEG_CODES = frozenset({7})
_JPEG2K_CODES = frozenset({33003, 33004, 33005, 34712})
#: JPEG start-of-frame markers (SOF0..SOF15 without DHT 0xC4, JPG 0xC8 and DAC 0xCC)
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
#: markers without a length field
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})


def check_jpeg_tile(data: bytes, tile_width: int, tile_length: int) -> str | None:
    """Why a JPEG tile's bytes cannot be the declared ``tile_width`` x ``tile_length`` px tile, or None.

    Checks, without decoding: SOI first; a frame header (SOF) whose height and width are
    non-zero and no larger than the declared tile; a start of scan; in a sequential (baseline)
    scan no marker other than restart markers before the end; EOI last. The cost is one pass of
    numpy over the bytes.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return f"it does not start with a JPEG start-of-image marker (starts with {data[:4].hex(' ') or 'nothing'})"
    pos, frame, progressive = 2, None, False
    while True:  # header segments up to the first start of scan
        while pos < n and data[pos] == 0xFF and pos + 1 < n and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes
        if pos + 2 > n or data[pos] != 0xFF:
            return f"its header is broken at byte {pos:,} (no marker where one must be)"
        marker = data[pos + 1]
        if marker == 0xD9:
            return "it ends (end-of-image marker) before any image data"
        if marker in _STANDALONE:
            pos += 2
            continue
        if pos + 4 > n:
            return f"its header is cut short at byte {pos:,}"
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2 or pos + 2 + length > n:
            return f"its marker 0xFF{marker:02X} at byte {pos:,} has a length ({length}) past the end of the tile"
        if marker in _SOF_MARKERS:
            if length < 8:
                return f"its frame header (SOF) at byte {pos:,} is too short"
            height = (data[pos + 5] << 8) | data[pos + 6]
            width = (data[pos + 7] << 8) | data[pos + 8]
            frame, progressive = (width, height), marker in (0xC2, 0xC6, 0xCA, 0xCE)
            if width == 0 or height == 0:
                return f"its frame header claims {width}x{height} px (height from a DNL marker is not supported)"
            if width > tile_width or height > tile_length:
                return (f"its frame header claims {width}x{height} px but the TIFF declares {tile_width}x{tile_length} px "
                        "tiles: refusing to decode it (a decompression bomb or a damaged header)")
        if marker == 0xDA:
            scan = pos + 2 + length
            break
        pos += 2 + length
    if frame is None:
        return "it has no frame header (SOF) before its image data"
    end = n
    while end > scan and data[end - 1] == 0x00:  # zero padding some writers leave after EOI
        end -= 1
    if end - scan < 2 or data[end - 2] != 0xFF or data[end - 1] != 0xD9:
        return "it does not end with an end-of-image marker: the tile is cut short or overwritten"
    body = np.frombuffer(data, np.uint8, end - 2 - scan, scan)
    ff = np.flatnonzero(body[:-1] == 0xFF)
    if ff.size:
        following = body[ff + 1]
        bad = (following != 0x00) & (following != 0xFF) & ((following < 0xD0) | (following > 0xD7))
        if progressive:  # later scans bring their own tables and headers; only an early EOI is damage
            bad &= following == 0xD9
        if bad.any():
            at = int(ff[np.argmax(bad)])
            return (f"marker 0xFF{int(body[at + 1]):02X} inside its image data at byte {scan + at:,} of {n:,} "
                    "(premature end of the image: the tile is damaged)")
    if body.size and body[-1] == 0xFF:
        return "its image data ends in a lone 0xFF byte: the tile is damaged"
    return None


def check_jpeg2k_tile(data: bytes, tile_width: int, tile_length: int) -> str | None:
    """Why a JPEG 2000 tile cannot be the declared tile (its SIZ image size is larger, or it has no SIZ), or None."""
    at = data.find(b"\xff\x4f\xff\x51", 0, 4096)  # SOC then SIZ, in a raw codestream or inside a JP2 box
    if at < 0 or at + 24 > len(data):
        return "it has no JPEG 2000 image header (SOC/SIZ markers)"
    xsiz, ysiz, xo, yo = np.frombuffer(data, ">u4", 4, at + 8).tolist()
    width, height = xsiz - xo, ysiz - yo
    if width <= 0 or height <= 0 or width > tile_width or height > tile_length:
        return (f"its JPEG 2000 header claims {width}x{height} px but the TIFF declares {tile_width}x{tile_length} px "
                "tiles: refusing to decode it")
    return None

_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)")


class _TileCache:
    """A thread-safe LRU of decoded tiles, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        with self._lock:
            tile = self._items.get(key)
            if tile is not None:
                self._items.move_to_end(key)
            return tile

    def put(self, key: tuple[int, int], tile: np.ndarray) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = tile
            self._bytes += tile.nbytes
            while self._bytes > self.max_bytes and self._items:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes


#: tifffile flags of TIFF flavours whose pixels need more than decoding stored tiles
#: (overlapping tiles, several images, JPEG restart-marker strips, ...)
_VENDOR_FLAGS = ("is_ndpi", "is_philips", "is_scn", "is_bif", "is_qpi", "is_sis", "is_lsm", "is_stk", "is_fluoview", "is_nih", "is_mdgel", "is_indica", "is_streak")


def _vendor_flavour(tif) -> str | None:
    """The name of a vendor flavour the direct path must not read, or None (SVS, OME, generic)."""
    if tif.is_svs or tif.is_ome:
        return None
    for flag in _VENDOR_FLAGS:
        if getattr(tif, flag, False):
            return flag[3:].upper()
    return None


class TiffTileBackend(SlideBackend):
    """Read tiled TIFF pyramids by decoding stored tiles directly (tifffile + imagecodecs)."""

    name = "tifffile"
    #: bytes of decoded tiles kept per open slide
    cache_bytes = 64 * 1024 * 1024

    def __init__(self, path: Path, tif) -> None:
        self.path = path
        self._tif = tif
        series = tif.series[0]
        self._pages = [level.keyframe for level in series.levels]
        for page in self._pages:
            if not page.is_tiled or page.dtype != np.uint8 or page.samplesperpixel not in (3, 4) or page.planarconfig != 1:
                raise ValueError("not a tiled 8-bit RGB pyramid (tifffile direct tile path)")
        if not all(p.imagedepth == 1 for p in self._pages):
            raise ValueError("volumetric TIFF tiles are not supported")
        for level, page in enumerate(self._pages):
            tile_bytes = int(page.tilewidth) * int(page.tilelength) * int(page.samplesperpixel)
            if tile_bytes > MAX_TILE_BYTES:
                raise ValueError(
                    f"level {level} declares {page.tilewidth}x{page.tilelength} px tiles ({tile_bytes / 2**20:,.0f} MiB "
                    f"decoded each), over the direct tile path's {MAX_TILE_BYTES / 2**20:,.0f} MiB per-tile limit: "
                    "unsupported by this reader"
                )
        # All levels' tile positions, taken from the level's pages.
        self._offsets = [np.asarray(p.dataoffsets, np.int64) for p in self._pages]
        self._counts = [np.asarray(p.databytecounts, np.int64) for p in self._pages]
        w0, h0 = self._pages[0].imagewidth, self._pages[0].imagelength
        self.level_dimensions = tuple((int(p.imagewidth), int(p.imagelength)) for p in self._pages)
        # As OpenSlide: the mean of the width and height ratios.
        self.level_downsamples = tuple((w0 / w + h0 / h) / 2 for w, h in self.level_dimensions)
        self.properties = self._read_properties(tif)
        self.vendor = "aperio" if tif.is_svs else ("ome-tiff" if tif.is_ome else "generic-tiff")
        self._fd = os.open(str(path), os.O_RDONLY)
        self._cache = _TileCache(self.cache_bytes)

    @staticmethod
    def _read_properties(tif) -> dict[str, str]:
        props = {"tifffile.series": tif.series[0].kind or "", "tifffile.levels": str(len(tif.series[0].levels))}
        description = tif.pages.first.description or ""
        if tif.is_svs:
            props["aperio.Description"] = description
            match = _APERIO_MPP.search(description)
            if match:
                props["aperio.MPP"] = match.group(1)
        return props

    @classmethod
    def open(cls, path: Path) -> "TiffTileBackend":
        import tifffile

        tif = tifffile.TiffFile(str(path))
        try:
            flavour = _vendor_flavour(tif)
            if flavour is not None:
                raise ValueError(f"{flavour} TIFF needs vendor-specific handling; left to OpenSlide")
            return cls(path, tif)
        except Exception:
            tif.close()
            raise

    def _damaged(self, level: int, index: int, why: str) -> SlideReadError:
        page = self._pages[level]
        across = math.ceil(page.imagewidth / page.tilewidth)
        return SlideReadError(
            f"tile {index} (row {index // across}, column {index % across}) of level {level} of '{self.path.name}' "
            f"is damaged: {why}"
        )

    def _tile(self, level: int, index: int) -> np.ndarray | None:
        """The decoded ``(tile_length, tile_width, 3)`` tile, or None for a sparse (absent) tile."""
        key = (level, index)
        tile = self._cache.get(key)
        if tile is not None:
            return tile
        page = self._pages[level]
        count = int(self._counts[level][index])
        if count == 0:  # sparse tile: nothing stored, background (the caller's white)
            return None
        tw, th = int(page.tilewidth), int(page.tilelength)
        data = os.pread(self._fd, count, int(self._offsets[level][index]))
        if len(data) != count:
            raise self._damaged(level, index, f"it is cut short ({len(data):,} of {count:,} bytes): the file is truncated")
        compression = int(page.compression)
        why = None
        if compression in _JPEG_CODES:
            why = check_jpeg_tile(data, tw, th)
        elif compression in _JPEG2K_CODES:
            why = check_jpeg2k_tile(data, tw, th)
        if why is not None:
            raise self._damaged(level, index, why)
        try:
            decoded, _, _ = page.decode(data, index, jpegtables=page.jpegtables, jpegheader=page.jpegheader)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a damaged tile
            raise self._damaged(level, index, f"the decoder failed ({type(exc).__name__}: {exc})") from exc
        if decoded is None or decoded.size != th * tw * page.samplesperpixel:
            shape = None if decoded is None else decoded.shape
            raise self._damaged(level, index, f"it decodes to {shape}, not the declared {tw}x{th} px tile")
        tile = decoded.reshape(th, tw, -1)[..., :3]
        self._cache.put(key, tile)
        return tile

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        page = self._pages[level]
        downsample = self.level_downsamples[level]
        level_w, level_h = self.level_dimensions[level]
        lx, ly = round(x / downsample), round(y / downsample)
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + width, level_w), min(ly + height, level_h)
        if x1 <= x0 or y1 <= y0:
            return out
        tw, th = page.tilewidth, page.tilelength
        tiles_across = math.ceil(level_w / tw)
        for row in range(y0 // th, (y1 - 1) // th + 1):
            for col in range(x0 // tw, (x1 - 1) // tw + 1):
                tile = self._tile(level, row * tiles_across + col)
                if tile is None:  # sparse: already white
                    continue
                tx0, ty0 = col * tw, row * th
                sx0, sy0 = max(x0, tx0), max(y0, ty0)
                sx1, sy1 = min(x1, tx0 + tw), min(y1, ty0 + th)
                out[sy0 - ly : sy1 - ly, sx0 - lx : sx1 - lx] = tile[sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0]
        return out

    def associated_image_names(self) -> tuple[str, ...]:
        return tuple(series.name.lower() for series in self._tif.series[1:] if series.name)

    def close(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass
        self._tif.close()
