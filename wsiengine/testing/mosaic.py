"""PCam-mosaic slides: pyramidal TIFF "lymph nodes" tiled with real PatchCamelyon patches.

PatchCamelyon (PCam, CC0) holds 96 x 96 RGB patches of lymph-node sections at about
0.972 µm/px, each labelled 1 (metastatic tumour in its centre) or 0 (normal).
:func:`make_mosaic_slide` lays such patches on a lattice of 96-pixel cells to build a slide
with a known ground truth at tile level:

- **glass**: near-white (about (240, 240, 238) with a per-slide jitter and slight pixel noise);
- **tissue**: 1-3 irregular blobs (wobbly ellipses with a rough edge, in cell units, without
  holes), separated from each other and from the border by a margin of glass; every tissue
  cell holds a distinct *normal* patch. Near-empty patches (PCam's background and fat, under
  ``min_stained`` stained pixels) are skipped, so tissue detection sees every cell as tissue;
- **lesion** (positive slides only): one connected cluster of cells inside one blob, grown
  from a random tissue cell to a size drawn log-uniformly in ``lesion_cells`` (so both
  micro-metastases of a few cells and large lesions occur), filled with *tumour* patches.

Cells lie on the lattice ``x = 96 i``, ``y = 96 j`` from the level-0 origin, and the slide's
resolution tags give :data:`PCAM_MPP`, so
``plan_tiles(slide, mask, target_mpp=slide.mpp[0], tile_px=96)`` reads level 0 with no
resampling and each tile it keeps is exactly one placed patch. :class:`MosaicSlide` returns
the cells (level-0 top-left corners, labels, source files), the tissue and the lesion
outlines as shapely geometry in level-0 pixels, a QuPath GeoJSON of the lesions and
:meth:`MosaicSlide.labels_at` for tile labels.

:func:`make_mosaic_dataset` writes a folder of such slides with ``labels.csv`` and the
lesion GeoJSONs, for training (PCam ``train``), validation (``valid``) and test (``test``).

The file is a tiled pyramidal TIFF as :func:`wsiengine.testing.make_pyramidal_slide` writes
it (JPEG YCbCr 4:2:0 tiles, reduced levels as further directories, ``XResolution`` in pixels
per centimetre), which the tifffile, OpenSlide and tiffslide backends open. A slide is
written under a temporary name and renamed. Only numpy, tifffile, imagecodecs, pillow and
shapely are used.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import math
import os
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from .synthetic import _stained

if TYPE_CHECKING:
    from shapely.geometry import MultiPolygon

__all__ = [
    "PCAM_MPP",
    "PATCH_PX",
    "PatchPool",
    "MosaicSlide",
    "make_mosaic_slide",
    "make_mosaic_dataset",
    "load_mosaic_dataset",
]

#: µm/px written into the slides (PCam's patches come from 10x, about 0.972 µm/px)
PCAM_MPP = 0.972
#: side of a PCam patch and of a lattice cell, level-0 pixels
PATCH_PX = 96
#: glass colour (R, G, B) before the per-slide jitter and pixel noise
GLASS_RGB = (240.0, 240.0, 238.0)
#: QuPath's colour for the "Tumor" class
TUMOR_COLOUR = (200, 0, 0)
#: smallest tissue blob, cells (tissue detection drops pieces under 0.05 mm², about 6 cells)
MIN_REGION_CELLS = 24

_LABELS = ("0", "1")


# -- the patch pool -------------------------------------------------------------------------------
@dataclass(frozen=True)
class PatchPool:
    """Paths of PCam patches of one split: normal (label 0) and tumour (label 1).

    Attributes
    ----------
    normal, tumour : tuple[Path, ...]
        96 x 96 RGB JPEG patches, sorted.
    root : Path or None
        The PCam folder; cell sources are recorded relative to it (else by file name).
    split : str
        Split name (``"train"``, ``"valid"``, ``"test"``), for provenance.
    """

    normal: tuple[Path, ...] = field(repr=False)
    tumour: tuple[Path, ...] = field(repr=False)
    root: Path | None = None
    split: str = ""

    @classmethod
    def from_pcam(cls, root: str | os.PathLike[str], split: str) -> "PatchPool":
        """The patches of ``root/split/{0,1}/*.jpg`` (``root`` is the ``pcam`` folder).

        Raises
        ------
        FileNotFoundError
            A folder is missing or holds no ``.jpg`` patch; the message names the path.
        """
        root_path = Path(os.fspath(root)).expanduser().resolve()
        split_dir = root_path / split
        if not split_dir.is_dir():
            raise FileNotFoundError(
                f"PCam split folder {split_dir} does not exist; expected {root_path}/{{train,valid,test}}/{{0,1}}/*.jpg"
            )
        found: list[tuple[Path, ...]] = []
        for label in _LABELS:
            folder = split_dir / label
            if not folder.is_dir():
                raise FileNotFoundError(f"PCam label folder {folder} does not exist (expected {split_dir}/{{0,1}}/*.jpg)")
            paths = tuple(sorted(folder.glob("*.jpg")))
            if not paths:
                raise FileNotFoundError(f"PCam label folder {folder} holds no .jpg patch")
            found.append(paths)
        return cls(normal=found[0], tumour=found[1], root=root_path, split=split)

    def __repr__(self) -> str:
        return f"PatchPool(split={self.split!r}, normal={len(self.normal)}, tumour={len(self.tumour)}, root={self.root})"

    def source_name(self, path: Path) -> str:
        """How a patch is recorded: its path relative to :attr:`root` (``train/1/patch0000001.jpg``), else its name."""
        if self.root is not None:
            try:
                return path.relative_to(self.root).as_posix()
            except ValueError:
                pass
        return path.name


@lru_cache(maxsize=None)
def _stained_fraction(path: Path) -> float:
    """Fraction of a patch's pixels that look stained (saturated or dark) rather than glass."""
    return float(_stained(_read_patch(path)).mean())


class _Sampler:
    """Draws distinct indices into ``paths``: through a random permutation without replacement,
    reshuffled when it runs out, skipping patches whose stained fraction is under ``min_stained``
    (those are never drawn again).

    One draw never repeats an index: after a reshuffle, the indices the draw already took from
    the end of the previous permutation are moved to the back of the new one.
    """

    def __init__(self, paths: Sequence[Path], rng: np.random.Generator, min_stained: float) -> None:
        self.paths, self.rng, self.min_stained = paths, rng, float(min_stained)
        self.rejected: set[int] = set()
        self.order = rng.permutation(len(paths)) if len(paths) else np.zeros(0, np.int64)
        self.pos = 0

    def _usable(self, i: int) -> bool:
        if i in self.rejected:
            return False
        if self.min_stained > 0 and _stained_fraction(self.paths[i]) < self.min_stained:
            self.rejected.add(i)
            return False
        return True

    def take(self, k: int) -> np.ndarray:
        out: list[int] = []
        chosen: set[int] = set()
        while len(out) < k:
            if self.pos >= len(self.order):
                available = len(self.paths) - len(self.rejected)
                if available < k:
                    raise InputError(
                        f"a slide needs {k} distinct patches but the pool has {available} usable of {len(self.paths)}"
                        + (f" (stained fraction >= {self.min_stained})" if self.rejected else "")
                    )
                order = self.rng.permutation(len(self.paths))
                order = order[~np.isin(order, np.fromiter(self.rejected, np.int64, len(self.rejected)))]
                used = np.isin(order, np.asarray(out, np.int64))
                self.order, self.pos = np.concatenate([order[~used], order[used]]), 0
            i = int(self.order[self.pos])
            self.pos += 1
            if i not in chosen and self._usable(i):
                out.append(i)
                chosen.add(i)
        return np.asarray(out, np.int64)


# -- the slide ------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class MosaicSlide:
    """What :func:`make_mosaic_slide` wrote.

    Attributes
    ----------
    path : Path
    slide_id : str
        The file stem.
    label : int
        1 iff the slide carries a lesion.
    mpp : float
        Level-0 µm/px written in the resolution tags.
    dimensions : tuple[int, int]
        Level-0 (width, height), pixels (multiples of :data:`PATCH_PX`).
    cell_xy : numpy.ndarray
        ``(K, 2)`` int64 level-0 (x, y) of each placed patch's top-left corner, row-major
        (the order of a :class:`~wsiengine.TileGrid`).
    cell_label : numpy.ndarray
        ``(K,)`` int8, 0 normal / 1 tumour, of the patch placed there.
    cell_source : tuple[str, ...]
        ``(K,)`` source patch of each cell (relative to the PCam folder, e.g. ``train/0/patch0000123.jpg``).
    tissue : shapely.MultiPolygon
        Union of the placed cells, level-0 pixels.
    lesions : shapely.MultiPolygon
        Union of the tumour cells, level-0 pixels; empty for negatives.
    level_downsamples : tuple[int, ...]
        Downsample of each pyramid level written.
    seed : int
        The slide's layout seed.
    """

    path: Path
    slide_id: str
    label: int
    mpp: float
    dimensions: tuple[int, int]
    cell_xy: np.ndarray = field(repr=False)
    cell_label: np.ndarray = field(repr=False)
    cell_source: tuple[str, ...] = field(repr=False)
    tissue: MultiPolygon = field(repr=False)
    lesions: MultiPolygon = field(repr=False)
    level_downsamples: tuple[int, ...] = (1,)
    seed: int = 0

    @property
    def n_cells(self) -> int:
        """Number of placed patches."""
        return int(len(self.cell_xy))

    @property
    def n_tumour_cells(self) -> int:
        """Number of tumour patches (lesion area / 96²)."""
        return int(np.count_nonzero(self.cell_label))

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(rows, cols) of the 96-px lattice over the slide."""
        return (self.dimensions[1] // PATCH_PX, self.dimensions[0] // PATCH_PX)

    def cell_index(self, coords: np.ndarray) -> np.ndarray:
        """``(N,)`` int64 index into the cells of the patch whose top-left corner is at each
        level-0 (x, y) in ``coords``; -1 where none is (glass, or off the lattice)."""
        c = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        rows, cols = self.grid_shape
        table = np.full((rows, cols), -1, np.int64)
        table[self.cell_xy[:, 1] // PATCH_PX, self.cell_xy[:, 0] // PATCH_PX] = np.arange(self.n_cells)
        on = (c % PATCH_PX == 0).all(axis=1) & (c >= 0).all(axis=1)
        on &= (c[:, 0] // PATCH_PX < cols) & (c[:, 1] // PATCH_PX < rows)
        out = np.full(len(c), -1, np.int64)
        out[on] = table[c[on, 1] // PATCH_PX, c[on, 0] // PATCH_PX]
        return out

    def labels_at(self, coords: np.ndarray, tile_px: float = PATCH_PX) -> np.ndarray:
        """``(N,)`` int8 tile labels: 1 iff the centre of the ``tile_px`` x ``tile_px`` level-0
        box at each (x, y) of ``coords`` lies inside a lesion, else 0."""
        import shapely

        c = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        if self.lesions.is_empty or not len(c):
            return np.zeros(len(c), np.int8)
        half = float(tile_px) / 2.0
        return shapely.contains_xy(self.lesions, c[:, 0] + half, c[:, 1] + half).astype(np.int8)

    def lesion_geojson(self) -> dict[str, Any]:
        """The lesion polygons as a QuPath-style GeoJSON FeatureCollection (level-0 pixels):
        one ``annotation`` feature per connected lesion, classified ``"Tumor"``."""
        features = []
        for k, polygon in enumerate(getattr(self.lesions, "geoms", ())):
            rings = [polygon.exterior, *polygon.interiors]
            features.append({
                "type": "Feature",
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"wsiengine-mosaic/{self.slide_id}/lesion/{k}")),
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[_num(x), _num(y)] for x, y in ring.coords] for ring in rings],
                },
                "properties": {
                    "objectType": "annotation",
                    "name": f"lesion {k + 1}",
                    "classification": {"name": "Tumor", "color": list(TUMOR_COLOUR)},
                    "isLocked": False,
                    "measurements": {"area_px": float(polygon.area), "area_um2": float(polygon.area) * self.mpp**2},
                },
            })
        return {"type": "FeatureCollection", "features": features}


def _num(v: float) -> int | float:
    return int(v) if float(v).is_integer() else float(v)


# -- layout ---------------------------------------------------------------------------------------
_NEIGHBOURS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def _components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a small boolean grid, as lists of (row, col)."""
    seen = np.zeros_like(mask, dtype=bool)
    rows, cols = mask.shape
    out = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        seen[r0, c0] = True
        queue, component = deque([(int(r0), int(c0))]), []
        while queue:
            r, c = queue.popleft()
            component.append((r, c))
            for dr, dc in _NEIGHBOURS:
                rr, cc = r + dr, c + dc
                if 0 <= rr < rows and 0 <= cc < cols and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
        out.append(component)
    return out


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill every background cell not 4-connected to the grid's border."""
    padded = np.pad(~mask, 1, constant_values=True)
    outside = np.zeros_like(padded)
    outside[0, 0] = True
    queue = deque([(0, 0)])
    rows, cols = padded.shape
    while queue:
        r, c = queue.popleft()
        for dr, dc in _NEIGHBOURS:
            rr, cc = r + dr, c + dc
            if 0 <= rr < rows and 0 <= cc < cols and padded[rr, cc] and not outside[rr, cc]:
                outside[rr, cc] = True
                queue.append((rr, cc))
    return ~outside[1:-1, 1:-1]


def _blob(rng: np.random.Generator, n: int, roughness: float) -> np.ndarray:
    """A hole-free, 4-connected blob of about ``n`` cells: the cells of a rotated ellipse with a
    wobbling, rough outline, cropped to its bounding box (``(rows, cols)`` bool)."""
    aspect = rng.uniform(0.45, 1.0)
    angle = rng.uniform(0.0, math.pi)
    rx = math.sqrt(n / (math.pi * aspect))
    ry = rx * aspect
    wobble = [(k, rng.uniform(0.02, 0.09), rng.uniform(0.0, 2 * math.pi)) for k in (2, 3, 4, 5)]
    reach = int(math.ceil(rx * 1.6)) + 2
    jj, ii = np.mgrid[-reach : reach + 1, -reach : reach + 1].astype(np.float64)
    c, s = math.cos(angle), math.sin(angle)
    u, v = (ii * c + jj * s) / rx, (-ii * s + jj * c) / ry
    theta = np.arctan2(v, u)
    factor = np.ones_like(theta)
    for k, a, phase in wobble:
        factor += a * np.cos(k * theta + phase)
    rho = np.hypot(u, v) / factor + rng.normal(0.0, roughness, theta.shape)
    mask = np.zeros(theta.shape, bool)
    mask.flat[np.argsort(rho.ravel(), kind="stable")[:n]] = True
    largest = max(_components(mask), key=len)
    mask = np.zeros_like(mask)
    mask[tuple(np.array(largest).T)] = True
    mask = _fill_holes(mask)
    r, cc = np.nonzero(mask)
    return mask[r.min() : r.max() + 1, cc.min() : cc.max() + 1]


def _grow_lesion(rng: np.random.Generator, region: set[tuple[int, int]], taken: set[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """A connected cluster of ``size`` cells of ``region`` (minus ``taken``), grown from a random
    cell by adding frontier cells, favouring those with more neighbours in the cluster (compact
    but irregular)."""
    free = sorted(region - taken)
    start = free[int(rng.integers(len(free)))]
    lesion = [start]
    inside = {start}
    frontier: dict[tuple[int, int], int] = {}

    def add(cell: tuple[int, int]) -> None:
        frontier.pop(cell, None)
        for dr, dc in _NEIGHBOURS:
            nb = (cell[0] + dr, cell[1] + dc)
            if nb in region and nb not in inside and nb not in taken:
                frontier[nb] = frontier.get(nb, 0) + 1

    add(start)
    while len(lesion) < size and frontier:
        cells = sorted(frontier)
        weights = np.array([frontier[cl] for cl in cells], np.float64) ** 2
        cell = cells[int(rng.choice(len(cells), p=weights / weights.sum()))]
        lesion.append(cell)
        inside.add(cell)
        add(cell)
    return lesion


@dataclass(frozen=True)
class _Layout:
    """Cells of one slide on the lattice: ``grid`` (rows, cols); ``cells`` (K, 2) (row, col)
    row-major; ``tumour`` (K,) bool."""

    grid: tuple[int, int]
    cells: np.ndarray
    tumour: np.ndarray


def _layout(
    rng: np.random.Generator,
    *,
    label: int,
    n_tissue_cells: tuple[int, int],
    lesion_cells: tuple[int, int],
    regions: tuple[int, int],
    n_lesions: tuple[int, int],
    margin_cells: int,
    roughness: float,
) -> _Layout:
    total = int(rng.integers(n_tissue_cells[0], n_tissue_cells[1] + 1))
    count = int(rng.integers(regions[0], regions[1] + 1))
    count = max(1, min(count, total // MIN_REGION_CELLS))
    base = min(MIN_REGION_CELLS, total // count)
    sizes = base + rng.multinomial(total - base * count, rng.dirichlet(np.full(count, 2.0)))
    blobs = [_blob(rng, int(n), roughness) for n in sizes]

    # Side by side in a row or stacked in a column, with glass around and between.
    horizontal = bool(rng.random() < 0.5)
    along = [b.shape[1] if horizontal else b.shape[0] for b in blobs]
    across = [b.shape[0] if horizontal else b.shape[1] for b in blobs]
    span = max(across)
    cross_margin = margin_cells + int(rng.integers(0, 3))
    pos = margin_cells + int(rng.integers(0, 3))
    origins = []
    for a, x in zip(along, across):
        offset = cross_margin + int(rng.integers(0, span - x + 1))
        origins.append((pos, offset))
        pos += a + margin_cells + int(rng.integers(0, 3))
    length = pos  # the last gap is the far margin
    width = span + 2 * cross_margin
    grid = (width, length) if horizontal else (length, width)
    canvas = np.zeros(grid, np.int32)  # region id + 1
    for k, (blob, (p, q)) in enumerate(zip(blobs, origins)):
        r0, c0 = (q, p) if horizontal else (p, q)
        canvas[r0 : r0 + blob.shape[0], c0 : c0 + blob.shape[1]][blob] = k + 1

    tumour_cells: set[tuple[int, int]] = set()
    if label:
        region_cells = [set(map(tuple, np.argwhere(canvas == k + 1).tolist())) for k in range(len(blobs))]
        lo, hi = lesion_cells
        for _ in range(int(rng.integers(n_lesions[0], n_lesions[1] + 1))):
            size = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi + 0.5)))))
            size = min(max(lo, size), hi)
            free = np.array([len(r - tumour_cells) for r in region_cells], np.float64)
            fits = free * 0.8 >= size
            if fits.any():
                k = int(rng.choice(len(free), p=(free * fits) / (free * fits).sum()))
            else:  # no blob is big enough: the largest, mostly filled
                k = int(np.argmax(free))
                size = max(1, min(size, int(free[k] * 0.8)))
            if free[k] == 0:
                break
            tumour_cells.update(_grow_lesion(rng, region_cells[k], tumour_cells, size))

    cells = np.argwhere(canvas > 0)  # row-major
    tumour = np.array([(int(r), int(c)) in tumour_cells for r, c in cells], bool)
    return _Layout(grid=(int(grid[0]), int(grid[1])), cells=cells.astype(np.int64), tumour=tumour)


# -- writing --------------------------------------------------------------------------------------
def _read_patch(path: Path) -> np.ndarray:
    import imagecodecs

    image = imagecodecs.jpeg8_decode(path.read_bytes())
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    image = image[..., :3]
    if image.shape[:2] != (PATCH_PX, PATCH_PX):
        raise InputError(f"PCam patch {path} is {image.shape[1]}x{image.shape[0]} px, expected {PATCH_PX}x{PATCH_PX}")
    return image


def _glass(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """``(rows * 96, cols * 96, 3)`` uint8 glass: per-slide colour jitter, pixel noise from 8 cell variants."""
    colour = np.array(GLASS_RGB) + rng.uniform(-2.0, 2.0, 3)
    variants = np.clip(colour + rng.normal(0.0, 1.5, (8, PATCH_PX, PATCH_PX, 3)) + 0.5, 0, 255).astype(np.uint8)
    ids = rng.integers(0, len(variants), (rows, cols))
    return np.ascontiguousarray(variants[ids].transpose(0, 2, 1, 3, 4).reshape(rows * PATCH_PX, cols * PATCH_PX, 3))


def _tiles(image: np.ndarray, tile: int, encode) -> Iterable[bytes]:
    h, w = image.shape[:2]
    th, tw = -(-h // tile), -(-w // tile)
    if (th * tile, tw * tile) != (h, w):
        image = np.pad(image, ((0, th * tile - h), (0, tw * tile - w), (0, 0)), mode="edge")
    for ty in range(th):
        for tx in range(tw):
            yield encode(np.ascontiguousarray(image[ty * tile : (ty + 1) * tile, tx * tile : (tx + 1) * tile]))


def _write_tiff(path: Path, level0: np.ndarray, *, mpp: float, downsamples: Sequence[int], tile: int, jpeg_quality: int) -> None:
    """Write ``level0`` and its box-downsampled levels as a tiled JPEG pyramidal TIFF at ``path``."""
    import imagecodecs
    import tifffile
    from PIL import Image

    jpeg_args = dict(level=int(jpeg_quality), colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2))
    encode = lambda a: imagecodecs.jpeg8_encode(a, **jpeg_args)  # noqa: E731
    h, w = level0.shape[:2]
    with tifffile.TiffWriter(str(path), bigtiff=w * h * 3 > 2**31) as writer:
        pil = None
        for level, d in enumerate(downsamples):
            if d == 1:
                image = level0
            else:
                pil = pil or Image.fromarray(level0)
                image = np.asarray(pil.reduce(int(d)))
            lh, lw = image.shape[:2]
            writer.write(
                _tiles(image, tile, encode),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": int(jpeg_quality)},
                subfiletype=0 if level == 0 else 1,
                resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)),
                resolutionunit="CENTIMETER",
                description=f"wsiengine PCam mosaic slide {w}x{h} mpp={mpp}" if level == 0 else None,
                software="wsiengine.testing",
                metadata=None,
                maxworkers=1,
            )


def _cells_geometry(xy: np.ndarray) -> MultiPolygon:
    import shapely
    from shapely.geometry import MultiPolygon, Polygon

    if not len(xy):
        return MultiPolygon()
    x, y = xy[:, 0].astype(np.float64), xy[:, 1].astype(np.float64)
    merged = shapely.simplify(shapely.union_all(shapely.box(x, y, x + PATCH_PX, y + PATCH_PX)), 0.0)
    if isinstance(merged, Polygon):
        return MultiPolygon([merged])
    return MultiPolygon([g for g in getattr(merged, "geoms", ()) if isinstance(g, Polygon)])


@dataclass(frozen=True)
class _Plan:
    seed: int
    label: int
    layout: _Layout
    sources: tuple[Path, ...]


def _plan(pool: PatchPool, label: int, seed: int, samplers: tuple[_Sampler, _Sampler] | None, min_stained: float,
          options: dict[str, Any]) -> _Plan:
    layout_ss, patch_ss = np.random.SeedSequence(seed).spawn(2)
    layout = _layout(np.random.default_rng(layout_ss), label=label, **options)
    n_tumour = int(layout.tumour.sum())
    n_normal = len(layout.tumour) - n_tumour
    if n_tumour and not pool.tumour:
        raise InputError("a positive slide needs tumour patches but the pool has none")
    if samplers is None:
        patch_rng = np.random.default_rng(patch_ss)
        samplers = (_Sampler(pool.normal, patch_rng, min_stained), _Sampler(pool.tumour, patch_rng, min_stained))
    normal, tumour = samplers
    normal_ids, tumour_ids = normal.take(n_normal), tumour.take(n_tumour)
    sources: list[Path] = [Path()] * len(layout.tumour)
    for k, i in zip(np.flatnonzero(~layout.tumour), normal_ids):
        sources[k] = pool.normal[int(i)]
    for k, i in zip(np.flatnonzero(layout.tumour), tumour_ids):
        sources[k] = pool.tumour[int(i)]
    return _Plan(seed=int(seed), label=int(label), layout=layout, sources=tuple(sources))


def _render(plan: _Plan, path: Path, pool: PatchPool, *, mpp: float, levels: Sequence[int], tile: int, jpeg_quality: int) -> MosaicSlide:
    rows, cols = plan.layout.grid
    rng = np.random.default_rng(np.random.SeedSequence(plan.seed).spawn(3)[2])
    canvas = _glass(rng, rows, cols)
    for (r, c), source in zip(plan.layout.cells, plan.sources):
        canvas[r * PATCH_PX : (r + 1) * PATCH_PX, c * PATCH_PX : (c + 1) * PATCH_PX] = _read_patch(source)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(plan):x}.tmp")
    try:
        _write_tiff(tmp, canvas, mpp=mpp, downsamples=levels, tile=tile, jpeg_quality=jpeg_quality)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

    xy = plan.layout.cells[:, ::-1] * PATCH_PX
    tumour = plan.layout.tumour
    return MosaicSlide(
        path=path,
        slide_id=path.stem,
        label=int(plan.label),
        mpp=float(mpp),
        dimensions=(cols * PATCH_PX, rows * PATCH_PX),
        cell_xy=np.ascontiguousarray(xy, dtype=np.int64),
        cell_label=tumour.astype(np.int8),
        cell_source=tuple(pool.source_name(p) for p in plan.sources),
        tissue=_cells_geometry(xy),
        lesions=_cells_geometry(xy[tumour]),
        level_downsamples=tuple(int(d) for d in levels),
        seed=int(plan.seed),
    )


_LAYOUT_KEYS = ("n_tissue_cells", "lesion_cells", "regions", "n_lesions", "margin_cells", "roughness")
_RENDER_KEYS = ("mpp", "levels", "tile", "jpeg_quality")


def _split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], float]:
    """Validate :func:`make_mosaic_slide`'s keyword options (all present) and split them into
    layout options, render options and ``min_stained``."""
    for name in ("n_tissue_cells", "lesion_cells", "regions", "n_lesions"):
        lo, hi = (int(v) for v in options[name])
        if not 1 <= lo <= hi:
            raise InputError(f"{name} must be a (low, high) pair with 1 <= low <= high, got {tuple(options[name])!r}")
    if not 0.0 <= float(options["min_stained"]) <= 1.0:
        raise InputError(f"min_stained must be in [0, 1], got {options['min_stained']!r}")
    if int(options["margin_cells"]) < 2:
        raise InputError(f"margin_cells must be >= 2 so tissue detection separates blobs from glass, got {options['margin_cells']}")
    d = [int(x) for x in options["levels"]]
    if not d or d[0] != 1 or d != sorted(set(d)) or any(PATCH_PX % x for x in d):
        raise InputError(f"levels must be increasing downsamples starting with 1 that divide {PATCH_PX}, got {tuple(options['levels'])}")
    if int(options["tile"]) <= 0 or int(options["tile"]) % 16:
        raise InputError(f"tile must be a positive multiple of 16, got {options['tile']}")
    if not 1 <= int(options["jpeg_quality"]) <= 100:
        raise InputError(f"jpeg_quality must be in 1..100, got {options['jpeg_quality']}")
    if not float(options["mpp"]) > 0:
        raise InputError(f"mpp must be positive µm/px, got {options['mpp']}")
    layout = {k: (tuple(int(v) for v in options[k]) if k not in ("margin_cells", "roughness") else options[k]) for k in _LAYOUT_KEYS}
    layout["margin_cells"], layout["roughness"] = int(layout["margin_cells"]), float(layout["roughness"])
    render = dict(mpp=float(options["mpp"]), levels=tuple(d), tile=int(options["tile"]), jpeg_quality=int(options["jpeg_quality"]))
    return layout, render, float(options["min_stained"])


def make_mosaic_slide(
    path: str | os.PathLike[str],
    pool: PatchPool,
    *,
    label: int,
    seed: int,
    n_tissue_cells: tuple[int, int] = (200, 400),
    lesion_cells: tuple[int, int] = (4, 113),
    regions: tuple[int, int] = (1, 3),
    jpeg_quality: int = 90,
    min_stained: float = 0.5,
    n_lesions: tuple[int, int] = (1, 1),
    margin_cells: int = 3,
    roughness: float = 0.04,
    levels: Sequence[int] = (1, 4, 16),
    tile: int = 256,
    mpp: float = PCAM_MPP,
) -> MosaicSlide:
    """Write one PCam-mosaic slide: glass, tissue blobs of normal patches and, when ``label`` is 1, a lesion of tumour patches.

    Parameters
    ----------
    path : path-like
        Output ``.tiff``; written under a temporary name, then renamed (overwrites).
    pool : PatchPool
        The patches to draw from; a slide never repeats a patch.
    label : {0, 1}
        1: a positive slide with ``n_lesions`` lesions; 0: normal patches only.
    seed : int
        Seeds the layout, the patch choice and the glass noise: same seed, same slide.
    n_tissue_cells : (int, int)
        Range (inclusive) of the number of tissue cells, drawn uniformly. The final count
        differs by a few cells (blobs are made hole-free and 4-connected).
    lesion_cells : (int, int)
        Range (inclusive) of a lesion's size in cells (each 96 x 96 px, about 93 x 93 µm),
        drawn log-uniformly; capped at 80 % of the blob it grows in.
    regions : (int, int)
        Range (inclusive) of the number of tissue blobs (each at least about 24 cells).
    jpeg_quality : int
        JPEG quality of the TIFF tiles (YCbCr 4:2:0).
    min_stained : float
        Least fraction of a patch's pixels that look stained (saturated or dark) rather than
        glass, 0..1, for it to be placed. PCam holds many near-empty patches (background, fat:
        about 30 % of normal patches are under 0.5); placed in tissue they would read as glass,
        and tissue detection would drop them or open holes. 0 places any patch.
    n_lesions : (int, int)
        Range (inclusive) of the number of lesions on a positive slide (default exactly one);
        lesions may touch.
    margin_cells : int
        Least glass between blobs and around them, cells (>= 2).
    roughness : float
        Standard deviation of the noise on the blob outline, in units of the blob radius.
    levels : sequence of int
        Downsample of each pyramid level (1 first; each divides 96).
    tile : int
        TIFF tile side, pixels.
    mpp : float
        Level-0 µm/px written into the slide (default :data:`PCAM_MPP`).

    Returns
    -------
    MosaicSlide
        Cells, labels, sources and outlines in level-0 pixels.
    """
    if label not in (0, 1):
        raise InputError(f"label must be 0 or 1, got {label!r}")
    layout, render, min_stained = _split_options(dict(
        n_tissue_cells=n_tissue_cells, lesion_cells=lesion_cells, regions=regions, n_lesions=n_lesions,
        margin_cells=margin_cells, roughness=roughness, min_stained=min_stained,
        mpp=mpp, levels=levels, tile=tile, jpeg_quality=jpeg_quality,
    ))
    plan = _plan(pool, int(label), int(seed), None, min_stained, layout)
    return _render(plan, Path(os.fspath(path)), pool, **render)


# -- datasets -------------------------------------------------------------------------------------
def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def make_mosaic_dataset(
    out_dir: str | os.PathLike[str],
    pool: PatchPool,
    n_slides: int,
    *,
    positive_fraction: float = 0.5,
    seed: int = 0,
    prefix: str = "mosaic",
    workers: int | None = None,
    **slide_options: Any,
) -> list[MosaicSlide]:
    """Write ``n_slides`` PCam-mosaic slides and their labels to ``out_dir``.

    Files written:

    - ``{prefix}-{i:03d}.tiff``: the slides;
    - ``labels.csv``: ``slide_id,label``;
    - ``{slide_id}.lesions.geojson``: the lesions of each positive slide (QuPath annotations);
    - ``slides.csv``: ``slide_id,label,width,height,mpp,levels,seed,n_cells,n_tumour_cells,lesion_area_um2``;
    - ``cells.csv``: ``slide_id,x,y,label,source``, one row per placed patch (level-0 px).

    Exactly ``round(n_slides * positive_fraction)`` slides are positive, in an order shuffled
    by ``seed``. Patches are drawn across the dataset without replacement: every patch of the
    pool is used once before any is used again; when a class runs out, its pool is reshuffled
    and drawing goes on (a slide itself never repeats a patch). Patches under ``min_stained``
    are skipped when drawn and never drawn again. Same ``seed``, same dataset: slides are
    planned one after another, then rendered on ``workers`` threads.

    Parameters
    ----------
    out_dir : path-like
        Created if needed; existing files of the same names are overwritten.
    pool : PatchPool
        One PCam split (train for training sets, valid for validation, test for test).
    n_slides : int
    positive_fraction : float
        Fraction of positive slides, 0..1.
    seed : int
        Seeds the label order, each slide's layout and the patch draws.
    prefix : str
        Slide file name prefix.
    workers : int, optional
        Threads writing slides (default: the CPU count, at most 8).
    **slide_options
        Passed to :func:`make_mosaic_slide` (``n_tissue_cells``, ``lesion_cells``, ...).

    Returns
    -------
    list[MosaicSlide]
        In file order.
    """
    if n_slides < 0:
        raise InputError(f"n_slides must be >= 0, got {n_slides}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise InputError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    if "label" in slide_options or "seed" in slide_options:
        raise TypeError("label and seed are chosen per slide; pass positive_fraction and the dataset seed instead")
    out = Path(os.fspath(out_dir))
    out.mkdir(parents=True, exist_ok=True)

    labels_ss, patches_ss, slides_ss = np.random.SeedSequence(seed).spawn(3)
    n_pos = int(round(n_slides * positive_fraction))
    labels = np.random.default_rng(labels_ss).permutation(np.r_[np.ones(n_pos, int), np.zeros(n_slides - n_pos, int)])
    seeds = [int(s.generate_state(1, np.uint32)[0]) for s in slides_ss.spawn(n_slides)]
    defaults = {
        name: parameter.default for name, parameter in inspect.signature(make_mosaic_slide).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default is not inspect.Parameter.empty
    }
    unknown = set(slide_options) - set(defaults)
    if unknown:
        raise TypeError(f"unknown slide options {sorted(unknown)}; make_mosaic_slide takes {sorted(defaults)}")
    layout, render, min_stained = _split_options({**defaults, **slide_options})

    # Plan every slide in order (layouts and patch draws: cheap, sequential, deterministic),
    # then render and write them in parallel.
    patch_rng = np.random.default_rng(patches_ss)
    samplers = (_Sampler(pool.normal, patch_rng, min_stained), _Sampler(pool.tumour, patch_rng, min_stained))
    plans = [_plan(pool, int(label), s, samplers, min_stained, layout) for label, s in zip(labels, seeds)]
    paths = [out / f"{prefix}-{i:03d}.tiff" for i in range(n_slides)]

    def job(i: int) -> MosaicSlide:
        return _render(plans[i], paths[i], pool, **render)

    workers = max(1, min(workers or min(8, os.cpu_count() or 1), max(1, n_slides)))
    if workers == 1:
        slides = [job(i) for i in range(n_slides)]
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="wsiengine-mosaic") as executor:
            slides = list(executor.map(job, range(n_slides)))

    for s in slides:
        geojson = out / f"{s.slide_id}.lesions.geojson"
        if s.label:
            _write_text_atomic(geojson, json.dumps(s.lesion_geojson()))
        else:
            geojson.unlink(missing_ok=True)
    _write_text_atomic(out / "cells.csv", _csv_text(
        ("slide_id", "x", "y", "label", "source"),
        ((s.slide_id, int(x), int(y), int(lab), src) for s in slides
         for (x, y), lab, src in zip(s.cell_xy, s.cell_label, s.cell_source)),
    ))
    _write_text_atomic(out / "slides.csv", _csv_text(
        ("slide_id", "label", "width", "height", "mpp", "levels", "seed", "n_cells", "n_tumour_cells", "lesion_area_um2"),
        ((s.slide_id, s.label, s.dimensions[0], s.dimensions[1], s.mpp, ";".join(map(str, s.level_downsamples)), s.seed,
          s.n_cells, s.n_tumour_cells, round(s.lesions.area * s.mpp**2, 3)) for s in slides),
    ))
    _write_text_atomic(out / "labels.csv", _csv_text(("slide_id", "label"), ((s.slide_id, s.label) for s in slides)))
    return slides


def load_mosaic_dataset(out_dir: str | os.PathLike[str]) -> list[MosaicSlide]:
    """Read back what :func:`make_mosaic_dataset` wrote (``slides.csv`` and ``cells.csv``) as
    :class:`MosaicSlide` objects, in ``slides.csv`` order, without opening the TIFFs."""
    out = Path(os.fspath(out_dir))
    for name in ("slides.csv", "cells.csv"):
        if not (out / name).is_file():
            raise FileNotFoundError(f"{out / name} does not exist; is {out} a folder written by make_mosaic_dataset?")
    with open(out / "cells.csv", newline="", encoding="utf-8") as f:
        cells: dict[str, list[tuple[int, int, int, str]]] = {}
        for row in csv.DictReader(f):
            cells.setdefault(row["slide_id"], []).append((int(row["x"]), int(row["y"]), int(row["label"]), row["source"]))
    slides = []
    with open(out / "slides.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            rows = cells.get(row["slide_id"], [])
            xy = np.array([(x, y) for x, y, _, _ in rows], np.int64).reshape(-1, 2)
            lab = np.array([v for _, _, v, _ in rows], np.int8)
            slides.append(MosaicSlide(
                path=out / f"{row['slide_id']}.tiff",
                slide_id=row["slide_id"],
                label=int(row["label"]),
                mpp=float(row["mpp"]),
                dimensions=(int(row["width"]), int(row["height"])),
                cell_xy=xy,
                cell_label=lab,
                cell_source=tuple(s for _, _, _, s in rows),
                tissue=_cells_geometry(xy),
                lesions=_cells_geometry(xy[lab.astype(bool)]),
                seed=int(row["seed"]),
                level_downsamples=tuple(int(d) for d in row["levels"].split(";")),
            ))
    return slides
