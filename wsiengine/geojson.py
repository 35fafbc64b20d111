"""QuPath-compatible GeoJSON export and import.

>>> from wsiengine.geojson import export_slide_geojson, read_geojson, annotations_to_geometry
>>> export_slide_geojson("x.geojson", tissue=mask, grid=grid, scores=pred.tile_scores, threshold=0.5, tiles=True,
...                      attention=pred.attention)
>>> roi = annotations_to_geometry(read_geojson("drawn_in_qupath.geojson"), "Tumor")
>>> grid = plan_tiles(slide, mask, include=roi)

Conventions (QuPath 0.4 and later, see ``qupath-core``'s ``PathObjectTypeAdapters``):

* a ``FeatureCollection`` in **level-0 pixel coordinates** (origin top-left of the full-resolution
  image), one ``Feature`` per object, with a UUID ``id``;
* ``properties.objectType`` is ``"annotation"`` (tissue, tumour regions) or ``"detection"`` (tiles);
* ``properties.classification`` is ``{"name": str, "color": [r, g, b]}`` (ints 0-255);
* ``properties.measurements`` is a JSON **object** mapping a name to a number, the form QuPath has
  written since 0.4.0 (it still reads the older ``[{"name", "value"}]`` list, and so does
  :func:`read_geojson`); non-finite values are left out, as JSON has no NaN;
* ``properties.color`` (``[r, g, b]``) colours one object, used for tiles coloured by score;
* ``isLocked`` is written only when true.

Every polygon written is valid (``shapely.is_valid``), snapped to a 0.01-px grid, exterior ring
counter-clockwise and holes clockwise (RFC 7946), rings closed.
"""

from __future__ import annotations

import gzip as _gzip
import json
import logging
import math
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, shape
from shapely.geometry.base import BaseGeometry
from shapely.geometry.polygon import orient

from .atomic import atomic_write
from .tiling import TileGrid
from .tissue import TissueMask

__all__ = [
    "Annotation",
    "TISSUE_CLASS",
    "TUMOR_CLASS",
    "NON_TUMOR_CLASS",
    "TILE_CLASS",
    "CLASS_COLOURS",
    "make_valid_geometry",
    "RegionMeasurement",
    "region_measurements",
    "tissue_features",
    "tumour_regions",
    "region_features",
    "tile_features",
    "feature_collection",
    "slide_feature_collection",
    "write_geojson",
    "export_slide_geojson",
    "read_geojson",
    "annotations_to_geometry",
    "read_camelyon_annotations",
    "max_diameter",
    "score_colours",
]

logger = logging.getLogger("wsiengine")

TISSUE_CLASS = "Tissue"
TUMOR_CLASS = "Tumor"
NON_TUMOR_CLASS = "Non-tumor"
TILE_CLASS = "Tile"
#: Classification colours, [r, g, b]; "Tumor" is QuPath's default tumour colour.
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    TUMOR_CLASS: (200, 0, 0),
    TISSUE_CLASS: (40, 160, 80),
    NON_TUMOR_CLASS: (80, 120, 200),
    TILE_CLASS: (120, 120, 120),
}
#: Grid coordinates are snapped to when written, level-0 pixels.
COORD_PRECISION_PX = 0.01
#: Gaps narrower than twice this between tiles of a region are closed, level-0 pixels (tile
#: origins are whole pixels while tile sizes need not be, so neighbours can miss by < 1 px).
_GAP_CLOSE_PX = 1.0
#: A polygon piece of a tumour region smaller than this fraction of one tile is a sliver.
_SLIVER_TILE_FRACTION = 0.01
#: Viridis at 0, 0.25, 0.5, 0.75, 1 (perceptually uniform, readable on H&E) for tile colours.
_SCORE_STOPS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)


# -- geometry helpers -----------------------------------------------------------------------------
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


def _num(v: float) -> int | float:
    """A coordinate for JSON: rounded to the 0.01-px grid, whole numbers as ints."""
    r = round(float(v), 2)
    return int(r) if r.is_integer() else r


