"""Tumour deposits on the tile lattice: tile probabilities -> smoothed map -> hysteresis regions
with a minimum support -> each deposit's outline and size as a pathologist measures it.

>>> from wsiengine.deposits import DepositRules, find_deposits
>>> found = find_deposits(grid, prediction.tile_scores, slide.mpp, DepositRules.from_config(config.mil))
>>> found.largest_mm, found.foci, found.total_area_mm2
(1.38, 1, 1.27)

The steps (the rules are :class:`DepositRules`, fields of the run configuration's ``mil``
section, chosen on validation nodes by ``python -m wsiengine.models.training.fit_deposit_rules``):

1. **Lattice.** Each tile's (row, column) on the grid's stride lattice (``grid.grid_index``).
2. **Smoothing.** A normalised 3 x 3 convolution over the tiles present: the tile itself weighs 1,
   its edge neighbours ``smoothing``, its corner neighbours ``smoothing / 2``; missing neighbours
   (glass, background) take no part, so a deposit at the tissue edge is not diluted by glass.
   Isolated confident tiles are pulled down by normal neighbours; tiles inside a deposit stay high.
3. **Hysteresis.** A deposit is an 8-connected set of tiles whose smoothed probability is at least
   ``grow_threshold`` that holds at least one tile at ``seed_threshold`` or above.
4. **Support.** A deposit needs ``min_tiles`` tiles, unless one of its tiles has a raw probability
   of at least ``single_tile_threshold`` (a very confident single tile: isolated tumour cells). Such
   a tile is also a seed and a member whatever its smoothed value.

Sizes: the deposit's outline is the union of its tiles' level-0 boxes; its greatest dimension is
the Feret diameter of that outline (the longest distance between two of its points, in mm at the
slide's µm/px), not the diagonal of a bounding box. The deposit's true edge lies somewhere in its
edge tiles or their neighbours, so every size carries an uncertainty of one tile side (half a tile
at each end): ``size_uncertainty_mm``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon

from .errors import InputError
from .geojson import max_diameter, tumour_regions
from .kernels import label_components
from .tiling import TileGrid

__all__ = ["DepositRules", "Deposit", "DepositMap", "find_deposits", "deposit_tiles", "feret_mm", "tile_side_mm", "tile_lattice",
           "smooth_on_lattice", "rules_from_slide_labels"]


@dataclass(frozen=True)
class DepositRules:
    """How tile probabilities become deposits (see the module docstring).

    Attributes
    ----------
    grow_threshold : float
        Smoothed tile probability at or above which a tile may belong to a deposit
        (``mil.tile_threshold``).
    seed_threshold : float
        A deposit holds at least one tile whose smoothed probability is at least this.
    smoothing : float
        Weight of each edge neighbour in the 3 x 3 smoothing (corners weigh half); 0 = none.
    min_tiles : int
        Fewest tiles of a deposit ...
    single_tile_threshold : float
        ... unless a tile of it has a raw probability at least this (1 disables the exception
        for tiles below 1).
    """

    grow_threshold: float = 0.5
    seed_threshold: float = 0.5
    smoothing: float = 0.0
    min_tiles: int = 1
    single_tile_threshold: float = 1.0

    def __post_init__(self) -> None:
        for name in ("grow_threshold", "seed_threshold", "single_tile_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise InputError(f"{name} is a probability in [0, 1], got {value!r}")
        if isinstance(self.smoothing, bool) or not isinstance(self.smoothing, (int, float)) or not 0 <= self.smoothing:
            raise InputError(f"smoothing is a weight >= 0, got {self.smoothing!r}")
        if isinstance(self.min_tiles, bool) or not isinstance(self.min_tiles, int) or self.min_tiles < 1:
            raise InputError(f"min_tiles is a whole number >= 1, got {self.min_tiles!r}")

    @property
    def effective_seed(self) -> float:
        """The seed threshold as applied: a seed is never below the grow threshold."""
        return max(self.seed_threshold, self.grow_threshold)

    @classmethod
    def from_config(cls, mil: Any) -> "DepositRules":
        """The rules of a run's ``mil`` section (:class:`~wsiengine.config.MILConfig`)."""
        return cls(grow_threshold=float(mil.tile_threshold), seed_threshold=float(mil.seed_threshold),
                   smoothing=float(mil.smoothing), min_tiles=int(mil.min_focus_tiles),
                   single_tile_threshold=float(mil.single_tile_threshold))

    @classmethod
    def from_recorded(cls, config: Mapping[str, Any] | None, *, tile_threshold: float | None = None) -> "DepositRules":
        """The rules a result store's run used, from its recorded configuration (``store.config``).

        A store written before the rules existed records only ``tile_threshold``: its rules are
        that threshold alone (no smoothing, any tile a focus), which is what it was measured with.
        ``tile_threshold`` overrides the grow threshold (and a seed below it).
        """
        config = config if isinstance(config, Mapping) else {}
        mil = config.get("mil") if isinstance(config.get("mil"), Mapping) else {}
        grow = float(mil.get("tile_threshold", config.get("tumour_threshold", 0.5)))
        rules = cls(grow_threshold=grow, seed_threshold=float(mil.get("seed_threshold", grow)),
                    smoothing=float(mil.get("smoothing", 0.0)), min_tiles=int(mil.get("min_focus_tiles", 1)),
                    single_tile_threshold=float(mil.get("single_tile_threshold", 1.0)))
        if tile_threshold is not None:
            rules = cls(grow_threshold=float(tile_threshold), seed_threshold=rules.seed_threshold,
                        smoothing=rules.smoothing, min_tiles=rules.min_tiles,
                        single_tile_threshold=rules.single_tile_threshold)
        return rules

    def to_dict(self) -> dict[str, Any]:
        return {"grow_threshold": self.grow_threshold, "seed_threshold": self.seed_threshold,
                "smoothing": self.smoothing, "min_tiles": self.min_tiles,
                "single_tile_threshold": self.single_tile_threshold}


