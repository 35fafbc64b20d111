"""Evaluation: lesion-level FROC as in CAMELYON16; node and patient agreement as in CAMELYON17.

>>> confusion_matrix(truth, called, labels=NODE_LABELS)       # rows: truth, columns: called
>>> quadratic_weighted_kappa(truth, called, labels=PN_LABELS)  # CAMELYON17's patient score

>>> from wsiengine.evaluate import froc, detections_from_tiles
>>> from wsiengine.geojson import read_camelyon_annotations
>>> dets = {"tumor_001": detections_from_tiles(grid, pred.tile_scores, threshold=0.1, local_maxima=True)}
>>> truth = {"tumor_001": read_camelyon_annotations("Tumor_001.json")}
>>> r = froc(dets, truth, mpp=0.243)
>>> r.score, r.operating_points      # mean sensitivity at 1/4, 1/2, 1, 2, 4, 8 FPs per slide

How detections are scored (the challenge's ``Evaluation_FROC.py``, with polygons in place of its
level-5 raster):

* **Lesions.** Each slide's lesion polygons are grown by ``dilation_um / 2`` (the challenge's
  "75 µm, about 5 tumour cells", applied as ``distance < 75 / (2 · resolution)``), holes filled,
  and lesions that touch after growing merge: each resulting polygon is one lesion.
* **ITCs.** A lesion whose longest diameter, grown, is below ``itc_um + dilation_um``
  (200 + 75 = 275 µm) holds isolated tumour cells: it is not counted in the sensitivity, and a
  detection on it is neither a true nor a false positive.
* **Hits.** A detection (a point with a probability) inside (or on the edge of) a lesion hits
  it; a lesion is detected at threshold *t* when its highest-probability hit has probability
  ``>= t``. Further hits on the same lesion are not false positives. A detection outside every
  lesion is a false positive; on a normal slide (empty geometry) every detection is.
* **Curve.** Thresholds sweep every distinct detection probability (plus +inf, the origin):
  ``fp_per_slide(t)`` = false positives with probability ``>= t`` / number of slides,
  ``sensitivity(t)`` = detected lesions / non-ITC lesions.
* **Score.** The mean sensitivity at 1/4, 1/2, 1, 2, 4 and 8 false positives per slide. As in the
  challenge (``np.interp`` on the curve), the curve is followed linearly between operating points
  in threshold order and held at its last value beyond the largest FP rate
  (``interpolation="linear"``); ``"step"`` gives the best sensitivity reached with at most that
  many FPs per slide instead. Unlike the challenge script, the lowest threshold is not dropped.

All coordinates are level-0 pixels; resolutions are µm/px.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import shapely
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from .errors import InputError
from .geojson import make_valid_geometry, max_diameter
from .tiling import TileGrid

__all__ = ["FROCResult", "LesionSet", "FROC_FP_RATES", "froc", "lesion_set", "detections_from_tiles",
           "confusion_matrix", "quadratic_weighted_kappa", "NODE_LABELS", "PN_LABELS"]

#: Node categories in order of severity (CAMELYON17's node labels).
NODE_LABELS: tuple[str, ...] = ("negative", "itc", "micrometastasis", "macrometastasis")
#: Patient pN stages in order (CAMELYON17's patient labels; pN3 is beyond its five nodes).
PN_LABELS: tuple[str, ...] = ("pN0", "pN0(i+)", "pN1mi", "pN1", "pN2")


def confusion_matrix(truth: Sequence[str], called: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """``(K, K)`` int64 counts: row = the true label, column = the called one, in ``labels`` order.
    InputError for a label outside ``labels`` or sequences of different lengths."""
    if len(truth) != len(called):
        raise InputError(f"{len(truth)} true labels but {len(called)} calls")
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({str(v) for v in (*truth, *called)} - set(index))
    if unknown:
        raise InputError(f"labels {unknown} are not among {list(labels)}")
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, c in zip(truth, called):
        matrix[index[t], index[c]] += 1
    return matrix


def quadratic_weighted_kappa(truth: Sequence[str], called: Sequence[str], labels: Sequence[str]) -> float:
    """Cohen's kappa with quadratic weights ``(i - j)^2 / (K - 1)^2`` over the ordered ``labels``
    (CAMELYON17's score): 1 for perfect agreement, 0 for chance. When both raters give one and
    the same label throughout (no expected disagreement) it is 1.0."""
    observed = confusion_matrix(truth, called, labels).astype(np.float64)
    k = len(labels)
    if observed.sum() == 0:
        raise InputError("kappa needs at least one pair of labels")
    i, j = np.indices((k, k))
    weights = (i - j) ** 2 / max(k - 1, 1) ** 2
    expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    disagreement_expected = float((weights * expected).sum())
    disagreement_observed = float((weights * observed).sum())
    if disagreement_expected == 0:
        return 1.0 if disagreement_observed == 0 else 0.0
    return 1.0 - disagreement_observed / disagreement_expected

#: Average false positives per slide at which the CAMELYON16 FROC score samples sensitivity.
FROC_FP_RATES: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True, eq=False)
class LesionSet:
    """One slide's lesions as the evaluation sees them.

    Attributes
    ----------
    regions : list[shapely.Polygon]
        Grown (dilated, holes filled, merged) lesions, level-0 pixels.
    is_itc : numpy.ndarray
        ``(L,)`` bool: isolated tumour cells, excluded from sensitivity.
    diameter_um : numpy.ndarray
        ``(L,)`` longest diameter of each grown lesion, µm.
    """

    regions: list[Polygon]
    is_itc: np.ndarray
    diameter_um: np.ndarray

    def __len__(self) -> int:
        return len(self.regions)

    def label(self, xy: np.ndarray) -> np.ndarray:
        """``(K,)`` int: index of the lesion each level-0 point ``xy`` (K, 2) falls in, -1 for none."""
        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        out = np.full(len(xy), -1, np.int64)
        for j, region in enumerate(self.regions):
            shapely.prepare(region)
            hit = shapely.intersects_xy(region, xy[:, 0], xy[:, 1]) & (out < 0)
            out[hit] = j
        return out


@dataclass(frozen=True, eq=False)
class FROCResult:
    """A lesion-level FROC evaluation.

    Attributes
    ----------
    score : float
        Mean sensitivity at :data:`FROC_FP_RATES` false positives per slide.
    fp_per_slide, sensitivity, thresholds : numpy.ndarray
        The curve, one point per threshold in decreasing order (first ``+inf``: 0 FPs, 0
        sensitivity); ``fp_per_slide`` and ``sensitivity`` are non-decreasing.
    operating_points : dict[float, float]
        Sensitivity at each rate of :data:`FROC_FP_RATES`.
    n_slides, n_lesions, n_itc : int
        Slides evaluated, non-ITC lesions (the sensitivity's denominator), ITC lesions ignored.
    lesion_probability : dict[str, numpy.ndarray]
        Per slide, ``(L,)`` highest probability among each lesion's hits (NaN: missed or ITC).
    false_positives : dict[str, numpy.ndarray]
        Per slide, the probabilities of its false-positive detections.
    """

    score: float
    fp_per_slide: np.ndarray
    sensitivity: np.ndarray
    operating_points: dict[float, float]
    thresholds: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    n_slides: int = 0
    n_lesions: int = 0
    n_itc: int = 0
    lesion_probability: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    false_positives: dict[str, np.ndarray] = field(repr=False, default_factory=dict)


def _mpp_of(mpp: Mapping[str, float] | float | Sequence[float], slide: str) -> float:
    value = mpp[slide] if isinstance(mpp, Mapping) else mpp
    if isinstance(value, (tuple, list, np.ndarray)):
        value = float(np.sqrt(float(value[0]) * float(value[1])))  # isotropic equivalent for the growth
    value = float(value)  # type: ignore[arg-type]
    if not np.isfinite(value) or value <= 0:
        raise InputError(f"mpp of slide {slide!r} is {value}; it must be a positive µm/px")
    return value


def lesion_set(lesions: BaseGeometry | None, mpp: float, *, itc_um: float = 200.0, dilation_um: float = 75.0) -> LesionSet:
    """Grow, merge and classify one slide's lesions (level-0 px, ``mpp`` µm/px) as the FROC does."""
    geom = make_valid_geometry(lesions)
    if geom.is_empty:
        return LesionSet([], np.zeros(0, bool), np.zeros(0))
    radius_px = dilation_um / 2.0 / mpp
    grown = make_valid_geometry(geom.buffer(radius_px)) if radius_px > 0 else geom
    # Fill holes (the challenge's binary_fill_holes), then merge what now overlaps.
    filled = make_valid_geometry(shapely.union_all([Polygon(p.exterior) for p in grown.geoms]))
    regions = sorted(filled.geoms, key=lambda p: (p.bounds[1], p.bounds[0]))
    diameter = np.array([max_diameter(p) * mpp for p in regions], np.float64)
    return LesionSet(list(regions), diameter < itc_um + dilation_um, diameter)


def froc(
    detections: Mapping[str, np.ndarray],
    lesions: Mapping[str, BaseGeometry | None],
    mpp: Mapping[str, float] | float,
    *,
    itc_um: float = 200.0,
    dilation_um: float = 75.0,
    fp_rates: Sequence[float] = FROC_FP_RATES,
    interpolation: Literal["linear", "step"] = "linear",
) -> FROCResult:
    """Lesion-level FROC of point detections against lesion polygons (CAMELYON16's metric).

    Parameters
    ----------
    detections : mapping slide -> (K, 3) array
        ``(x, y, probability)`` per detection, level-0 pixels. A slide with lesions but no entry
        here has no detections; NaN probabilities are dropped.
    lesions : mapping slide -> shapely geometry
        Ground-truth lesions in level-0 pixels; empty or None for a normal slide. Every slide
        evaluated must be here (it defines the slide set and the FP denominator).
    mpp : mapping slide -> float, or float
        Level-0 µm/px per slide, or one value for all.
    itc_um : float
        Lesions with a longest diameter below this (µm, before growth) are isolated tumour cells.
    dilation_um : float
        Growth of the lesions, µm across (half on each side), as the challenge's 75 µm.
    fp_rates : sequence of float
        False positives per slide at which sensitivity is read (default 1/4 ... 8).
    interpolation : {"linear", "step"}
        How the curve is read between operating points (see the module docstring).

    Returns
    -------
    FROCResult

    Raises
    ------
    InputError
        (a ``ValueError``) A detection's slide has no ground truth, a shape is wrong, or no lesion counts.
    """
    missing = sorted(set(detections) - set(lesions))
    if missing:
        raise InputError(f"detections for slides without ground truth: {missing[:5]}; "
                         "pass an empty geometry in `lesions` for normal slides")
    if interpolation not in ("linear", "step"):
        raise InputError(f"interpolation must be 'linear' or 'step', not {interpolation!r}")
    fp_probs: list[np.ndarray] = []
    tp_probs: list[np.ndarray] = []
    lesion_probability: dict[str, np.ndarray] = {}
    false_positives: dict[str, np.ndarray] = {}
    n_lesions = n_itc = 0
    for slide in lesions:
        d = np.asarray(detections.get(slide, np.zeros((0, 3))), np.float64)
        if d.size == 0:
            d = d.reshape(0, 3)
        if d.ndim != 2 or d.shape[1] != 3:
            raise InputError(f"detections[{slide!r}] has shape {d.shape}; expected (K, 3) rows of (x, y, probability)")
        d = d[np.isfinite(d[:, 2])]
        ls = lesion_set(lesions[slide], _mpp_of(mpp, slide), itc_um=itc_um, dilation_um=dilation_um)
        label = ls.label(d[:, :2]) if len(ls) else np.full(len(d), -1, np.int64)
        best = np.full(len(ls), np.nan)
        for j in range(len(ls)):
            if ls.is_itc[j]:
                continue
            p = d[label == j, 2]
            if p.size:
                best[j] = p.max()
        fp = d[label < 0, 2]
        fp_probs.append(fp)
        tp_probs.append(best[np.isfinite(best)])
        lesion_probability[slide] = best
        false_positives[slide] = fp
        n_lesions += int((~ls.is_itc).sum())
        n_itc += int(ls.is_itc.sum())
    n_slides = len(lesions)
    if n_slides == 0:
        raise InputError("no slides to evaluate")
    if n_lesions == 0:
        raise InputError("no lesion to detect: every slide is normal or holds only isolated tumour cells; "
                         "FROC sensitivity is undefined")
    fps = np.sort(np.concatenate(fp_probs)) if fp_probs else np.zeros(0)
    tps = np.sort(np.concatenate(tp_probs)) if tp_probs else np.zeros(0)
    thresholds = np.unique(np.concatenate([fps, tps]))[::-1]
    fp_count = fps.size - np.searchsorted(fps, thresholds, side="left")
    tp_count = tps.size - np.searchsorted(tps, thresholds, side="left")
    thresholds = np.concatenate([[np.inf], thresholds])
    fp_rate = np.concatenate([[0.0], fp_count / n_slides])
    sens = np.concatenate([[0.0], tp_count / n_lesions])
    points = {float(r): _read_curve(fp_rate, sens, float(r), interpolation) for r in fp_rates}
    return FROCResult(
        score=float(np.mean(list(points.values()))),
        fp_per_slide=fp_rate,
        sensitivity=sens,
        operating_points=points,
        thresholds=thresholds,
        n_slides=n_slides,
        n_lesions=n_lesions,
        n_itc=n_itc,
        lesion_probability=lesion_probability,
        false_positives=false_positives,
    )


def _read_curve(fp: np.ndarray, sens: np.ndarray, rate: float, interpolation: str) -> float:
    """Sensitivity of the curve (``fp``, ``sens`` non-decreasing, starting at 0) at ``rate`` FPs/slide."""
    at_or_below = fp <= rate
    best_below = float(sens[at_or_below].max())
    if interpolation == "step" or np.any(fp == rate) or not np.any(fp > rate):
        return best_below
    # Walk the curve in threshold order: from the last point at or below the rate to the first above.
    k = int(np.flatnonzero(at_or_below)[-1])
    x0, y0, x1, y1 = fp[k], sens[k], fp[k + 1], sens[k + 1]
    return float(y0 + (y1 - y0) * (rate - x0) / (x1 - x0))


def detections_from_tiles(grid: TileGrid, tile_scores: np.ndarray, *, threshold: float = 0.5,
                          local_maxima: bool = False) -> np.ndarray:
    """Point detections from tile scores, for :func:`froc`.

    Every tile scoring at least ``threshold`` becomes a detection at its centre. With
    ``local_maxima``, only tiles whose score is the highest among their 8 lattice neighbours
    (ties go to the first in row-major order) are kept, one detection per blob of high scores as
    the challenge's participants did (fewer false positives per lesion missed by a few px).

    Parameters
    ----------
    grid : TileGrid
    tile_scores : (N,) array
        Per-tile probability; NaN never passes.
    threshold : float
        Lowest score kept.
    local_maxima : bool
        Keep only local maxima on the tile lattice.

    Returns
    -------
    numpy.ndarray
        ``(K, 3)`` float64 rows of (x, y, probability), level-0 pixel centres, by decreasing
        probability.
    """
    s = np.asarray(tile_scores, np.float64).reshape(-1)
    if s.shape[0] != len(grid):
        raise InputError(f"tile_scores has {s.shape[0]} values but the grid has {len(grid)} tiles")
    keep = s >= threshold
    if local_maxima and keep.any():
        rows, cols = grid.grid_shape
        lattice = np.full((rows + 2, cols + 2), -np.inf)
        order = np.full((rows + 2, cols + 2), np.iinfo(np.int64).max, np.int64)
        r, c = grid.grid_index[:, 0] + 1, grid.grid_index[:, 1] + 1
        vals = np.where(np.isfinite(s), s, -np.inf)
        lattice[r, c] = vals
        order[r, c] = (r - 1) * cols + (c - 1)
        me = (r - 1) * cols + (c - 1)
        is_max = np.ones(len(s), bool)
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                if dr == 0 and dc == 0:
                    continue
                nv, no = lattice[r + dr, c + dc], order[r + dr, c + dc]
                is_max &= ~((nv > vals) | ((nv == vals) & (no < me)))
        keep &= is_max
    idx = np.flatnonzero(keep)
    idx = idx[np.argsort(-s[idx], kind="stable")]
    centres = grid.centres()[idx]
    return np.column_stack([centres, s[idx]]) if idx.size else np.zeros((0, 3))
