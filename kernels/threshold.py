"""Histograms with fixed bins and Otsu's threshold on them.

The histogram has fixed bins over a given value range, so histograms of separate chunks of
an image can be summed and thresholded once (``threshold_otsu(hist=h1 + h2)``).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["histogram", "bin_centers", "threshold_otsu"]


def _check_bins(nbins: int, value_range: tuple[float, float]) -> tuple[int, float, float]:
    n = int(nbins)
    if n != nbins or n < 1:
        raise ValueError(f"nbins must be a positive integer, got {nbins!r}")
    lo, hi = float(value_range[0]), float(value_range[1])
    if not (np.isfinite(lo) and np.isfinite(hi)) or not lo < hi:
        raise ValueError(f"value_range must be finite with low < high, got {value_range!r}")
    return n, lo, hi


@numba.njit(cache=True, nogil=True)
def _histogram(values, mask, use_mask, edges, lo, hi, denom, nbins_f, nbins):
    # Same arithmetic as numpy.histogram's equal-bin path, in the dtype of ``values``
    # (lo, hi, denom, nbins_f and edges are given in that dtype).
    counts = np.zeros(nbins, dtype=np.int64)
    for i in range(values.size):
        if use_mask and not mask[i]:
            continue
        v = values[i]
        if not (v >= lo and v <= hi):  # also drops NaN
            continue
        idx = int(((v - lo) / denom) * nbins_f)
        if idx == nbins:
            idx -= 1
        if v < edges[idx]:
            idx -= 1
        if idx != nbins - 1 and v >= edges[idx + 1]:
            idx += 1
        counts[idx] += 1
    return counts


def histogram(
    values: np.ndarray,
    nbins: int = 256,
    value_range: tuple[float, float] = (0.0, 1.0),
    *,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Counts of ``values`` in ``nbins`` equal bins over ``value_range``.

    Identical to ``numpy.histogram(values[mask], nbins, range=value_range)[0]``: bins are
    half-open ``[edge_i, edge_i+1)`` except the last, which includes ``value_range[1]``;
    values outside the range and NaN are not counted. Float32 input is binned in float32
    arithmetic, as numpy does.

    Parameters
    ----------
    values : numpy.ndarray
        Any shape, real numbers (integers are binned as float64).
    nbins : int
        Number of bins.
    value_range : (float, float)
        Lower and upper edge of the bins, in the units of ``values``.
    mask : numpy.ndarray of bool, optional
        Same shape as ``values``; only True positions are counted.

    Returns
    -------
    numpy.ndarray
        ``(nbins,)`` int64 counts.
    """
    n, lo, hi = _check_bins(nbins, value_range)
    v = np.asarray(values)
    if v.dtype not in (np.float32, np.float64):
        v = v.astype(np.float64)
    v = np.ascontiguousarray(v).reshape(-1)
    if mask is None:
        m = np.zeros(1, dtype=np.bool_)
        use_mask = False
    else:
        m = np.asarray(mask)
        if m.shape != np.shape(values):
            raise ValueError(f"mask shape {m.shape} differs from values shape {np.shape(values)}")
        m = np.ascontiguousarray(m, dtype=np.bool_).reshape(-1)
        use_mask = True
    t = v.dtype.type
    edges = np.linspace(lo, hi, n + 1, endpoint=True, dtype=v.dtype)
    return _histogram(v, m, use_mask, edges, t(lo), t(hi), t(hi - lo), t(n), n)


def bin_centers(nbins: int = 256, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Centres of the bins of :func:`histogram`, float64.

    ``edges = numpy.linspace(lo, hi, nbins + 1)``; centre ``i`` is ``(edges[i] + edges[i+1]) / 2``.
    """
    n, lo, hi = _check_bins(nbins, value_range)
    edges = np.linspace(lo, hi, n + 1)
    return (edges[:-1] + edges[1:]) / 2.0


@numba.njit(cache=True, nogil=True)
def _otsu_best(counts, centers, start, end):
    # scikit-image's formulation on counts[start:end + 1] (zero ends trimmed): for each split
    # k, class weights w1 = cumsum(counts), w2 = reverse cumsum, class means m1, m2 from
    # cumulative sums of counts * centers; maximise w1[k] * w2[k+1] * (m1[k] - m2[k+1])**2;
    # the first maximum wins.
    m = end - start + 1
    w1 = np.empty(m, dtype=np.float64)
    s1 = np.empty(m, dtype=np.float64)
    cw = 0
    cs = 0.0
    for i in range(m):
        c = counts[start + i]
        cw += c
        cs += c * centers[start + i]
        w1[i] = cw
        s1[i] = cs
    w2 = np.empty(m, dtype=np.float64)
    s2 = np.empty(m, dtype=np.float64)
    cw = 0
    cs = 0.0
    for i in range(m - 1, -1, -1):
        c = counts[start + i]
        cw += c
        cs += c * centers[start + i]
        w2[i] = cw
        s2[i] = cs
    best = -1.0
    best_k = 0
    for k in range(m - 1):
        d = s1[k] / w1[k] - s2[k + 1] / w2[k + 1]
        v = (w1[k] * w2[k + 1]) * (d * d)
        if v > best:
            best = v
            best_k = k
    return start + best_k


def threshold_otsu(
    image: np.ndarray | None = None,
    *,
    hist: np.ndarray | None = None,
    nbins: int = 256,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> float:
    """Otsu's threshold, from an image or from a pre-computed :func:`histogram`.

    Matches ``skimage.filters.threshold_otsu(hist=(counts, centers))`` on the same bins
    (``centers = bin_centers(nbins, value_range)``): empty bins at both ends are trimmed,
    the split maximising the between-class variance is chosen (the first on ties) and the
    centre of the lower class's last bin is returned; foreground is ``value > threshold``.
    Class weights are multiplied in float64, so summed histograms of whole slides cannot
    overflow (identical to scikit-image's int64 products below 2**53).

    Defined where scikit-image raises or special-cases: a histogram with a single non-empty
    bin returns that bin's centre; an empty histogram (no values in range) returns
    ``value_range[1]``, so that ``value > threshold`` selects nothing in the range.

    Parameters
    ----------
    image : numpy.ndarray, optional
        Values to threshold (any shape); binned with :func:`histogram`. Ignored if ``hist``
        is given.
    hist : numpy.ndarray, optional
        ``(nbins,)`` integer counts over ``value_range`` (e.g. a sum of chunk histograms).
    nbins : int
        Number of bins when ``image`` is given (``len(hist)`` otherwise).
    value_range : (float, float)
        Range the bins span, in the units of the values.

    Returns
    -------
    float
        Threshold in the units of the values.
    """
    if hist is None:
        if image is None:
            raise ValueError("threshold_otsu needs image or hist")
        counts = histogram(image, nbins, value_range)
    else:
        counts = np.asarray(hist)
        if counts.ndim != 1 or counts.size < 1:
            raise ValueError(f"hist must be a non-empty 1-D array of counts, got shape {counts.shape}")
        if np.any(counts < 0):
            raise ValueError("hist must not contain negative counts")
        counts = np.ascontiguousarray(counts, dtype=np.int64)
    n = counts.size
    _, lo, hi = _check_bins(n, value_range)
    centers = bin_centers(n, (lo, hi))
    occupied = np.flatnonzero(counts)
    if occupied.size == 0:
        return hi
    start, end = int(occupied[0]), int(occupied[-1])
    if start == end:
        return float(centers[start])
    return float(centers[_otsu_best(counts, centers, start, end)])
