"""QuPath-compatible GeoJSON export: tissue and tumour-region annotations, tile detections with
measurements, written atomically (optionally gzipped).

See :mod:`wsiengine.geojson` for the conventions (QuPath 0.4+ feature layout, level-0 pixels,
valid polygons snapped to a 0.01-px grid, RFC 7946 ring orientation).
"""

from __future__ import annotations

import gzip as _gzip
import json
import math
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry
from shapely.geometry.polygon import orient

from ..atomic import atomic_write
from ..errors import InputError
from ..tiling import TileGrid
from ..tissue import TissueMask
from .geometry import _mm2, _mpp_xy, _snap
from .regions import region_measurements, tumour_regions

__all__ = [
    "TISSUE_CLASS",
    "TUMOR_CLASS",
    "NON_TUMOR_CLASS",
    "TILE_CLASS",
    "CLASS_COLOURS",
    "tissue_features",
    "region_features",
    "tile_features",
    "feature_collection",
    "slide_feature_collection",
    "write_geojson",
    "export_slide_geojson",
    "score_colours",
]

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
#: Viridis at 0, 0.25, 0.5, 0.75, 1 (perceptually uniform, readable on H&E) for tile colours.
_SCORE_STOPS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)


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

def deposit_features(deposits: Sequence[Any], *, name: str = TUMOR_CLASS, colour: Sequence[int] | None = None,
                     id_namespace: str | None = None) -> list[dict[str, Any]]:
    """Measured tumour deposits (:class:`wsiengine.deposits.Deposit`: ``rank``, ``outline``,
    ``measurements()``) as classified QuPath annotations, one per deposit, largest first, named
    ``"Tumor deposit 1"``, ... Their measurements are the report's numbers (``"Max diameter mm"``
    is the Feret diameter of the deposit, ``"Size uncertainty mm"`` its ± one tile)."""
    features = []
    for deposit in deposits:
        features.append(_feature(_geometry_json(list(deposit.outline.geoms)), "annotation", classification=name,
                                 colour=colour, name=f"{name} deposit {deposit.rank}",
                                 measurements=dict(deposit.measurements()),
                                 fid=_feature_id(id_namespace, f"deposit-{name}", deposit.rank - 1)))
    return features


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
            raise InputError(f"value {k!r} has {v.shape[0]} entries but the grid has {n} tiles")
    if classification is None or isinstance(classification, str):
        classes: Sequence[str | None] = [classification] * n
    else:
        classes = list(classification)
        if len(classes) != n:
            raise InputError(f"classification has {len(classes)} entries but the grid has {n} tiles")
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
                             slide_id: str | None = None, deposits: Sequence[Any] | None = None,
                             node: Mapping[str, Any] | None = None) -> dict[str, Any]:
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
    deposits : sequence of Deposit, optional
        Measured deposits (:func:`wsiengine.deposits.find_deposits`): they are the tumour regions
        (see :func:`deposit_features`) instead of tiles merged by ``threshold``, and tiles are
        ``"Tumor"`` when they belong to one.
    node : mapping, optional
        The node's findings (category, largest deposit, foci, tumour area), written as the
        collection's foreign member ``"wsiengine": {"node": ...}`` (QuPath ignores it).
    """
    if mpp is None and grid is not None:
        mpp = grid.slide_mpp
    mpp_xy = None if mpp is None else _mpp_xy(mpp)
    features: list[dict[str, Any]] = []
    if tissue is not None:
        features += tissue_features(tissue, mpp=mpp_xy, id_namespace=slide_id)  # None: from the mask
    if grid is not None and scores is not None:
        if mpp_xy is None:
            raise InputError("mpp is required for tumour regions (area in mm², diameter in mm): pass the level-0 mpp "
                             "(µm/px) or a grid that carries slide_mpp")
        if deposits is not None:
            features += deposit_features(deposits, id_namespace=slide_id)
        else:
            regions = tumour_regions(grid, scores, threshold, min_tiles=min_tiles)
            features += region_features(regions, mpp_xy, grid=grid, scores=scores, id_namespace=slide_id)
    if tiles:
        if grid is None:
            raise InputError("tiles=True needs the grid: pass grid= (the TileGrid the scores belong to)")
        values: dict[str, np.ndarray] = {}
        classes: list[str | None] | str = TILE_CLASS
        if scores is not None:
            values["tile score"] = np.asarray(scores)
            if deposits is not None:
                member = np.zeros(len(grid), bool)
                for deposit in deposits:
                    member[np.asarray(deposit.tiles, np.int64)] = True
            else:
                member = np.asarray(scores, np.float64).reshape(-1) >= threshold
            classes = [TUMOR_CLASS if m else NON_TUMOR_CLASS for m in member]
        if attention is not None:
            values["attention"] = np.asarray(attention)
        features += tile_features(grid, values, classification=classes, id_namespace=slide_id)
    collection = feature_collection(features)
    if node is not None:
        collection["wsiengine"] = {"node": dict(node)}
    return collection


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
    InputError
        (a ``ValueError``) A value is NaN or infinite (not valid JSON).
    """
    path = Path(os.fspath(path))
    use_gzip = _is_gzip_path(path) if gzip is None else bool(gzip)
    try:
        with atomic_write(path) as raw:
            if use_gzip:
                with _gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
                    _dump(collection, gz)
            else:
                _dump(collection, raw)
    except ValueError as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"cannot write {path.name}: {exc}; GeoJSON has no NaN or infinity, "
                         "leave such values out (measurements drop them)") from exc
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
                         gzip: bool | None = None, deposits: Sequence[Any] | None = None,
                         node: Mapping[str, Any] | None = None) -> Path:
    """Write a slide's QuPath GeoJSON (see :func:`slide_feature_collection`) to ``path``
    atomically, gzipped when ``path`` ends with ``.gz`` or ``gzip=True``. Returns ``path``."""
    collection = slide_feature_collection(tissue=tissue, grid=grid, scores=scores, threshold=threshold, mpp=mpp,
                                          tiles=tiles, attention=attention, min_tiles=min_tiles, slide_id=slide_id,
                                          deposits=deposits, node=node)
    return write_geojson(path, collection, gzip=gzip)
