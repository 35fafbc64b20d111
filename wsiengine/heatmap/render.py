"""Heatmap rendering: colour maps, the overlay of a heatmap on the slide thumbnail with a colour
bar, and atomic PNG writing. Needs numpy and Pillow (no matplotlib).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from ..errors import ConfigError
from .raster import HeatmapRaster

__all__ = ["colormap", "COLORMAPS", "render_overlay", "save_overlay_png"]


# -- colour maps -----------------------------------------------------------------------------

# Turbo (Mikhailov, Google 2019): Ruofei Du's published 5th-order polynomial fit, per channel,
# coefficients of 1, x, x^2, x^3, x^4, x^5.
_TURBO_POLY = np.array([
    [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
    [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
    [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
])

# 11 evenly spaced anchors (0, 0.1, ..., 1) of the perceptually uniform viridis and inferno
# maps (van der Walt & Smith), linearly interpolated in RGB: "viridis-like", "inferno-like".
_ANCHORS = {
    "viridis": ["440154", "482475", "414487", "355f8d", "2a788e", "21918c", "22a884", "44bf70", "7ad151", "bddf26", "fde725"],
    "inferno": ["000004", "160b39", "420a68", "6a176e", "932667", "bc3754", "dd513a", "f37819", "fca50a", "f6d746", "fcffa4"],
    "gray": ["000000", "ffffff"],
}

#: names accepted by :func:`colormap`
COLORMAPS = ("turbo", "viridis", "inferno", "gray")


def colormap(name: str = "turbo") -> np.ndarray:
    """A 256-entry colour lookup table, ``(256, 3)`` uint8 RGB, for values 0..1.

    ``"turbo"`` (Google's polynomial approximation), ``"viridis"``, ``"inferno"`` (anchor
    interpolations of those maps) or ``"gray"``; append ``"_r"`` to reverse.
    """
    if not isinstance(name, str):
        raise ConfigError(f"colormap name must be a string, got {type(name).__name__}")
    base, reverse = (name[:-2], True) if name.endswith("_r") else (name, False)
    t = np.linspace(0.0, 1.0, 256)
    if base == "turbo":
        powers = t[:, None] ** np.arange(6)[None, :]
        rgb = powers @ _TURBO_POLY.T
    elif base in _ANCHORS:
        anchors = np.array([[int(h[i:i + 2], 16) for i in (0, 2, 4)] for h in _ANCHORS[base]], np.float64) / 255.0
        x = np.linspace(0.0, 1.0, len(anchors))
        rgb = np.column_stack([np.interp(t, x, anchors[:, c]) for c in range(3)])
    else:
        raise ConfigError(f"unknown colormap {name!r}; choose one of {list(COLORMAPS)} (optionally with '_r')")
    lut = np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(lut[::-1] if reverse else lut)


# -- overlays --------------------------------------------------------------------------------


def _as_rgb(image: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
        raise ConfigError(f"{what} must be an (H, W, 3) RGB image, got shape {a.shape}")
    if a.dtype != np.uint8:
        raise ConfigError(f"{what} must be uint8, got {a.dtype}")
    return np.ascontiguousarray(a[:, :, :3])


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _format_tick(v: float) -> str:
    return f"{v:.3g}"


def render_overlay(
    thumbnail: np.ndarray,
    thumbnail_downsample: float | tuple[float, float],
    raster: HeatmapRaster,
    *,
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
    cmap: str = "turbo",
    alpha: float = 0.5,
    label: str = "",
) -> np.ndarray:
    """The heatmap over the slide thumbnail, with a colour bar, as an RGB uint8 image.

    Each thumbnail pixel takes the raster cell under its centre (nearest neighbour, in
    level-0 pixels), coloured with ``cmap`` over ``[vmin, vmax]`` (values outside are
    clipped) and blended as ``(1 - alpha) * thumbnail + alpha * colour``; NaN cells and
    pixels outside the raster keep the thumbnail's colour. A white margin on the right holds
    a vertical colour bar with ticks at vmin, the midpoint and vmax, and ``label`` above it.
    The thumbnail occupies ``out[:H, :W]``; the image is taller than ``H`` only when the
    thumbnail is too short for the colour bar.

    Parameters
    ----------
    thumbnail : numpy.ndarray
        ``(H, W, 3)`` uint8 RGB, level 0 downsampled by ``thumbnail_downsample``.
    thumbnail_downsample : float or (float, float)
        Level-0 pixels per thumbnail pixel, (x, y) when they differ.
    raster : HeatmapRaster
    vmin, vmax : float or None
        Value range of the colour map; None takes the raster's finite min or max.
    cmap : str
        A :func:`colormap` name.
    alpha : float
        Heatmap opacity, 0..1.
    label : str
        Caption of the colour bar, e.g. ``"tumour probability"``.
    """
    from PIL import Image, ImageDraw

    thumb = _as_rgb(thumbnail, "thumbnail")
    if not isinstance(raster, HeatmapRaster):
        raise ConfigError(f"raster must be a HeatmapRaster, got {type(raster).__name__}")
    ds = (thumbnail_downsample, thumbnail_downsample) if np.isscalar(thumbnail_downsample) else tuple(thumbnail_downsample)
    if len(ds) != 2 or not all(math.isfinite(float(d)) and float(d) > 0 for d in ds):
        raise ConfigError(f"thumbnail_downsample must be positive level-0 pixels per thumbnail pixel, got {thumbnail_downsample!r}")
    dx, dy = float(ds[0]), float(ds[1])
    if not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    finite = raster.values[np.isfinite(raster.values)]
    lo = float(vmin) if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else lo + 1.0)
    if hi <= lo and (vmin is None or vmax is None):  # a constant raster with an automatic end
        hi, lo = (lo + 1.0, lo) if vmax is None else (hi, hi - 1.0)
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        raise ConfigError(f"vmin must be below vmax (both finite), got vmin={vmin}, vmax={vmax}")
    lut = colormap(cmap)

    # Nearest raster cell under each thumbnail pixel centre (separable: one index per column / row).
    h, w = thumb.shape[:2]
    rows, cols = raster.shape
    r_idx, _ = raster.index_at(0.0, (np.arange(h) + 0.5) * dy)
    _, c_idx = raster.index_at((np.arange(w) + 0.5) * dx, 0.0)
    r_ok, c_ok = (r_idx >= 0) & (r_idx < rows), (c_idx >= 0) & (c_idx < cols)
    sampled = np.full((h, w), np.nan, np.float32)
    if r_ok.any() and c_ok.any():
        sampled[np.ix_(r_ok, c_ok)] = raster.values[np.ix_(r_idx[r_ok], c_idx[c_ok])]
    valid = np.isfinite(sampled)
    t = np.clip((np.where(valid, sampled, lo) - lo) / (hi - lo), 0.0, 1.0)
    colour = lut[np.round(t * 255).astype(np.intp)]
    blended = thumb.astype(np.float32)
    blended[valid] = (1.0 - alpha) * blended[valid] + float(alpha) * colour[valid]
    body = np.clip(np.round(blended), 0, 255).astype(np.uint8)

    # Colour bar in a right-hand margin, scaled to the thumbnail height.
    font_px = int(np.clip(round(h / 30), 10, 24))
    font = _font(font_px)
    ticks = [hi, (lo + hi) / 2, lo]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(s: str) -> tuple[int, int]:
        if not s:
            return (0, 0)
        x0, y0, x1, y1 = probe.textbbox((0, 0), s, font=font)
        return (int(x1 - x0), int(y1 - y0))

    pad = max(6, font_px // 2)
    bar_w = max(10, font_px)
    tick_w = max(text_size(_format_tick(v))[0] for v in ticks)
    label_w, label_h = text_size(label)
    margin = pad + max(bar_w + 4 + pad // 2 + tick_w, label_w) + pad
    top = pad + (label_h + pad if label else 0) + font_px // 2
    min_bar = 3 * font_px
    out_h = max(h, top + min_bar + font_px // 2 + pad)
    bar_h = out_h - top - font_px // 2 - pad
    canvas = Image.new("RGB", (w + margin, out_h), (255, 255, 255))
    canvas.paste(Image.fromarray(body), (0, 0))
    bar_x = w + pad
    ramp = lut[np.round(np.linspace(1.0, 0.0, bar_h) * 255).astype(np.intp)]  # top = vmax
    canvas.paste(Image.fromarray(np.ascontiguousarray(np.repeat(ramp[:, None, :], bar_w, axis=1))), (bar_x, top))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([bar_x - 1, top - 1, bar_x + bar_w, top + bar_h], outline=(0, 0, 0))
    for frac, v in zip((0.0, 0.5, 1.0), ticks):
        y = top + round(frac * (bar_h - 1))
        draw.line([bar_x + bar_w, y, bar_x + bar_w + 4, y], fill=(0, 0, 0))
        draw.text((bar_x + bar_w + 4 + pad // 2, y), _format_tick(v), fill=(0, 0, 0), font=font, anchor="lm")
    if label:
        draw.text((w + pad, pad), label, fill=(0, 0, 0), font=font)
    return np.asarray(canvas, dtype=np.uint8)


def save_overlay_png(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Write an RGB(A) uint8 image as PNG atomically (temporary name, then ``os.replace``).

    Returns the final path; on failure no file is left under ``path`` or the temporary name.
    """
    from PIL import Image

    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or a.dtype != np.uint8:
        raise ConfigError(f"overlay image must be (H, W, 3 or 4) uint8, got shape {a.shape} dtype {a.dtype}")
    final = Path(path)
    with atomic_write(final) as fh:
        Image.fromarray(np.ascontiguousarray(a)).save(fh, format="PNG")
    return final