def _measure(v: Any) -> float | None:
    """A measurement value for JSON: 6 significant digits, None when not finite."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(f):
        return None
    return float(f"{f:.6g}")


def _measurements(values: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in values.items():
        m = _measure(v)
        if m is not None:
            out[str(k)] = m
    return out


def _rings(polygon: Polygon) -> list[list[list[int | float]]]:
    polygon = orient(polygon, 1.0)
    return [[[_num(x), _num(y)] for x, y in ring.coords] for ring in (polygon.exterior, *polygon.interiors)]


def _snap(geom: BaseGeometry) -> list[Polygon]:
    """Valid polygons of ``geom`` snapped to the output grid (snapping keeps validity)."""
    geom = make_valid_geometry(geom)
    if geom.is_empty:
        return []
    snapped = shapely.set_precision(geom, COORD_PRECISION_PX)
    return [p for p in _polygons(make_valid_geometry(snapped)) if p.area > 0]


def _geometry_json(polygons: Sequence[Polygon]) -> dict[str, Any]:
    if len(polygons) == 1:
        return {"type": "Polygon", "coordinates": _rings(polygons[0])}
    return {"type": "MultiPolygon", "coordinates": [_rings(p) for p in polygons]}


def _colour(name: str, colour: Sequence[int] | None = None) -> list[int]:
    if colour is None:
        colour = CLASS_COLOURS.get(name)
    if colour is None:  # a stable colour per unknown class name
        h = uuid.uuid5(uuid.NAMESPACE_OID, name).bytes
        colour = (h[0], h[1], h[2])
    return [int(c) for c in colour]


def _feature_id(namespace: str | None, kind: str, index: int) -> str:
    """A UUID (QuPath 0.4+ reads ``id`` as the object's UUID): deterministic given ``namespace``."""
    if namespace is None:
        return str(uuid.uuid4())
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"wsiengine/{namespace}/{kind}/{index}"))


def _feature(geometry: dict[str, Any], object_type: str, *, classification: str | None, colour: Sequence[int] | None = None,
             name: str | None = None, measurements: Mapping[str, Any] | None = None, object_colour: Sequence[int] | None = None,
             locked: bool = False, fid: str) -> dict[str, Any]:
    props: dict[str, Any] = {"objectType": object_type}
    if name is not None:
        props["name"] = name
    if object_colour is not None:
        props["color"] = [int(c) for c in object_colour]
    if classification is not None:
        props["classification"] = {"name": classification, "color": _colour(classification, colour)}
    if locked:
        props["isLocked"] = True
    if measurements:
        m = _measurements(measurements)
        if m:
            props["measurements"] = m
    return {"type": "Feature", "id": fid, "geometry": geometry, "properties": props}


# -- export ---------------------------------------------------------------------------------------
def tissue_features(polygons: BaseGeometry | TissueMask, *, mpp: tuple[float, float] | float | None = None,
                    classification: str = TISSUE_CLASS, id_namespace: str | None = None) -> list[dict[str, Any]]:
    """Tissue outlines as QuPath annotations, one per polygon, holes kept.

    Parameters
    ----------
    polygons : shapely geometry or TissueMask
        Tissue in level-0 pixels (a TissueMask's ``polygons``).
    mpp : (x, y) or float, optional
        Level-0 µm/px; each feature then carries ``"Area mm^2"``. Derived from a TissueMask
        (``mask_mpp / level0_per_mask_px``) when not given.
    classification : str
        Class name (default ``"Tissue"``).
    id_namespace : str, optional
        Makes feature ids deterministic (e.g. the slide id); random UUIDs otherwise.
    """
    if isinstance(polygons, TissueMask):
        if mpp is None:
            mpp = (polygons.mask_mpp[0] / polygons.level0_per_mask_px[0], polygons.mask_mpp[1] / polygons.level0_per_mask_px[1])
        polygons = polygons.polygons
    mpp_xy = None if mpp is None else _mpp_xy(mpp)
    features = []
    for k, polygon in enumerate(_snap(polygons)):
        meas = {"Area mm^2": _mm2(polygon.area, mpp_xy)} if mpp_xy is not None else None
        features.append(_feature(_geometry_json([polygon]), "annotation", classification=classification,
                                 name=f"{classification} {k + 1}", measurements=meas,
                                 fid=_feature_id(id_namespace, "tissue", k)))
    return features


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
        raise ValueError(f"scores has {scores.shape[0]} values but the grid has {len(grid)} tiles; pass one score per tile")
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


