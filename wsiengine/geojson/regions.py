"""Tumour regions: tiles scoring at or above a threshold merged into polygons, and each region's
measurements (area in mm², greatest dimension in mm, the tiles inside and their scores).

Used by the QuPath export (:mod:`wsiengine.geojson.export`) and by slide reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

from ..errors import InputError
from ..tiling import TileGrid
from .geometry import _mm2, _mpp_xy, _points_in, _snap, make_valid_geometry, max_diameter

__all__ = ["tumour_regions", "RegionMeasurement", "region_measurements"]

#: Gaps narrower than twice this between tiles of a region are closed, level-0 pixels (tile
#: origins are whole pixels while tile sizes need not be, so neighbours can miss by < 1 px).
_GAP_CLOSE_PX = 1.0
#: A polygon piece of a tumour region smaller than this fraction of one tile is a sliver.
_SLIVER_TILE_FRACTION = 0.01


def tumour_regions(grid: TileGrid, scores: np.ndarray, threshold: float, *, min_tiles: int = 1) -> MultiPolygon:
    """Merge the tiles scoring at least ``threshold`` into region polygons.

    The level-0 boxes of the selected tiles (``grid.boxes()``) are unioned with shapely; gaps
    under 2 px between neighbours (whole-pixel tile origins, fractional tile sizes) are closed
    with a mitred 1-px closing so square corners stay square; the result is made valid, collinear
    vertices are dropped, slivers (< 1% of a tile) are removed, and regions covering fewer than
    ``min_tiles`` tile centres are dropped.

    Parameters
    ----------
    grid : TileGrid
    scores : (N,) array
        Per-tile score (e.g. ``SlidePrediction.tile_scores``); NaN never passes.
    threshold : float
        Inclusive lower bound on the score.
    min_tiles : int
        Smallest region kept, in tiles.

    Returns
    -------
    shapely.MultiPolygon
        Valid, level-0 pixels, possibly empty.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.shape[0] != len(grid):
        raise InputError(f"scores has {scores.shape[0]} values but the grid has {len(grid)} tiles; pass one score per tile")
    selected = np.flatnonzero(scores >= threshold)
    if selected.size == 0:
        return MultiPolygon()
    b = grid.boxes()[selected]
    g = _GAP_CLOSE_PX  # closing: union the grown boxes, then shrink back (mitred, so corners stay square)
    merged = shapely.union_all(shapely.box(b[:, 0] - g, b[:, 1] - g, b[:, 2] + g, b[:, 3] + g))
    merged = merged.buffer(-g, join_style="mitre")
    merged = make_valid_geometry(shapely.simplify(make_valid_geometry(merged), 0.0))
    tile_area = float(grid.tile_size_level0[0] * grid.tile_size_level0[1])
    pieces = [p for p in merged.geoms if p.area >= _SLIVER_TILE_FRACTION * tile_area]
    pieces.sort(key=lambda p: (p.bounds[1], p.bounds[0]))  # top to bottom, then left to right
    if min_tiles > 1 and pieces:
        inside = _points_in(pieces, grid.centres()[selected])
        pieces = [p for p, idx in zip(pieces, inside) if idx.size >= min_tiles]
    out = MultiPolygon(pieces)
    return out if out.is_valid else make_valid_geometry(out)


@dataclass(frozen=True, eq=False)
class RegionMeasurement:
    """One region polygon and its measurements (what :func:`region_features` and slide reports show).

    Attributes
    ----------
    polygon : shapely.Polygon
        Level-0 pixels (vertices on the 0.01-px grid of the GeoJSON export).
    area_mm2, max_diameter_mm : float
        Area and greatest dimension (between convex-hull vertices).
    tiles : (K,) int64 or None
        Grid rows whose centres lie inside or on the edge (with a grid and scores).
    mean_tile_score, max_tile_score : float or None
        Over those tiles' finite scores.
    """

    polygon: Polygon
    area_mm2: float
    max_diameter_mm: float
    tiles: np.ndarray | None = None
    mean_tile_score: float | None = None
    max_tile_score: float | None = None


def region_measurements(regions: BaseGeometry, mpp: tuple[float, float] | float, *, grid: TileGrid | None = None,
                        scores: np.ndarray | None = None) -> list[RegionMeasurement]:
    """Measure each polygon of ``regions`` (level-0 px) at level-0 ``mpp`` µm/px; with ``grid`` and
    ``scores``, also the tiles whose centres fall inside (a spatial index: O(N log R), not O(N R))."""
    mpp_xy = _mpp_xy(mpp)
    polygons = _snap(regions)
    tiles_in: list[np.ndarray] | None = None
    s = np.zeros(0)
    if grid is not None and scores is not None:
        s = np.asarray(scores, np.float64).reshape(-1)
        if s.shape[0] != len(grid):
            raise InputError(f"scores has {s.shape[0]} values but the grid has {len(grid)} tiles; pass one score per tile")
        tiles_in = _points_in(polygons, grid.centres())
    out = []
    for k, polygon in enumerate(polygons):
        m = RegionMeasurement(polygon, _mm2(polygon.area, mpp_xy), max_diameter(polygon, mpp_xy) / 1000.0)
        if tiles_in is not None:
            inside = tiles_in[k]
            finite = s[inside][np.isfinite(s[inside])]
            m = RegionMeasurement(polygon, m.area_mm2, m.max_diameter_mm, inside,
                                  float(finite.mean()) if finite.size else None,
                                  float(finite.max()) if finite.size else None)
        out.append(m)
    return out
