"""Tile values -> multiscale Zarr rasters and PNG overlays.

A per-tile value (attention, tile score, ...) becomes a raster on the tile grid's *stride
lattice*: raster pixel ``(row, col)`` is the level-0 box
``[origin + col * cell_x, origin + (col + 1) * cell_x) x [origin + row * cell_y, ...)`` with
``cell = grid.stride_level0``. A tile covers ``ceil(tile / stride)`` cells per axis; a cell
covered by several tiles (``overlap_px > 0``) holds their mean, a cell no tile covers is NaN.

Coordinate conventions
----------------------
* :meth:`HeatmapRaster.transform` is **pixel-corner** based, like the engine's level-0
  coordinates (``TileGrid.coords``, tissue polygons, GeoJSON): it maps raster coordinates
  ``(col, row)`` to the level-0 ``(x, y)`` of that pixel's *top-left corner*, so
  ``floor(inverse @ (x, y, 1))`` is the raster pixel holding level-0 point ``(x, y)``.
* The OME-NGFF ``coordinateTransformations`` are **pixel-centre** based, as NGFF viewers
  (napari) read them: array index ``i`` is the centre of pixel ``i`` and the output space is
  level-0 pixel *centres* (level-0 pixel ``j`` of the slide sits at ``j``, exactly where an
  NGFF viewer shows the slide's own level 0 with an identity transform). Level ``k`` has
  ``scale = cell * 2**k`` and ``translation = origin + scale / 2 - 0.5``, so a heatmap opened
  next to the slide in napari lies on it to the pixel.

Axes are ``y, x`` of type ``"space"``, in level-0 pixels (NGFF has no unit for pixels, so the
axes carry none); ``attrs["wsiengine"]["slide_mpp"]`` gives µm per level-0 pixel.

This module needs only numpy, zarr (v3) and Pillow: no torch, no matplotlib.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .atomic import atomic_write
from .errors import ConfigError, StoreError

if TYPE_CHECKING:  # pragma: no cover
    from .tiling import TileGrid

__all__ = [
    "HeatmapRaster",
    "tile_raster",
    "downsample_nanmean",
    "write_heatmap",
    "read_heatmap",
    "list_heatmaps",
    "colormap",
    "COLORMAPS",
    "render_overlay",
    "save_overlay_png",
]

#: NGFF version written in each ``multiscales`` entry
NGFF_VERSION = "0.4"
_RESERVED_ATTRS = ("multiscales", "ome", "wsiengine")


@dataclass(frozen=True, eq=False)
class HeatmapRaster:
    """A heatmap on a regular lattice in level-0 pixels.

    Attributes
    ----------
    values : numpy.ndarray
        ``(rows, cols)`` float32; NaN where no tile covers the cell.
    cell_size_level0 : tuple[float, float]
        (x, y) level-0 pixels per raster pixel (the grid's stride at level 0).
    origin_level0 : tuple[float, float]
        Level-0 (x, y) of the raster's top-left corner.
    slide_mpp : tuple[float, float] or None
        Level-0 µm/px of the slide, for physical units.
    """

    values: np.ndarray
    cell_size_level0: tuple[float, float]
    origin_level0: tuple[float, float] = (0.0, 0.0)
    slide_mpp: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        values = np.asarray(self.values, dtype=np.float32)
        if values.ndim != 2:
            raise ConfigError(f"HeatmapRaster.values must be 2-D (rows, cols), got shape {values.shape}")
        cell = tuple(float(c) for c in self.cell_size_level0)
        if len(cell) != 2 or not all(math.isfinite(c) and c > 0 for c in cell):
            raise ConfigError(f"cell_size_level0 must be two positive level-0 pixel sizes (x, y), got {self.cell_size_level0}")
        origin = tuple(float(o) for o in self.origin_level0)
        if len(origin) != 2 or not all(math.isfinite(o) for o in origin):
            raise ConfigError(f"origin_level0 must be a finite level-0 (x, y), got {self.origin_level0}")
        mpp = None if self.slide_mpp is None else tuple(float(m) for m in self.slide_mpp)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "cell_size_level0", cell)
        object.__setattr__(self, "origin_level0", origin)
        object.__setattr__(self, "slide_mpp", mpp)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the raster."""
        return (int(self.values.shape[0]), int(self.values.shape[1]))

    def transform(self) -> np.ndarray:
        """3x3 affine from raster (col, row) to level-0 (x, y), pixel-corner convention.

        ``transform() @ (col, row, 1)`` is the level-0 top-left corner of pixel (row, col);
        add 0.5 to col and row for its centre.
        """
        (cx, cy), (ox, oy) = self.cell_size_level0, self.origin_level0
        return np.array([[cx, 0.0, ox], [0.0, cy, oy], [0.0, 0.0, 1.0]], dtype=np.float64)

    def index_at(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """(row, col) int64 of the raster pixels holding level-0 points (x, y); may be out of range."""
        (cx, cy), (ox, oy) = self.cell_size_level0, self.origin_level0
        col = np.floor((np.asarray(x, np.float64) - ox) / cx).astype(np.int64)
        row = np.floor((np.asarray(y, np.float64) - oy) / cy).astype(np.int64)
        return row, col

    def extent_level0(self) -> tuple[float, float, float, float]:
        """Level-0 (x0, y0, x1, y1) the raster covers."""
        (cx, cy), (ox, oy) = self.cell_size_level0, self.origin_level0
        rows, cols = self.shape
        return (ox, oy, ox + cols * cx, oy + rows * cy)


# -- scattering tiles onto the lattice ------------------------------------------------------


def tile_raster(grid: "TileGrid", values: np.ndarray, *, nan: str = "raise") -> HeatmapRaster:
    """Scatter one value per tile onto the grid's stride lattice.

    Each tile covers ``ceil(tile / stride)`` lattice cells per axis from its ``grid_index``;
    a cell holds the mean of the values of all tiles covering it (overlaps averaged) and is
    NaN when no tile covers it (tissue-free). Vectorised with ``np.bincount``: O(N).

    Parameters
    ----------
    grid : TileGrid
        The tiles; its ``grid_shape`` is the raster shape and its level-0 stride the cell size.
    values : array-like
        ``(N,)`` one finite value per tile, in grid order.
    nan : {"raise", "ignore"}
        What to do with non-finite values: raise :class:`ConfigError`, or leave those tiles
        out (as if they were not in the grid).

    Raises
    ------
    ConfigError
        ``values`` is not ``(len(grid),)``, holds NaN/inf with ``nan="raise"``, or the grid's
        indices fall outside its ``grid_shape``.
    """
    if nan not in ("raise", "ignore"):
        raise ConfigError(f"nan must be 'raise' or 'ignore', got {nan!r}")
    n = len(grid)
    vals = np.asarray(values)
    if vals.ndim == 2 and vals.shape[1] == 1:
        vals = vals[:, 0]
    if vals.shape != (n,):
        raise ConfigError(f"tile values have shape {vals.shape}, expected ({n},): one value per tile of the grid, in grid order")
    if not (np.issubdtype(vals.dtype, np.number) or vals.dtype == bool) or np.iscomplexobj(vals):
        raise ConfigError(f"tile values must be real numbers, got dtype {vals.dtype}")
    vals = vals.astype(np.float64, copy=False)
    finite = np.isfinite(vals)
    if not finite.all():
        if nan == "raise":
            bad = np.flatnonzero(~finite)
            raise ConfigError(
                f"{bad.size} of {n} tile values are NaN or infinite (first at tiles {bad[:5].tolist()}); "
                "fix the values or pass nan='ignore' to leave those tiles out of the heatmap"
            )
    rows, cols = (int(s) for s in grid.grid_shape)
    index = np.asarray(grid.grid_index, dtype=np.int64).reshape(-1, 2) if n else np.zeros((0, 2), np.int64)
    if index.shape != (n, 2):
        raise ConfigError(f"grid.grid_index has shape {index.shape}, expected ({n}, 2)")
    if n and (index.min() < 0 or (index[:, 0] >= rows).any() or (index[:, 1] >= cols).any()):
        raise ConfigError(f"grid.grid_index has (row, col) outside grid_shape {grid.grid_shape}; the grid is inconsistent")
    # Cells per tile along each axis, in whole read-level pixels (no float rounding).
    kx = max(1, -(-int(grid.read_size[0]) // max(1, int(grid.stride_level_px[0]))))
    ky = max(1, -(-int(grid.read_size[1]) // max(1, int(grid.stride_level_px[1]))))

    r0, c0, v = index[finite, 0], index[finite, 1], vals[finite]
    size = rows * cols
    total = np.zeros(size, np.float64)
    count = np.zeros(size, np.float64)
    for dy in range(ky):
        r = r0 + dy
        in_r = r < rows
        for dx in range(kx):
            c = c0 + dx
            ok = in_r & (c < cols)
            flat = r[ok] * cols + c[ok]
            total += np.bincount(flat, weights=v[ok], minlength=size)
            count += np.bincount(flat, minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return HeatmapRaster(
        values=mean.reshape(rows, cols).astype(np.float32),
        cell_size_level0=tuple(float(s) for s in grid.stride_level0),  # type: ignore[arg-type]
        origin_level0=(0.0, 0.0),
        slide_mpp=tuple(grid.slide_mpp) if grid.slide_mpp is not None else None,  # type: ignore[arg-type]
    )


def downsample_nanmean(values: np.ndarray) -> np.ndarray:
    """2x2 NaN-aware mean: each output pixel is the mean of its non-NaN children, NaN if all are.

    Odd sides are padded with NaN, so the output is ``(ceil(rows/2), ceil(cols/2))`` float32.
    """
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 2:
        raise ConfigError(f"downsample_nanmean needs a 2-D array, got shape {a.shape}")
    rows, cols = a.shape
    pr, pc = rows + rows % 2, cols + cols % 2
    if (pr, pc) != (rows, cols):
        padded = np.full((pr, pc), np.nan)
        padded[:rows, :cols] = a
        a = padded
    blocks = a.reshape(pr // 2, 2, pc // 2, 2)
    valid = ~np.isnan(blocks)
    total = np.where(valid, blocks, 0.0).sum(axis=(1, 3))
    count = valid.sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return out.astype(np.float32)


# -- Zarr storage with OME-NGFF metadata --------------------------------------------------


def _open(group: Any, mode: str):
    """An open zarr Group, or one opened from a path."""
    if isinstance(group, (str, os.PathLike)):
        import zarr

        try:
            return zarr.open_group(str(group), mode=mode)
        except (FileNotFoundError, OSError) as exc:
            raise StoreError(f"cannot open the result store '{group}': {exc}") from exc
        except Exception as exc:  # zarr raises its own errors for a missing group
            raise StoreError(f"cannot open '{group}' as a Zarr group: {exc}") from exc
    return group


def _ngff_transforms(raster: HeatmapRaster, level: int) -> list[dict[str, Any]]:
    """NGFF scale + translation (pixel-centre convention, axes y, x) of pyramid level ``level``."""
    f = 2**level
    sx, sy = raster.cell_size_level0[0] * f, raster.cell_size_level0[1] * f
    tx = raster.origin_level0[0] + sx / 2 - 0.5
    ty = raster.origin_level0[1] + sy / 2 - 0.5
    return [{"type": "scale", "scale": [sy, sx]}, {"type": "translation", "translation": [ty, tx]}]


def _json_float(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def write_heatmap(
    group: Any,
    name: str,
    raster: HeatmapRaster,
    *,
    min_size: int = 64,
    chunks: int = 512,
    attrs: dict[str, Any] | None = None,
) -> None:
    """Write ``raster`` as a multiscale pyramid at ``group["heatmaps"][name]``.

    Level ``k`` (array ``"k"``) is ``raster`` downsampled ``2**k`` times by
    :func:`downsample_nanmean` (each level from the one before), until both sides are at most
    ``min_size``. Arrays are float32 with fill value NaN, dimension names ``y, x``. The group's
    attrs carry OME-NGFF ``multiscales`` (version 0.4; the same entry under ``attrs["ome"]``
    as NGFF 0.5 places it for Zarr v3) mapping array indices to level-0 pixel centres, and
    ``attrs["wsiengine"]``: unit, ``slide_mpp`` (µm/px), ``transform_level0`` (the level-0
    raster's pixel-corner affine), ``value`` (the name), ``range`` ([nanmin, nanmax], None when
    all NaN) and the conventions. An existing heatmap of that name is replaced.

    Parameters
    ----------
    group : zarr.Group or path
        A writable Zarr v3 group (e.g. a result store being written).
    name : str
        Heatmap name, e.g. ``"attention"`` or ``"tile_scores"``.
    raster : HeatmapRaster
    min_size : int
        Stop once both sides of a level are <= this many pixels (>= 1).
    chunks : int
        Chunk side, pixels (>= 1).
    attrs : dict, optional
        Extra JSON-serialisable attributes for the heatmap group (not ``multiscales``,
        ``ome`` or ``wsiengine``).
    """
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ConfigError(f"heatmap name must be a non-empty string without '/', got {name!r}")
    if not isinstance(raster, HeatmapRaster):
        raise ConfigError(f"raster must be a HeatmapRaster (see tile_raster), got {type(raster).__name__}")
    if int(min_size) < 1:
        raise ConfigError(f"min_size must be >= 1 pixel, got {min_size}")
    if int(chunks) < 1:
        raise ConfigError(f"chunks must be >= 1 pixel, got {chunks}")
    extra = dict(attrs or {})
    clash = [k for k in extra if k in _RESERVED_ATTRS]
    if clash:
        raise ConfigError(f"attrs may not set {clash}: write_heatmap writes those itself")

    levels = [raster.values]
    while max(levels[-1].shape) > int(min_size) and max(levels[-1].shape) > 1:
        levels.append(downsample_nanmean(levels[-1]))

    finite = raster.values[np.isfinite(raster.values)]
    value_range = [_json_float(finite.min()), _json_float(finite.max())] if finite.size else [None, None]
    multiscale = {
        "name": name,
        "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
        "datasets": [{"path": str(k), "coordinateTransformations": _ngff_transforms(raster, k)} for k in range(len(levels))],
        "type": "mean",
        "metadata": {
            "method": "wsiengine.heatmap.downsample_nanmean",
            "description": "2x2 mean of the non-NaN children of the level above; NaN where all are NaN",
        },
    }
    meta = {
        "unit": "level-0 pixel",
        "slide_mpp": None if raster.slide_mpp is None else list(raster.slide_mpp),
        "transform_level0": raster.transform().tolist(),
        "cell_size_level0": list(raster.cell_size_level0),
        "origin_level0": list(raster.origin_level0),
        "value": name,
        "range": value_range,
        "levels": len(levels),
        "pixel_convention": {
            "transform_level0": "pixel corner: (col, row) -> level-0 (x, y) of the pixel's top-left corner",
            "ngff": "pixel centre: index i is the pixel centre; output is level-0 pixel centres (translation = origin + scale/2 - 0.5)",
        },
    }
    target = _open(group, "a")
    try:
        heatmaps = target.require_group("heatmaps")
        hm = heatmaps.create_group(name, overwrite=True)
        for k, data in enumerate(levels):
            shape = data.shape
            hm.create_array(
                str(k),
                shape=shape,
                dtype="float32",
                chunks=(max(1, min(int(chunks), shape[0])), max(1, min(int(chunks), shape[1]))),
                fill_value=np.nan,
                dimension_names=("y", "x"),
            )[...] = data
        hm.attrs.update({
            **extra,
            "multiscales": [{"version": NGFF_VERSION, **multiscale}],
            "ome": {"version": "0.5", "multiscales": [multiscale]},
            "wsiengine": meta,
        })
    except OSError as exc:
        raise StoreError(f"writing heatmap '{name}' failed: {exc}. Check the store is writable and the disk has space.") from exc


def list_heatmaps(group: Any) -> list[str]:
    """Sorted names of the heatmaps in ``group["heatmaps"]`` (empty when there are none)."""
    g = _open(group, "r")
    try:
        heatmaps = g["heatmaps"]
    except KeyError:
        return []
    return sorted(n for n, child in heatmaps.groups() if "multiscales" in child.attrs or "ome" in child.attrs)


def read_heatmap(group: Any, name: str, level: int = 0) -> HeatmapRaster:
    """Read level ``level`` of heatmap ``name`` back as a :class:`HeatmapRaster`.

    Cell size and origin (level-0 pixels) come from the level's NGFF scale and translation
    (pixel-centre convention, inverted as ``origin = translation - scale/2 + 0.5``).

    Raises
    ------
    StoreError
        No heatmap of that name, or its metadata is missing or malformed.
    ConfigError
        ``level`` is not one of the stored levels.
    """
    g = _open(group, "r")
    available = list_heatmaps(g)
    if name not in available:
        raise StoreError(f"no heatmap named {name!r} in the store; available: {available or 'none'}")
    hm = g["heatmaps"][name]
    attrs = dict(hm.attrs)
    ms = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
    try:
        datasets = ms[0]["datasets"]
        axes = [a["name"] for a in ms[0]["axes"]]
    except (TypeError, KeyError, IndexError) as exc:
        raise StoreError(f"heatmap {name!r} has no valid OME-NGFF multiscales metadata") from exc
    if axes != ["y", "x"]:
        raise StoreError(f"heatmap {name!r} has axes {axes}; expected ['y', 'x']")
    if not isinstance(level, (int, np.integer)) or not 0 <= int(level) < len(datasets):
        raise ConfigError(f"heatmap {name!r} has levels 0..{len(datasets) - 1}, got level {level!r}")
    ds = datasets[int(level)]
    transforms = {t["type"]: t for t in ds.get("coordinateTransformations", [])}
    try:
        sy, sx = (float(s) for s in transforms["scale"]["scale"])
        ty, tx = (float(t) for t in transforms.get("translation", {"translation": [sy / 2 - 0.5, sx / 2 - 0.5]})["translation"])
    except (KeyError, ValueError, TypeError) as exc:
        raise StoreError(f"heatmap {name!r} level {level}: malformed coordinateTransformations {ds.get('coordinateTransformations')}") from exc
    meta = attrs.get("wsiengine") or {}
    mpp = meta.get("slide_mpp")
    return HeatmapRaster(
        values=np.asarray(hm[ds["path"]][...], dtype=np.float32),
        cell_size_level0=(sx, sy),
        origin_level0=(tx - sx / 2 + 0.5, ty - sy / 2 + 0.5),
        slide_mpp=None if mpp is None else (float(mpp[0]), float(mpp[1])),
    )


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
