"""Pen-ink pixels: green, blue, red and black marker on slides.

The rules rest on how the H&E stains absorb light. Haematoxylin and eosin both absorb
green at least as strongly as red, so in H&E the green channel never exceeds the red one by
much, whatever the shade (pink, purple, dark nuclei). Green, teal and blue markers absorb
red instead, so G (and B) clearly above R marks ink. Red marker absorbs green and blue
alike (pure red), whereas eosin leaves blue brighter than green (pink-magenta), which puts
red ink at hues within about 15 degrees below to 20 degrees above pure red with a high
saturation. Black ink is darker than any stained tissue at thumbnail resolution.

Rules on 8-bit ``R, G, B``, with ``mx = max``, ``mn = min``, ``c = mx - mn``, all integer:

- **green / blue ink**: ``G - R >= 25`` and ``max(G, B) - R >= 40`` and ``R <= 180``
  (the last keeps bright, noisy near-white glass out);
- **red ink**: ``R == mx`` and ``R >= 60`` and ``5 c >= 3 R`` (HSV saturation >= 0.6) and
  the hue lies in [345, 360) or [0, 20] degrees: ``4 (B - G) <= c`` when ``B >= G``,
  ``3 (G - B) <= c`` when ``G > B``;
- **black ink**: ``mx <= 35``.

Checked on the histolab pen images (tcga-green-pen, tcga-red-pen, wsi-blue-pen, the
``*pen*`` tiles): the ink is flagged; on H&E without pen (histolab tissue and nuclei-score
tiles, TIAToolbox regions, the StarDist image) well under 1 % of pixels are, mostly single
JPEG-artefact pixels and the reddest red blood cells.
"""

from __future__ import annotations

import numba
import numpy as np

from ._checks import as_rgb

__all__ = ["pen_mask"]

GREEN_MIN_EXCESS_OVER_RED = 25
GREEN_BLUE_MIN_CHROMA_OVER_RED = 40
GREEN_BLUE_MAX_RED = 180
RED_MIN_VALUE = 60
BLACK_MAX_VALUE = 35


@numba.njit(cache=True, nogil=True)
def _is_pen(r, g, b):
    mx = max(r, max(g, b))
    mn = min(r, min(g, b))
    c = mx - mn
    if g - r >= GREEN_MIN_EXCESS_OVER_RED and max(g, b) - r >= GREEN_BLUE_MIN_CHROMA_OVER_RED and r <= GREEN_BLUE_MAX_RED:
        return True
    if r == mx and r >= RED_MIN_VALUE and 5 * c >= 3 * r:
        if b >= g:
            if 4 * (b - g) <= c:
                return True
        elif 3 * (g - b) <= c:
            return True
    return mx <= BLACK_MAX_VALUE


@numba.njit(cache=True, nogil=True)
def _pen(rgb):
    h, w = rgb.shape[0], rgb.shape[1]
    out = np.empty((h, w), dtype=np.bool_)
    for y in range(h):
        for x in range(w):
            out[y, x] = _is_pen(np.int32(rgb[y, x, 0]), np.int32(rgb[y, x, 1]), np.int32(rgb[y, x, 2]))
    return out


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels that look like pen ink (green, blue, red or black marker).

    Pixel-wise colour rules (see the module docstring for the exact rules and why H&E stain
    does not match them). Ink edges and halos are not included; the tissue pipeline dilates
    this mask before excluding it.

    Parameters
    ----------
    rgb : numpy.ndarray
        ``(H, W, 3)`` (or ``(H, W, 4)``) uint8 image.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` bool, True on ink.
    """
    return _pen(as_rgb(rgb))
