"""TileGrid: patch coordinates at a target resolution, with their tissue fraction.

The grid is laid on the read level chosen by :meth:`Slide.plan_read` (the lowest-resolution
level that still resolves ``target_mpp``): tile origins step by a whole number of that level's
pixels, so every patch is one read of ``read_size`` pixels, resampled once (or not at all) to
``tile_px``. Tiles are kept when their tissue fraction, computed from the mask's integral image,
reaches ``min_tissue``, and when their centre is inside the ``include`` ROI and outside the
``exclude`` ROI. Order is row-major (top to bottom, then left to right): deterministic.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from .config import TilingConfig
from .errors import NoTissueError
from .kernels import box_mean, integral_image
from .slide import Slide
from .tissue import TissueMask

__all__ = ["TileGrid", "plan_tiles"]

logger = logging.getLogger("wsiengine")


@dataclass(frozen=True, eq=False)
class TileGrid:
    """Patch positions on one slide.

    Attributes
    ----------
    coords : numpy.ndarray
        ``(N, 2)`` int64 level-0 (x, y) of each patch's top-left corner.
    tissue_fraction : numpy.ndarray
        ``(N,)`` float32 in [0, 1].
    grid_index : numpy.ndarray
        ``(N, 2)`` int64 (row, col) of each patch in the full lattice.
    grid_shape : tuple[int, int]
        (rows, cols) of the full lattice over the slide, tissue or not.
    target_mpp : float
        µm per pixel of the patches.
    tile_px, overlap_px : int
        Patch side and overlap, pixels at ``target_mpp``.
    read_level : int
        Pyramid level patches are read from.
    read_size : tuple[int, int]
        (width, height) read per patch, pixels of ``read_level``; resampled to ``tile_px`` when different.
    stride_level_px : tuple[int, int]
        (x, y) step between patch origins, pixels of ``read_level``.
    tile_size_level0 : tuple[float, float]
        (width, height) a patch covers, level-0 pixels.
    slide_dimensions : tuple[int, int]
        (width, height) of level 0.
    slide_mpp : tuple[float, float]
        Level-0 µm/px of the slide the grid was planned on.
    """

    coords: np.ndarray
    tissue_fraction: np.ndarray
    grid_index: np.ndarray
    grid_shape: tuple[int, int]
    target_mpp: float
    tile_px: int
    overlap_px: int
    read_level: int
    read_size: tuple[int, int]
    stride_level_px: tuple[int, int]
    tile_size_level0: tuple[float, float]
    slide_dimensions: tuple[int, int]
    slide_mpp: tuple[float, float]

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def resamples(self) -> bool:
        """Whether patches are resampled from ``read_size`` to ``tile_px``."""
        return self.read_size != (self.tile_px, self.tile_px)

    @property
    def stride_level0(self) -> tuple[float, float]:
        """(x, y) step between patch origins in level-0 pixels."""
        d = self.tile_size_level0[0] / self.read_size[0], self.tile_size_level0[1] / self.read_size[1]
        return (self.stride_level_px[0] * d[0], self.stride_level_px[1] * d[1])

    def subset(self, keep: np.ndarray) -> "TileGrid":
        """A grid with only the rows selected by ``keep`` (boolean mask or indices), order kept."""
        keep = np.asarray(keep)
        if keep.dtype == bool:
            keep = np.flatnonzero(keep)
        keep = np.sort(keep)
        return _replace(self, coords=self.coords[keep], tissue_fraction=self.tissue_fraction[keep], grid_index=self.grid_index[keep])

    def boxes(self) -> np.ndarray:
        """``(N, 4)`` float64 level-0 (x0, y0, x1, y1) of every patch."""
        w, h = self.tile_size_level0
        c = self.coords.astype(np.float64)
        return np.column_stack([c[:, 0], c[:, 1], c[:, 0] + w, c[:, 1] + h])

    def centres(self) -> np.ndarray:
        """``(N, 2)`` float64 level-0 (x, y) patch centres."""
        w, h = self.tile_size_level0
        return self.coords.astype(np.float64) + np.array([w / 2, h / 2])


def _replace(grid: TileGrid, **changes) -> TileGrid:
    import dataclasses

    return dataclasses.replace(grid, **changes)


def plan_tiles(
    slide: Slide,
    mask: TissueMask | None = None,
    target_mpp: float | None = None,
    tile_px: int | None = None,
    overlap_px: int | None = None,
    min_tissue: float | None = None,
    *,
    include: BaseGeometry | None = None,
    exclude: BaseGeometry | None = None,
    config: TilingConfig | None = None,
) -> TileGrid:
    """Lay a patch grid over ``slide``.

    Parameters
    ----------
    slide : Slide
    mask : TissueMask, optional
        Tissue mask; None treats the whole slide as tissue (``tissue_fraction`` 1).
    target_mpp : float
        Patch resolution, µm/px (default 0.5).
    tile_px : int
        Patch side, pixels at ``target_mpp`` (default 224).
    overlap_px : int
        Overlap between neighbours, pixels at ``target_mpp`` (default 0).
    min_tissue : float
        Minimum tissue fraction to keep a patch, 0..1 (default 0.25).
    include, exclude : shapely geometry, optional
        Regions of interest in level-0 pixels: keep patches whose centre lies inside
        ``include`` and outside ``exclude``.
    config : TilingConfig, optional
        Defaults for the arguments above; explicit arguments win. Unset ``target_mpp`` /
        ``tile_px`` mean 0.5 µm/px and 224 px.

    Raises
    ------
    ResolutionError
        ``target_mpp`` finer than level 0 (beyond tolerance) without ``allow_upsample``.
    NoTissueError
        No patch kept and ``config.on_no_tiles == "raise"``.
    """
    config = TilingConfig.given(config, target_mpp=target_mpp, tile_px=tile_px, overlap_px=overlap_px,
                                min_tissue=min_tissue).with_defaults()
    plan = slide.plan_read((config.tile_px, config.tile_px), config.target_mpp, allow_upsample=config.allow_upsample)
    level = plan.level
    downsample = slide.level_downsamples[level]
    level_w, level_h = slide.level_dimensions[level]
    read_w, read_h = plan.read_size
    # Stride in read-level pixels, from the stride at target_mpp (whole pixels, so patches tile exactly).
    scale_x, scale_y = read_w / config.tile_px, read_h / config.tile_px
    stride_x = max(1, round(config.stride_px * scale_x))
    stride_y = max(1, round(config.stride_px * scale_y))
    cols = (level_w - read_w) // stride_x + 1 if level_w >= read_w else 0
    rows = (level_h - read_h) // stride_y + 1 if level_h >= read_h else 0
    w0, h0 = slide.dimensions

    row_idx, col_idx = np.meshgrid(np.arange(rows, dtype=np.int64), np.arange(cols, dtype=np.int64), indexing="ij")
    row_idx, col_idx = row_idx.ravel(), col_idx.ravel()
    tile_w0, tile_h0 = read_w * downsample, read_h * downsample
    x = np.minimum(np.round(col_idx * stride_x * downsample).astype(np.int64), max(0, int(math.floor(w0 - tile_w0))))
    y = np.minimum(np.round(row_idx * stride_y * downsample).astype(np.int64), max(0, int(math.floor(h0 - tile_h0))))
    coords = np.column_stack([x, y]) if x.size else np.zeros((0, 2), np.int64)

    if mask is None:
        fraction = np.ones(len(coords), dtype=np.float32)
    else:
        fraction = tissue_fractions(mask, coords, (tile_w0, tile_h0))
    keep = fraction >= config.min_tissue
    if mask is not None:
        keep &= fraction > 0
    if include is not None or exclude is not None:
        centres = coords + np.array([tile_w0 / 2, tile_h0 / 2])
        if include is not None:
            keep &= shapely.contains_xy(include, centres[:, 0], centres[:, 1])
        if exclude is not None:
            keep &= ~shapely.contains_xy(exclude, centres[:, 0], centres[:, 1])

    grid = TileGrid(
        coords=np.ascontiguousarray(coords[keep]),
        tissue_fraction=fraction[keep].astype(np.float32),
        grid_index=np.column_stack([row_idx, col_idx])[keep],
        grid_shape=(int(rows), int(cols)),
        target_mpp=float(config.target_mpp),
        tile_px=int(config.tile_px),
        overlap_px=int(config.overlap_px),
        read_level=int(level),
        read_size=(int(read_w), int(read_h)),
        stride_level_px=(int(stride_x), int(stride_y)),
        tile_size_level0=(float(tile_w0), float(tile_h0)),
        slide_dimensions=(int(w0), int(h0)),
        slide_mpp=tuple(slide.mpp),  # type: ignore[arg-type]
    )
    if len(grid) == 0:
        message = (
            f"no tile of '{slide.path.name}' has tissue fraction >= {config.min_tissue} "
            f"({rows}x{cols} lattice at {config.target_mpp} µm/px, {config.tile_px} px). "
            "Lower min_tissue, check the tissue mask, or widen the ROI."
        )
        if config.on_no_tiles == "raise":
            raise NoTissueError(message)
        logger.warning(message)
    return grid


def tissue_fractions(mask: TissueMask, coords: np.ndarray, tile_size_level0: tuple[float, float]) -> np.ndarray:
    """Tissue fraction (0..1) of each level-0 box ``coords + tile_size_level0`` from the mask's integral image."""
    if len(coords) == 0:
        return np.zeros(0, np.float32)
    sx, sy = mask.level0_per_mask_px
    c = np.asarray(coords, dtype=np.float64)
    x0 = np.floor(c[:, 0] / sx + 0.5).astype(np.int64)
    y0 = np.floor(c[:, 1] / sy + 0.5).astype(np.int64)
    x1 = np.maximum(np.floor((c[:, 0] + tile_size_level0[0]) / sx + 0.5).astype(np.int64), x0 + 1)
    y1 = np.maximum(np.floor((c[:, 1] + tile_size_level0[1]) / sy + 0.5).astype(np.int64), y0 + 1)
    table = integral_image(mask.raster)
    return np.asarray(box_mean(table, y0, x0, y1, x1), dtype=np.float32)
