"""Slide-level classification metrics in NumPy: ROC, AUC, threshold choice, calibration.

No torch and no scikit-learn: these run wherever predictions do.

>>> auc = roc_auc(labels, probs)
>>> t = select_threshold(val_probs, val_labels, rule="youden")     # validation data only
>>> binary_metrics(test_probs, test_labels, t)                        # BinaryMetrics(auc=..., sensitivity=..., ...)
>>> calibration_table(test_probs, test_labels, bins=10)

All functions take ``labels`` as 0/1 and ``probs`` as the positive-class probability in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ...atomic import atomic_write

__all__ = ["roc_curve", "roc_auc", "select_threshold", "THRESHOLD_RULES", "BinaryMetrics", "binary_metrics",
           "CalibrationBin", "calibration_table", "expected_calibration_error", "bootstrap_auc_ci", "plot_roc"]

#: Rules :func:`select_threshold` knows.
THRESHOLD_RULES = ("youden", "balanced_accuracy", "f1", "fixed")


def _check(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"probs ({p.shape[0]}) and labels ({y.shape[0]}) differ in length")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got values {np.unique(y)[:5].tolist()}")
    if not np.isfinite(p).all():
        raise ValueError("probs hold NaN or infinite values")
    return p, y.astype(np.int64)


def roc_curve(labels: Any, probs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` of the ROC curve, one point per distinct score plus (0, 0).

    ``thresholds[i]`` is the smallest score predicted positive at point i (``probs >= t``); the
    first point has threshold ``inf``. Needs both classes.
    """
    p, y = _check(probs, labels)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC needs both classes; got {n_pos} positive and {n_neg} negative")
    order = np.argsort(-p, kind="mergesort")
    p, y = p[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(p)), len(p) - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    return fpr, tpr, np.r_[np.inf, p[distinct]]


