"""Patient pN staging (CAMELYON17 rules) from node reports; node/patient agreement metrics."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from wsiengine.cli import main
from wsiengine.errors import ConfigError, InputError, ReportError
from wsiengine.evaluate import NODE_LABELS, PN_LABELS, confusion_matrix, quadratic_weighted_kappa
from wsiengine.staging import (INCOMPLETE, pn_stage, read_node, read_patients, stage_patients, write_patient_reports,
                               write_stages)

NEG, ITC, MICRO, MACRO, IND = "negative", "itc", "micrometastasis", "macrometastasis", "indeterminate"
SIZES = {NEG: None, ITC: 0.1, MICRO: 1.0, MACRO: 3.0, IND: None}


# --- the rules, on every boundary ----------------------------------------------------------------

@pytest.mark.parametrize("nodes, expected", [
    ([], "pN0"),
    ([NEG] * 5, "pN0"),
    ([NEG, IND, NEG], "pN0"),                               # indeterminate staged as negative (and named)
    ([ITC], "pN0(i+)"),
    ([ITC, ITC, NEG, NEG, NEG], "pN0(i+)"),                 # ITC-only nodes are not positive
    ([MICRO], "pN1mi"),
    ([MICRO] * 5, "pN1mi"),                                 # micrometastases only, however many
    ([MICRO, ITC, ITC], "pN1mi"),
    ([MACRO], "pN1"),
    ([MACRO, MICRO, MICRO], "pN1"),                         # 3 positive nodes: still pN1
    ([MACRO, ITC, ITC, ITC, ITC], "pN1"),                   # ITCs do not make it pN2
    ([MACRO, MICRO, MICRO, MICRO], "pN2"),                  # 4 positive nodes
    ([MACRO] * 5, "pN2"),
    ([MACRO] + [MICRO] * 8, "pN2"),                         # 9 positive nodes
    ([MACRO] + [MICRO] * 9, "pN3"),                         # 10: AJCC pN3, beyond CAMELYON17's five nodes
])
def test_pn_stage_rules(nodes, expected):
    assert pn_stage(nodes) == expected
    assert pn_stage(list(reversed(nodes))) == expected


def test_pn_stage_refuses_unknown_categories():
    with pytest.raises(ConfigError, match="unknown node categories"):
        pn_stage(["negative", "metastasis"])


# --- the patients table --------------------------------------------------------------------------

def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "patient_id,slide_id") -> Path:
    path.write_text(header + "\n" + "".join(f"{p},{s}\n" for p, s in rows), encoding="utf-8")
    return path


def test_read_patients_keeps_file_order(tmp_path):
    path = write_csv(tmp_path / "p.csv", [("p1", "n3"), ("p0", "n1"), ("p1", "n2")])
    assert read_patients(path) == {"p1": ["n3", "n2"], "p0": ["n1"]}
    path.write_text("\ufeffslide_id,patient_id\nb,x\n", encoding="utf-8")  # BOM, other column order
    assert read_patients(path) == {"x": ["b"]}


@pytest.mark.parametrize("rows, header, message", [
    ([("p", "n")], "patient,slide", "needs the columns patient_id,slide_id"),
    ([], "patient_id,slide_id", "lists no patients"),
    ([("p", "../etc/passwd")], "patient_id,slide_id", "is not an id"),
    ([("p", "/abs")], "patient_id,slide_id", "is not an id"),
    (([("..", "n")]), "patient_id,slide_id", "is not an id"),
    ([("p", "")], "patient_id,slide_id", "is not an id"),
    ([("p", "n"), ("q", "n")], "patient_id,slide_id", "listed twice"),
])
def test_read_patients_refuses_bad_tables(tmp_path, rows, header, message):
    with pytest.raises(ConfigError, match=message):
        read_patients(write_csv(tmp_path / "p.csv", rows, header))


def test_read_patients_refuses_binary_and_missing_files(tmp_path):
    (tmp_path / "b.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_patients(tmp_path / "b.csv")
    with pytest.raises(ConfigError, match="cannot read"):
        read_patients(tmp_path / "absent.csv")


# --- node reports from a real run ---------------------------------------------------------------

@pytest.fixture(scope="module")
def real_report(tmp_path_factory, cmu_small) -> dict:
    """The report JSON of a real `wsiengine run` of the sample slide."""
    out = tmp_path_factory.mktemp("staged-run")
    assert main(["-q", "run", str(cmu_small), "-o", str(out), "--providers", "cpu"]) == 0
    return json.loads(next(out.glob("*.report.json")).read_text())


CALLS = {NEG: "no", IND: "indeterminate", ITC: "yes", MICRO: "yes", MACRO: "yes"}


def node_report(template: dict, slide_id: str, category: str) -> dict:
    """The real report made into another node's: its id, category, call and largest deposit."""
    doc = json.loads(json.dumps(template))
    doc["slide"]["slide_id"] = slide_id
    doc["findings"]["category"]["code"] = category
    doc["findings"]["metastasis"]["call"] = CALLS[category]
    doc["findings"]["deposits"]["largest_mm"] = SIZES[category]
    doc["findings"]["category"]["low_confidence"] = False
    return doc