@dataclass(frozen=True, eq=False)
class Deposit:
    """One tumour deposit.

    Attributes
    ----------
    rank : int
        1 for the largest (by greatest dimension, then area), 2 for the next, ...
    tiles : (K,) int64
        Grid rows of its tiles.
    outline : shapely.MultiPolygon
        Union of its tiles' boxes, level-0 pixels (pieces touch at corners when tiles do).
    largest_mm : float
        Greatest dimension (Feret diameter of ``outline``), mm, rounded to 0.1 µm.
    size_uncertainty_mm : float
        ± this on ``largest_mm``: one tile side, mm.
    area_mm2 : float
        Area of ``outline``, mm², rounded to 10 µm². Reports, store attributes and GeoJSON
        measurements all show these rounded values, so they agree exactly.
    max_probability, mean_probability : float
        Over its tiles' raw probabilities (4 decimals).
    """

    rank: int
    tiles: np.ndarray
    outline: MultiPolygon
    largest_mm: float
    size_uncertainty_mm: float
    area_mm2: float
    max_probability: float
    mean_probability: float

    def measurements(self) -> dict[str, float]:
        """What QuPath shows for it (GeoJSON ``measurements``), the same numbers as the report."""
        return {"Max diameter mm": self.largest_mm, "Size uncertainty mm": self.size_uncertainty_mm,
                "Area mm^2": self.area_mm2, "Tiles": int(self.tiles.size), "Max tile score": self.max_probability,
                "Mean tile score": self.mean_probability}

    def to_dict(self) -> dict[str, Any]:
        """The report's entry for it (``deposits.regions``)."""
        return {"rank": self.rank, "max_diameter_mm": self.largest_mm, "size_uncertainty_mm": self.size_uncertainty_mm,
                "area_mm2": self.area_mm2, "tiles": int(self.tiles.size), "max_tile_score": self.max_probability,
                "mean_tile_score": self.mean_probability,
                "bbox_level0": [int(round(v)) for v in self.outline.bounds]}


@dataclass(frozen=True, eq=False)
class DepositMap:
    """The deposits of one slide and the per-tile values they came from.

    Attributes
    ----------
    deposits : list of Deposit
        Largest first.
    tile_deposit : (N,) int32
        Each tile's deposit ``rank`` (0: none).
    smoothed : (N,) float32
        The smoothed tile probabilities.
    rules : DepositRules
    tile_size_mm : float
        Tile side at level 0, mm.
    """

    deposits: list[Deposit]
    tile_deposit: np.ndarray = field(repr=False)
    smoothed: np.ndarray = field(repr=False)
    rules: DepositRules
    tile_size_mm: float

    @property
    def foci(self) -> int:
        return len(self.deposits)

    @property
    def largest_mm(self) -> float | None:
        return self.deposits[0].largest_mm if self.deposits else None

    @property
    def total_area_mm2(self) -> float:
        return round(float(sum(d.area_mm2 for d in self.deposits)), 5)

    def outline(self) -> MultiPolygon:
        """Every deposit's outline in one MultiPolygon (level-0 pixels)."""
        return MultiPolygon([p for d in self.deposits for p in d.outline.geoms])


