"""Polygon geometry and measures for annotations, in level-0 pixels: repair, snapping to the
export grid, longest diameter, areas in mm², and which points fall inside which polygons.

Every function takes and returns level-0 pixel coordinates; physical units come from a level-0
``mpp`` (µm/px, a float or an (x, y) pair).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

__all__ = ["COORD_PRECISION_PX", "make_valid_geometry", "max_diameter"]

#: Grid coordinates are snapped to when written, level-0 pixels.
COORD_PRECISION_PX = 0.01


def _polygons(geom: BaseGeometry | None) -> list[Polygon]:
    """The non-empty polygons inside ``geom`` (any geometry type), in order."""
    if geom is None or geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        return [geom]
    if hasattr(geom, "geoms"):
        out: list[Polygon] = []
        for part in geom.geoms:
            out.extend(_polygons(part))
        return out
    return []


def _as_multipolygon(geom: BaseGeometry | None) -> MultiPolygon:
    return MultiPolygon(_polygons(geom))


def make_valid_geometry(geom: BaseGeometry | None) -> MultiPolygon:
    """Repair a polygonal geometry and return its polygonal part as a valid MultiPolygon.

    Repeated points are dropped, then ``shapely.make_valid`` (which splits a self-intersecting
    "bow-tie" into its two lobes, keeping their area) fixes the rest; points and lines it produces
    from collapsed rings are discarded. ``buffer(0)`` is the fallback when GEOS cannot repair.
    Coordinates are unchanged (level-0 pixels in, level-0 pixels out).

    Parameters
    ----------
    geom : shapely geometry or None

    Returns
    -------
    shapely.MultiPolygon
        Valid, possibly empty.
    """
    if geom is None or geom.is_empty:
        return MultiPolygon()
    geom = shapely.remove_repeated_points(geom)
    if not geom.is_valid:
        try:
            repaired = shapely.make_valid(geom)
        except shapely.errors.GEOSException:  # pragma: no cover - GEOS failures are rare
            repaired = geom.buffer(0)
        geom = repaired
    out = _as_multipolygon(geom)
    if not out.is_valid:
        # Pieces of a GeometryCollection may overlap each other: union them.
        out = _as_multipolygon(shapely.union_all([p for p in out.geoms]))
    if not out.is_valid:  # pragma: no cover - last resort
        out = _as_multipolygon(out.buffer(0))
    return out


def max_diameter(geom: BaseGeometry, scale: tuple[float, float] = (1.0, 1.0)) -> float:
    """Longest distance between two points of ``geom`` (between two vertices of its convex hull).

    Parameters
    ----------
    geom : shapely geometry
        Level-0 pixels.
    scale : (sx, sy)
        Multiplies x and y before measuring, e.g. the slide's µm/px for a result in µm.
    """
    if geom is None or geom.is_empty:
        return 0.0
    hull = geom.convex_hull
    pts = shapely.get_coordinates(hull).astype(np.float64)
    if len(pts) < 2:
        return 0.0
    pts = np.unique(pts * np.asarray(scale, np.float64), axis=0)
    best = 0.0
    # Hull vertices of slide polygons are at most a few thousand: chunked pairwise distances.
    for start in range(0, len(pts), 1024):
        d = pts[start:start + 1024, None, :] - pts[None, :, :]
        best = max(best, float(np.sqrt((d * d).sum(-1)).max()))
    return best


def _mpp_xy(mpp: tuple[float, float] | Sequence[float] | float) -> tuple[float, float]:
    """(x, y) µm/px from a float or a pair."""
    if np.isscalar(mpp):
        return (float(mpp), float(mpp))  # type: ignore[arg-type]
    x, y = mpp  # type: ignore[misc]
    return (float(x), float(y))


def _mm2(area_px: float, mpp: tuple[float, float]) -> float:
    return float(area_px) * mpp[0] * mpp[1] / 1e6


def _snap(geom: BaseGeometry) -> list[Polygon]:
    """Valid polygons of ``geom`` snapped to the output grid (snapping keeps validity)."""
    geom = make_valid_geometry(geom)
    if geom.is_empty:
        return []
    snapped = shapely.set_precision(geom, COORD_PRECISION_PX)
    return [p for p in _polygons(make_valid_geometry(snapped)) if p.area > 0]


def _points_in(polygons: Sequence[Polygon], xy: np.ndarray) -> list[np.ndarray]:
    """For each polygon, the indices of the points ``xy`` (K, 2) inside it or on its edge."""
    if not polygons:
        return []
    if len(xy) == 0:
        return [np.zeros(0, np.int64) for _ in polygons]
    point_idx, poly_idx = shapely.STRtree(polygons).query(shapely.points(xy), predicate="intersects")
    order = np.argsort(poly_idx, kind="stable")
    counts = np.bincount(poly_idx, minlength=len(polygons))
    return np.split(point_idx[order], np.cumsum(counts)[:-1])
