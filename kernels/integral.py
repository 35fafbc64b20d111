"""Integral images (summed-area tables) and box sums/means over them.

Used for the tissue fraction of every tile: one integral image of the tissue mask, then
four look-ups per tile.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["integral_image", "box_sum", "box_mean"]


@numba.njit(cache=True, nogil=True)
def _integral(values, out):
    h, w = values.shape
    for y in range(h):
        s = out[0, 0]  # zero, in the dtype of the table
        for x in range(w):
            s += values[y, x]
            out[y + 1, x + 1] = out[y, x + 1] + s
    return out


def integral_image(values: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero first row and column.

    ``table[y, x]`` is the sum of ``values[:y, :x]``, so the sum over the half-open box
    ``[y0, y1) x [x0, x1)`` is ``table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]``.

    Parameters
    ----------
    values : numpy.ndarray
        ``(H, W)`` bool, integer or float array (a mask: sums are pixel counts).

    Returns
    -------
    numpy.ndarray
        ``(H + 1, W + 1)``: int64 for bool and integer input (exact), float64 for float input.
    """
    v = np.asarray(values)
    if v.ndim != 2:
        raise ValueError(f"values must be 2-D (H, W), got shape {v.shape}")
    if v.dtype == np.bool_:
        v = v.view(np.uint8)
    if np.issubdtype(v.dtype, np.integer):
        out_dtype = np.int64
    elif np.issubdtype(v.dtype, np.floating):
        out_dtype = np.float64
    else:
        raise TypeError(f"values must be bool, integer or float, got {v.dtype}")
    v = np.ascontiguousarray(v)
    out = np.zeros((v.shape[0] + 1, v.shape[1] + 1), dtype=out_dtype)
    if v.size:
        _integral(v, out)
    return out


@numba.njit(cache=True, nogil=True)
def _box_sum(table, y0, x0, y1, x1, out):
    h = table.shape[0] - 1
    w = table.shape[1] - 1
    for i in range(y0.size):
        a = min(max(y0[i], 0), h)
        b = min(max(y1[i], 0), h)
        c = min(max(x0[i], 0), w)
        d = min(max(x1[i], 0), w)
        if b <= a or d <= c:
            out[i] = 0.0
        else:
            out[i] = table[b, d] - table[a, d] - table[b, c] + table[a, c]
    return out


def _boxes(table, y0, x0, y1, x1):
    t = np.asarray(table)
    if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] < 1:
        raise ValueError(f"table must be a 2-D integral image (H + 1, W + 1), got shape {t.shape}")
    coords = np.broadcast_arrays(*(np.asarray(c) for c in (y0, x0, y1, x1)))
    shape = coords[0].shape
    for c in coords:
        if c.size and not np.issubdtype(c.dtype, np.integer):
            raise TypeError(f"box coordinates must be integers, got {c.dtype}")
    flat = [np.ascontiguousarray(c, dtype=np.int64).reshape(-1) for c in coords]
    out = np.empty(flat[0].size, dtype=np.float64)
    _box_sum(np.ascontiguousarray(t), flat[0], flat[1], flat[2], flat[3], out)
    return out.reshape(shape), flat, shape


def box_sum(table: np.ndarray, y0, x0, y1, x1) -> np.ndarray:
    """Sums over half-open boxes ``[y0, y1) x [x0, x1)``, clipped to the image.

    Parameters
    ----------
    table : numpy.ndarray
        Integral image from :func:`integral_image`, ``(H + 1, W + 1)``.
    y0, x0, y1, x1 : int or array of int
        Box corners in pixels of the original image (broadcast together). Parts of a box
        outside the image contribute 0.

    Returns
    -------
    numpy.ndarray
        float64 sums, shape of the broadcast coordinates.
    """
    sums, _, _ = _boxes(table, y0, x0, y1, x1)
    return sums


def box_mean(table: np.ndarray, y0, x0, y1, x1) -> np.ndarray:
    """Means over half-open boxes ``[y0, y1) x [x0, x1)``; outside the image counts as 0.

    The sum over the part of the box inside the image is divided by the area of the whole
    requested box, ``(y1 - y0) * (x1 - x0)``: a tile hanging half off a mask that is True
    everywhere has mean 0.5. For a mask this is the fraction of the box that is True.

    Parameters
    ----------
    table : numpy.ndarray
        Integral image from :func:`integral_image`, ``(H + 1, W + 1)``.
    y0, x0, y1, x1 : int or array of int
        Box corners in pixels of the original image (broadcast together); every box must
        have ``y1 > y0`` and ``x1 > x0``.

    Returns
    -------
    numpy.ndarray
        float64 means, shape of the broadcast coordinates.

    Raises
    ------
    ValueError
        If a box is empty (``y1 <= y0`` or ``x1 <= x0``).
    """
    sums, (a, c, b, d), shape = _boxes(table, y0, x0, y1, x1)
    area = (b - a) * (d - c)
    if np.any(b <= a) or np.any(d <= c):
        bad = int(np.flatnonzero((b <= a) | (d <= c))[0])
        raise ValueError(
            f"box {bad} is empty: y0={a[bad]}, y1={b[bad]}, x0={c[bad]}, x1={d[bad]}; need y1 > y0 and x1 > x0"
        )
    return sums / area.reshape(shape)
