"""models/training/fit_deposit_rules.py: Platt fit, the card section, the shipped head's record, a small real run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wsiengine.aggregate import MILHead
from wsiengine.config import RunConfig
from wsiengine.models.training import fit_deposit_rules as fit
from wsiengine.resolve import resolve_config

from .conftest import shared_file


def test_platt_fit_recovers_a_known_calibration():
    rng = np.random.default_rng(0)
    z = rng.normal(scale=2.0, size=50_000)
    labels = rng.random(z.size) < 1 / (1 + np.exp(-(0.6 * z - 1.5)))
    scores = 1 / (1 + np.exp(-z))
    calibration = fit.fit_platt(scores, labels)
    assert calibration.slope == pytest.approx(0.6, abs=0.03) and calibration.intercept == pytest.approx(-1.5, abs=0.05)


def test_platt_fit_stays_finite_on_separable_scores():
    scores = np.r_[np.full(500, 1e-7), np.full(50, 1 - 1e-7)]
    calibration = fit.fit_platt(scores, np.r_[np.zeros(500), np.ones(50)])
    assert np.isfinite([calibration.slope, calibration.intercept]).all() and 0 < calibration.slope <= 100


def test_the_shipped_head_records_its_calibration_and_rules_and_runs_take_them():
    head = MILHead.load("default")
    rules = head.config["deposit_rules"]
    assert head.tile_calibration is not None and "PCam valid" in rules["fitted_on"]
    config = resolve_config(RunConfig.load(env={}))
    assert config.mil.tile_threshold == rules["grow_threshold"] and config.mil.seed_threshold == rules["seed_threshold"]
    assert config.mil.smoothing == rules["smoothing"] and config.mil.min_focus_tiles == rules["min_tiles"]
    assert config.source("mil.smoothing").startswith("MIL head")
    assert config.mil.tile_calibration == head.tile_calibration.describe()
    explicit = resolve_config(RunConfig.load(env={}, tile_threshold=0.45))
    assert explicit.mil.tile_threshold == 0.45 and explicit.key() != config.key()


def test_card_section_is_replaced_not_appended_twice(tmp_path):
    result = {"date": "2026-01-01", "patients": 2, "nodes": 10, "seed": 1, "tiles": 1234, "tumour_tiles": 56,
              "tile_calibration": {"method": "platt", "slope": 0.5, "intercept": -1.0}, "rules_tried": 7,
              "deposit_rules": {"grow_threshold": 0.3, "seed_threshold": 0.6, "smoothing": 0.5, "min_tiles": 1,
                                "single_tile_threshold": 1.0},
              "validation": {"node_kappa": 0.9, "mean_iou": 0.8, "median_size_error": 0.05, "negative_foci_median": 0,
                             "negative_foci_mean": 0.2, "itc_detected": 1, "itc_total": 2},
              "validation_plain_threshold_0.5": {"node_kappa": 0.2, "mean_iou": 0.6, "median_size_error": None,
                                                 "negative_foci_median": 40, "negative_foci_mean": 39.5,
                                                 "itc_detected": 2, "itc_total": 2}}
    card = tmp_path / "card.md"
    card.write_text("# Card\n\ntext\n")
    fit.write_card_section(result, card)
    fit.write_card_section(dict(result, date="2026-02-02"), card)
    text = card.read_text()
    assert text.count(fit.CARD_BEGIN) == 1 and "2026-02-02" in text and "2026-01-01" not in text
    assert text.startswith("# Card\n\ntext\n") and "| node-category kappa (quadratic) | 0.900 | 0.200 |" in text


def test_a_small_validation_run_chooses_rules(tmp_path, capsys):
    shared_file("pcam/valid")
    assert fit.main(["--work", str(tmp_path), "--patients", "3", "--small", "--pcam", str(shared_file("pcam"))]) == 0
    result = json.loads((tmp_path / "deposit_rules.json").read_text())
    assert result["pcam_split"] == "valid" and result["nodes"] == 15 and result["rules_tried"] > 1000
    assert result["validation"]["negative_foci_median"] == 0
    assert 0 < result["tile_calibration"]["slope"] <= 100
    assert result["tumour_tiles"] > 0 and result["tiles"] > result["tumour_tiles"]
