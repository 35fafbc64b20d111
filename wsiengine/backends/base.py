"""The interface every slide reader implements.

A backend only opens a file and returns RGB pixels; resolution handling, level choice and
resampling live in :mod:`wsiengine.slide`, so a new reader is one small class plus one line
in the backend registry (:data:`wsiengine.backends.BACKENDS`) and in the shared conformance
tests (``tests/test_backends.py``).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np

__all__ = ["SlideBackend", "composite_on_white"]


class SlideBackend(abc.ABC):
    """One open slide file, read through one library.

    Coordinates passed to :meth:`read_region` are level-0 pixels for the location and
    pixels *at the requested level* for the size, as in OpenSlide.
    """

    #: registry name, e.g. ``"openslide"``
    name: ClassVar[str]
    #: prefix of the library's ``PREFIX.level[N].tile-width`` properties (see :meth:`tile_grid`), or None
    properties_prefix: ClassVar[str | None] = None

    path: Path
    #: (width, height) per level, in pixels of that level; level 0 is the finest
    level_dimensions: tuple[tuple[int, int], ...]
    #: level-0 pixels per pixel of each level
    level_downsamples: tuple[float, ...]
    #: raw metadata as the library reports it
    properties: Mapping[str, str]
    #: scanner vendor or format family as reported by the library ("aperio", "dicom", ...) or None
    vendor: str | None

    @classmethod
    @abc.abstractmethod
    def open(cls, path: Path) -> "SlideBackend":
        """Open ``path`` or raise the library's own exception."""

    @abc.abstractmethod
    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """Read RGB pixels.

        Parameters
        ----------
        x, y : int
            Top-left corner in level-0 pixels.
        level : int
            Pyramid level to read from.
        width, height : int
            Size in pixels of ``level``.

        Returns
        -------
        numpy.ndarray
            ``(height, width, 3)`` uint8 RGB; transparent or out-of-slide pixels are white.
        """

    def tile_grid(self, level: int) -> tuple[int, int] | None:
        """(width, height) in pixels of ``level`` of the stored tiles, when reads aligned to them
        decode each stored tile once (the tile at column ``i``, row ``j`` covers level pixels
        ``[i w, (i + 1) w) x [j h, (j + 1) h)``); None when unknown (the default).

        An optional capability: :meth:`wsiengine.slide.Slide.thumbnail` reads whole stored tiles,
        several at a time in threads, when a backend reports them. The default reads the
        ``{properties_prefix}.level[N].tile-width`` / ``-height`` properties that OpenSlide and
        tiffslide publish.
        """
        prefix = getattr(self, "properties_prefix", None)
        if prefix is None:
            return None
        try:
            w = int(self.properties[f"{prefix}.level[{level}].tile-width"])
            h = int(self.properties[f"{prefix}.level[{level}].tile-height"])
        except (KeyError, ValueError):
            return None
        return (w, h) if w > 0 and h > 0 else None

    def associated_image_names(self) -> tuple[str, ...]:
        """Names of the non-pyramid images (label, macro, thumbnail). Never read by the engine."""
        return ()

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the file handle."""


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Flatten ``(H, W, 4)`` RGBA (not premultiplied) onto a white background -> ``(H, W, 3)`` uint8."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)[..., None]
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)