def tile_lattice(grid: TileGrid) -> tuple[np.ndarray, np.ndarray]:
    """Each tile's (row, column) on the grid's stride lattice (``grid.grid_index``, shifted to
    start at 0), int64."""
    index = np.asarray(grid.grid_index, np.int64).reshape(-1, 2)
    if not len(index):
        return index[:, 0], index[:, 1]
    return index[:, 0] - index[:, 0].min(), index[:, 1] - index[:, 1].min()


def smooth_on_lattice(values: np.ndarray, rows: np.ndarray, cols: np.ndarray, weight: float) -> np.ndarray:
    """Normalised 3 x 3 smoothing of per-tile ``values`` over the tiles present (see the module
    docstring); ``weight`` is each edge neighbour's weight (corners half). Returns float64 (N,)."""
    values = np.asarray(values, np.float64).reshape(-1)
    if weight == 0 or values.size == 0:
        return values.copy()
    h, w = int(rows.max()) + 3, int(cols.max()) + 3
    total = np.zeros((h, w))
    present = np.zeros((h, w))
    total[rows + 1, cols + 1] = values
    present[rows + 1, cols + 1] = 1.0
    num = total.copy()
    den = present.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == 0 and dx == 0:
                continue
            k = weight if (dy == 0 or dx == 0) else weight / 2
            num[1:-1, 1:-1] += k * total[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx]
            den[1:-1, 1:-1] += k * present[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx]
    return num[rows + 1, cols + 1] / den[rows + 1, cols + 1]


def tile_side_mm(grid: TileGrid, mpp: tuple[float, float] | float) -> float:
    """The longer side of one tile at level 0, mm (the size uncertainty of every deposit)."""
    mpp_xy = (float(mpp), float(mpp)) if np.isscalar(mpp) else (float(mpp[0]), float(mpp[1]))
    return max(float(grid.tile_size_level0[0]) * mpp_xy[0], float(grid.tile_size_level0[1]) * mpp_xy[1]) / 1000.0


def deposit_tiles(grid: TileGrid, probabilities: np.ndarray, rules: DepositRules) -> tuple[list[np.ndarray], np.ndarray]:
    """Steps 1-4 of the module docstring: the grid rows of each deposit (unordered) and the
    smoothed probabilities (float64, (N,))."""
    p = np.nan_to_num(np.asarray(probabilities, np.float64).reshape(-1), nan=0.0)
    if p.shape[0] != len(grid):
        raise InputError(f"probabilities has {p.shape[0]} values but the grid has {len(grid)} tiles; pass one per tile")
    if p.size == 0:
        return [], p
    rows, cols = tile_lattice(grid)
    smoothed = smooth_on_lattice(p, rows, cols, rules.smoothing)
    if rules.single_tile_threshold < 1.0:
        confident = p >= rules.single_tile_threshold
    else:
        confident = np.zeros(p.shape, bool)
    member = (smoothed >= rules.grow_threshold) | confident
    seed = (smoothed >= rules.effective_seed) | confident
    if not seed.any():
        return [], smoothed
    lattice = np.zeros((int(rows.max()) + 1, int(cols.max()) + 1), bool)
    lattice[rows[member], cols[member]] = True
    labels, _ = label_components(lattice, connectivity=2)
    tile_label = np.where(member, labels[rows, cols], 0)
    seeded = np.zeros(int(tile_label.max()) + 1, bool)
    seeded[tile_label[seed & member]] = True
    seeded[0] = False
    candidates = np.flatnonzero(seeded[tile_label])  # tiles of seeded components, grouped by label below
    order = candidates[np.argsort(tile_label[candidates], kind="stable")]
    out = []
    for tiles in np.split(order, np.flatnonzero(np.diff(tile_label[order])) + 1) if order.size else []:
        if tiles.size >= rules.min_tiles or confident[tiles].any():
            out.append(tiles)
    return out, smoothed


