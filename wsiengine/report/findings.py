"""Structured findings of one slide, computed by code: the report's truth.

Everything here is derived from a committed (or about-to-be-committed) result store: the MIL
call, tumour deposits from the tile scores, the AJCC/CAP size category, the evidence tiles and
QC flags. A language model may phrase these findings later; it never changes them.

Sizes are millimetres on the slide (level-0 pixels times the slide's µm/px), coordinates
level-0 pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import ReportConfig
from ..errors import ReportError

if TYPE_CHECKING:  # pragma: no cover
    from ..deposits import DepositMap, DepositRules
    from ..ood import EmbeddingReference
    from ..store import ResultStore

__all__ = ["Category", "CATEGORIES", "ITC_MAX_MM", "MICRO_MAX_MM", "EXTRANODAL_EXTENSION", "metastasis_call",
           "size_category", "node_category", "node_summary", "build_findings", "evidence_tiles", "QCFlag",
           "recorded_rules"]

logger = logging.getLogger("wsiengine")

#: Isolated tumour cells: the largest deposit is at most this, mm (AJCC 8th ed., CAP).
ITC_MAX_MM = 0.2
#: Micrometastasis: larger than ITC and at most this, mm; larger is a macrometastasis.
MICRO_MAX_MM = 2.0
#: Extranodal extension needs the capsule, which tiles of the node's interior do not show.
EXTRANODAL_EXTENSION = "not assessed"


@dataclass(frozen=True)
class Category:
    """An AJCC/CAP nodal category: ``code`` (JSON), ``name`` (display), ``definition``."""

    code: str
    name: str
    definition: str


CATEGORIES: dict[str, Category] = {c.code: c for c in (
    Category("negative", "Negative", "no metastasis detected"),
    Category("itc", "Isolated tumour cells", f"largest deposit <= {ITC_MAX_MM} mm"),
    Category("micrometastasis", "Micrometastasis", f"largest deposit > {ITC_MAX_MM} mm and <= {MICRO_MAX_MM:g} mm"),
    Category("macrometastasis", "Macrometastasis", f"largest deposit > {MICRO_MAX_MM:g} mm"),
    Category("indeterminate", "Indeterminate", "the slide call or the deposit size is uncertain"),
)}


@dataclass(frozen=True)
class QCFlag:
    """A quality-control flag: a stable ``code`` and a message for people."""

    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def metastasis_call(probability: float, threshold: float, margin: float = 0.05) -> str:
    """``"yes"``, ``"no"`` or ``"indeterminate"`` for a slide probability.

    Probabilities within ``margin`` of ``threshold`` (``|p - t| < margin``) are indeterminate;
    otherwise ``p >= t`` is ``"yes"``. ``margin=0`` gives the head's plain label.
    """
    if not np.isfinite(probability):
        return "indeterminate"
    if margin > 0 and abs(probability - threshold) < margin:
        return "indeterminate"
    return "yes" if probability >= threshold else "no"


def size_category(largest_mm: float | None, *, tile_mm: float = 0.1) -> tuple[str, bool]:
    """The AJCC/CAP category of a positive node from its largest deposit, and whether that is
    low-confidence.

    ``<= 0.2`` mm: ``"itc"``; ``> 0.2`` and ``<= 2`` mm: ``"micrometastasis"``; ``> 2`` mm:
    ``"macrometastasis"``; None (no measurable deposit): ``"indeterminate"``. The size is measured
    on tiles of side ``tile_mm``, so a size within ``tile_mm`` of a boundary (0.2 or 2 mm) is
    flagged low-confidence: one tile more or less would change the category.
    """
    if largest_mm is None or not np.isfinite(largest_mm):
        return "indeterminate", True
    if largest_mm <= ITC_MAX_MM:
        code = "itc"
    elif largest_mm <= MICRO_MAX_MM:
        code = "micrometastasis"
    else:
        code = "macrometastasis"
    near = min(abs(largest_mm - ITC_MAX_MM), abs(largest_mm - MICRO_MAX_MM)) <= tile_mm
    return code, bool(near)


def _round(v: float | None, digits: int = 4) -> float | None:
    if v is None or not np.isfinite(v):
        return None
    return round(float(v), digits)


def _deposits(store: "ResultStore", scores: np.ndarray | None, rules: "DepositRules",
              mpp: tuple[float, float], found: "DepositMap | None" = None) -> dict[str, Any]:
    """Tumour deposits from the tile probabilities (:func:`wsiengine.deposits.find_deposits`, the
    same as the GeoJSON's regions): foci, sizes with their uncertainty, areas (mm, mm²)."""
    from ..deposits import find_deposits, tile_side_mm

    grid = store.tile_grid()
    tile_mm = tile_side_mm(grid, mpp)
    out: dict[str, Any] = {"foci": 0, "largest_mm": None, "size_uncertainty_mm": round(tile_mm, 4),
                           "total_area_mm2": 0.0, "tile_threshold": rules.grow_threshold, "rules": rules.to_dict(),
                           "tile_size_mm": round(tile_mm, 4), "tiles_above_threshold": 0, "regions": []}
    if scores is None or not len(grid):
        return out
    scores = np.asarray(scores, np.float64)
    out["tiles_above_threshold"] = int(np.count_nonzero(scores >= rules.grow_threshold))
    found = found if found is not None else find_deposits(grid, scores, mpp, rules)
    out.update(foci=found.foci, largest_mm=found.largest_mm, total_area_mm2=found.total_area_mm2,
               regions=[d.to_dict() for d in found.deposits])
    return out


def node_category(call: str, largest_mm: float | None, foci: int, *, tile_mm: float) -> tuple[str, bool]:
    """The node's category code and whether it is low-confidence, from the slide head's call and
    the measured deposits.

    The deposits decide: a node with a deposit takes the category of its largest one
    (:func:`size_category`; low-confidence within one tile of 0.2 or 2 mm), whatever the slide
    call (the findings' call then becomes ``"yes"``, with a ``discordant_call`` flag when the head
    did not say so). Without a deposit, a ``"no"`` call is ``negative`` and any other call
    ``indeterminate`` (positive or uncertain at slide level, yet nothing measurable).
    """
    if foci and largest_mm is not None:
        return size_category(largest_mm, tile_mm=tile_mm)
    if call == "no":
        return "negative", False
    return "indeterminate", True


def evidence_tiles(attention: np.ndarray | None, scores: np.ndarray | None, k: int) -> np.ndarray:
    """Indices of the ``k`` tiles of highest attention (ties by tile score, then index), best
    first; by tile score when there is no attention."""
    key = attention if attention is not None else scores
    if key is None or len(key) == 0:
        return np.zeros(0, np.int64)
    key = np.nan_to_num(np.asarray(key, np.float64), nan=-np.inf)
    second = np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf) if scores is not None else np.zeros_like(key)
    order = np.lexsort((np.arange(len(key)), -second, -key))
    return order[: min(k, len(key))].astype(np.int64)


