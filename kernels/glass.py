"""Glass (slide background) pixels: near-white or low-saturation grey."""

from __future__ import annotations

import numba
import numpy as np

from ._checks import as_rgb
from .colour import _saturation

__all__ = ["glass_mask", "GLASS_WHITE_MIN", "GLASS_GREY_MAX_SATURATION"]

#: Default: a pixel whose darkest channel is at least this (0-255) is near-white glass.
GLASS_WHITE_MIN: int = 225
#: Default: a pixel with HSV saturation at most this is grey (glass, out-of-scan area, dust).
GLASS_GREY_MAX_SATURATION: float = 0.05


@numba.njit(cache=True, nogil=True)
def _glass(rgb, sat, white_min, grey_max_saturation):
    h, w = sat.shape
    out = np.empty((h, w), dtype=np.bool_)
    for y in range(h):
        for x in range(w):
            mn = min(rgb[y, x, 0], min(rgb[y, x, 1], rgb[y, x, 2]))
            out[y, x] = mn >= white_min or np.float64(sat[y, x]) <= grey_max_saturation
    return out


def glass_mask(
    rgb: np.ndarray,
    *,
    white_min: int = GLASS_WHITE_MIN,
    grey_max_saturation: float = GLASS_GREY_MAX_SATURATION,
) -> np.ndarray:
    """Pixels that look like bare glass: near-white or grey.

    A pixel is glass when ``min(R, G, B) >= white_min`` (bright in every channel) or when its
    HSV saturation (:func:`~wsiengine.kernels.rgb_to_saturation`, float32) is
    ``<= grey_max_saturation`` (compared in float64). Grey covers tinted or dim background,
    black out-of-scan areas (saturation 0) and neutral dust; stained tissue is never that
    grey.

    Parameters
    ----------
    rgb : numpy.ndarray
        ``(H, W, 3)`` (or ``(H, W, 4)``) uint8 image.
    white_min : int
        0-255 intensity every channel must reach for near-white (default 225).
    grey_max_saturation : float
        Largest HSV saturation, 0-1, counted as grey (default 0.05).

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` bool, True on glass.
    """
    a = as_rgb(rgb)
    return _glass(a, _saturation(a), int(white_min), float(grey_max_saturation))