def region_features(regions: BaseGeometry, mpp: tuple[float, float] | float, *, name: str = TUMOR_CLASS,
                    grid: TileGrid | None = None, scores: np.ndarray | None = None,
                    colour: Sequence[int] | None = None, id_namespace: str | None = None) -> list[dict[str, Any]]:
    """Predicted regions as classified QuPath annotations, one per polygon.

    Measurements: ``"Area mm^2"``; ``"Max diameter mm"``, the longest distance between two
    vertices of the convex hull, in mm; with ``grid`` and ``scores`` also ``"Tiles"`` (tile centres
    inside), ``"Mean tile score"`` and ``"Max tile score"`` over those tiles.

    Parameters
    ----------
    regions : shapely geometry
        Level-0 pixels (from :func:`tumour_regions`, or any polygons).
    mpp : (x, y) or float
        Level-0 µm/px.
    name : str
        Classification name (default ``"Tumor"``, QuPath's colour ``[200, 0, 0]``).
    grid, scores : TileGrid and (N,) array, optional
        The tiles and scores the regions came from.
    colour : [r, g, b], optional
        Classification colour; default from :data:`CLASS_COLOURS`.
    id_namespace : str, optional
        Makes feature ids deterministic.
    """
    features = []
    for k, m in enumerate(region_measurements(regions, mpp, grid=grid, scores=scores)):
        meas: dict[str, Any] = {"Area mm^2": m.area_mm2, "Max diameter mm": m.max_diameter_mm}
        if m.tiles is not None:
            meas["Tiles"] = int(m.tiles.size)
            if m.max_tile_score is not None:
                meas["Mean tile score"] = m.mean_tile_score
                meas["Max tile score"] = m.max_tile_score
        features.append(_feature(_geometry_json([m.polygon]), "annotation", classification=name, colour=colour,
                                 name=f"{name} region {k + 1}", measurements=meas,
                                 fid=_feature_id(id_namespace, f"region-{name}", k)))
    return features


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
            raise ValueError(f"scores has {s.shape[0]} values but the grid has {len(grid)} tiles; pass one score per tile")
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