def _tissue(store: "ResultStore", mpp: tuple[float, float]) -> tuple[float | None, float | None]:
    """Tissue area (mm²) and fraction of the slide from the stored mask."""
    raster = store.tissue_mask
    if raster is None:
        return None, None
    scale = store.array_attrs("tissue_mask").get("level0_per_mask_px", [1.0, 1.0])
    px = float(np.count_nonzero(raster))
    area_mm2 = px * float(scale[0]) * float(scale[1]) * mpp[0] * mpp[1] / 1e6
    return round(area_mm2, 4), round(px / max(1, raster.size), 4)


def _ood_fraction(store: "ResultStore", reference: "EmbeddingReference", quantile: float) -> float | None:
    """Fraction of the slide's tiles beyond ``reference``'s ``quantile`` distance, reading the
    features in chunks so memory stays bounded."""
    features = store.group["features"]
    n = features.shape[0]
    if n == 0:
        return None
    if features.shape[1] != reference.dim:
        logger.warning("%s: features have D=%d but the embedding reference D=%d; OOD check skipped",
                       store.path.name, features.shape[1], reference.dim)
        return None
    limit = reference.threshold(quantile)
    step = max(1, (32 << 20) // (4 * features.shape[1]))
    outside = 0
    for start in range(0, n, step):
        outside += int(np.count_nonzero(reference.distance(np.asarray(features[start:start + step])) > limit))
    return outside / n


def _tiling_mismatch(mil: dict[str, Any] | None, grid: dict[str, Any]) -> str | None:
    """A message when the tiles differ from those the MIL head was trained on (by the head's own
    rule, :func:`wsiengine.aggregate.tiling_differences`)."""
    from ..aggregate import tiling_differences

    if not mil or not grid:
        return None
    trained_mpp, trained_px = mil.get("target_mpp"), mil.get("tile_px")
    if not tiling_differences(trained_mpp, trained_px, grid.get("target_mpp"), grid.get("tile_px")):
        return None
    return (f"Tiles are {int(grid['tile_px'])} px at {float(grid['target_mpp']):g} µm/px but the MIL head was trained "
            f"on {int(trained_px)} px at {float(trained_mpp):g} µm/px; its scores may not transfer.")


def recorded_rules(store: "ResultStore", *, tile_threshold: float | None = None) -> "DepositRules":
    """The deposit rules the store's run used (:meth:`wsiengine.deposits.DepositRules.from_recorded`);
    ``tile_threshold`` overrides its grow threshold."""
    from ..deposits import DepositRules

    return DepositRules.from_recorded(store.config, tile_threshold=tile_threshold)


def build_findings(store: "ResultStore", *, config: ReportConfig | None = None,
                   reference: "EmbeddingReference | None" = None, tile_threshold: float | None = None,
                   deposits: "DepositMap | None" = None) -> dict[str, Any]:
    """The structured findings of a slide (a JSON-ready dict; see ``schema.json``).

    Parameters
    ----------
    store : ResultStore
        The slide's results (:func:`wsiengine.open_result`), with a MIL prediction for a call.
    config : ReportConfig, optional
        Evidence count, the indeterminate band, QC limits.
    reference : EmbeddingReference, optional
        The MIL head's training embeddings; without it the OOD check is not run
        (``qc.ood_fraction`` is null).
    tile_threshold : float, optional
        Smoothed tile probability at or above which tiles may join deposits (default: the store's
        run's; the other deposit rules are always the run's, :func:`recorded_rules`).
    deposits : DepositMap, optional
        The deposits already found from this store's tile scores with its rules (the pipeline
        passes them, to measure once); found here otherwise.

    Returns
    -------
    dict
        ``metastasis``, ``category``, ``deposits``, ``extranodal_extension``, ``evidence`` (without
        images; :func:`wsiengine.report.make_report` adds them), ``qc``, ``second_opinion`` (null).
    """
    config = config or ReportConfig()
    slide = store.slide
    if not slide.get("mpp"):
        raise ReportError(f"'{store.path.name}' records no slide resolution (mpp); rerun the slide with this wsiengine")
    mpp = (float(slide["mpp"][0]), float(slide["mpp"][1]))
    prediction = store.prediction
    attention, scores = store.attention, store.tile_scores
    n_tiles = store.n_tiles
    rules = recorded_rules(store, tile_threshold=tile_threshold)
    tile_threshold = rules.grow_threshold
    flags: list[QCFlag] = []

    if prediction is None:
        call, probability, threshold = "indeterminate", None, None
        reason = "no tissue tiles" if n_tiles == 0 else "no MIL head was run on this slide"
        flags.append(QCFlag("no_prediction", f"No slide prediction: {reason}."))
    else:
        probability, threshold = float(prediction["probability"]), float(prediction["threshold"])
        call = metastasis_call(probability, threshold, config.indeterminate_margin)
    deposits = _deposits(store, scores, rules, mpp, deposits)
    tile_mm = deposits["tile_size_mm"]
    head_call = call if prediction is not None else None
    code, low_confidence = node_category(call, deposits["largest_mm"], deposits["foci"], tile_mm=tile_mm)
    note = ""
    if code in ("itc", "micrometastasis", "macrometastasis"):
        call = "yes"  # a measured deposit is the node's call, whatever the slide probability
        if low_confidence:
            note = (f"The largest deposit ({deposits['largest_mm']:.2f} ± {tile_mm:.2f} mm) is within one tile of a "
                    "category boundary (0.2 or 2 mm).")
        if head_call != "yes":
            below = "below" if head_call == "no" else "near"
            flags.append(QCFlag("discordant_call", (
                f"The slide probability is {below} the head's threshold, yet {deposits['foci']} deposit(s) were "
                f"found (largest {deposits['largest_mm']:.2f} mm); the call and category follow the deposits. "
                "Review them on the heatmap.")))
        note = (note + " " if note else "") + (
            f"Sizes are Feret diameters of regions built from {tile_mm:.3f} mm tiles (± one tile), not of cells; ITC "
            "also counts clusters of <= 200 cells, which tiles cannot count.")
    elif code == "indeterminate":
        note = ("There is no slide prediction." if prediction is None else
                f"The slide call is '{call}' but no deposit passes the region rules, so none can be measured.")
    category = CATEGORIES[code]

    evidence = []
    for rank, i in enumerate(evidence_tiles(attention, scores, config.top_k), 1):
        x, y = (int(v) for v in store.coords[i])
        w, h = (int(v) for v in store.grid["tile_size_level0"])
        evidence.append({
            "rank": rank, "tile_index": int(i), "x": x, "y": y, "width": w, "height": h,
            "attention": _round(attention[i], 6) if attention is not None else None,
            "attention_relative": _round(attention[i] / np.nanmax(attention), 4) if attention is not None else None,
            "tile_score": _round(scores[i]) if scores is not None else None,
            "image": None})

    singles = sum(1 for r in deposits["regions"] if r["tiles"] <= 1)
    if singles >= config.scattered_tiles:
        flags.append(QCFlag("scattered_tiles", (
            f"{singles} of the {deposits['foci']} foci are single tiles: isolated positive tiles are often false "
            "positives of the tile classifier, so the focus count is an upper bound; review them on the heatmap.")))
    tissue_mm2, tissue_fraction = _tissue(store, mpp)
    if n_tiles < config.min_tiles:
        flags.append(QCFlag("few_tiles", f"Only {n_tiles} tissue tile(s) (fewer than {config.min_tiles}): the call "
                                         "rests on little tissue."))
    if tissue_mm2 is not None and tissue_mm2 < config.min_tissue_mm2:
        flags.append(QCFlag("low_tissue", f"Tissue area {tissue_mm2:.2f} mm² is below {config.min_tissue_mm2:g} mm²."))
    source = slide.get("mpp_source")
    if source in ("user", "user-forced"):
        flags.append(QCFlag("mpp_user", "The resolution (mpp) was given by the user, not read from the file; "
                                        "sizes in mm depend on it."))
    elif source == "tiff-resolution":
        flags.append(QCFlag("mpp_tiff", "The resolution (mpp) comes from generic TIFF resolution tags, which "
                                        "scanners do not always set correctly; check sizes in mm."))
    ood = _ood_fraction(store, reference, config.ood_quantile) if reference is not None else None
    if ood is not None and ood > config.ood_max_fraction:
        flags.append(QCFlag("ood_embeddings", (
            f"{ood:.0%} of tiles lie outside the MIL head's training embeddings (beyond their "
            f"{config.ood_quantile:.0%} quantile): stain, tissue type or scanner may differ from training.")))
    mismatch = _tiling_mismatch(store.mil, store.grid) if prediction is not None else None
    if mismatch:
        flags.append(QCFlag("tiling_mismatch", mismatch))
    return {
        "metastasis": {"call": call, "probability": _round(probability), "threshold": _round(threshold),
                       "indeterminate_margin": config.indeterminate_margin, "head_call": head_call},
        "category": {"code": category.code, "name": category.name, "definition": category.definition,
                     "low_confidence": bool(low_confidence), "note": note},
        "deposits": deposits,
        "extranodal_extension": EXTRANODAL_EXTENSION,
        "evidence": evidence,
        "qc": {"flags": [f.to_dict() for f in flags], "n_tiles": int(n_tiles), "tissue_area_mm2": tissue_mm2,
               "tissue_fraction": tissue_fraction, "mpp": [round(mpp[0], 6), round(mpp[1], 6)],
               "mpp_source": source, "ood_fraction": _round(ood), "ood_quantile": config.ood_quantile},
        "second_opinion": None,
    }


def node_summary(findings: dict[str, Any]) -> dict[str, Any]:
    """The per-node findings a result store records in its attributes (``node``) and the GeoJSON
    carries: the same numbers as the report's ``category`` and ``deposits``."""
    deposits = findings["deposits"]
    return {"category": findings["category"]["code"], "low_confidence": findings["category"]["low_confidence"],
            "largest_mm": deposits["largest_mm"], "size_uncertainty_mm": deposits["size_uncertainty_mm"],
            "foci": deposits["foci"], "total_area_mm2": deposits["total_area_mm2"],
            "call": findings["metastasis"]["call"], "probability": findings["metastasis"]["probability"],
            "rules": deposits["rules"]}
