"""Tissue detection: thumbnail -> Numba kernels -> TissueMask.

The slide is read as a thumbnail at ``mask_mpp`` (8 µm/px by default) in pieces of at most
``read_budget_px`` pixels, so memory and backend requests stay bounded however large the
slide. :func:`wsiengine.kernels.segment_tissue` then runs, in order: saturation colour
transform -> Otsu threshold -> pen-ink and glass rejection -> morphological closing, then
opening by reconstruction (what survives the opening keeps its own outline) -> hysteresis
(pale, non-glass pixels joined to that tissue down to ``hysteresis_ratio`` times the Otsu
threshold are kept) -> filling of small holes -> removal of small objects. Areas and radii
are given in micrometres and converted to mask pixels here (:func:`segment_params`).
``TissueConfig(opening_by_reconstruction=False, hysteresis_ratio=1.0)`` gives the mask of
before issue 14 (plain opening, no hysteresis), which eroded tissue edges and pale rims: on a
0.94-gigapixel PCam mosaic with 96-px tiles at ``min_tissue=0.5`` it tiled 94.8 % of the
clearly cellular cells and 84.9 % of those on the tissue edge; the default tiles 99.8 % and
99.0 % (``benchmarks/bench_tissue_coverage.py``; figures in the kernel's docstring).

Building the thumbnail is bounded too: a slide whose thumbnail would need more than
:data:`MAX_THUMBNAIL_READS` backend reads (a huge level 0 with no coarse pyramid level, e.g. a
file declaring 10^6 x 10^6 px) raises :class:`~wsiengine.errors.SlideReadError` up front
instead of reading for an hour.

No tissue is a result, not an error: the mask is empty and a warning is logged, unless
``TissueConfig(on_no_tissue="raise")`` asks for :class:`~wsiengine.errors.NoTissueError`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.affinity import scale as shapely_scale

from .config import TissueConfig
from .errors import NoTissueError
from .kernels import TissueSegmentParams, label_components, segment_tissue, trace_rings
from .slide import Slide

__all__ = ["TissueMask", "detect_tissue", "segment_params", "mask_to_polygons", "MAX_THUMBNAIL_READS"]

logger = logging.getLogger("wsiengine")

#: the most backend reads (each at most ``TissueConfig.read_budget_px``) one tissue thumbnail may
#: take; at the default budget that is a single-level slide of about 130,000 px square.
MAX_THUMBNAIL_READS = 1024


@dataclass(frozen=True, eq=False)
class TissueMask:
    """Where the tissue is.

    Attributes
    ----------
    raster : numpy.ndarray
        ``(H, W)`` bool, True on tissue, one pixel per ``mask_mpp`` µm.
    mask_mpp : tuple[float, float]
        Exact (x, y) µm per mask pixel.
    level0_per_mask_px : tuple[float, float]
        (x, y) level-0 pixels per mask pixel.
    polygons : shapely.MultiPolygon
        Tissue outlines with holes, in level-0 pixels.
    slide_dimensions : tuple[int, int]
        (width, height) of level 0, pixels.
    otsu_threshold : float
        The saturation threshold Otsu chose (diagnostics).
    """

    raster: np.ndarray
    mask_mpp: tuple[float, float]
    level0_per_mask_px: tuple[float, float]
    polygons: MultiPolygon
    slide_dimensions: tuple[int, int]
    otsu_threshold: float = float("nan")
    thumbnail: np.ndarray | None = field(default=None, repr=False)

    @property
    def is_empty(self) -> bool:
        return not bool(self.raster.any())

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the slide area covered by tissue, 0..1."""
        return float(self.raster.mean()) if self.raster.size else 0.0

    @property
    def area_mm2(self) -> float:
        """Tissue area in mm² (mask pixels times their area)."""
        return float(self.raster.sum()) * self.mask_mpp[0] * self.mask_mpp[1] / 1e6

    @classmethod
    def full(cls, slide: Slide, mask_mpp: float = 8.0) -> "TissueMask":
        """A mask that calls the whole slide tissue (for tiling without detection)."""
        w0, h0 = slide.dimensions
        mx, my = slide.mpp
        w, h = max(1, round(w0 * mx / mask_mpp)), max(1, round(h0 * my / mask_mpp))
        box = MultiPolygon([Polygon([(0, 0), (w0, 0), (w0, h0), (0, h0)])])
        return cls(np.ones((h, w), bool), (w0 * mx / w, h0 * my / h), (w0 / w, h0 / h), box, (w0, h0))