def score_colours(values: np.ndarray, vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """``(N, 3)`` uint8 viridis colours for ``values`` scaled from [vmin, vmax]; NaN is grey."""
    v = np.asarray(values, np.float64).reshape(-1)
    t = np.clip((v - vmin) / (vmax - vmin if vmax > vmin else 1.0), 0.0, 1.0)
    pos = np.nan_to_num(t, nan=0.0) * (len(_SCORE_STOPS) - 1)
    i = np.minimum(pos.astype(np.int64), len(_SCORE_STOPS) - 2)
    f = (pos - i)[:, None]
    rgb = _SCORE_STOPS[i] * (1 - f) + _SCORE_STOPS[i + 1] * f
    rgb[~np.isfinite(v)] = 128
    return np.rint(rgb).astype(np.uint8)


def tile_features(grid: TileGrid, values: Mapping[str, np.ndarray], *,
                  classification: str | Sequence[str | None] | None = None,
                  colour_by: str | None = "tile score", id_namespace: str | None = None) -> list[dict[str, Any]]:
    """Tiles as QuPath detections, one per tile (its level-0 box), carrying ``values`` as measurements.

    Parameters
    ----------
    grid : TileGrid
    values : mapping of name -> (N,) array
        Per-tile measurements, e.g. ``{"attention": ..., "tile score": ...}``; NaN is left out.
    classification : str or sequence of str, optional
        Class of every tile, or one per tile (e.g. ``"Tumor"`` / ``"Non-tumor"`` by threshold);
        none by default. QuPath draws a detection in its own ``color`` when set.
    colour_by : str or None
        The value (in [0, 1]) that sets each tile's ``color`` (viridis); skipped when absent.
    id_namespace : str, optional
        Makes feature ids deterministic.
    """
    n = len(grid)
    cols = {str(k): np.asarray(v, np.float64).reshape(-1) for k, v in values.items()}
    for k, v in cols.items():
        if v.shape[0] != n:
            raise ValueError(f"value {k!r} has {v.shape[0]} entries but the grid has {n} tiles")
    if classification is None or isinstance(classification, str):
        classes: Sequence[str | None] = [classification] * n
    else:
        classes = list(classification)
        if len(classes) != n:
            raise ValueError(f"classification has {len(classes)} entries but the grid has {n} tiles")
    colours = score_colours(cols[colour_by]) if colour_by is not None and colour_by in cols else None
    boxes = grid.boxes()
    features = []
    for i in range(n):
        x0, y0, x1, y1 = (_num(c) for c in boxes[i])
        geometry = {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}
        features.append(_feature(geometry, "detection", classification=classes[i],
                                 measurements={k: v[i] for k, v in cols.items()},
                                 object_colour=None if colours is None else colours[i],
                                 fid=_feature_id(id_namespace, "tile", i)))
    return features


def feature_collection(features: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """A GeoJSON ``FeatureCollection`` of ``features``."""
    return {"type": "FeatureCollection", "features": list(features)}


def slide_feature_collection(*, tissue: TissueMask | BaseGeometry | None = None, grid: TileGrid | None = None,
                             scores: np.ndarray | None = None, threshold: float = 0.5,
                             mpp: tuple[float, float] | float | None = None, tiles: bool = False,
                             attention: np.ndarray | None = None, min_tiles: int = 1,
                             slide_id: str | None = None) -> dict[str, Any]:
    """The FeatureCollection of one slide: tissue annotations, tumour-region annotations
    (tiles with ``scores >= threshold`` merged, see :func:`tumour_regions`) and, with ``tiles``,
    one detection per tile with ``"tile score"`` and ``"attention"``, classified ``"Tumor"`` or
    ``"Non-tumor"`` by ``threshold`` (``"Tile"`` without scores) and coloured by score.

    Parameters
    ----------
    tissue : TissueMask or shapely geometry, optional
        Level-0 pixels.
    grid, scores : TileGrid and (N,) array, optional
        Needed for regions and tiles.
    threshold : float
        Tile score at or above which a tile is tumour.
    mpp : (x, y) or float, optional
        Level-0 µm/px; default ``grid.slide_mpp``.
    tiles : bool
        Add the tiles as detections.
    attention : (N,) array, optional
        Per-tile MIL attention for the tile detections.
    min_tiles : int
        Smallest tumour region kept, tiles.
    slide_id : str, optional
        Makes feature ids deterministic.
    """
    if mpp is None and grid is not None:
        mpp = grid.slide_mpp
    mpp_xy = None if mpp is None else _mpp_xy(mpp)
    features: list[dict[str, Any]] = []
    if tissue is not None:
        features += tissue_features(tissue, mpp=mpp_xy, id_namespace=slide_id)  # None: from the mask
    if grid is not None and scores is not None:
        if mpp_xy is None:
            raise ValueError("mpp is required for tumour regions (area in mm², diameter in mm)")
        regions = tumour_regions(grid, scores, threshold, min_tiles=min_tiles)
        features += region_features(regions, mpp_xy, grid=grid, scores=scores, id_namespace=slide_id)
    if tiles:
        if grid is None:
            raise ValueError("tiles=True needs the grid")
        values: dict[str, np.ndarray] = {}
        classes: list[str | None] | str = TILE_CLASS
        if scores is not None:
            values["tile score"] = np.asarray(scores)
            classes = [TUMOR_CLASS if v >= threshold else NON_TUMOR_CLASS
                       for v in np.asarray(scores, np.float64).reshape(-1)]
        if attention is not None:
            values["attention"] = np.asarray(attention)
        features += tile_features(grid, values, classification=classes, id_namespace=slide_id)
    return feature_collection(features)


def _is_gzip_path(path: Path) -> bool:
    return path.suffix.lower() == ".gz"


def write_geojson(path: str | os.PathLike[str], collection: Mapping[str, Any] | Sequence[Any], *,
                  gzip: bool | None = None) -> Path:
    """Write ``collection`` as compact JSON, atomically (a temporary file in the same folder,
    then ``os.replace``): the file appears complete or not at all, and an existing file is
    untouched when writing fails.

    Parameters
    ----------
    path : path-like
        Output file; parent folders are created.
    collection : dict
        A FeatureCollection (or any JSON value).
    gzip : bool, optional
        Compress with gzip; default: when ``path`` ends with ``.gz``.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        A value is NaN or infinite (not valid JSON).
    """
    path = Path(os.fspath(path))
    use_gzip = _is_gzip_path(path) if gzip is None else bool(gzip)
    with atomic_write(path) as raw:
        if use_gzip:
            with _gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
                _dump(collection, gz)
        else:
            _dump(collection, raw)
    return path


def _dump(obj: Any, binary: Any) -> None:
    encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    buffer: list[str] = []
    size = 0
    for chunk in encoder.iterencode(obj):
        buffer.append(chunk)
        size += len(chunk)
        if size >= 1 << 20:
            binary.write("".join(buffer).encode("utf-8"))
            buffer, size = [], 0
    binary.write("".join(buffer).encode("utf-8"))


def export_slide_geojson(path: str | os.PathLike[str], *, tissue: TissueMask | BaseGeometry | None = None,
                         grid: TileGrid | None = None, scores: np.ndarray | None = None, threshold: float = 0.5,
                         mpp: tuple[float, float] | float | None = None, tiles: bool = False,
                         attention: np.ndarray | None = None, min_tiles: int = 1, slide_id: str | None = None,
                         gzip: bool | None = None) -> Path:
    """Write a slide's QuPath GeoJSON (see :func:`slide_feature_collection`) to ``path``
    atomically, gzipped when ``path`` ends with ``.gz`` or ``gzip=True``. Returns ``path``."""
    collection = slide_feature_collection(tissue=tissue, grid=grid, scores=scores, threshold=threshold, mpp=mpp,
                                          tiles=tiles, attention=attention, min_tiles=min_tiles, slide_id=slide_id)
    return write_geojson(path, collection, gzip=gzip)


# -- import ---------------------------------------------------------------------------------------
#: QuPath 0.2 stored the object type in ``id``.
_LEGACY_TYPES = {
    "PathAnnotationObject": "annotation",
    "PathDetectionObject": "detection",
    "PathTileObject": "tile",
    "PathCellObject": "cell",
    "TMACoreObject": "tmaCore",
    "PathRootObject": "root",
}


@dataclass(frozen=True)
class Annotation:
    """One imported GeoJSON feature.

    Attributes
    ----------
    geometry : shapely geometry
        Level-0 pixels; polygons are repaired to be valid.
    name : str or None
        ``properties.name``.
    classification : str or None
        ``properties.classification.name`` (``names`` joined with ``": "``, as QuPath shows them).
    object_type : str
        ``properties.objectType`` (``"annotation"`` when absent, as QuPath assumes).
    properties : dict
        All of ``properties``.
    id : str or None
        The feature's ``id``.
    """

    geometry: BaseGeometry
    name: str | None
    classification: str | None
    object_type: str
    properties: dict[str, Any] = field(default_factory=dict, repr=False)
    id: str | None = None

    @property
    def measurements(self) -> dict[str, float]:
        """Measurements as name -> value, from either QuPath form (object, or list of name/value)."""
        m = self.properties.get("measurements")
        if isinstance(m, Mapping):
            return {str(k): float(v) for k, v in m.items() if isinstance(v, (int, float))}
        if isinstance(m, list):
            return {str(e["name"]): float(e["value"]) for e in m
                    if isinstance(e, Mapping) and "name" in e and isinstance(e.get("value"), (int, float))}
        return {}


def _load_json(source: str | os.PathLike[str] | Mapping[str, Any] | list[Any]) -> Any:
    if isinstance(source, (Mapping, list)):
        return source
    path = Path(os.fspath(source))
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = _gzip.decompress(data)
    try:
        return json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: not JSON ({exc}); expected a GeoJSON FeatureCollection or feature list") from exc


def _classification(props: Mapping[str, Any]) -> str | None:
    c = props.get("classification")
    if isinstance(c, Mapping):
        if c.get("name") is not None:
            return str(c["name"])
        if isinstance(c.get("names"), list):
            return ": ".join(str(n) for n in c["names"])
        return None
    if isinstance(c, str):
        return c
    return None


def _annotation(feature: Mapping[str, Any]) -> Annotation | None:
    geom_json = feature.get("geometry")
    if not geom_json:
        logger.warning("GeoJSON feature %r has no geometry; skipped", feature.get("id"))
        return None
    geom = shape(geom_json)
    if geom.geom_type in ("Polygon", "MultiPolygon"):
        geom = make_valid_geometry(geom)
    elif geom.geom_type == "GeometryCollection" and _polygons(geom):
        geom = make_valid_geometry(geom)
    props = dict(feature.get("properties") or {})
    fid = feature.get("id")
    object_type = props.get("objectType") or props.get("object_type") or props.get("type")
    if object_type is None and isinstance(fid, str) and fid in _LEGACY_TYPES:
        object_type = _LEGACY_TYPES[fid]
    return Annotation(geometry=geom, name=props.get("name"), classification=_classification(props),
                      object_type=str(object_type or "annotation"), properties=props,
                      id=None if fid is None else str(fid))


def read_geojson(source: str | os.PathLike[str] | Mapping[str, Any] | list[Any]) -> list[Annotation]:
    """Read QuPath (or any) GeoJSON into :class:`Annotation` objects.

    Accepts a ``FeatureCollection``, a bare list of features (QuPath's export without
    ``FEATURE_COLLECTION``), a single ``Feature`` or a bare geometry, from a path (plain or
    gzipped, detected from the content) or an already parsed object. Coordinates are taken as
    level-0 pixels. Features without geometry are skipped with a warning.
    """
    data = _load_json(source)
    if isinstance(data, list):
        items = data
    elif isinstance(data, Mapping) and data.get("type") == "FeatureCollection":
        items = list(data.get("features") or [])
    elif isinstance(data, Mapping) and data.get("type") == "Feature":
        items = [data]
    elif isinstance(data, Mapping) and ("coordinates" in data or data.get("type") == "GeometryCollection"):
        items = [{"type": "Feature", "geometry": data, "properties": {}}]
    else:
        raise ValueError("not GeoJSON: expected a FeatureCollection, a list of features, a Feature or a geometry")
    out = []
    for item in items:
        if not isinstance(item, Mapping):
            raise ValueError(f"not a GeoJSON feature: {str(item)[:80]}")
        a = _annotation(item)
        if a is not None:
            out.append(a)
    return out


def annotations_to_geometry(annotations: Iterable[Annotation], classification: str | None = None, *,
                            object_type: str | None = None) -> MultiPolygon:
    """The union of the polygonal annotations that match, valid, in level-0 pixels: a tiling ROI
    for ``plan_tiles(include=...)`` / ``exclude=``, or lesion ground truth for FROC.

    Parameters
    ----------
    annotations : iterable of Annotation
    classification : str, optional
        Keep only this class (case-insensitive); all classes when None.
    object_type : str, optional
        Keep only this object type (e.g. ``"annotation"``); all when None.
    """
    keep = []
    for a in annotations:
        if classification is not None and (a.classification or "").casefold() != classification.casefold():
            continue
        if object_type is not None and a.object_type != object_type:
            continue
        keep.extend(_polygons(a.geometry))
    if not keep:
        return MultiPolygon()
    return make_valid_geometry(shapely.union_all(keep))


#: CAMELYON16 XML (ASAP) groups: "_0"/"_1"/"Tumor" are lesions, "_2"/"Exclusion" normal islands.
_XML_NEGATIVE = {"_2", "exclusion", "none", "normal"}


def read_camelyon_annotations(path: str | os.PathLike[str]) -> MultiPolygon:
    """CAMELYON16 lesion annotations as one valid MultiPolygon in level-0 pixels.

    Reads the NCRF JSON form ``{"positive": [{"name", "vertices": [[x, y], ...]}], "negative": [...]}``
    and the challenge's ASAP XML (groups ``_0``/``_1`` lesions, ``_2`` exclusions). The result is
    the union of the positive polygons minus the union of the negative ones, each polygon repaired
    first (some annotations self-intersect). A slide without lesions gives an empty MultiPolygon.
    """
    path = Path(os.fspath(path))
    text = path.read_text(encoding="utf-8-sig")
    positive: list[BaseGeometry] = []
    negative: list[BaseGeometry] = []
    if text.lstrip().startswith("<"):
        import xml.etree.ElementTree as ET

        root = ET.fromstring(text)
        for ann in root.iter("Annotation"):
            pts = sorted(ann.iter("Coordinate"), key=lambda c: int(float(c.get("Order", 0))))
            xy = [(float(c.get("X")), float(c.get("Y"))) for c in pts]  # type: ignore[arg-type]
            if len(xy) < 3:
                continue
            group = (ann.get("PartOfGroup") or "").strip().casefold()
            (negative if group in _XML_NEGATIVE else positive).append(make_valid_geometry(Polygon(xy)))
    else:
        data = json.loads(text)
        if not isinstance(data, Mapping) or not ({"positive", "negative"} & set(data)):
            raise ValueError(f"{path}: not an NCRF CAMELYON annotation file (expected 'positive'/'negative' lists)")
        for key, sink in (("positive", positive), ("negative", negative)):
            for entry in data.get(key) or []:
                xy = np.asarray(entry.get("vertices") or [], np.float64).reshape(-1, 2)
                if len(xy) < 3:
                    logger.warning("%s: %s polygon %r has %d vertices; skipped", path.name, key, entry.get("name"), len(xy))
                    continue
                sink.append(make_valid_geometry(Polygon(xy)))
    pos = make_valid_geometry(shapely.union_all(positive)) if positive else MultiPolygon()
    if pos.is_empty:
        return MultiPolygon()
    if negative:
        pos = make_valid_geometry(pos.difference(make_valid_geometry(shapely.union_all(negative))))
    return pos
