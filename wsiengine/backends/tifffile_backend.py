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
* Before a stored tile is decoded it is checked against the TIFF
  (:mod:`wsiengine.backends.tile_checks`, shared with the tiffslide backend):

  - a JPEG tile must start with SOI, carry a frame header (SOF) no larger than the declared
    tile, hold no marker other than restart markers inside a baseline scan, and end with EOI. A
    JPEG whose SOF claims 65000 x 65000 px is therefore refused without allocating anything,
    where the decoder would have asked for 12 GB;
  - the entropy-coded data of a sequential Huffman 8-bit JPEG tile is then walked without the
    IDCT (:func:`wsiengine.kernels.jpeg_entropy.check_scan`, about a quarter of the decode time, once per tile): every
    Huffman code, restart marker and padding byte as libjpeg reads them, so whatever libjpeg
    would warn about ("Corrupt JPEG data: bad Huffman code", "premature end of data segment",
    "extraneous bytes before marker", a wrong restart marker) is damage here as in OpenSlide,
    plus values no valid encoder writes (AC runs past coefficient 63, over-long sizes, a DC
    beyond what the quantisation table allows: damage drifts the DC predictor, so this
    catches it blocks later). Random bytes or a run of zeros written inside a scan of the sample
    slide are caught in about 99-100 % of cases. Damage that still decodes to exactly as many
    blocks of plausible values (a flipped bit often does) cannot be told from image data.
    Progressive, arithmetic-coded, lossless and 12-bit tiles get the marker checks only;
  - a JPEG 2000 tile's SIZ size must fit the declared tile, and its codestream structure must
    hold: main header, tile-parts whose lengths (Psot) end exactly at the next tile-part or EOC,
    and packet data free of the byte pairs 0xFF90..0xFFFF that bit stuffing rules out (SOP and
    EPH markers where the COD enables them, SOP numbers counting up). JPEG 2000 has no
    checksum and OpenJPEG decodes damaged code-block data silently: damage inside code-block
    data that keeps the bit-stuffing rule cannot be detected (200 random bytes at a random place
    in a tile of the TCGA sample are caught about a third of the time).
* Sparse tiles (byte count 0) are background and allocate nothing.

A read that touches a damaged tile (bad header, size mismatch, early end-of-image, truncated
data, damaged entropy-coded data or codestream structure, decoder error, decoded shape other
than the declared tile) raises :class:`~wsiengine.errors.SlideReadError` naming the level, the
tile index, its row and column and what is wrong; it is never served silently, and nothing of it
is cached. A batch records such a slide as failed with that message.
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .base import SlideBackend
from .tile_checks import StoredTiles, check_jpeg_tile

__all__ = ["TiffTileBackend", "MAX_TILE_BYTES", "check_jpeg_tile"]

#: the most bytes one decoded tile may take (the declared TileWidth x TileLength x samples);
#: a level with larger tiles is refused at open.
MAX_TILE_BYTES = 256 * 1024 * 1024

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
        w0, h0 = self._pages[0].imagewidth, self._pages[0].imagelength
        self.level_dimensions = tuple((int(p.imagewidth), int(p.imagelength)) for p in self._pages)
        # As OpenSlide: the mean of the width and height ratios.
        self.level_downsamples = tuple((w0 / w + h0 / h) / 2 for w, h in self.level_dimensions)
        self.properties = self._read_properties(tif)
        self.vendor = "aperio" if tif.is_svs else ("ome-tiff" if tif.is_ome else "generic-tiff")
        self._stored = StoredTiles(str(path), self._pages)
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

    def _tile(self, level: int, index: int) -> np.ndarray | None:
        """The decoded ``(tile_length, tile_width, 3)`` tile, or None for a sparse (absent) tile."""
        key = (level, index)
        tile = self._cache.get(key)
        if tile is not None:
            return tile
        page = self._pages[level]
        data = self._stored.read(level, index)  # checked: SlideReadError naming the tile if damaged
        if data is None:  # sparse tile: nothing stored, background (the caller's white)
            return None
        tw, th = int(page.tilewidth), int(page.tilelength)
        try:
            decoded, _, _ = page.decode(data, index, jpegtables=page.jpegtables, jpegheader=page.jpegheader)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a damaged tile
            raise self._stored.damaged(level, index, f"the decoder failed ({type(exc).__name__}: {exc})") from exc
        if decoded is None or decoded.size != th * tw * page.samplesperpixel:
            shape = None if decoded is None else decoded.shape
            raise self._stored.damaged(level, index, f"it decodes to {shape}, not the declared {tw}x{th} px tile")
        tile = decoded.reshape(th, tw, -1)[..., :3]
        self._cache.put(key, tile)
        return tile

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        page = self._pages[level]
        downsample = self.level_downsamples[level]
        level_w, level_h = self.level_dimensions[level]
        lx, ly = round(x / downsample), round(y / downsample)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + width, level_w), min(ly + height, level_h)
        inside = (x0, y0, x1, y1) == (lx, ly, lx + width, ly + height)
        # Inside the level every pixel is written below (sparse tiles made white there), so no fill.
        out = np.empty((height, width, 3), dtype=np.uint8) if inside else np.full((height, width, 3), 255, dtype=np.uint8)
        if x1 <= x0 or y1 <= y0:
            return out
        tw, th = page.tilewidth, page.tilelength
        tiles_across = math.ceil(level_w / tw)
        for row in range(y0 // th, (y1 - 1) // th + 1):
            for col in range(x0 // tw, (x1 - 1) // tw + 1):
                tile = self._tile(level, row * tiles_across + col)
                tx0, ty0 = col * tw, row * th
                sx0, sy0 = max(x0, tx0), max(y0, ty0)
                sx1, sy1 = min(x1, tx0 + tw), min(y1, ty0 + th)
                if tile is None:  # sparse: background
                    out[sy0 - ly : sy1 - ly, sx0 - lx : sx1 - lx] = 255
                    continue
                out[sy0 - ly : sy1 - ly, sx0 - lx : sx1 - lx] = tile[sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0]
        return out

    def tile_grid(self, level: int) -> tuple[int, int]:
        """(width, height) of the level's stored tiles: a read aligned to them decodes each once."""
        page = self._pages[level]
        return int(page.tilewidth), int(page.tilelength)

    def associated_image_names(self) -> tuple[str, ...]:
        return tuple(series.name.lower() for series in self._tif.series[1:] if series.name)

    def close(self) -> None:
        self._stored.close()
        self._tif.close()