def mask_to_polygons(raster: np.ndarray, level0_per_mask_px: tuple[float, float] = (1.0, 1.0)) -> MultiPolygon:
    """Outline a boolean raster as valid shapely polygons with holes.

    Each True pixel ``(row, col)`` covers ``[col, col + 1) x [row, row + 1)`` in mask
    coordinates; the result, scaled by ``level0_per_mask_px`` into level-0 pixels, covers
    exactly the True pixels. One polygon per 4-connected region: its outer boundary and its
    holes are traced along pixel edges by a Numba kernel (:func:`wsiengine.kernels.trace_rings`),
    vertices only at corners; pieces touching only at a corner are separate polygons.
    """
    raster = np.asarray(raster, dtype=bool)
    if not raster.any():
        return MultiPolygon()
    vertices, offsets, pixels, area2 = trace_rings(raster)
    labels, _ = label_components(raster, connectivity=1)
    region = labels[pixels[:, 0], pixels[:, 1]]
    order = np.lexsort((area2 < 0, region))  # by region, its outer boundary (area > 0) first
    lengths = np.diff(offsets)[order]
    ring_of_vertex = np.repeat(np.arange(len(order)), lengths)
    take = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in order]) if len(order) else np.zeros(0, int)
    sx, sy = level0_per_mask_px
    coords = vertices[take].astype(np.float64) * (float(sx), float(sy))
    rings = shapely.linearrings(coords, indices=ring_of_vertex)
    _, polygon_of_ring = np.unique(region[order], return_inverse=True)
    polygons = shapely.polygons(rings, indices=polygon_of_ring)
    invalid = ~shapely.is_valid(polygons)
    if invalid.any():  # a hole ring through a corner it shares with itself: split into touching holes
        polygons[invalid] = shapely.make_valid(polygons[invalid])
    parts = [g for p in polygons for g in getattr(p, "geoms", [p]) if isinstance(g, Polygon) and not g.is_empty]
    return MultiPolygon(parts)

def segment_params(config: TissueConfig, mask_mpp: tuple[float, float]) -> TissueSegmentParams:
    """The kernel parameters, in mask pixels, of ``config``'s micrometre sizes at ``mask_mpp`` (x, y) µm/px.

    Radii are rounded to whole pixels of the geometric-mean pixel side; areas are divided by the
    pixel area (holes rounded down, objects and ink specks up).
    """
    px_area = float(mask_mpp[0]) * float(mask_mpp[1])
    radius = lambda um: int(round(um / math.sqrt(px_area)))  # noqa: E731
    return TissueSegmentParams(
        closing_radius_px=radius(config.closing_um),
        opening_radius_px=radius(config.opening_um),
        max_hole_px=int(config.max_hole_um2 / px_area),
        min_object_px=int(math.ceil(config.min_object_um2 / px_area)),
        reject_pen=config.reject_pen,
        pen_dilation_px=radius(config.pen_margin_um),
        min_pen_object_px=int(math.ceil(config.min_pen_object_um2 / px_area)),
        weak_threshold_ratio=float(config.hysteresis_ratio),
        opening_by_reconstruction=bool(config.opening_by_reconstruction),
    )


def detect_tissue(
    slide: Slide,
    *,
    mask_mpp: float | None = None,
    config: TissueConfig | None = None,
    keep_thumbnail: bool = False,
) -> TissueMask:
    """Find tissue on ``slide``.

    Parameters
    ----------
    slide : Slide
    mask_mpp : float, optional
        Mask resolution in µm/px (default ``config.mask_mpp``, 8 µm/px). Coarsened when the
        mask would exceed ``config.max_mask_px`` pixels; never finer than level 0.
    config : TissueConfig, optional
    keep_thumbnail : bool
        Keep the RGB thumbnail on the mask (``mask.thumbnail``), e.g. for overlays.

    Returns
    -------
    TissueMask
        Possibly empty (see ``TissueConfig.on_no_tissue``).
    """
    config = config or TissueConfig()
    target = float(mask_mpp or config.mask_mpp)
    w0, h0 = slide.dimensions
    mx, my = slide.mpp
    target = max(target, min(mx, my))
    pixels = (w0 * mx / target) * (h0 * my / target)
    if pixels > config.max_mask_px:
        target *= math.sqrt(pixels / config.max_mask_px) * 1.001
        logger.info("%s: mask coarsened to %.3g µm/px to stay within %d px", slide.path.name, target, config.max_mask_px)
    thumb, (tmx, tmy) = slide.thumbnail(target, read_budget_px=config.read_budget_px, max_reads=MAX_THUMBNAIL_READS)
    params = segment_params(config, (tmx, tmy))
    raster, threshold = segment_tissue(thumb, params, return_threshold=True)
    # A mask pixel is exactly (tmx / mx) level-0 px wide (the thumbnail's integer shrink of its
    # level); the last column and row may reach past the slide's edge, so outlines are clipped.
    scale = (tmx / mx, tmy / my)
    polygons = mask_to_polygons(raster, scale)
    if raster.shape[1] * scale[0] > w0 + 1e-6 or raster.shape[0] * scale[1] > h0 + 1e-6:
        clipped = shapely.clip_by_rect(polygons, 0.0, 0.0, float(w0), float(h0))
        polygons = MultiPolygon([g for g in getattr(clipped, "geoms", [clipped]) if isinstance(g, Polygon)])
    mask = TissueMask(
        raster=raster,
        mask_mpp=(tmx, tmy),
        level0_per_mask_px=scale,
        polygons=polygons,
        slide_dimensions=(w0, h0),
        otsu_threshold=float(threshold),
        thumbnail=thumb if keep_thumbnail else None,
    )
    if mask.is_empty:
        message = (
            f"no tissue found on '{slide.path.name}' at {tmx:.3g} µm/px (Otsu threshold {threshold:.3f}). "
            "If the slide has faint tissue, lower TissueConfig.min_object_um2 or disable pen rejection; "
            "or tile without a mask: plan_tiles(slide, None, ...)."
        )
        if config.on_no_tissue == "raise":
            raise NoTissueError(message)
        logger.warning(message)
    return mask
