"""Connected components of binary masks: labelling, small-object removal, hole filling.

All three work on runs (maximal horizontal stretches of equal pixels) rather than pixels:
runs are extracted row by row, runs that touch between consecutive rows are merged with a
union-find, and component areas are sums of run lengths. Work beyond the single pass over
the pixels is proportional to the number of runs, which is small for tissue masks.

Connectivity follows scikit-image: 1 = 4-neighbours (edges), 2 = 8-neighbours (edges and
corners).
"""

from __future__ import annotations

import numba
import numpy as np

from ._checks import as_mask, check_connectivity

__all__ = ["label_components", "remove_small_objects", "fill_holes"]


@numba.njit(cache=True, nogil=True)
def _runs(mask, value):
    """Runs of pixels equal to ``value``: row_start (H+1,), y, x0, x1 (exclusive) per run.

    One pass. Each row is checked in blocks of 64 pixels for any change between neighbours
    (a vectorised XOR); only blocks with a change are scanned pixel by pixel. The run arrays
    are allocated for the worst case (every other pixel a run) and returned as views of the
    used part (memory never written is never paged in).
    """
    h, w = mask.shape
    cap = h * ((w + 1) // 2)
    row_start = np.empty(h + 1, dtype=np.int64)
    ry = np.empty(cap, dtype=np.int32)
    rx0 = np.empty(cap, dtype=np.int32)
    rx1 = np.empty(cap, dtype=np.int32)
    m8 = mask.view(np.uint8)
    val = np.uint8(1) if value else np.uint8(0)
    k = 0
    for y in range(h):
        row_start[y] = k
        if w == 0:
            continue
        row = m8[y]
        inside = row[0] == val
        if inside:
            ry[k] = y
            rx0[k] = 0
        x0 = 1
        while x0 < w:
            x1 = min(x0 + 64, w)
            cur = row[x0:x1]
            prev = row[x0 - 1 : x1 - 1]
            change = np.uint8(0)
            for i in range(x1 - x0):
                change |= cur[i] ^ prev[i]
            if change:
                for x in range(x0, x1):
                    v = row[x] == val
                    if v != inside:
                        if v:
                            ry[k] = y
                            rx0[k] = x
                        else:
                            rx1[k] = x
                            k += 1
                        inside = v
            x0 = x1
        if inside:
            rx1[k] = w
            k += 1
    row_start[h] = k
    return row_start, ry[:k], rx0[:k], rx1[:k]


@numba.njit(cache=True, nogil=True)
def _find(parent, i):
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@numba.njit(cache=True, nogil=True)
def _union_runs(row_start, rx0, rx1, eight):
    """Union-find over runs; returns the root of every run (a run index)."""
    n = rx0.size
    parent = np.arange(n, dtype=np.int64)
    h = row_start.size - 1
    slack = 1 if eight else 0
    for y in range(1, h):
        a = row_start[y - 1]
        a_end = row_start[y]
        b = row_start[y]
        b_end = row_start[y + 1]
        while a < a_end and b < b_end:
            # runs [x0, x1) touch if they overlap (4-conn) or are diagonal neighbours (8-conn)
            if rx0[a] < rx1[b] + slack and rx0[b] < rx1[a] + slack:
                ra = _find(parent, a)
                rb = _find(parent, b)
                if ra < rb:
                    parent[rb] = ra
                elif rb < ra:
                    parent[ra] = rb
            # advance the run that ends first
            if rx1[a] < rx1[b]:
                a += 1
            else:
                b += 1
    for i in range(n):
        parent[i] = _find(parent, i)
    return parent


@numba.njit(cache=True, nogil=True)
def _label(mask, eight):
    h, w = mask.shape
    row_start, ry, rx0, rx1 = _runs(mask, True)
    root = _union_runs(row_start, rx0, rx1, eight)
    n = rx0.size
    label_of_root = np.zeros(n, dtype=np.int32)
    labels = np.zeros((h, w), dtype=np.int32)
    count = 0
    for i in range(n):  # runs are in raster order: labels follow each component's first pixel
        r = root[i]
        if label_of_root[r] == 0:
            count += 1
            label_of_root[r] = count
        lab = label_of_root[r]
        y = ry[i]
        for x in range(rx0[i], rx1[i]):
            labels[y, x] = lab
    return labels, count


@numba.njit(cache=True, nogil=True)
def _remove_small(mask, eight, min_size):
    h, w = mask.shape
    row_start, ry, rx0, rx1 = _runs(mask, True)
    root = _union_runs(row_start, rx0, rx1, eight)
    n = rx0.size
    area = np.zeros(n, dtype=np.int64)
    for i in range(n):
        area[root[i]] += rx1[i] - rx0[i]
    out = np.zeros((h, w), dtype=np.bool_)
    for i in range(n):
        if area[root[i]] >= min_size:
            y = ry[i]
            for x in range(rx0[i], rx1[i]):
                out[y, x] = True
    return out


@numba.njit(cache=True, nogil=True)
def _fill_holes(mask, eight, max_hole):
    # Holes are components of False pixels that do not touch the image border.
    h, w = mask.shape
    row_start, ry, rx0, rx1 = _runs(mask, False)
    root = _union_runs(row_start, rx0, rx1, eight)
    n = rx0.size
    area = np.zeros(n, dtype=np.int64)
    border = np.zeros(n, dtype=np.bool_)
    for i in range(n):
        r = root[i]
        area[r] += rx1[i] - rx0[i]
        if ry[i] == 0 or ry[i] == h - 1 or rx0[i] == 0 or rx1[i] == w:
            border[r] = True
    out = mask.copy()
    for i in range(n):
        r = root[i]
        if not border[r] and (max_hole < 0 or area[r] <= max_hole):
            y = ry[i]
            for x in range(rx0[i], rx1[i]):
                out[y, x] = True
    return out


@numba.njit(cache=True, nogil=True)
def _reconstruct(seed, within, eight):
    # Components of ``within`` that contain at least one ``seed`` pixel (binary
    # reconstruction by dilation; seed pixels outside ``within`` are ignored).
    h, w = within.shape
    row_start, ry, rx0, rx1 = _runs(within, True)
    root = _union_runs(row_start, rx0, rx1, eight)
    n = rx0.size
    seeded = np.zeros(n, dtype=np.bool_)
    for i in range(n):
        r = root[i]
        if seeded[r]:
            continue
        y = ry[i]
        for x in range(rx0[i], rx1[i]):
            if seed[y, x]:
                seeded[r] = True
                break
    out = np.zeros((h, w), dtype=np.bool_)
    for i in range(n):
        if seeded[root[i]]:
            y = ry[i]
            for x in range(rx0[i], rx1[i]):
                out[y, x] = True
    return out


def label_components(mask: np.ndarray, connectivity: int = 2) -> tuple[np.ndarray, int]:
    """Label the connected components of True pixels.

    Labels are 1..n in raster order of each component's first pixel (as
    ``skimage.measure.label(mask, connectivity=connectivity)``); background is 0.

    Parameters
    ----------
    mask : numpy.ndarray
        ``(H, W)`` bool (other dtypes: non-zero is True).
    connectivity : {1, 2}
        1: pixels sharing an edge are connected; 2: edges or corners.

    Returns
    -------
    labels : numpy.ndarray
        ``(H, W)`` int32.
    n : int
        Number of components.
    """
    labels, n = _label(as_mask(mask), check_connectivity(connectivity) == 2)
    return labels, int(n)


def remove_small_objects(mask: np.ndarray, min_size_px: int, connectivity: int = 2) -> np.ndarray:
    """Drop connected components whose area is below ``min_size_px`` pixels.

    Components with area ``< min_size_px`` are removed, those with area ``>= min_size_px``
    kept. In scikit-image 0.26 terms this is
    ``skimage.morphology.remove_small_objects(mask, max_size=min_size_px - 1, connectivity=...)``
    (``max_size`` removes areas ``<=`` it; the deprecated ``min_size`` removed areas ``<`` it,
    as here). ``min_size_px <= 1`` keeps everything.

    Parameters
    ----------
    mask : numpy.ndarray
        ``(H, W)`` bool.
    min_size_px : int
        Smallest area kept, pixels.
    connectivity : {1, 2}
        1: 4-neighbours; 2: 8-neighbours.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` bool.
    """
    m = as_mask(mask)
    eight = check_connectivity(connectivity) == 2
    if int(min_size_px) <= 1:
        return m.copy()
    return _remove_small(m, eight, int(min_size_px))


def fill_holes(mask: np.ndarray, max_hole_px: int | None = None, connectivity: int = 1) -> np.ndarray:
    """Fill holes: components of False pixels that do not touch the image border.

    With ``max_hole_px=None`` every hole is filled, as ``scipy.ndimage.binary_fill_holes``
    with its default structure (holes are 4-connected, ``connectivity=1``). With a number,
    only holes of area ``<= max_hole_px`` pixels are filled; larger holes (lumens, tears)
    stay open.

    Parameters
    ----------
    mask : numpy.ndarray
        ``(H, W)`` bool.
    max_hole_px : int or None
        Largest hole area filled, pixels; None fills all; 0 fills none.
    connectivity : {1, 2}
        Connectivity of the background (False) pixels forming a hole.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` bool.
    """
    m = as_mask(mask)
    eight = check_connectivity(connectivity) == 2
    if max_hole_px is None:
        limit = -1
    else:
        limit = int(max_hole_px)
        if limit < 0:
            raise ValueError(f"max_hole_px must be >= 0 or None, got {max_hole_px!r}")
        if limit == 0:
            return m.copy()
    if m.size == 0:
        return m.copy()
    return _fill_holes(m, eight, limit)
