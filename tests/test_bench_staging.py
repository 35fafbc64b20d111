"""benchmarks/bench_staging.py and wsiengine.testing.nodes: patient plans, truth from lesion geometry, and a
tiny real run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from wsiengine.staging import pn_stage
from wsiengine.testing.nodes import STAGES, category_of, plan_patients

from ._scripts import load_script
from .conftest import shared_file

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_staging.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT)


def test_planned_patients_have_five_nodes_and_their_target_stage():
    nodes = plan_patients(10, seed=0)
    assert len(nodes) == 50 and len({n.slide_id for n in nodes}) == 50
    for p in range(10):
        planned = [n.planned for n in nodes if n.patient_id == f"patient_{p:03d}"]
        assert len(planned) == 5 and pn_stage(planned) == STAGES[p % 5]
    assert nodes == plan_patients(10, seed=0)


@pytest.mark.parametrize("mm, category", [(None, "negative"), (0.13, "itc"), (0.2, "itc"), (0.21, "micrometastasis"),
                                          (2.0, "micrometastasis"), (2.01, "macrometastasis")])
def test_true_category_from_the_lesion_size(mm, category):
    assert category_of(mm) == category


def test_a_small_run_scores_every_node_and_patient(bench, tmp_path, capsys):
    shared_file("pcam/test")
    assert bench.main(["--work", str(tmp_path), "--patients", "5", "--small", "--pcam",
                       str(shared_file("pcam"))]) == 0
    figures = json.loads((tmp_path / "staging.json").read_text())
    assert figures["nodes"] == 25 and figures["patients"] == 5 and not figures["failed"]
    assert sum(map(sum, figures["node_confusion"])) == 25 and sum(map(sum, figures["patient_confusion"])) == 5
    assert -1 <= figures["node_kappa"] <= 1 and -1 <= figures["patient_kappa"] <= 1
    truth = list(csv.DictReader((tmp_path / "truth.csv").open()))
    for row in truth:  # an ITC is one patch; negatives have no lesion
        if row["planned"] == "itc":
            assert row["true_category"] == "itc" and float(row["true_mm"]) <= 0.2
        if row["planned"] == "negative":
            assert row["true_category"] == "negative" and row["true_mm"] == ""
    assert len(list(csv.DictReader((tmp_path / "results" / "stages.csv").open()))) == 5
    out = capsys.readouterr().out
    assert "patient pN kappa" in out and "0.89 best single algorithm" in out
