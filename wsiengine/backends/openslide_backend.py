"""OpenSlide backend: Aperio (JPEG, JPEG 2000), Hamamatsu, Leica, MIRAX, Philips, Sakura,
Trestle, Ventana, DICOM WSI and generic tiled TIFF, through the bundled ``openslide-bin``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import SlideBackend, composite_on_white

__all__ = ["OpenSlideBackend"]


class OpenSlideBackend(SlideBackend):
    """Read a slide with OpenSlide 4 (thread-safe; releases the GIL while decoding)."""

    name = "openslide"
    properties_prefix = "openslide"  # its level[N].tile-width/-height give tile_grid

    def __init__(self, path: Path, handle) -> None:
        self.path = path
        self._handle = handle
        self.level_dimensions = tuple(tuple(map(int, d)) for d in handle.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in handle.level_downsamples)
        self.properties = dict(handle.properties)
        self.vendor = self.properties.get("openslide.vendor")

    @classmethod
    def open(cls, path: Path) -> "OpenSlideBackend":
        import openslide

        return cls(path, openslide.OpenSlide(str(path)))

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        image = self._handle.read_region((int(x), int(y)), int(level), (int(width), int(height)))
        if image.getextrema()[3] == (255, 255):  # fully opaque: drop alpha in C, no float maths
            return np.asarray(image.convert("RGB"))
        return composite_on_white(np.asarray(image))


    def associated_image_names(self) -> tuple[str, ...]:
        return tuple(self._handle.associated_images)

    def close(self) -> None:
        self._handle.close()
