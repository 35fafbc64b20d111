"""Import of annotations: QuPath (or any) GeoJSON into :class:`Annotation` objects and tiling
ROIs, and CAMELYON16 lesion annotations (NCRF JSON, ASAP XML) as one MultiPolygon.

Coordinates are taken as level-0 pixels; polygons are repaired to be valid.
"""

from __future__ import annotations

import gzip as _gzip
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, shape
from shapely.geometry.base import BaseGeometry

from ..errors import AnnotationError
from .geometry import _polygons, make_valid_geometry

__all__ = ["Annotation", "read_geojson", "annotations_to_geometry", "read_camelyon_annotations"]

logger = logging.getLogger("wsiengine")

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
        raise AnnotationError(f"cannot read {path}: not JSON ({exc}); expected a GeoJSON FeatureCollection or feature list") from exc


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
        raise AnnotationError("not GeoJSON: expected a FeatureCollection, a list of features, a Feature or a geometry")
    out = []
    for item in items:
        if not isinstance(item, Mapping):
            raise AnnotationError(f"not a GeoJSON feature: {str(item)[:80]}")
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
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AnnotationError(f"cannot read {path}: neither ASAP XML nor JSON ({exc}); expected a CAMELYON16 "
                                  "annotation file (NCRF JSON or the challenge's XML)") from exc
        if not isinstance(data, Mapping) or not ({"positive", "negative"} & set(data)):
            raise AnnotationError(f"{path}: not an NCRF CAMELYON annotation file (expected 'positive'/'negative' lists)")
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
