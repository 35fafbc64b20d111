"""benchmarks/bench_deposit_rules.py: the measures it prints, on slides with known deposits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import shapely

from wsiengine.deposits import DepositRules

from ._scripts import load_script
from .test_deposits import full_grid

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_deposit_rules.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT)


def test_measure_scores_iou_size_and_negative_foci(bench):
    grid, at = full_grid(10, 10)
    positive = np.full(len(grid), 0.1)
    for r in range(2, 6):
        for c in range(2, 4):
            positive[at[(r, c)]] = 0.9  # a 4 x 2 tile deposit, 0.4 x 0.2 mm at 1 µm/px and 100-px tiles
    lesion = shapely.box(200, 200, 400, 600)  # exactly those tiles
    negative = np.full(len(grid), 0.1)
    negative[at[(8, 8)]] = 0.7
    slides = [{"grid": grid, "scores": positive, "label": 1, "lesion": lesion, "mpp": (1.0, 1.0)},
              {"grid": grid, "scores": negative, "label": 0, "lesion": None, "mpp": (1.0, 1.0)}]
    plain = bench.measure(slides, DepositRules())
    assert plain["mean_iou"] == pytest.approx(1.0) and plain["size_ratio_median"] == pytest.approx(1.0, rel=1e-3)
    assert plain["negative_foci_median"] == 1 and plain["negative_with_focus"] == 1.0
    strict = bench.measure(slides, DepositRules(grow_threshold=0.5, seed_threshold=0.8))
    assert strict["negative_foci_median"] == 0 and strict["mean_iou"] == pytest.approx(1.0)