def write_nodes(folder: Path, template: dict, nodes: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for slide_id, category in nodes.items():
        (folder / f"{slide_id}.report.json").write_text(json.dumps(node_report(template, slide_id, category)))
    return folder


def test_patients_are_staged_from_their_node_reports(tmp_path, real_report):
    results = write_nodes(tmp_path / "results", real_report, {
        "a0": MACRO, "a1": MICRO, "a2": NEG, "a3": ITC, "a4": NEG,          # pN1
        "b0": MACRO, "b1": MACRO, "b2": MICRO, "b3": MICRO, "b4": NEG,      # pN2
        "c0": ITC, "c1": NEG, "c2": NEG, "c3": NEG, "c4": NEG,              # pN0(i+)
        "d0": MICRO, "d1": IND, "d2": NEG, "d3": NEG, "d4": NEG,            # pN1mi, d1 to review
    })
    patients = {p: [f"{p}{i}" for i in range(5)] for p in "abcd"}
    stages = {s.patient_id: s for s in stage_patients(patients, results)}
    assert {p: s.pn_stage for p, s in stages.items()} == {"a": "pN1", "b": "pN2", "c": "pN0(i+)", "d": "pN1mi"}
    a = stages["a"]
    assert (a.n_nodes, a.n_positive, a.n_macro, a.n_micro, a.n_itc) == (5, 2, 1, 1, 1)
    assert a.largest_mm == 3.0 and not a.missing
    assert stages["d"].uncertain == ("d1",)
    node = read_node(results, "a0")
    assert node.category == MACRO and node.report == "a0.report.json"
    assert node.probability == real_report["findings"]["metastasis"]["probability"]
    assert len(node.evidence) == min(3, len(real_report["findings"]["evidence"]))


def test_a_missing_node_makes_the_patient_incomplete_never_pn0(tmp_path, real_report):
    results = write_nodes(tmp_path / "results", real_report, {"n0": NEG, "n1": NEG, "n3": NEG})
    (stage,) = stage_patients({"p": ["n0", "n1", "n2", "n3"]}, results)
    assert stage.pn_stage == INCOMPLETE and stage.missing == ("n2",) and stage.n_nodes == 4
    row = stage.to_row()
    assert row["pn_stage"] == "incomplete" and row["missing"] == "n2"


def test_a_report_of_another_slide_or_a_damaged_one_is_refused(tmp_path, real_report):
    results = write_nodes(tmp_path / "results", real_report, {"n0": NEG})
    shutil.copy(results / "n0.report.json", results / "n1.report.json")  # names slide n0
    with pytest.raises(ReportError, match="report of slide 'n0', not 'n1'"):
        read_node(results, "n1")
    (results / "n2.report.json").write_text('{"format": "x"')
    with pytest.raises(ReportError, match="cannot read the report"):
        read_node(results, "n2")
    bad = node_report(real_report, "n3", NEG)
    bad["findings"]["category"]["code"] = "pN2"
    (results / "n3.report.json").write_text(json.dumps(bad))
    with pytest.raises(ReportError, match="does not match its schema"):
        read_node(results, "n3")
    (results / "n4.report.json").symlink_to(tmp_path / "elsewhere.json")
    (tmp_path / "elsewhere.json").write_text(json.dumps(node_report(real_report, "n4", NEG)))
    with pytest.raises(ReportError, match="outside the results folder"):
        read_node(results, "n4")


def test_stages_csv_and_patient_reports(tmp_path, real_report):
    results = write_nodes(tmp_path / "results", real_report, {"x0": MACRO, "x1": NEG, "y0": NEG})
    stages = stage_patients({"x": ["x0", "x1"], "y": ["y0", "y1"]}, results)
    write_stages(stages, tmp_path / "stages.csv")
    rows = list(csv.DictReader((tmp_path / "stages.csv").open()))
    assert [(r["patient_id"], r["pn_stage"], r["n_nodes"], r["n_positive"], r["n_macro"]) for r in rows] == [
        ("x", "pN1", "2", "1", "1"), ("y", "incomplete", "2", "0", "0")]
    assert {"patient_id", "pn_stage", "n_nodes", "n_positive", "n_macro", "n_micro", "n_itc"} <= set(rows[0])
    paths = write_patient_reports(stages, tmp_path / "patients")
    assert sorted(p.name for p in paths) == ["x.patient.json", "x.patient.md", "y.patient.json", "y.patient.md"]
    md = (tmp_path / "patients" / "x.patient.md").read_text()
    assert "# Patient x: pN1" in md and "| x0 | macrometastasis | 3.00 mm" in md and "Not for diagnostic use" in md
    doc = json.loads((tmp_path / "patients" / "y.patient.json").read_text())
    assert doc["pn_stage"] == "incomplete" and doc["missing"] == ["y1"] and doc["disclaimer"]
    assert "Incomplete" in (tmp_path / "patients" / "y.patient.md").read_text()


def test_stage_command_and_run_with_patients(tmp_path, real_report, cmu_small, capsys):
    results = write_nodes(tmp_path / "results", real_report, {"p0": MICRO, "p1": NEG, "q0": MACRO})
    patients = write_csv(tmp_path / "patients.csv", [("p", "p0"), ("p", "p1"), ("q", "q0")])
    assert main(["stage", str(results), "--patients", str(patients), "-o", str(tmp_path / "s.csv")]) == 0
    out = capsys.readouterr()
    assert "pN1mi" in out.out and "2 patients staged" in out.err
    assert [r["pn_stage"] for r in csv.DictReader((tmp_path / "s.csv").open())] == ["pN1mi", "pN1"]
    assert (results / "patients" / "p.patient.md").is_file()
    write_csv(patients, [("p", "p0"), ("p", "p9")])
    assert main(["stage", str(results), "--patients", str(patients)]) == 1  # incomplete: exit 1, file still written
    assert next(csv.DictReader((results / "stages.csv").open()))["missing"] == "p9"
    assert main(["stage", str(results), "--patients", str(tmp_path / "absent.csv")]) == 2
    # run --patients stages at the end of the batch
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / cmu_small.name).symlink_to(cmu_small)
    write_csv(patients, [("solo", cmu_small.name.rsplit(".", 1)[0])])
    out_dir = tmp_path / "run"
    assert main(["-q", "run", str(slides), "-o", str(out_dir), "--providers", "cpu", "--patients", str(patients)]) == 0
    (row,) = csv.DictReader((out_dir / "stages.csv").open())
    assert row["patient_id"] == "solo" and row["pn_stage"] in {"pN0", "pN0(i+)", "pN1mi", "pN1"} and row["n_nodes"] == "1"


