"""Exact pixel-edge outlines of a boolean raster: every boundary of its True regions as closed rings.

A True pixel ``(row, col)`` covers ``[col, col + 1] x [row, row + 1]``; the rings run along
pixel edges, with vertices only where the direction changes, so the polygons they bound cover
exactly the True pixels. Each boundary edge is walked once, with the True pixels on its right
(image coordinates, y down): outer boundaries come out clockwise on screen (positive shoelace
area in these coordinates), the boundaries of holes counter-clockwise (negative). Where two
True pixels touch only at a corner, the walk turns towards the True pixel it is beside, so
True regions are 4-connected and every ring is simple; a hole ring may pass twice through such
a corner (the caller repairs that one case).

:func:`trace_rings` is the kernel; ``wsiengine.tissue.mask_to_polygons`` turns its rings into
shapely polygons with holes.
"""

from __future__ import annotations

import numba
import numpy as np

from ._checks import as_mask

__all__ = ["trace_rings"]

# Directions: 0 east (+x), 1 south (+y), 2 west (-x), 3 north (-y).


@numba.njit(cache=True, nogil=True)
def _edges(mask):
    """``h[y, x]``: the horizontal edge from (x, y) to (x + 1, y) is a boundary walked east (1) or
    west (-1); ``v[y, x]``: the vertical edge from (x, y) to (x, y + 1) walked south (1) or north (-1)."""
    rows, cols = mask.shape
    h = np.zeros((rows + 1, cols), np.int8)
    v = np.zeros((rows, cols + 1), np.int8)
    count = 0
    for y in range(rows + 1):
        for x in range(cols):
            above = mask[y - 1, x] if y > 0 else False
            below = mask[y, x] if y < rows else False
            if below and not above:
                h[y, x] = 1  # top edge of a True pixel: True below, walked east (True on the right)
                count += 1
            elif above and not below:
                h[y, x] = -1  # bottom edge: True above, walked west
                count += 1
    for y in range(rows):
        for x in range(cols + 1):
            left = mask[y, x - 1] if x > 0 else False
            right = mask[y, x] if x < cols else False
            if left and not right:
                v[y, x] = 1  # right edge of a True pixel: True on the west, walked south
                count += 1
            elif right and not left:
                v[y, x] = -1  # left edge: True on the east, walked north
                count += 1
    return h, v, count


@numba.njit(cache=True, nogil=True)
def _outgoing(h, v, x, y, direction):
    """Whether the boundary edge leaving vertex (x, y) in ``direction`` exists and is unwalked."""
    if direction == 0:
        return x < h.shape[1] and h[y, x] == 1
    if direction == 1:
        return y < v.shape[0] and v[y, x] == 1
    if direction == 2:
        return x > 0 and h[y, x - 1] == -1
    return y > 0 and v[y - 1, x] == -1


@numba.njit(cache=True, nogil=True)
def _walk(h, v, x, y, direction):
    """Mark the edge leaving (x, y) in ``direction`` walked; the vertex it reaches."""
    if direction == 0:
        h[y, x] = 2
        return x + 1, y
    if direction == 1:
        v[y, x] = 2
        return x, y + 1
    if direction == 2:
        h[y, x - 1] = 2
        return x - 1, y
    v[y - 1, x] = 2
    return x, y - 1


@numba.njit(cache=True, nogil=True)
def _trace(mask):
    h, v, count = _edges(mask)
    # a ring of e edges has at most e + 1 vertices (its first repeated last), and at least 4 edges
    xs = np.empty(count + count // 4 + 2, np.int64)
    ys = np.empty(count + count // 4 + 2, np.int64)
    starts = np.empty(count + 1, np.int64)
    pixel_row = np.empty(count, np.int64)
    pixel_col = np.empty(count, np.int64)
    n_vertices = 0
    n_rings = 0
    rows, cols = mask.shape
    for y0 in range(rows + 1):
        for x0 in range(cols):
            if h[y0, x0] != 1:
                continue  # every ring has a top edge walked east: start there
            starts[n_rings] = n_vertices
            pixel_row[n_rings] = y0
            pixel_col[n_rings] = x0
            n_rings += 1
            x, y, direction = x0, y0, 0
            xs[n_vertices] = x0
            ys[n_vertices] = y0
            n_vertices += 1
            while True:
                x, y = _walk(h, v, x, y, direction)
                if x == x0 and y == y0 and not _outgoing(h, v, x, y, 0):
                    break
                # Prefer the right turn (hugs the True pixel on the right), then straight, then left.
                new = -1
                for turn in (1, 0, 3):
                    candidate = (direction + turn) % 4
                    if _outgoing(h, v, x, y, candidate):
                        new = candidate
                        break
                if new != direction:
                    xs[n_vertices] = x
                    ys[n_vertices] = y
                    n_vertices += 1
                direction = new
            xs[n_vertices] = x0  # close the ring
            ys[n_vertices] = y0
            n_vertices += 1
    starts[n_rings] = n_vertices
    return xs[:n_vertices], ys[:n_vertices], starts[: n_rings + 1], pixel_row[:n_rings], pixel_col[:n_rings]


def trace_rings(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every boundary ring of the True regions of ``mask``.

    Parameters
    ----------
    mask : numpy.ndarray
        ``(H, W)`` bool (other dtypes: non-zero is True).

    Returns
    -------
    vertices : numpy.ndarray
        ``(V, 2)`` int64 ``(x, y)`` pixel-corner coordinates of all rings, one after another,
        each ring closed (its first vertex repeated last).
    offsets : numpy.ndarray
        ``(R + 1,)`` int64: ring ``i`` is ``vertices[offsets[i]:offsets[i + 1]]``.
    pixels : numpy.ndarray
        ``(R, 2)`` int64 ``(row, col)`` of a True pixel each ring bounds (the pixel below its
        first edge): rings of one 4-connected region share its label.
    area2 : numpy.ndarray
        ``(R,)`` int64 twice the signed area (shoelace, y down): > 0 an outer boundary, < 0 a hole.
    """
    xs, ys, starts, prow, pcol = _trace(np.ascontiguousarray(as_mask(mask)))
    vertices = np.column_stack([xs, ys])
    cross = xs[:-1] * ys[1:] - xs[1:] * ys[:-1]
    csum = np.concatenate([[0], np.cumsum(cross)])
    area2 = csum[starts[1:] - 1] - csum[starts[:-1]]
    return vertices, starts, np.column_stack([prow, pcol]), area2
