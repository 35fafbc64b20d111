"""Deep-zoom (DZI) tiles of a slide, read through wsiengine's own readers, and a small bounded
cache of open readers.

Deep-zoom level ``L`` of a ``W`` x ``H`` slide is the slide shrunk by ``2 ** (max_level - L)``
(``max_level = ceil(log2(max(W, H)))``, so level ``max_level`` is level 0 of the slide); tiles
are 254 px with a 1-px overlap (256 px at most), JPEG. Each tile is read from the pyramid level
whose downsample is the largest not above the tile's, then shrunk by area averaging: one read,
one resample. Far below the coarsest level (a slide stored with one level, seen whole), tiles are
cut from the result store's overview image instead, so no zoom reads the whole slide at full
resolution. Only the slide's pyramid is ever read: its label and macro images are not.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..slide import Slide, open_slide

__all__ = ["TILE_PX", "OVERLAP_PX", "OVERVIEW_SHRINK", "DeepZoom", "Overview", "ReaderCache", "encode_jpeg",
           "encode_png"]

TILE_PX = 254
OVERLAP_PX = 1
JPEG_QUALITY = 80


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, "PNG", optimize=False, compress_level=3)
    return buffer.getvalue()


@dataclass(frozen=True)
class DeepZoom:
    """The deep-zoom pyramid of one slide (see the module docstring)."""

    width: int
    height: int
    level_downsamples: tuple[float, ...]
    level_dimensions: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, slide: Slide) -> "DeepZoom":
        w, h = slide.dimensions
        return cls(int(w), int(h), tuple(float(d) for d in slide.level_downsamples),
                   tuple((int(a), int(b)) for a, b in slide.level_dimensions))

    @property
    def max_level(self) -> int:
        return max(0, math.ceil(math.log2(max(self.width, self.height, 1))))

    def level_size(self, level: int) -> tuple[int, int]:
        scale = 2 ** (self.max_level - level)
        return max(1, math.ceil(self.width / scale)), max(1, math.ceil(self.height / scale))

    def tile_count(self, level: int) -> tuple[int, int]:
        w, h = self.level_size(level)
        return math.ceil(w / TILE_PX), math.ceil(h / TILE_PX)

    def dzi(self) -> str:
        """The DZI descriptor (XML)."""
        return ('<?xml version="1.0" encoding="UTF-8"?>\n'
                f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="jpeg" Overlap="{OVERLAP_PX}" '
                f'TileSize="{TILE_PX}"><Size Width="{self.width}" Height="{self.height}"/></Image>\n')

    def exists(self, level: int, col: int, row: int) -> bool:
        if not 0 <= level <= self.max_level:
            return False
        cols, rows = self.tile_count(level)
        return 0 <= col < cols and 0 <= row < rows

    def tile_region(self, level: int, col: int, row: int) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
        """The tile's level-0 box ``(x0, y0, x1, y1)`` and its output size ``(w, h)`` px."""
        lw, lh = self.level_size(level)
        x0 = col * TILE_PX - (OVERLAP_PX if col > 0 else 0)
        y0 = row * TILE_PX - (OVERLAP_PX if row > 0 else 0)
        x1 = min((col + 1) * TILE_PX + OVERLAP_PX, lw)
        y1 = min((row + 1) * TILE_PX + OVERLAP_PX, lh)
        scale = 2 ** (self.max_level - level)
        box = (x0 * scale, y0 * scale, min(x1 * scale, self.width), min(y1 * scale, self.height))
        return box, (x1 - x0, y1 - y0)

    def read_plan(self, level: int, col: int, row: int) -> tuple[int, tuple[int, int], tuple[int, int], tuple[int, int]]:
        """``(pyramid level, level-0 origin, read size at that level, output size)`` of a tile."""
        (x0, y0, x1, y1), out = self.tile_region(level, col, row)
        scale = 2 ** (self.max_level - level)
        candidates = [k for k, d in enumerate(self.level_downsamples) if d <= scale * 1.0001]
        best = max(candidates, key=lambda k: self.level_downsamples[k]) if candidates else 0
        d = self.level_downsamples[best]
        lw, lh = self.level_dimensions[best]
        rx, ry = int(x0 / d), int(y0 / d)
        rw = max(1, min(math.ceil((x1 - x0) / d), lw - rx))
        rh = max(1, min(math.ceil((y1 - y0) / d), lh - ry))
        return best, (int(x0), int(y0)), (rw, rh), out

    def shrink(self, level: int, col: int, row: int) -> float:
        """How many times the pyramid read is larger than the tile (1: a level matches)."""
        _, _, size, out = self.read_plan(level, col, row)
        return max(size[0] / max(1, out[0]), size[1] / max(1, out[1]))

    def tile(self, slide: Slide, level: int, col: int, row: int) -> np.ndarray:
        """The tile's RGB pixels, ``(h, w, 3)`` uint8."""
        best, origin, size, out = self.read_plan(level, col, row)
        return _fit(slide.read_region(origin, best, size), out)

    def tile_from_overview(self, overview: "Overview", level: int, col: int, row: int) -> np.ndarray:
        """The tile cut from a whole-slide overview image (for zooms far below the slide's
        coarsest pyramid level, where a read would cover the slide at full resolution)."""
        (x0, y0, x1, y1), out = self.tile_region(level, col, row)
        px, py = overview.level0_per_px
        h, w = overview.image.shape[:2]
        c0, r0 = min(w - 1, int(x0 / px)), min(h - 1, int(y0 / py))
        c1, r1 = max(c0 + 1, min(w, math.ceil(x1 / px))), max(r0 + 1, min(h, math.ceil(y1 / py)))
        return _fit(np.ascontiguousarray(overview.image[r0:r1, c0:c1, :3]), out)


