"""Heatmap rasters: one value per tile scattered onto the tile grid's stride lattice, in level-0
pixels, and the NaN-aware 2x2 downsampling that builds their pyramids.

See :mod:`wsiengine.heatmap` for the lattice and the pixel-corner :meth:`HeatmapRaster.transform`.
Needs only numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from ..tiling import TileGrid

__all__ = ["HeatmapRaster", "tile_raster", "downsample_nanmean"]


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