def roc_auc(labels: Any, probs: Any) -> float:
    """Area under the ROC curve (ties count one half): the Mann-Whitney U statistic / (n_pos n_neg)."""
    p, y = _check(probs, labels)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes; got {n_pos} positive and {n_neg} negative")
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p), dtype=np.float64)
    sorted_p = p[order]
    # average ranks over ties
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_p)) + 1]
    ends = np.r_[starts[1:], len(p)]
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def select_threshold(probs: Any, labels: Any, rule: str = "youden", fixed: float = 0.5) -> float:
    """A decision threshold on ``probs`` chosen from ``labels`` -- pass **validation** data only.

    Rules: ``"youden"`` maximises sensitivity + specificity - 1 (equivalently balanced
    accuracy); ``"balanced_accuracy"`` is the same criterion; ``"f1"`` maximises F1 of the
    positive class; ``"fixed"`` returns ``fixed``. Among equally good cut points the midpoint of
    the widest gap between neighbouring scores is used, so the threshold does not sit on a
    validation score. Returns a probability in [0, 1].
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; choose one of {THRESHOLD_RULES}")
    if rule == "fixed":
        return float(fixed)
    p, y = _check(probs, labels)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"choosing a threshold needs both classes in the validation data; got {n_pos} "
                         f"positive and {n_neg} negative")
    # candidate cut points: midpoints between consecutive distinct scores, and beyond both ends
    s = np.unique(p)
    cuts = np.r_[s[0] / 2.0, (s[:-1] + s[1:]) / 2.0, (s[-1] + 1.0) / 2.0]
    pred = p[None, :] >= cuts[:, None]
    tp = (pred & (y == 1)).sum(1)
    fp = (pred & (y == 0)).sum(1)
    if rule in ("youden", "balanced_accuracy"):
        score = tp / n_pos - fp / n_neg
    else:
        precision = np.divide(tp, tp + fp, out=np.zeros(len(cuts)), where=(tp + fp) > 0)
        recall = tp / n_pos
        score = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(cuts)),
                          where=(precision + recall) > 0)
    best = np.flatnonzero(np.isclose(score, score.max(), rtol=0, atol=1e-12))
    # the widest margin among the optimal cuts: distance to the nearest score on either side
    margin = np.array([np.min(np.abs(s - cuts[i])) for i in best])
    return float(np.clip(cuts[best[int(np.argmax(margin))]], 0.0, 1.0))


@dataclass(frozen=True)
class BinaryMetrics:
    """Metrics of one set of slides at one threshold (NaN where undefined, e.g. AUC with one class)."""

    n: int
    n_positive: int
    auc: float
    threshold: float
    accuracy: float
    balanced_accuracy: float
    sensitivity: float
    specificity: float
    precision: float
    f1: float
    brier: float
    ece: float

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def binary_metrics(probs: Any, labels: Any, threshold: float | np.ndarray, *, bins: int = 10) -> BinaryMetrics:
    """AUC, accuracy, balanced accuracy, sensitivity, specificity, precision, F1 at ``threshold``
    (predicted positive iff ``prob >= threshold``; an array gives each slide its own, as when
    pooling splits), Brier score and expected calibration error."""
    p, y = _check(probs, labels)
    cut = np.asarray(threshold, dtype=np.float64)
    pred = p >= cut
    tp = int((pred & (y == 1)).sum())
    tn = int((~pred & (y == 0)).sum())
    fp = int((pred & (y == 0)).sum())
    fn = int((~pred & (y == 1)).sum())
    n_pos, n_neg = tp + fn, tn + fp
    sens, spec = _ratio(tp, n_pos), _ratio(tn, n_neg)
    precision = _ratio(tp, tp + fp)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    both = n_pos > 0 and n_neg > 0
    return BinaryMetrics(
        n=len(y), n_positive=n_pos, auc=roc_auc(y, p) if both else float("nan"),
        threshold=float(cut) if cut.ndim == 0 else float("nan"),
        accuracy=_ratio(tp + tn, len(y)), balanced_accuracy=(sens + spec) / 2 if both else float("nan"),
        sensitivity=sens, specificity=spec, precision=precision, f1=f1,
        brier=float(np.mean((p - y) ** 2)) if len(y) else float("nan"),
        ece=expected_calibration_error(p, y, bins=bins) if len(y) else float("nan"),
    )


@dataclass(frozen=True)
class CalibrationBin:
    """One probability bin: ``[lower, upper)`` (the last bin includes 1), its slide count, mean
    predicted probability and observed fraction of positives (None when empty)."""

    lower: float
    upper: float
    count: int
    mean_probability: float | None
    fraction_positive: float | None


def calibration_table(probs: Any, labels: Any, bins: int = 10) -> list[CalibrationBin]:
    """Reliability table over ``bins`` equal-width probability bins."""
    p, y = _check(probs, labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    table = []
    for b in range(bins):
        sel = which == b
        count = int(sel.sum())
        table.append(CalibrationBin(lower=float(edges[b]), upper=float(edges[b + 1]), count=count,
                                    mean_probability=float(p[sel].mean()) if count else None,
                                    fraction_positive=float(y[sel].mean()) if count else None))
    return table


def expected_calibration_error(probs: Any, labels: Any, bins: int = 10) -> float:
    """Count-weighted mean |mean probability - fraction positive| over the calibration bins."""
    table = calibration_table(probs, labels, bins)
    n = sum(b.count for b in table)
    if n == 0:
        return float("nan")
    return float(sum(b.count * abs(b.mean_probability - b.fraction_positive) for b in table if b.count) / n)


def bootstrap_auc_ci(labels: Any, probs: Any, *, resamples: int = 1000, level: float = 0.95, seed: int = 0
                     ) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the AUC (resampling slides, stratified by class)."""
    p, y = _check(probs, labels)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    aucs = np.empty(resamples)
    for i in range(resamples):
        idx = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        aucs[i] = roc_auc(y[idx], p[idx])
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(aucs, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def plot_roc(curves: Sequence[tuple[str, Any, Any]], path: Any, *, title: str = "ROC",
             thresholds: Mapping[str, float] | None = None) -> None:
    """Write a ROC plot PNG.

    ``curves`` is ``[(name, labels, probs), ...]`` (the legend shows each AUC); ``thresholds``
    maps a curve's name to its decision threshold, drawn as that curve's operating point. Needs
    matplotlib (the ``[train]`` extra). The file is written under a temporary name and renamed.
    """
    from pathlib import Path

    from matplotlib.figure import Figure

    path = Path(path)
    thresholds = dict(thresholds or {})
    fig = Figure(figsize=(5.0, 5.0), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle=":", color="0.6", linewidth=1, label="chance")
    for name, labels, probs in curves:
        fpr, tpr, _ = roc_curve(labels, probs)
        (line,) = ax.plot(fpr, tpr, linewidth=1.6, label=f"{name} (AUC {roc_auc(labels, probs):.3f})")
        if name in thresholds:
            m = binary_metrics(probs, labels, thresholds[name])
            ax.plot([1 - m.specificity], [m.sensitivity], marker="o", markersize=6, linestyle="none",
                    color=line.get_color(), markeredgecolor="black", markeredgewidth=0.6)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title + (" (dots: validation-chosen thresholds)" if thresholds else ""), fontsize=9)
    ax.set_aspect("equal")
    ax.grid(True, linewidth=0.4, color="0.85")
    ax.legend(loc="lower right", fontsize=7, frameon=False)
    fig.tight_layout()
    with atomic_write(path) as fh:
        fig.savefig(fh, format="png")
