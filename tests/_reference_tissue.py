"""Plain NumPy / SciPy / scikit-image reference of the tissue pipeline in wsiengine.kernels.

The same algorithm as the Numba kernels, written the obvious way with library calls, for
equality tests. Slow and memory-hungry on purpose: clarity over speed. Only the numeric
constants of the pen rules are shared with the kernels (so a change of threshold is one
edit); every formula is restated here.
"""

from __future__ import annotations

import warnings

import numpy as np
import shapely
from scipy import ndimage as ndi
from shapely.affinity import scale as shapely_scale
from shapely.geometry import MultiPolygon, Polygon
from skimage.filters import threshold_otsu as sk_threshold_otsu
from skimage.measure import label as sk_label
from skimage.morphology import disk
from skimage.morphology import remove_small_objects as sk_remove_small_objects

from wsiengine.kernels import pixel_classes as rules

EIGHT = ndi.generate_binary_structure(2, 2)
FOUR = ndi.generate_binary_structure(2, 1)


def rgb3(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(rgb)[..., :3]


def saturation(rgb: np.ndarray) -> np.ndarray:
    a = rgb3(rgb).astype(np.int32)
    mx = a.max(axis=-1)
    mn = a.min(axis=-1)
    out = np.zeros(mx.shape, dtype=np.float32)
    nz = mx > 0
    out[nz] = (mx - mn)[nz].astype(np.float32) / mx[nz].astype(np.float32)
    return out


def optical_density(rgb: np.ndarray) -> np.ndarray:
    a = rgb3(rgb).astype(np.float64)
    od = -np.log10((a + 1.0) / 256.0)
    return ((od[..., 0] + od[..., 1] + od[..., 2]) / 3.0).astype(np.float32)


def glass(rgb: np.ndarray, white_min: int, grey_max_saturation: float) -> np.ndarray:
    mn = rgb3(rgb).min(axis=-1).astype(np.int32)
    return (mn >= white_min) | (saturation(rgb).astype(np.float64) <= grey_max_saturation)


def pen_classes(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """The ink classes of every pixel as boolean arrays (rules in pixel_classes' docstring)."""
    a = rgb3(rgb).astype(np.int32)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    mx = a.max(axis=-1)
    mn = a.min(axis=-1)
    c = mx - mn
    gb = np.maximum(g, b) - r
    d = b - g
    red_max = (r == mx) & (c > 0)
    red_hue = np.where(d >= 0, 4 * d <= c, -3 * d <= c)
    faint_hue = np.where(d >= 0, 4 * d <= c, -2 * d <= c)
    return {
        "ink_cyan": (
            (g - r >= rules.GREEN_MIN_EXCESS_OVER_RED)
            & (gb >= rules.GREEN_BLUE_MIN_CHROMA_OVER_RED)
            & (r <= rules.GREEN_BLUE_MAX_RED)
        )
        | (
            (b == mx)
            & (b >= rules.BLUE_MIN_VALUE)
            & (g - r >= rules.BLUE_MIN_GREEN_OVER_RED)
            & (b - r >= rules.BLUE_MIN_BLUE_OVER_RED)
            & (r <= rules.GREEN_BLUE_MAX_RED)
        ),
        "faint_cyan": ((g - r >= rules.FAINT_GREEN_MIN_EXCESS_OVER_RED) & (gb >= rules.FAINT_GREEN_BLUE_MIN_CHROMA_OVER_RED))
        | ((b == mx) & (b - r >= rules.FAINT_BLUE_MIN_BLUE_OVER_RED) & (g - r >= rules.FAINT_BLUE_MIN_GREEN_OVER_RED)),
        "ink_red": red_max & red_hue & (r >= rules.RED_MIN_VALUE) & (5 * c >= 3 * r),
        "faint_red": red_max & faint_hue & (5 * c >= r),
        "black": mx <= rules.BLACK_MAX_VALUE,
        "dark": mx <= rules.DARK_MAX_VALUE,
    }


def pen(rgb: np.ndarray) -> np.ndarray:
    k = pen_classes(rgb)
    return k["ink_cyan"] | k["ink_red"] | k["black"]


def dilation(mask: np.ndarray, r: int) -> np.ndarray:
    return ndi.binary_dilation(mask, structure=disk(r).astype(bool), border_value=0)


def erosion(mask: np.ndarray, r: int) -> np.ndarray:
    return ndi.binary_erosion(mask, structure=disk(r).astype(bool), border_value=1)


def closing(mask: np.ndarray, r: int) -> np.ndarray:
    return erosion(dilation(mask, r), r)


def opening(mask: np.ndarray, r: int) -> np.ndarray:
    return dilation(erosion(mask, r), r)


def remove_small_objects(mask: np.ndarray, min_size_px: int, connectivity: int = 2) -> np.ndarray:
    """Drop components with area < min_size_px (skimage 0.26: max_size = min_size_px - 1)."""
    if min_size_px <= 1:
        return mask.copy()
    return sk_remove_small_objects(mask, max_size=min_size_px - 1, connectivity=connectivity)


def fill_holes(mask: np.ndarray, max_hole_px: int | None) -> np.ndarray:
    """Fill 4-connected background components not touching the border, of area <= max_hole_px."""
    if max_hole_px is None:
        return ndi.binary_fill_holes(mask)
    labels, n = ndi.label(~mask, structure=FOUR)
    if n == 0:
        return mask.copy()
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill = sizes <= max_hole_px
    fill[border] = False
    fill[0] = False
    return mask | fill[labels]


def reconstruct(seed: np.ndarray, area: np.ndarray) -> np.ndarray:
    """Components of ``area`` (8-connected) holding a seed pixel."""
    labels = sk_label(area, connectivity=2)
    keep = np.zeros(labels.max() + 1, dtype=bool)
    keep[np.unique(labels[seed & area])] = True
    keep[0] = False
    return keep[labels]


def otsu(counts: np.ndarray, value_range=(0.0, 1.0)) -> float:
    """skimage's Otsu on fixed bins, with the kernels' definitions for degenerate histograms."""
    lo, hi = value_range
    edges = np.linspace(lo, hi, counts.size + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    occupied = np.flatnonzero(counts)
    if occupied.size == 0:
        return float(hi)
    if occupied.size == 1:
        return float(centers[occupied[0]])
    return float(sk_threshold_otsu(hist=(counts, centers)))


def pen_zone(rgb: np.ndarray, min_pen_object_px: int, pen_dilation_px: int) -> np.ndarray:
    k = pen_classes(rgb)
    ink = remove_small_objects(k["ink_cyan"] | k["ink_red"] | k["black"], min_pen_object_px)
    zone = ink.copy()
    zone |= reconstruct(k["ink_cyan"] & ink, k["ink_cyan"] | k["faint_cyan"])
    zone |= reconstruct(k["ink_red"] & ink, k["ink_red"] | k["faint_red"] | k["dark"])
    return dilation(zone, pen_dilation_px)


def segment_tissue(rgb: np.ndarray, params) -> tuple[np.ndarray, float]:
    """Reference of wsiengine.kernels.segment_tissue: (mask, threshold)."""
    p = params
    h, w = rgb.shape[:2]
    sat = saturation(rgb)
    if p.reject_pen:
        zone = pen_zone(rgb, p.min_pen_object_px, p.pen_dilation_px)
    else:
        zone = np.zeros((h, w), dtype=bool)
    counts = np.histogram(sat[~zone], bins=p.nbins, range=(0.0, 1.0))[0]
    t = otsu(counts)
    t = min(max(t, p.min_threshold), p.max_threshold)
    usable = ~glass(rgb, p.white_min, p.grey_max_saturation) & ~zone
    mask = (sat.astype(np.float64) > t) & usable
    if h and w:
        closed = closing(mask, p.closing_radius_px)
        if p.opening_by_reconstruction:
            seeds = erosion(closed, p.opening_radius_px)
            mask = reconstruct(seeds, closed)
        else:
            seeds = mask = opening(closed, p.opening_radius_px)
        if p.weak_threshold_ratio < 1.0:  # hysteresis from the seeds not touching the pen zone
            grow = closed | ((sat.astype(np.float64) > t * float(p.weak_threshold_ratio)) & usable)
            touching = reconstruct(dilation(zone, 1) & closed, closed)
            mask = mask | reconstruct(seeds & ~touching, grow)
        if p.max_hole_px > 0:
            mask = fill_holes(mask, p.max_hole_px)
        mask = remove_small_objects(mask, p.min_object_px)
        if p.reject_pen:
            mask &= ~zone
    return mask, t


def skimage_binary(op: str, mask: np.ndarray, r: int) -> np.ndarray:
    """skimage.morphology.binary_<op>(mask, disk(r)), silencing its 0.26 deprecation."""
    import skimage.morphology as morph

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return getattr(morph, f"binary_{op}")(mask, disk(r))


def reference_mask_polygons(raster: np.ndarray, level0_per_mask_px: tuple[float, float] = (1.0, 1.0)) -> MultiPolygon:
    """The union of one box per run of True pixels (merged across rows), as shapely dissolves it:
    the reference of :func:`wsiengine.tissue.mask_to_polygons` (which traces rings instead).

    Each True pixel ``(row, col)`` covers ``[col, col + 1) x [row, row + 1)`` in mask
    coordinates; the result is scaled by ``level0_per_mask_px`` into level-0 pixels. Runs of
    pixels are merged into rectangles (vertically where rows repeat), then dissolved.
    """
    raster = np.asarray(raster, dtype=bool)
    if not raster.any():
        return MultiPolygon()
    padded = np.zeros((raster.shape[0], raster.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = raster
    edges = np.diff(padded, axis=1)
    rows_start, cols_start = np.nonzero(edges == 1)
    _, cols_end = np.nonzero(edges == -1)
    # Merge identical runs on consecutive rows into one taller rectangle.
    boxes: list[tuple[int, int, int, int]] = []  # x0, y0, x1, y1 in mask px
    open_runs: dict[tuple[int, int], int] = {}  # (x0, x1) -> first row
    previous_row = -2
    split_at = np.flatnonzero(np.diff(rows_start)) + 1
    for row_runs_x0, row_runs_x1, row in zip(
        np.split(cols_start, split_at), np.split(cols_end, split_at), rows_start[np.r_[0, split_at]]
    ):
        row = int(row)
        runs = set(zip(row_runs_x0.tolist(), row_runs_x1.tolist()))
        contiguous = row == previous_row + 1
        for run in list(open_runs):
            if not contiguous or run not in runs:
                boxes.append((run[0], open_runs.pop(run), run[1], previous_row + 1))
        for run in runs:
            open_runs.setdefault(run, row)
        previous_row = row
    for run, first_row in open_runs.items():
        boxes.append((run[0], first_row, run[1], previous_row + 1))
    b = np.asarray(boxes, dtype=np.float64)
    rects = shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3])
    merged = shapely.union_all(rects)
    merged = shapely.simplify(merged, 0.0)  # drop collinear vertices left by the rectangles
    sx, sy = level0_per_mask_px
    if (sx, sy) != (1.0, 1.0):
        merged = shapely_scale(merged, xfact=sx, yfact=sy, origin=(0, 0))
    if not merged.is_valid:
        merged = shapely.make_valid(merged)
    polys = [g for g in getattr(merged, "geoms", [merged]) if isinstance(g, Polygon) and not g.is_empty]
    return MultiPolygon(polys)