@dataclass(frozen=True, eq=False)
class Overview:
    """A whole-slide image at ``level0_per_px`` level-0 pixels per pixel (x, y): the result
    store's thumbnail, made by the run's tissue step."""

    image: np.ndarray
    level0_per_px: tuple[float, float]


#: A tile is cut from the overview when the pyramid read would be this many times larger.
OVERVIEW_SHRINK = 8


def _fit(image: np.ndarray, out: tuple[int, int]) -> np.ndarray:
    """``image`` resized to ``out`` (w, h): area averaging when shrinking, bilinear when enlarging."""
    from PIL import Image

    if (image.shape[1], image.shape[0]) == out:
        return image
    resample = Image.Resampling.BOX if image.shape[1] > out[0] else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(image).resize(out, resample))


class _Reader:
    """An open slide, its deep-zoom pyramid, and the lock its reads take."""

    def __init__(self, slide: Slide) -> None:
        self.slide = slide
        self.deepzoom = DeepZoom.of(slide)
        self.lock = threading.Lock()
        self.closed = False

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.slide.close()


class ReaderCache:
    """At most ``max_open`` open slides, least recently used closed first (memory stays bounded
    however many slides the folder holds). One slide's reads are serial (backends differ in thread
    safety) while other slides' proceed in parallel."""

    def __init__(self, max_open: int = 4, opener: Callable[[Path], Slide] | None = None) -> None:
        if max_open < 1:
            raise ValueError("max_open must be >= 1")
        self.max_open = max_open
        self._opener = opener or (lambda path: open_slide(path, require_mpp=False))
        self._open: OrderedDict[Path, _Reader] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._open)

    def _get(self, path: Path) -> _Reader:
        with self._lock:
            reader = self._open.get(path)
            if reader is not None:
                self._open.move_to_end(path)
                return reader
        reader = _Reader(self._opener(path))  # outside the lock: opening a slide can take a while
        evicted = []
        with self._lock:
            if path in self._open:  # another thread opened it meanwhile
                evicted.append(reader)
                reader = self._open[path]
            else:
                self._open[path] = reader
                while len(self._open) > self.max_open:
                    evicted.append(self._open.popitem(last=False)[1])
        for old in evicted:
            old.close()
        return reader

    def deepzoom(self, path: Path) -> DeepZoom:
        """The slide's deep-zoom pyramid (opening it if needed)."""
        return self._get(path).deepzoom

    def tile(self, path: Path, level: int, col: int, row: int, overview: Callable[[], Overview | None] | None = None
             ) -> np.ndarray:
        """One deep-zoom tile of the slide at ``path`` (see :meth:`DeepZoom.tile`). When the pyramid
        read would be more than :data:`OVERVIEW_SHRINK` times the tile (a slide without coarse
        levels, seen whole) and ``overview()`` gives an image at least as fine as the tile, the
        tile is cut from it instead: no read of the whole slide at full resolution."""
        deepzoom = self.deepzoom(path)
        if overview is not None and deepzoom.shrink(level, col, row) > OVERVIEW_SHRINK:
            image = overview()
            scale = 2 ** (deepzoom.max_level - level)
            if image is not None and max(image.level0_per_px) <= scale * 1.0001:
                return deepzoom.tile_from_overview(image, level, col, row)
        for _ in range(3):
            reader = self._get(path)
            with reader.lock:
                if not reader.closed:  # evicted between _get and here: open it again
                    return reader.deepzoom.tile(reader.slide, level, col, row)
        raise RuntimeError(f"'{path.name}' was closed three times while being read; raise max_open")

    def close(self) -> None:
        with self._lock:
            readers = list(self._open.values())
            self._open.clear()
        for reader in readers:
            reader.close()