def feret_mm(grid: TileGrid, tiles: np.ndarray, mpp: tuple[float, float]) -> float:
    """Greatest dimension of the union of the ``tiles``' level-0 boxes, mm: the Feret diameter,
    the longest distance between two of its corners (the union's convex hull is their hull)."""
    b = grid.boxes()[np.asarray(tiles, np.int64)]
    corners = np.concatenate([b[:, [0, 1]], b[:, [2, 1]], b[:, [2, 3]], b[:, [0, 3]]])
    return max_diameter(shapely.multipoints(corners), mpp) / 1000.0


def find_deposits(grid: TileGrid, probabilities: np.ndarray, mpp: tuple[float, float] | float,
                  rules: DepositRules | None = None) -> DepositMap:
    """The tumour deposits of a slide from its tile probabilities (see the module docstring).

    Parameters
    ----------
    grid : TileGrid
    probabilities : (N,) array
        Calibrated tile tumour probabilities (the store's ``tile_scores``); NaN counts as 0.
    mpp : (x, y) or float
        Level-0 µm/px of the slide.
    rules : DepositRules, optional
        Default: ``DepositRules()`` (threshold 0.5, no smoothing, any tile a focus).
    """
    rules = rules or DepositRules()
    mpp_xy = (float(mpp), float(mpp)) if np.isscalar(mpp) else (float(mpp[0]), float(mpp[1]))
    tile_mm = tile_side_mm(grid, mpp_xy)
    groups, smoothed = deposit_tiles(grid, probabilities, rules)
    p = np.nan_to_num(np.asarray(probabilities, np.float64).reshape(-1), nan=0.0)
    found: list[tuple[np.ndarray, MultiPolygon, float, float]] = []
    for tiles in groups:
        outline = tumour_regions(grid.subset(tiles), np.ones(tiles.size), 0.5)
        area_mm2 = float(outline.area) * mpp_xy[0] * mpp_xy[1] / 1e6
        found.append((tiles, outline, feret_mm(grid, tiles, mpp_xy), area_mm2))
    found.sort(key=lambda f: (-f[2], -f[3], int(f[0][0])))
    deposits = []
    tile_deposit = np.zeros(len(grid), np.int32)
    for rank, (tiles, outline, largest, area) in enumerate(found, 1):
        tile_deposit[tiles] = rank
        deposits.append(Deposit(rank, tiles.astype(np.int64), outline, round(largest, 4), round(tile_mm, 4),
                                round(area, 5), round(float(p[tiles].max()), 4), round(float(p[tiles].mean()), 4)))
    return DepositMap(deposits, tile_deposit, smoothed.astype(np.float32), rules, tile_mm)



def rules_from_slide_labels(grids: list[TileGrid], scores: list[np.ndarray], labels: list[int], *,
                            smoothing: float = 0.5, negative_slide_quantile: float = 0.9,
                            negative_tile_quantile: float = 0.99) -> DepositRules:
    """Deposit rules for a head trained with slide labels only (``train-mil``), from its
    validation slides: what can be chosen without a single tile label.

    Every tile of a negative slide is normal, so the negatives bound the false foci:

    - ``seed_threshold`` lies just above the ``negative_slide_quantile`` quantile of the negative
      slides' highest smoothed tile scores (by default about 10 % of them keep a focus);
    - ``grow_threshold`` is the ``negative_tile_quantile`` of the negative slides' smoothed tile
      scores: a deposit grows over tiles more tumour-like than 99 % of normal tiles, which fills
      it beyond the few tiles a MIL tile head fires on.

    Sizes are not calibrated this way (positive slides carry no outline); the head's card says so.
    Raises :class:`~wsiengine.errors.InputError` without a negative slide.
    """
    negative_max, negative_tiles = [], []
    for grid, s, y in zip(grids, scores, labels):
        if int(y) != 0 or not len(grid):
            continue
        rows, cols = tile_lattice(grid)
        smoothed = smooth_on_lattice(np.nan_to_num(np.asarray(s, np.float64), nan=0.0), rows, cols, smoothing)
        negative_max.append(float(smoothed.max()))
        negative_tiles.append(smoothed)
    if not negative_max:
        raise InputError("choosing deposit rules from slide labels needs validation slides labelled negative")
    seed = float(np.quantile(negative_max, negative_slide_quantile))
    seed = float(min(1.0, np.nextafter(seed, 2.0)))
    grow = float(min(seed, np.quantile(np.concatenate(negative_tiles), negative_tile_quantile)))
    return DepositRules(grow_threshold=grow, seed_threshold=seed, smoothing=smoothing, min_tiles=1,
                        single_tile_threshold=1.0)
