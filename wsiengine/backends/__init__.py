"""Slide readers behind one interface, :class:`~wsiengine.backends.base.SlideBackend`.

``auto`` tries the backends in :data:`AUTO_ORDER`:

1. ``tifffile`` — the direct tile path, for Aperio SVS, OME-TIFF and generic tiled TIFF
   pyramids only (the fastest: stored tiles decoded once, no compositing);
2. ``openslide`` — the widest format support: Hamamatsu NDPI/VMS, MIRAX, Philips, Leica,
   Ventana, DICOM WSI and the rest;
3. ``tiffslide`` — OME-TIFF, plain untiled TIFF and other TIFF layouts OpenSlide refuses.
"""

from __future__ import annotations

from .base import SlideBackend
from .openslide_backend import OpenSlideBackend
from .tiffslide_backend import TiffSlideBackend
from .tifffile_backend import TiffTileBackend

__all__ = ["SlideBackend", "OpenSlideBackend", "TiffSlideBackend", "TiffTileBackend", "BACKENDS", "AUTO_ORDER"]

#: every backend by name
BACKENDS: dict[str, type[SlideBackend]] = {
    OpenSlideBackend.name: OpenSlideBackend,
    TiffSlideBackend.name: TiffSlideBackend,
    TiffTileBackend.name: TiffTileBackend,
}

#: the order ``backend="auto"`` tries
AUTO_ORDER: tuple[str, ...] = ("tifffile", "openslide", "tiffslide")
