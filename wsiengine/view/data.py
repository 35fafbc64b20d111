"""What the viewer's pages show, as JSON-ready values and images: the slide list, a slide's
results (report, node findings, heatmaps, evidence), its regions, a patient's nodes.

Everything read from a file is checked for shape before it is used: a malformed report or
GeoJSON gives empty sections, never an error page.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from .catalog import ViewSlide, read_json_file

__all__ = ["slide_summary", "slide_detail", "patient_detail", "regions", "heatmap_rgba", "colorbar", "COLORMAP"]

logger = logging.getLogger("wsiengine")

#: The heatmaps' colour map (as the overlay PNGs of a run).
COLORMAP = "turbo"
#: Most vertices per ring and rings per region the viewer draws.
MAX_RING_POINTS = 20_000
MAX_RINGS = 2_000


def _num(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _report(entry: ViewSlide) -> dict[str, Any] | None:
    if entry.report_json is None:
        return None
    try:
        doc = read_json_file(entry.report_json)
    except (OSError, ValueError) as exc:
        logger.warning("view: cannot read %s: %s", entry.report_json.name, exc)
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("findings"), dict) else None


def slide_summary(entry: ViewSlide, report: dict[str, Any] | None = None) -> dict[str, Any]:
    """One row of the index: status, call, probability, category, largest deposit, QC flags
    (``report``: the slide's report when already read)."""
    row = entry.row
    report = report if report is not None else _report(entry)
    findings = report["findings"] if report else {}
    flags = [f.get("code") for f in (findings.get("qc") or {}).get("flags") or [] if isinstance(f, dict)]
    metastasis = findings.get("metastasis") if isinstance(findings.get("metastasis"), dict) else {}
    category = findings.get("category") if isinstance(findings.get("category"), dict) else {}
    return {
        "id": entry.slide_id, "status": row.get("status") or ("done" if entry.store else "unknown"),
        "label": row.get("label", ""), "probability": _num(row.get("probability")),
        "call": metastasis.get("call"), "category": category.get("code") or row.get("category") or None,
        "largest_mm": _num((findings.get("deposits") or {}).get("largest_mm")) if findings else _num(row.get("largest_mm")),
        "flags": [f for f in flags if isinstance(f, str)], "n_tiles": _num(row.get("n_tiles")),
        "error": row.get("error", ""), "has_store": entry.store is not None, "has_slide": entry.slide_path is not None,
    }


def slide_detail(entry: ViewSlide, store: Any | None, deepzoom: Any | None) -> dict[str, Any]:
    """A slide page's data: the slide's size and resolution, its heatmaps and where they lie
    (level-0 pixels), the node findings and the report."""
    report = _report(entry)
    out: dict[str, Any] = {"id": entry.slide_id, "summary": slide_summary(entry, report), "slide": None,
                           "heatmaps": [], "node": None, "report": None}
    if store is not None:
        slide = store.slide
        dims = slide.get("dimensions") or [None, None]
        out["slide"] = {"width": dims[0], "height": dims[1], "mpp": slide.get("mpp"),
                        "dzi": f"/dzi/{entry.slide_id}.dzi" if deepzoom is not None else None}
        out["node"] = store.node
        for name in store.heatmap_names():
            try:
                from ..heatmap import read_heatmap

                raster = read_heatmap(store.group, name, 0)
            except Exception as exc:  # noqa: BLE001
                logger.warning("view: heatmap %s of %s: %s", name, entry.slide_id, exc)
                continue
            rows, cols = raster.values.shape
            (cx, cy), (ox, oy) = raster.cell_size_level0, raster.origin_level0
            out["heatmaps"].append({"name": name, "url": f"/heatmap/{entry.slide_id}/{name}.png",
                                    "bounds": [ox, oy, cols * cx, rows * cy]})
    if deepzoom is not None and out["slide"] is not None:
        out["slide"].update(width=deepzoom.width, height=deepzoom.height)
    if report is not None:
        f = report["findings"]
        evidence = []
        for e in f.get("evidence") or []:
            if not isinstance(e, dict):
                continue
            rank = e.get("rank")
            image = (entry.report_dir is not None and isinstance(rank, int)
                     and (entry.report_dir / f"evidence-{rank:02d}.png").is_file())
            evidence.append({"rank": rank, "x": _num(e.get("x")), "y": _num(e.get("y")), "width": _num(e.get("width")),
                             "height": _num(e.get("height")), "tile_score": _num(e.get("tile_score")),
                             "attention_relative": _num(e.get("attention_relative")),
                             "image": f"/evidence/{entry.slide_id}/{rank}.png" if image else None})
        deposits = f.get("deposits") if isinstance(f.get("deposits"), dict) else {}
        out["report"] = {
            "narrative": _narrative(report.get("narrative")),
            "metastasis": f.get("metastasis"), "category": f.get("category"),
            "deposits": {k: deposits.get(k) for k in ("foci", "largest_mm", "size_uncertainty_mm", "total_area_mm2",
                                                      "tile_size_mm")},
            "extranodal_extension": f.get("extranodal_extension"),
            "flags": [q for q in (f.get("qc") or {}).get("flags") or [] if isinstance(q, dict)],
            "evidence": evidence,
            "disclaimer": report.get("disclaimer") if isinstance(report.get("disclaimer"), str) else "",
        }
    return out


def _narrative(value: Any) -> str:
    """The report's narrative text (``{"text", "source", ...}``; a plain string in older reports)."""
    if isinstance(value, dict):
        value = value.get("text")
    return value if isinstance(value, str) else ""


def patient_detail(doc: Any, catalog: Any) -> dict[str, Any]:
    """A patient page's data from ``PATIENT_ID.patient.json``: the stage and each node."""
    if not isinstance(doc, dict):
        return {"patient_id": None, "pn_stage": None, "nodes": []}
    nodes = []
    for n in doc.get("nodes") or []:
        if not isinstance(n, dict):
            continue
        slide_id = n.get("slide_id")
        nodes.append({"slide_id": slide_id, "category": n.get("category"), "largest_mm": _num(n.get("largest_mm")),
                      "foci": n.get("foci"), "probability": _num(n.get("probability")),
                      "low_confidence": bool(n.get("low_confidence")),
                      "link": f"/slide/{slide_id}" if isinstance(slide_id, str) and slide_id in catalog.slides else None})
    keys = ("patient_id", "pn_stage", "n_nodes", "n_positive", "n_macro", "n_micro", "n_itc", "missing", "uncertain",
            "disclaimer")
    return {**{k: doc.get(k) for k in keys}, "nodes": nodes}


def _rings(geometry: Any) -> list[list[list[float]]]:
    """The rings of a GeoJSON Polygon or MultiPolygon, as [[x, y], ...] lists (level-0 pixels)."""
    if not isinstance(geometry, dict):
        return []
    coords = geometry.get("coordinates")
    polygons = [coords] if geometry.get("type") == "Polygon" else coords if geometry.get("type") == "MultiPolygon" else []
    out = []
    for polygon in polygons or []:
        for ring in polygon or []:
            if not isinstance(ring, list) or len(ring) < 3 or len(ring) > MAX_RING_POINTS:
                continue
            points = [[float(p[0]), float(p[1])] for p in ring
                      if isinstance(p, list) and len(p) >= 2 and _num(p[0]) is not None and _num(p[1]) is not None]
            if len(points) >= 3:
                out.append(points)
            if len(out) >= MAX_RINGS:
                return out
    return out


def regions(collection: Any) -> dict[str, Any]:
    """Tissue outlines and tumour deposits of a slide's GeoJSON, with each deposit's measurements
    and a point inside it (level-0 pixels)."""
    import shapely
    from shapely.geometry import shape

    out: dict[str, Any] = {"tissue": [], "deposits": []}
    features = collection.get("features") if isinstance(collection, dict) else None
    for feature in features or []:
        props = feature.get("properties") if isinstance(feature, dict) else None
        if not isinstance(props, dict) or props.get("objectType") != "annotation":
            continue
        name = (props.get("classification") or {}).get("name") if isinstance(props.get("classification"), dict) else None
        rings = _rings(feature.get("geometry"))
        if not rings:
            continue
        if name == "Tissue":
            out["tissue"].append({"rings": rings})
        elif name == "Tumor":
            measurements = props.get("measurements") if isinstance(props.get("measurements"), dict) else {}
            try:
                inside = shape(feature["geometry"]).representative_point()
                point = [inside.x, inside.y]
            except (ValueError, TypeError, KeyError, AttributeError, shapely.errors.GEOSException):
                point = rings[0][0]
            out["deposits"].append({"name": str(props.get("name") or "Tumor"), "rings": rings, "point": point,
                                    "measurements": {str(k): v for k, v in measurements.items() if _num(v) is not None}})
    return out


def heatmap_rgba(store: Any, name: str) -> np.ndarray:
    """Level 0 of a stored heatmap coloured with :data:`COLORMAP` over [0, 1], transparent where
    no tile lies: ``(rows * f, cols * f, 4)`` uint8, each cell a block of ``f`` x ``f`` pixels."""
    from ..heatmap import read_heatmap
    from ..heatmap.render import colormap

    values = read_heatmap(store.group, name, 0).values
    # cells drawn as blocks: repeat each to about 1,024 px on the longer side (browsers smooth
    # small images when they scale them up, which would blur the tile lattice)
    factor = int(min(16, max(1, 1024 // max(1, max(values.shape)))))
    if factor > 1:
        values = np.repeat(np.repeat(values, factor, axis=0), factor, axis=1)
    lut = colormap(COLORMAP)
    finite = np.isfinite(values)
    index = np.clip(np.nan_to_num(values, nan=0.0) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    rgba = np.zeros((*values.shape, 4), np.uint8)
    rgba[..., :3] = lut[index]
    rgba[..., 3] = np.where(finite, 255, 0)
    return rgba


def colorbar(width: int = 256, height: int = 14) -> np.ndarray:
    """The colour bar of :data:`COLORMAP`, 0 on the left, 1 on the right: ``(height, width, 3)`` uint8."""
    from ..heatmap.render import colormap

    lut = colormap(COLORMAP)
    index = np.linspace(0, 255, width).round().astype(np.int64)
    return np.ascontiguousarray(np.broadcast_to(lut[index][None, :, :], (height, width, 3)))