def test_run_with_patients_stages_an_anonymized_run_through_its_private_map(tmp_path, cmu_small, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / cmu_small.name).symlink_to(cmu_small)
    original = cmu_small.name.rsplit(".", 1)[0]
    patients = write_csv(tmp_path / "patients.csv", [("solo", original)])
    out_dir = tmp_path / "anon"
    assert main(["-q", "run", str(slides), "-o", str(out_dir), "--providers", "cpu", "--anonymize-ids",
                 "--patients", str(patients)]) == 0
    (row,) = csv.DictReader((out_dir / "stages.csv").open())
    assert row["pn_stage"] != "incomplete" and row["n_nodes"] == "1" and not row["missing"]
    for path in [out_dir / "stages.csv", *(out_dir / "patients").iterdir()]:
        assert original not in path.read_text(), path  # the results folder names the anonymous id only
    id_map = out_dir / "private" / "slide-ids.csv"
    assert main(["stage", str(out_dir), "--patients", str(patients), "--id-map", str(id_map),
                 "-o", str(tmp_path / "mapped.csv")]) == 0
    assert main(["stage", str(out_dir), "--patients", str(patients), "-o", str(tmp_path / "unmapped.csv")]) == 1
    assert next(csv.DictReader((tmp_path / "unmapped.csv").open()))["missing"] == original
    assert main(["stage", str(out_dir), "--patients", str(patients), "--id-map", str(tmp_path / "none.csv")]) == 2
    assert "missing or empty" in capsys.readouterr().err


# --- agreement ------------------------------------------------------------------------------------

def test_confusion_matrix_rows_are_truth():
    m = confusion_matrix(["negative", "itc", "itc"], ["negative", "negative", "itc"], NODE_LABELS)
    assert m.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    with pytest.raises(InputError, match="not among"):
        confusion_matrix(["pN9"], ["pN0"], PN_LABELS)
    with pytest.raises(InputError, match="2 true labels but 1"):
        confusion_matrix(["pN0", "pN1"], ["pN0"], PN_LABELS)


def test_quadratic_weighted_kappa_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(20):
        truth = rng.integers(0, 5, 40)
        called = np.where(rng.random(40) < 0.6, truth, rng.integers(0, 5, 40))
        ours = quadratic_weighted_kappa([PN_LABELS[i] for i in truth], [PN_LABELS[i] for i in called], PN_LABELS)
        assert ours == pytest.approx(sklearn.cohen_kappa_score(truth, called, weights="quadratic", labels=range(5)))


def test_quadratic_weighted_kappa_extremes():
    labels = PN_LABELS
    assert quadratic_weighted_kappa(list(labels), list(labels), labels) == 1.0
    assert quadratic_weighted_kappa(["pN0", "pN2"], ["pN2", "pN0"], labels) == pytest.approx(-1.0)
    assert quadratic_weighted_kappa(["pN0"] * 3, ["pN0"] * 3, labels) == 1.0  # no expected disagreement
    near = quadratic_weighted_kappa(["pN0", "pN1", "pN2"], ["pN0", "pN1", "pN1"], labels)
    far = quadratic_weighted_kappa(["pN0", "pN1", "pN2"], ["pN0", "pN1", "pN0"], labels)
    assert 0 < far < near < 1  # a call one stage off costs less than two
