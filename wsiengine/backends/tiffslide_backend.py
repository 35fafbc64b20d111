"""tiffslide backend: Aperio SVS, generic and plain (untiled) TIFF, OME-TIFF, through tifffile.

Before tiffslide reads a region, the stored JPEG / JPEG 2000 tiles it touches are checked as the
tifffile backend checks them (:class:`~wsiengine.backends.tile_checks.StoredTiles`, each tile
once per open slide): a damaged tile raises the same
:class:`~wsiengine.errors.SlideReadError` naming it. Levels that are not tiled (strips), or
whose page does not match tiffslide's level, are read unchecked.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .base import SlideBackend, composite_on_white
from .tile_checks import StoredTiles

__all__ = ["TiffSlideBackend"]


class TiffSlideBackend(SlideBackend):
    """Read a slide with tiffslide (pure Python over tifffile and imagecodecs)."""

    name = "tiffslide"
    properties_prefix = "tiffslide"  # its level[N].tile-width/-height give tile_grid

    def __init__(self, path: Path, handle) -> None:
        self.path = path
        self._handle = handle
        self.level_dimensions = tuple(tuple(map(int, d)) for d in handle.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in handle.level_downsamples)
        self.properties = {k: str(v) for k, v in handle.properties.items() if v is not None}
        self.vendor = self.properties.get("tiffslide.vendor")
        self._stored = self._stored_tiles(path, handle)

    def _stored_tiles(self, path: Path, handle) -> StoredTiles | None:
        """The checker of the levels' stored tiles: tiffslide's level ``i`` is page
        ``series[series-index].levels[i].keyframe``; a level whose page is untiled or not of the
        level's size is left unchecked (None for it); None when tiffslide has no TiffFile."""
        try:
            tif = handle.ts_tifffile
            levels = tif.series[int(self.properties.get("tiffslide.series-index", 0))].levels
        except (RuntimeError, NotImplementedError, AttributeError, IndexError):
            return None
        pages = []
        for level, size in enumerate(self.level_dimensions):
            page = levels[level].keyframe if level < len(levels) else None
            fits = page is not None and page.is_tiled and (int(page.imagewidth), int(page.imagelength)) == size
            pages.append(page if fits and page.imagedepth == 1 else None)
        return StoredTiles(str(path), pages) if any(p is not None for p in pages) else None

    @classmethod
    def open(cls, path: Path) -> "TiffSlideBackend":
        import tiffslide

        return cls(path, tiffslide.TiffSlide(str(path)))

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        downsample = self.level_downsamples[level]
        level_w, level_h = self.level_dimensions[level]
        # Level pixel of the level-0 location: rounded, as OpenSlide does (tiffslide floors).
        lx, ly = round(x / downsample), round(y / downsample)
        out = np.full((height, width, 3), 255, dtype=np.uint8)  # outside the slide is white
        cx0, cy0 = max(lx, 0), max(ly, 0)
        cx1, cy1 = min(lx + width, level_w), min(ly + height, level_h)
        if cx1 <= cx0 or cy1 <= cy0:
            return out
        if self._stored is not None:  # SlideReadError naming the first damaged tile
            self._stored.verify(level, cx0, cy0, cx1, cy1)
        # A level-0 location that tiffslide floors back to exactly (cx0, cy0).
        location = (math.ceil(cx0 * downsample), math.ceil(cy0 * downsample))
        array = self._handle.read_region(location, int(level), (cx1 - cx0, cy1 - cy0), as_array=True, padding=False)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        array = composite_on_white(array) if array.shape[2] == 4 else array[..., :3]
        if (cx0, cy0, cx1, cy1) == (lx, ly, lx + width, ly + height):
            return np.ascontiguousarray(array, dtype=np.uint8)
        out[cy0 - ly : cy1 - ly, cx0 - lx : cx1 - lx] = array
        return out


    def associated_image_names(self) -> tuple[str, ...]:
        return tuple(self._handle.associated_images)

    def close(self) -> None:
        if self._stored is not None:
            self._stored.close()
        self._handle.close()
