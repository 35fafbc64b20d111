"""benchmarks/camelyon17_reproduce.py, run for real on a tiny stand-in CAMELYON17 folder.

The stand-in has the official layout (training/center_0 ... with patient_NNN_node_N.tif, and
training/stage_labels.csv with the official header, ``.zip`` / ``.tif`` ids and short node
labels) filled with small generated pyramidal TIFFs whose texture is drawn here (pale
sparse-nuclei tissue for negative nodes, dense purple for positive ones), so nothing from
../shared is needed. Three patients: patient_000 (centre 0, complete), patient_001 (centre 0,
node_3's slide absent) and patient_060 (centre 3, node_2's slide corrupt). The script runs the
default pipeline, stages and scores; the figures themselves are not the point, only that the
real pipeline runs end to end, that a node without a result makes its patient ``incomplete``
(never a silent pN0) and is reported, and that bad labels and bad files are refused clearly.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from wsiengine.evaluate import NODE_LABELS, PN_LABELS, quadratic_weighted_kappa

from ._scripts import load_script as _load_script  # noqa: E402
from ._scripts import make_standin_slide, run_main  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "camelyon17_reproduce.py"

#: node labels of the stand-in, as the official file writes them
NODE_TRUTH = {
    "patient_000": ["macro", "micro", "negative", "negative", "negative"],   # pN1
    "patient_001": ["negative", "negative", "itc", "negative", "negative"],  # pN0(i+)
    "patient_060": ["negative"] * 5,                                       # pN0
}
STAGE_TRUTH = {"patient_000": "pN1", "patient_001": "pN0(i+)", "patient_060": "pN0"}
ABSENT = "patient_001_node_3"      # no file
CORRUPT = "patient_060_node_2"     # not a TIFF


def load_script():
    """The script as a module (benchmarks/ is not a package)."""
    return _load_script(SCRIPT)


def make_slide(path: Path, seed: int, tumour: bool) -> None:
    make_standin_slide(path, seed, tumour, side=1280, jitter=40, radii=(380, 480))


def labels_text(truth=NODE_TRUTH, stages=STAGE_TRUTH) -> str:
    rows = ["patient,stage"]
    for patient, labels in truth.items():
        rows.append(f"{patient}.zip,{stages[patient]}")
        rows += [f"{patient}_node_{k}.tif,{label}" for k, label in enumerate(labels)]
    return "\n".join(rows) + "\n"


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("CAMELYON17")
    for patient, labels in NODE_TRUTH.items():
        number = int(patient.split("_")[1])
        folder = root / "training" / f"center_{number // 20}"
        folder.mkdir(parents=True, exist_ok=True)
        for k, label in enumerate(labels):
            node = f"{patient}_node_{k}"
            if node == ABSENT:
                continue
            if node == CORRUPT:
                (folder / f"{node}.tif").write_bytes(b"this is not a TIFF" + bytes(range(256)) * 64)
                continue
            make_slide(folder / f"{node}.tif", seed=10 * number + k, tumour=label != "negative")
    # files a real copy holds beside the slides: ignored
    (root / "training" / "center_0" / "patient_000_node_0.xml").write_text("<ASAP_Annotations/>")
    (root / "training" / "center_0" / "readme.txt").write_text("CC0")
    (root / "training" / "stage_labels.csv").write_text(labels_text())
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def first_run(script, standin, tmp_path_factory):
    """The first two patients of the default (all) split: patient_000 and patient_001."""
    work = tmp_path_factory.mktemp("work")
    rc, out, err, seconds = run_main(script, [str(standin), "--work", str(work), "--limit", "2",
                                              "--providers", "cpu", "--workers", "1"])
    return {"rc": rc, "out": out, "err": err, "work": work, "seconds": seconds}


# -- the real run ----------------------------------------------------------------------------

def test_a_smoke_run_stages_every_patient_and_prints_the_anchors(first_run):
    assert first_run["rc"] == 0, first_run["err"]
    work = first_run["work"]
    nodes = read_csv(work / "per_node.csv")
    expected = [f"{p}_node_{k}" for p in ("patient_000", "patient_001") for k in range(5)]
    assert [n["node_id"] for n in nodes] == expected  # --limit 2: patient_060 is not there
    by_id = {n["node_id"]: n for n in nodes}
    assert by_id["patient_000_node_0"]["truth"] == "macrometastasis"
    assert by_id["patient_000_node_1"]["truth"] == "micrometastasis"
    assert by_id["patient_001_node_2"]["truth"] == "itc"
    assert {n["centre"] for n in nodes} == {"0"} and {n["split"] for n in nodes} == {"tune"}
    for node_id, n in by_id.items():
        if node_id == ABSENT:
            continue
        assert n["status"] == "done", n
        assert n["category"] in ("negative", "itc", "micrometastasis", "macrometastasis", "indeterminate")
        assert n["called"] == ("negative" if n["category"] == "indeterminate" else n["category"])
        assert 0.0 <= float(n["probability"]) <= 1.0
        assert (work / "results" / f"{node_id}.report.json").is_file()  # the engine named it by the node id

    patients = {p["patient_id"]: p for p in read_csv(work / "per_patient.csv")}
    assert list(patients) == ["patient_000", "patient_001"]
    assert patients["patient_000"]["truth"] == "pN1" and patients["patient_001"]["truth"] == "pN0(i+)"
    assert patients["patient_000"]["truth_from_nodes"] == "pN1"
    assert patients["patient_000"]["called"] in PN_LABELS
    assert patients["patient_000"]["agree"] == str(int(patients["patient_000"]["called"] == "pN1"))

    res = json.loads((work / "results.json").read_text())
    s = res["scores"]
    assert isinstance(s["patient_kappa"], float) and -1.0 <= s["patient_kappa"] <= 1.0
    assert isinstance(s["node_kappa"], float) and -1.0 <= s["node_kappa"] <= 1.0
    assert (s["patients_scored"], s["patients"], s["nodes_scored"], s["nodes"]) == (1, 2, 9, 10)
    assert s["node_labels"] == list(NODE_LABELS) + ["no result"]
    assert sum(map(sum, s["node_confusion"])) == 10 and sum(map(sum, s["patient_confusion"])) == 2
    assert s["node_confusion"][0][-1] == 1  # the absent node (truth negative), in the "no result" column
    assert s["itc_nodes"] == 1 and s["itc_scored"] == 1 and s["itc_detected"] in (0, 1)
    assert res["anchors"]["kappa_best_single"] == 0.89 and res["anchors"]["kappa_ensemble"] == 0.93
    assert res["protocol"]["split"] == "all" and res["patients"]["ids"] == ["patient_000", "patient_001"]
    assert res["run"] == {"processed": 9, "resumed": 0, "failed": 0}
    assert res["labels"]["files"][0]["path"].endswith("stage_labels.csv") and not res["labels"]["notes"]

    table = first_run["out"]
    for text in ("patient pN kappa", "0.89 best single algorithm", "0.93 ensemble", "every team < 40%",
                 "node confusion", "patient confusion", "IEEE Transactions on Medical Imaging"):
        assert text in table, text
    assert f"{s['patient_kappa']:.3f}" in table


def test_a_node_without_a_slide_makes_its_patient_incomplete_and_is_reported(first_run):
    work = first_run["work"]
    node = next(n for n in read_csv(work / "per_node.csv") if n["node_id"] == ABSENT)
    assert node["status"] == "missing" and node["called"] == "no result" and node["category"] == ""
    assert "no slide file" in node["error"]
    patient = next(p for p in read_csv(work / "per_patient.csv") if p["patient_id"] == "patient_001")
    assert patient["called"] == "incomplete" and patient["missing"] == ABSENT and patient["agree"] == ""

    stages = {r["patient_id"]: r for r in read_csv(work / "stages.csv")}  # wsiengine.staging.write_stages
    assert stages["patient_001"]["pn_stage"] == "incomplete" and stages["patient_001"]["missing"] == ABSENT
    assert stages["patient_001"]["n_nodes"] == "5"
    assert stages["patient_000"]["pn_stage"] in PN_LABELS and stages["patient_000"]["missing"] == ""
    report = json.loads((work / "patient_reports" / "patient_001.patient.json").read_text())
    assert report["pn_stage"] == "incomplete" and report["missing"] == [ABSENT] and len(report["nodes"]) == 4
    assert "Incomplete" in (work / "patient_reports" / "patient_001.patient.md").read_text()
    assert (work / "patient_reports" / "patient_000.patient.md").is_file()
    with open(work / "patients.csv", newline="") as fh:  # the staging API's input: every evaluated node
        assert len(list(csv.DictReader(fh))) == 10

    res = json.loads((work / "results.json").read_text())
    assert res["scores"]["incomplete"] == {"patient_001": [ABSENT]}
    assert res["scores"]["patient_confusion"][1][-1] == 1  # truth pN0(i+), called incomplete
    out = first_run["out"]
    assert "INCOMPLETE" in out and ABSENT in out.split("INCOMPLETE")[1]
    assert "1/2 patients" in out


def test_a_rerun_resumes_without_running_the_slides_again(first_run, script, standin):
    work = first_run["work"]
    stores = sorted((work / "results").glob("*.zarr"))
    assert len(stores) == 9
    before = {p.name: (p / "zarr.json").stat().st_mtime_ns for p in stores}
    rc, out, err, _ = run_main(script, [str(standin), "--work", str(work), "--limit", "2", "--providers", "cpu",
                                        "--workers", "1", "--quiet"])
    assert rc == 0, err
    assert {p.name: (p / "zarr.json").stat().st_mtime_ns for p in sorted((work / "results").glob("*.zarr"))} == before
    res = json.loads((work / "results.json").read_text())
    assert res["run"] == {"processed": 0, "resumed": 9, "failed": 0}
    assert {r["status"] for r in read_csv(work / "results" / "summary.csv")} == {"skipped"}
    assert {n["status"] for n in read_csv(work / "per_node.csv") if n["node_id"] != ABSENT} == {"skipped"}
    assert "patient pN kappa" in out and "CAMELYON17 at" not in out  # --quiet: the table only


def test_the_test_split_holds_only_the_test_centres_and_a_failed_node_is_counted(script, standin, tmp_path):
    work = tmp_path / "work"
    rc, out, err, _ = run_main(script, [str(standin), "--work", str(work), "--split", "test", "--providers", "cpu",
                                        "--workers", "1"])
    assert rc == 1, err  # the only test-centre patient has a failed node: nothing could be staged
    assert "no patient could be staged" in err
    nodes = {n["node_id"]: n for n in read_csv(work / "per_node.csv")}
    assert sorted(nodes) == [f"patient_060_node_{k}" for k in range(5)]
    assert {n["split"] for n in nodes.values()} == {"test"} and {n["centre"] for n in nodes.values()} == {"3"}
    assert nodes[CORRUPT]["status"] == "failed" and nodes[CORRUPT]["error"]
    assert all(n["status"] == "done" for k, n in nodes.items() if k != CORRUPT)
    assert read_csv(work / "per_patient.csv")[0]["called"] == "incomplete"
    res = json.loads((work / "results.json").read_text())
    assert res["scores"]["patient_kappa"] is None and res["scores"]["patients_scored"] == 0
    assert -1.0 <= res["scores"]["node_kappa"] <= 1.0 and res["scores"]["nodes_scored"] == 4
    assert res["run"]["failed"] == 1
    assert "undefined" in out and CORRUPT in out.split("INCOMPLETE")[1]


# -- slides under ROOT -----------------------------------------------------------------------

def _touch_patient(folder: Path, patient: str, skip: tuple[int, ...] = ()) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(5):
        if k not in skip:
            (folder / f"{patient}_node_{k}.tif").write_bytes(b"x")


def test_a_link_out_of_root_is_refused_and_its_patient_is_incomplete(script, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.tif").write_bytes(b"x")
    folder = root / "training" / "center_0"
    _touch_patient(folder, "patient_000", skip=(0, 1))
    (folder / "patient_000_node_0.tif").symlink_to(outside / "secret.tif")
    (folder / "patient_000_node_1.tif").symlink_to(folder / "patient_000_node_2.tif")  # inside ROOT: fine
    (folder / "patient_000_node_9.tif").mkdir()  # not a node of CAMELYON17's five, and not a file
    files = script.find_node_files(root)
    assert "outside ROOT" in files.refused["patient_000_node_0"]
    assert files.found["patient_000_node_1"] == (folder / "patient_000_node_2.tif").resolve()
    assert "patient_000_node_9" in files.refused and "not a regular file" in files.refused["patient_000_node_9"]

    (root / "training" / "stage_labels.csv").write_text(labels_text({"patient_000": ["negative"] * 5},
                                                                    {"patient_000": "pN0"}))
    for k in range(1, 5):  # no slide to run: only the refused link decides
        os.unlink(folder / f"patient_000_node_{k}.tif")
    rc, out, err, _ = run_main(script, [str(root), "--work", str(tmp_path / "work")])
    assert rc == 1
    nodes = {n["node_id"]: n for n in read_csv(tmp_path / "work" / "per_node.csv")}
    assert nodes["patient_000_node_0"]["status"] == "refused" and "outside ROOT" in nodes["patient_000_node_0"]["error"]
    assert {nodes[f"patient_000_node_{k}"]["status"] for k in range(1, 5)} == {"missing"}
    assert read_csv(tmp_path / "work" / "per_patient.csv")[0]["called"] == "incomplete"
    assert "outside ROOT" in out


def test_a_node_in_another_centres_folder_or_twice_is_a_layout_error(script, tmp_path):
    _touch_patient(tmp_path / "a" / "training" / "center_1", "patient_000")
    with pytest.raises(script.LayoutError, match="center_1, but patient 000 belongs to center_0"):
        script.find_node_files(tmp_path / "a")
    _touch_patient(tmp_path / "b" / "training" / "center_0", "patient_000")
    (tmp_path / "b" / "training" / "center_0" / "PATIENT_000_NODE_1.TIFF").write_bytes(b"x")
    with pytest.raises(script.LayoutError, match="patient_000_node_1 is there twice"):
        script.find_node_files(tmp_path / "b")
    _touch_patient(tmp_path / "c" / "testing" / "patients", "patient_010")
    with pytest.raises(script.LayoutError, match="training patient 010 belongs in training/center_0"):
        script.find_node_files(tmp_path / "c")
    _touch_patient(tmp_path / "d" / "testing" / "patients", "patient_150")
    assert sorted(script.find_node_files(tmp_path / "d").found) == [f"patient_150_node_{k}" for k in range(5)]


def test_a_folder_not_in_the_camelyon17_layout_is_a_clear_error(script, tmp_path):
    (tmp_path / "training" / "normal").mkdir(parents=True)
    rc, _, err, _ = run_main(script, [str(tmp_path), "--work", str(tmp_path / "work")])
    assert rc == 2 and "not a CAMELYON17 copy" in err and "center_0" in err
    assert not (tmp_path / "work").exists()
    rc, _, err, _ = run_main(script, [str(tmp_path / "nowhere"), "--work", str(tmp_path / "work")])
    assert rc == 2 and "is not a folder" in err
    _touch_patient(tmp_path / "training" / "center_0", "patient_000")
    rc, _, err, _ = run_main(script, [str(tmp_path), "--work", str(tmp_path / "work")])
    assert rc == 2 and "no labels file" in err and "--labels" in err


def test_work_slides_holds_only_the_scripts_links(script, tmp_path):
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    folder = tmp_path / "slides"
    script.link_slides({"patient_000_node_0": a, "patient_000_node_1": b}, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["patient_000_node_0.tif", "patient_000_node_1.tif"]
    script.link_slides({"patient_000_node_0": b}, folder)  # a stale link goes, a changed one is remade
    assert [p.name for p in folder.iterdir()] == ["patient_000_node_0.tif"]
    assert (folder / "patient_000_node_0.tif").read_bytes() == b"b"
    (folder / "mine.tif").write_bytes(b"m")
    with pytest.raises(script.LayoutError, match="not a link this script made"):
        script.link_slides({"patient_000_node_0": b}, folder)
    assert (folder / "mine.tif").read_bytes() == b"m"


# -- labels ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("patient_000.zip", ("patient_000", 0, None)),
    ("Patient_042", ("patient_042", 42, None)),
    ("patient_199_node_4.tif", ("patient_199_node_4", 199, 4)),
    (" PATIENT_007_NODE_0.TIFF ", ("patient_007_node_0", 7, 0)),
])
def test_official_ids_are_read_whatever_their_suffix_and_case(script, text, expected):
    assert script.parse_id(text) == expected


@pytest.mark.parametrize("text", ["patient_00", "patient_0000", "patient_000_node_10.tif", "../patient_000.zip",
                                  "patient_000.svs", "patient_000_node_a", "tumor_001", "", "patient_000/node_0"])
def test_other_ids_are_refused(script, text):
    with pytest.raises(ValueError, match="is not a patient id"):
        script.parse_id(text)


def test_labels_map_to_the_engine_categories_and_stages(script):
    assert [script.node_label(w) for w in ("negative", "ITC", "micro", " Macro ", "micrometastasis")] == [
        "negative", "itc", "micrometastasis", "macrometastasis", "micrometastasis"]
    assert [script.stage_label(w) for w in ("pN0", "pn0(i+)", "PN1MI", "pN1", "pN2")] == list(PN_LABELS)
    for bad in ("positive", "isolated", "", "macro-metastasis"):
        with pytest.raises(ValueError, match="unknown node label"):
            script.node_label(bad)
    for bad in ("pN3", "pN0(i-)", "pN1a", "N0"):
        with pytest.raises(ValueError, match="unknown patient stage"):
            script.stage_label(bad)


def test_the_official_labels_file_is_read(script, tmp_path):
    path = tmp_path / "stage_labels.csv"
    path.write_bytes(("\ufeff" + labels_text()).replace("\n", "\r\n").encode("utf-8"))  # BOM, CRLF
    labels = script.read_labels(path)
    assert labels.stages == STAGE_TRUTH
    assert labels.nodes["patient_000_node_0"] == "macrometastasis" and labels.nodes["patient_001_node_2"] == "itc"
    assert len(labels.nodes) == 15 and not labels.notes
    assert labels.sources[0]["patients"] == "3" and len(labels.sources[0]["sha256"]) == 64

    plain = tmp_path / "no_header.csv"
    plain.write_text(labels_text().split("\n", 1)[1])
    assert script.read_labels(plain).stages == STAGE_TRUTH

    more = tmp_path / "test_labels.csv"  # a second file (e.g. the test patients), merged
    more.write_text(labels_text({"patient_150": ["negative", "itc", "negative", "negative", "negative"]},
                                {"patient_150": "pN0(i+)"}))
    merged = script.read_labels(more, into=script.read_labels(path))
    assert set(merged.stages) == set(STAGE_TRUTH) | {"patient_150"} and len(merged.sources) == 2
    with pytest.raises(script.LabelsError, match="patient_150 is listed twice .*earlier labels file"):
        script.read_labels(more, into=merged)

    odd = tmp_path / "inconsistent.csv"  # an official stage its nodes do not give: kept, with a note
    odd.write_text(labels_text({"patient_002": ["negative"] * 5}, {"patient_002": "pN1"}))
    labels = script.read_labels(odd)
    assert labels.stages == {"patient_002": "pN1"} and "node labels give pN0" in labels.notes[0]


BAD_LABELS = {
    "unknown node label": ("patient_000.zip,pN0\n" + "".join(f"patient_000_node_{k}.tif,{'maybe' if k == 2 else 'negative'}\n"
                                                             for k in range(5)), "unknown node label 'maybe'"),
    "unknown stage": (labels_text().replace("patient_001.zip,pN0(i+)", "patient_001.zip,pN7"), "unknown patient stage 'pN7'"),
    "duplicate": (labels_text() + "patient_000_node_1.tif,negative\n", "patient_000_node_1 is listed twice"),
    "bad id": (labels_text() + "../../etc/passwd,negative\n", "'../../etc/passwd' is not a patient id"),
    "node 7": (labels_text() + "patient_000_node_7.tif,negative\n", "nodes 0-4"),
    "patient 250": (labels_text().replace("patient_060", "patient_250"), "patient_250 is not a CAMELYON17 patient"),
    "missing node rows": ("patient,stage\npatient_000.zip,pN0\npatient_000_node_0.tif,negative\n",
                          "patient_000 has a stage but no row for patient_000_node_1"),
    "node without stage": (labels_text() + "".join(f"patient_005_node_{k}.tif,negative\n" for k in range(5)),
                           "patient_005 has no stage row"),
    "stage on a node": (labels_text().replace("patient_000_node_2.tif,negative", "patient_000_node_2.tif,pN0"),
                        "unknown node label 'pN0'"),
    "no label": (labels_text().replace("patient_000_node_2.tif,negative", "patient_000_node_2.tif,"),
                 "needs an id and a label"),
    "empty": ("\n\n", "is empty"),
    "header only": ("patient,stage\n", "labels no patient"),
}


@pytest.mark.parametrize("case", sorted(BAD_LABELS))
def test_a_bad_labels_file_is_a_clear_error_before_anything_runs(script, standin, tmp_path, case):
    text, message = BAD_LABELS[case]
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(script.LabelsError, match=None) as info:
        script.read_labels(path)
    assert message in str(info.value) and str(path) in str(info.value)
    rc, out, err, _ = run_main(script, [str(standin), "--work", str(tmp_path / "work"), "--labels", str(path)])
    assert rc == 2 and message in err and not out
    assert not (tmp_path / "work").exists()  # refused before any slide ran


def test_a_huge_or_binary_labels_file_is_refused(script, tmp_path):
    huge = tmp_path / "huge.csv"
    with open(huge, "wb") as fh:
        fh.truncate(script.MAX_LABELS_BYTES + 1)
    with pytest.raises(script.LabelsError, match="larger than 1024 KiB"):
        script.read_labels(huge)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 100)
    with pytest.raises(script.LabelsError, match="not a CSV text file"):
        script.read_labels(binary)
    with pytest.raises(script.LabelsError, match="is not a file"):
        script.read_labels(tmp_path)


# -- split and scores ------------------------------------------------------------------------

def test_the_split_is_fixed_by_centre(script):
    assert [script.centre_of(n) for n in (0, 19, 20, 59, 60, 99, 100, 199)] == [0, 0, 1, 2, 3, 4, None, None]
    assert [script.split_of(n) for n in (0, 59, 60, 99, 100)] == ["tune", "tune", "test", "test", "test"]
    assert set(script.TUNE_CENTRES).isdisjoint(script.TEST_CENTRES)
    assert set(script.TUNE_CENTRES) | set(script.TEST_CENTRES) == set(script.CENTRES)
    labels = script.Labels(stages={p: "pN0" for p in ("patient_099", "patient_000", "patient_060", "patient_059",
                                                      "patient_120")})
    assert script.select_patients(labels, "all") == ["patient_000", "patient_059", "patient_060", "patient_099",
                                                     "patient_120"]
    assert script.select_patients(labels, "tune") == ["patient_000", "patient_059"]
    assert script.select_patients(labels, "test") == ["patient_060", "patient_099", "patient_120"]
    assert script.select_patients(labels, "test", limit=1) == ["patient_060"]
    assert script.DEFAULT_SPLIT == "all"


def _node(script, patient, k, truth, category, status="done"):
    return script.NodeRow(patient, f"{patient}_node_{k}", 0, "tune", truth, status, category=category)


def test_scores_leave_nodes_without_results_and_incomplete_patients_out_of_the_kappa(script):
    nodes = [_node(script, "patient_000", 0, "macrometastasis", "macrometastasis"),
             _node(script, "patient_000", 1, "itc", "indeterminate"),          # scored as negative: a missed ITC
             _node(script, "patient_001", 0, "itc", "micrometastasis"),        # detected (called positive)
             _node(script, "patient_001", 1, "negative", "", status="failed"),
             _node(script, "patient_002", 0, "negative", "negative")]
    patients = [{"patient_id": "patient_000", "truth": "pN1", "called": "pN1", "missing": ""},
                {"patient_id": "patient_001", "truth": "pN0(i+)", "called": "incomplete", "missing": "patient_001_node_1"},
                {"patient_id": "patient_002", "truth": "pN0", "called": "pN1mi", "missing": ""},
                {"patient_id": "patient_003", "truth": "pN2", "called": "pN2", "missing": ""}]
    s = script.score(nodes, patients)
    assert s["patient_kappa"] == pytest.approx(quadratic_weighted_kappa(["pN1", "pN0", "pN2"], ["pN1", "pN1mi", "pN2"],
                                                                        PN_LABELS))
    assert s["patients_scored"] == 3 and s["patient_accuracy"] == pytest.approx(2 / 3)
    assert s["incomplete"] == {"patient_001": ["patient_001_node_1"]}
    assert s["patient_confusion"][1] == [0, 0, 0, 0, 0, 0, 1]  # pN0(i+) -> incomplete
    assert s["node_kappa"] == pytest.approx(quadratic_weighted_kappa(
        ["macrometastasis", "itc", "itc", "negative"], ["macrometastasis", "negative", "micrometastasis", "negative"],
        NODE_LABELS))
    assert s["nodes_scored"] == 4 and s["indeterminate"] == 1
    assert s["node_confusion"][0] == [1, 0, 0, 0, 1]  # the failed negative node: no result
    assert (s["itc_detected"], s["itc_scored"], s["itc_rate"]) == (1, 2, 0.5)
    assert list(s["unavailable"]) == ["patient_001_node_1"]

    perfect = script.score(nodes[:1], patients[:1])
    assert perfect["patient_kappa"] == 1.0 and perfect["node_kappa"] == 1.0 and perfect["itc_rate"] is None
    none = script.score(nodes[3:4], patients[1:2])
    assert none["patient_kappa"] is None and none["node_kappa"] is None and none["patient_accuracy"] is None


def test_the_protocol_constants_and_anchors(script):
    assert script.PATIENT_STAGES == PN_LABELS and script.NODE_CATEGORIES == NODE_LABELS
    assert len(script.TRAIN_PATIENTS) == 100 and len(script.TEST_PATIENTS) == 100
    assert script.NODES_PER_PATIENT == 5 and script.PATIENTS_PER_CENTRE == 20
    assert (script.ANCHORS["kappa_best_single"], script.ANCHORS["kappa_ensemble"],
            script.ANCHORS["itc_detection_below"]) == (0.89, 0.93, 0.40)
    for text in ("IEEE Transactions on Medical Imaging 38(2):550-560", "training/center_0", "stage_labels.csv",
                 "patient_000_node_0.tif,negative", "--split test", "incomplete"):
        assert text in script.__doc__, text
