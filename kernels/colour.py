"""Colour transforms of uint8 RGB images: HSV saturation and optical density."""

from __future__ import annotations

import numba
import numpy as np

from ._checks import as_rgb

__all__ = ["rgb_to_saturation", "rgb_to_optical_density", "OD_LUT"]

#: Optical density of each 8-bit intensity, ``-log10((I + 1) / 256)``: 0 for I = 255,
#: ``log10(256)`` (about 2.41) for I = 0.
OD_LUT: np.ndarray = -np.log10((np.arange(256, dtype=np.float64) + 1.0) / 256.0)


@numba.njit(cache=True, nogil=True)
def _saturation(rgb):
    h, w = rgb.shape[0], rgb.shape[1]
    out = np.empty((h, w), dtype=np.float32)
    for y in range(h):
        for x in range(w):
            r = np.int32(rgb[y, x, 0])
            g = np.int32(rgb[y, x, 1])
            b = np.int32(rgb[y, x, 2])
            mx = max(r, max(g, b))
            mn = min(r, min(g, b))
            if mx == 0:
                out[y, x] = np.float32(0.0)
            else:
                out[y, x] = np.float32(mx - mn) / np.float32(mx)
    return out


@numba.njit(cache=True, nogil=True)
def _optical_density(rgb, lut):
    h, w = rgb.shape[0], rgb.shape[1]
    out = np.empty((h, w), dtype=np.float32)
    for y in range(h):
        for x in range(w):
            s = lut[rgb[y, x, 0]] + lut[rgb[y, x, 1]] + lut[rgb[y, x, 2]]
            out[y, x] = np.float32(s / 3.0)
    return out


def rgb_to_saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of an RGB image.

    Parameters
    ----------
    rgb : numpy.ndarray
        ``(H, W, 3)`` (or ``(H, W, 4)``, alpha ignored) uint8 image.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` float32 in [0, 1]: ``(max - min) / max`` over the three channels, computed
        in float32 as ``float32(max - min) / float32(max)``; 0 where ``max == 0`` (black).
    """
    return _saturation(as_rgb(rgb))


def rgb_to_optical_density(rgb: np.ndarray) -> np.ndarray:
    """Mean optical density over the three channels (Beer-Lambert).

    Each channel's OD is ``-log10((I + 1) / 256)`` for 8-bit intensity ``I``: the incident
    light is taken as ``I0 = 255`` and one is added to numerator and denominator so black
    pixels give a finite value. OD is 0 for white (255) and about 2.41 for black (0); the
    result is ``(OD_R + OD_G + OD_B) / 3``, computed in float64 and stored as float32.

    Parameters
    ----------
    rgb : numpy.ndarray
        ``(H, W, 3)`` (or ``(H, W, 4)``, alpha ignored) uint8 image.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` float32, dimensionless absorbance.
    """
    return _optical_density(as_rgb(rgb), OD_LUT)
