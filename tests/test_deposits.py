"""wsiengine.deposits: smoothing, hysteresis, minimum support, Feret sizes on known shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsiengine.config import RunConfig
from wsiengine.deposits import DepositRules, feret_mm, find_deposits, smooth_on_lattice, tile_lattice
from wsiengine.errors import InputError
from wsiengine.report.findings import node_category, size_category
from wsiengine.tiling import TileGrid

TILE = 100  # level-0 px per tile side
MPP = 1.0  # µm/px: one tile is 0.1 mm


def lattice_grid(cells: list[tuple[int, int]], tile: int = TILE, mpp: float = MPP) -> TileGrid:
    """A grid whose tiles sit at lattice (row, col) ``cells``, ``tile`` px apart, no overlap."""
    index = np.asarray(cells, np.int64).reshape(-1, 2)
    coords = index[:, ::-1] * tile
    rows, cols = (int(index[:, 0].max()) + 1, int(index[:, 1].max()) + 1) if len(index) else (0, 0)
    return TileGrid(coords=coords, tissue_fraction=np.ones(len(index), np.float32), grid_index=index,
                    grid_shape=(rows, cols), target_mpp=mpp, tile_px=tile, overlap_px=0, read_level=0,
                    read_size=(tile, tile), stride_level_px=(tile, tile), tile_size_level0=(float(tile), float(tile)),
                    slide_dimensions=(cols * tile, rows * tile), slide_mpp=(mpp, mpp))


def full_grid(h: int, w: int) -> tuple[TileGrid, dict[tuple[int, int], int]]:
    cells = [(r, c) for r in range(h) for c in range(w)]
    return lattice_grid(cells), {cell: i for i, cell in enumerate(cells)}


def scores_with(n: int, where: dict[int, float], background: float = 0.01) -> np.ndarray:
    p = np.full(n, background)
    for i, v in where.items():
        p[i] = v
    return p


# -- Feret diameters of known shapes -------------------------------------------------------
@pytest.mark.parametrize("cells, expected_mm", [
    ([(0, 0)], math.hypot(0.1, 0.1)),                                   # one tile: its diagonal
    ([(0, 0), (0, 1), (0, 2)], math.hypot(0.3, 0.1)),                   # a bar of three
    ([(0, 0), (1, 0), (2, 0), (2, 1), (2, 2)], math.hypot(0.3, 0.3)),   # an L: corner to corner
    ([(0, 0), (1, 1), (2, 2), (3, 3)], math.hypot(0.4, 0.4)),           # a diagonal chain (8-connected)
    ([(r, c) for r in range(5) for c in range(2)], math.hypot(0.5, 0.2)),  # a 5 x 2 block
])
def test_feret_diameter_of_known_tile_shapes(cells, expected_mm):
    grid = lattice_grid(cells)
    assert feret_mm(grid, np.arange(len(cells)), (MPP, MPP)) == pytest.approx(expected_mm, rel=1e-9)
    found = find_deposits(grid, np.ones(len(cells)), MPP)
    assert found.foci == 1
    assert found.largest_mm == pytest.approx(expected_mm, abs=1e-4)
    assert found.deposits[0].area_mm2 == pytest.approx(len(cells) * 0.01, abs=1e-5)


def test_feret_is_not_the_bounding_box_diagonal():
    # a plus sign of five tiles: bounding box 0.3 x 0.3 mm (diagonal 0.424) but the farthest
    # points are opposite corners of two opposite arms: hypot(0.3, 0.1) = 0.316
    cells = [(0, 1), (1, 0), (1, 1), (1, 2), (2, 1)]
    found = find_deposits(lattice_grid(cells), np.ones(5), MPP)
    assert found.largest_mm == pytest.approx(math.hypot(0.3, 0.1), abs=1e-4)
    assert found.largest_mm < math.hypot(0.3, 0.3) - 0.05


def test_feret_scales_with_anisotropic_mpp():
    grid = lattice_grid([(0, 0), (0, 1), (0, 2)])
    assert feret_mm(grid, np.arange(3), (2.0, 1.0)) == pytest.approx(math.hypot(0.6, 0.1))


def test_size_uncertainty_is_one_tile_side():
    grid = lattice_grid([(0, 0), (0, 1)], tile=96, mpp=0.972)
    found = find_deposits(grid, np.ones(2), 0.972)
    assert found.deposits[0].size_uncertainty_mm == pytest.approx(96 * 0.972 / 1000, abs=1e-4)
    assert found.tile_size_mm == pytest.approx(96 * 0.972 / 1000)


# -- region building -----------------------------------------------------------------------
def test_hysteresis_grows_from_a_seed_and_drops_unseeded_regions():
    grid, at = full_grid(6, 10)
    p = scores_with(len(grid), {at[(1, 1)]: 0.95, at[(1, 2)]: 0.6, at[(1, 3)]: 0.6,   # seeded: grows to 3 tiles
                                at[(4, 7)]: 0.6, at[(4, 8)]: 0.6})                    # no seed: dropped
    found = find_deposits(grid, p, MPP, DepositRules(grow_threshold=0.5, seed_threshold=0.9))
    assert found.foci == 1
    assert sorted(found.deposits[0].tiles.tolist()) == sorted([at[(1, 1)], at[(1, 2)], at[(1, 3)]])
    assert found.largest_mm == pytest.approx(math.hypot(0.3, 0.1), abs=1e-4)
    # a single threshold (seed = grow) keeps both
    assert find_deposits(grid, p, MPP, DepositRules(grow_threshold=0.5, seed_threshold=0.5)).foci == 2


def test_minimum_support_drops_lone_tiles_unless_very_confident():
    grid, at = full_grid(6, 10)
    p = scores_with(len(grid), {at[(1, 1)]: 0.9, at[(1, 2)]: 0.9, at[(4, 7)]: 0.9, at[(4, 2)]: 0.999})
    rules = DepositRules(grow_threshold=0.5, seed_threshold=0.5, min_tiles=2)
    assert find_deposits(grid, p, MPP, rules).foci == 1
    rescued = DepositRules(grow_threshold=0.5, seed_threshold=0.5, min_tiles=2, single_tile_threshold=0.995)
    found = find_deposits(grid, p, MPP, rescued)
    assert found.foci == 2 and {d.tiles.size for d in found.deposits} == {2, 1}
    assert at[(4, 2)] in np.concatenate([d.tiles for d in found.deposits])


def test_smoothing_removes_isolated_tiles_but_keeps_a_deposit_whole():
    grid, at = full_grid(9, 9)
    block = {at[(r, c)]: 0.97 for r in range(2, 6) for c in range(2, 6)}
    p = scores_with(len(grid), {**block, at[(7, 7)]: 0.97}, background=0.02)
    rules = DepositRules(grow_threshold=0.3, seed_threshold=0.7, smoothing=0.5)
    found = find_deposits(grid, p, MPP, rules)
    # the lone tile, averaged with eight normal neighbours, falls to 0.26; the block's corners keep
    # 0.55 and the normal ring around it stays below 0.3
    assert found.foci == 1
    assert sorted(found.deposits[0].tiles.tolist()) == sorted(block)
    assert found.largest_mm == pytest.approx(math.hypot(0.4, 0.4), abs=1e-4)
    assert found.smoothed[at[(7, 7)]] == pytest.approx(1.03 / 4, abs=1e-6)
    # without smoothing the lone tile is a focus of its own
    assert find_deposits(grid, p, MPP, DepositRules(grow_threshold=0.3, seed_threshold=0.7)).foci == 2


def test_smoothing_ignores_missing_neighbours_at_the_tissue_edge():
    # a 2 x 2 tissue island of tumour surrounded by glass (no tiles): nothing dilutes it
    grid = lattice_grid([(5, 5), (5, 6), (6, 5), (6, 6)])
    rows, cols = tile_lattice(grid)
    assert rows.min() == 0 and cols.min() == 0
    smoothed = smooth_on_lattice(np.full(4, 0.8), rows, cols, 1.0)
    np.testing.assert_allclose(smoothed, 0.8)
    # beside one normal tile the edge tile is pulled down, by its weight only
    grid2 = lattice_grid([(0, 0), (0, 1)])
    r2, c2 = tile_lattice(grid2)
    np.testing.assert_allclose(smooth_on_lattice(np.array([1.0, 0.0]), r2, c2, 0.5), [1 / 1.5, 0.5 / 1.5])


def test_ranks_order_deposits_largest_first_and_label_every_tile():
    grid, at = full_grid(8, 12)
    small = {at[(1, 1)]: 0.9}
    large = {at[(5, c)]: 0.9 for c in range(3, 9)}
    found = find_deposits(grid, scores_with(len(grid), {**small, **large}), MPP)
    assert [d.rank for d in found.deposits] == [1, 2]
    assert found.deposits[0].tiles.size == 6 and found.largest_mm > found.deposits[1].largest_mm
    assert set(np.unique(found.tile_deposit)) == {0, 1, 2}
    assert (found.tile_deposit[list(large)] == 1).all() and found.tile_deposit[at[(1, 1)]] == 2
    assert found.total_area_mm2 == pytest.approx(0.07, abs=1e-5)


def test_nan_scores_count_as_normal_and_wrong_lengths_are_refused():
    grid, at = full_grid(3, 3)
    p = np.full(len(grid), np.nan)
    assert find_deposits(grid, p, MPP).foci == 0
    with pytest.raises(InputError, match="one per tile"):
        find_deposits(grid, np.ones(len(grid) + 1), MPP)


def test_an_empty_grid_has_no_deposits():
    found = find_deposits(lattice_grid([]), np.zeros(0), MPP)
    assert found.foci == 0 and found.largest_mm is None and found.total_area_mm2 == 0


# -- rules and configuration ---------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{"grow_threshold": 1.5}, {"seed_threshold": -0.1}, {"smoothing": -1},
                                    {"min_tiles": 0}, {"min_tiles": 2.5}, {"single_tile_threshold": True}])
def test_invalid_rules_are_refused(kwargs):
    with pytest.raises(InputError):
        DepositRules(**kwargs)


def test_rules_recorded_by_an_older_store_are_its_threshold_alone():
    rules = DepositRules.from_recorded({"mil": {"tile_threshold": 0.6}})
    assert rules == DepositRules(grow_threshold=0.6, seed_threshold=0.6, smoothing=0.0, min_tiles=1,
                                 single_tile_threshold=1.0)
    assert DepositRules.from_recorded(None) == DepositRules()
    recorded = {"mil": {"tile_threshold": 0.4, "seed_threshold": 0.8, "smoothing": 0.5, "min_focus_tiles": 2,
                        "single_tile_threshold": 0.99}}
    assert DepositRules.from_recorded(recorded, tile_threshold=0.3).grow_threshold == 0.3
    assert DepositRules.from_recorded(recorded).min_tiles == 2


def test_run_configuration_carries_the_rules():
    config = RunConfig.load(env={}, smoothing=0.5, min_focus_tiles=3, seed_threshold=0.8)
    rules = DepositRules.from_config(config.mil)
    assert (rules.smoothing, rules.min_tiles, rules.seed_threshold) == (0.5, 3, 0.8)


def test_head_rules_fill_only_settings_still_at_their_defaults():
    head = {"grow_threshold": 0.35, "seed_threshold": 0.75, "smoothing": 0.5, "min_tiles": 2,
            "single_tile_threshold": 0.99}
    config = RunConfig.load(env={}, smoothing=0.25).resolve_deposit_rules(head)
    assert config.mil.tile_threshold == 0.35 and config.mil.min_focus_tiles == 2
    assert config.mil.smoothing == 0.25 and config.source("mil.smoothing") == "code"
    assert config.source("mil.seed_threshold").startswith("MIL head")
    from wsiengine.errors import ModelError

    with pytest.raises(ModelError, match="deposit_rules"):
        RunConfig.load(env={}).resolve_deposit_rules({"grow_threshold": 7})


# -- category from deposits ----------------------------------------------------------------
@pytest.mark.parametrize("call, largest, foci, expected", [
    ("no", None, 0, ("negative", False)),
    ("yes", None, 0, ("indeterminate", True)),
    ("indeterminate", None, 0, ("indeterminate", True)),
    ("no", 1.2, 1, ("micrometastasis", False)),       # the deposits decide
    ("yes", 0.08, 1, ("itc", False)),
    ("yes", 0.25, 2, ("micrometastasis", True)),      # within one tile (0.1 mm) of 0.2 mm
    ("yes", 2.05, 1, ("macrometastasis", True)),
    ("yes", 2.5, 1, ("macrometastasis", False)),
])
def test_node_category_follows_the_deposits(call, largest, foci, expected):
    assert node_category(call, largest, foci, tile_mm=0.1) == expected


def test_size_category_boundaries_are_inclusive_as_in_ajcc():
    assert size_category(0.2, tile_mm=0.01)[0] == "itc"
    assert size_category(0.2001, tile_mm=0.01)[0] == "micrometastasis"
    assert size_category(2.0, tile_mm=0.01)[0] == "micrometastasis"
    assert size_category(2.0001, tile_mm=0.01)[0] == "macrometastasis"


# -- rules from slide labels only (train-mil heads) ----------------------------------------
def test_rules_from_slide_labels_bound_false_foci_on_negative_slides():
    from wsiengine.deposits import rules_from_slide_labels

    rng = np.random.default_rng(0)
    grid, at = full_grid(10, 10)
    negatives = [rng.uniform(0, 0.3, len(grid)) for _ in range(10)]
    for k, s in enumerate(negatives):
        s[at[(5, 5)]] = 0.5 + 0.04 * k  # one tumour-like tile per negative slide, of rising score
    positive = scores_with(len(grid), {at[(r, c)]: 0.95 for r in range(2, 6) for c in range(2, 6)}, background=0.1)
    rules = rules_from_slide_labels([grid] * 11, negatives + [positive], [0] * 10 + [1])
    assert rules.smoothing == 0.5 and rules.grow_threshold <= rules.seed_threshold
    with_focus = sum(find_deposits(grid, s, MPP, rules).foci > 0 for s in negatives)
    assert with_focus <= 1  # the 90th-percentile negative slide and below hold no seed
    found = find_deposits(grid, positive, MPP, rules)
    assert found.foci == 1 and found.deposits[0].tiles.size >= 16  # the deposit is filled, not just its peak
    with pytest.raises(InputError, match="negative"):
        rules_from_slide_labels([grid], [positive], [1])
