"""``--anonymize-ids`` (issue 13, identifiers policy): outputs a user may share name no patient.

Real runs of the sample slide under a patient-like file name, beside a damaged slide whose
error message would name its file; every byte the run writes outside ``private/`` is searched
for the names.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

import wsiengine as we
from wsiengine.batch.anonymize import ANONYMOUS_ID, RedactingFormatter, anonymize_entries, read_id_map
from wsiengine.batch.discovery import SlideEntry
from wsiengine.cli import main
from wsiengine.errors import ConfigError

PATIENT = "SMITH_JOHN_MRN4471"


@pytest.fixture()
def slides(tmp_path, cmu_small) -> Path:
    """``DOE_JANE/SMITH_JOHN_MRN4471 HE.svs`` (the sample slide) and ``DOE_JANE/ROE_RICHARD.svs`` (not a slide)."""
    folder = tmp_path / "slides" / "DOE_JANE"
    folder.mkdir(parents=True)
    shutil.copy(cmu_small, folder / f"{PATIENT} HE.svs")
    (folder / "ROE_RICHARD.svs").write_bytes(b"II*\x00" + b"\x00" * 64)
    return tmp_path / "slides"


def _shared_bytes(out: Path) -> dict[str, bytes]:
    """Every file of the results folder outside ``private/``, Zarr chunks and metadata included."""
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*")
            if p.is_file() and p.relative_to(out).parts[0] != "private"}


def _assert_no_identifiers(out: Path, names=(PATIENT, "SMITH", "DOE_JANE", "ROE_RICHARD", "MRN4471")) -> None:
    for name, data in _shared_bytes(out).items():
        assert PATIENT not in name and "ROE" not in name, name
        for identifier in names:
            assert identifier.encode() not in data, f"{identifier} in {name}"
            assert identifier.encode("utf-16-le") not in data, f"{identifier} (UTF-16) in {name}"


def test_anonymized_run_names_no_patient_in_any_shared_output(slides, tmp_path):
    out = tmp_path / "results"
    assert main(["run", str(slides), "-o", str(out), "--anonymize-ids", "--workers", "1", "--quiet"]) == 1  # one failed

    rows = list(csv.DictReader((out / "summary.csv").open(encoding="utf-8")))
    assert {r["status"] for r in rows} == {"done", "failed"}
    assert all(ANONYMOUS_ID.fullmatch(r["slide_id"]) and r["path"] == "" for r in rows)
    failed = next(r for r in rows if r["status"] == "failed")
    assert failed["slide_id"] in failed["error"]  # the error names the slide by its anonymous id
    done = next(r for r in rows if r["status"] == "done")
    sid = done["slide_id"]
    for suffix in (".zarr", ".geojson", ".heatmap.png", ".report.json", ".report.md", ".report"):
        assert (out / f"{sid}{suffix}").exists(), suffix
    store = we.open_result(out / f"{sid}.zarr")
    assert store.slide["path"] is None and store.slide["path_from_results"] is None
    assert store.slide["name"] == f"{sid}.svs" and store.attrs["slide_id"] == sid
    report = json.loads((out / f"{sid}.report.json").read_text())
    assert report["slide"]["slide_id"] == sid and report["slide"]["name"] == f"{sid}.svs"
    assert (out / "wsiengine.log").read_text().count(sid) >= 1
    _assert_no_identifiers(out)

    # The private map links ids to files, readable by its owner only.
    id_map = out / "private" / "slide-ids.csv"
    mapping = {r["anonymous_id"]: r for r in csv.DictReader(id_map.open(encoding="utf-8"))}
    assert mapping[sid]["slide_id"] == f"DOE_JANE__{PATIENT} HE"
    assert Path(mapping[sid]["path"]) == (slides / "DOE_JANE" / f"{PATIENT} HE.svs").absolute()
    assert stat.S_IMODE(id_map.stat().st_mode) == 0o600
    assert stat.S_IMODE(id_map.parent.stat().st_mode) == 0o700

    # A rerun keeps every id (the done slide is up to date, the failed one stays failed).
    again = we.run_batch(slides, out, workers=1, anonymize_ids=True)
    assert {r.slide_id: r.status for r in again.rows} == {sid: "skipped", failed["slide_id"]: "failed"}
    _assert_no_identifiers(out)


def test_a_new_slide_gets_a_new_id_and_the_others_keep_theirs(tmp_path):
    id_map = tmp_path / "ids.csv"
    first = anonymize_entries([SlideEntry("a", tmp_path / "a.svs")], id_map)
    second = anonymize_entries([SlideEntry("b", tmp_path / "b.svs"), SlideEntry("A", tmp_path / "A.svs")], id_map)
    assert second[1].slide_id == first[0].slide_id  # ids are unique ignoring case: "A" is "a"
    assert second[0].slide_id != first[0].slide_id and ANONYMOUS_ID.fullmatch(second[0].slide_id)
    assert set(read_id_map(id_map)) == {"a", "b"}


def test_a_tampered_map_row_is_ignored_and_the_slide_gets_a_fresh_id(tmp_path):
    id_map = tmp_path / "ids.csv"
    id_map.write_text("anonymous_id,slide_id,path\n../../etc/passwd,a,/x\nslide-0123456789ab,b,/y\n")
    entries = anonymize_entries([SlideEntry("a", tmp_path / "a.svs"), SlideEntry("b", tmp_path / "b.svs")], id_map)
    assert ANONYMOUS_ID.fullmatch(entries[0].slide_id) and entries[1].slide_id == "slide-0123456789ab"


def test_log_lines_name_the_anonymous_id_not_the_file(tmp_path):
    import logging

    entry = SlideEntry("slide-00000000000a", tmp_path / "x" / "SMITH_J.svs", source_id="x__SMITH_J")
    formatter = RedactingFormatter("%(message)s", [entry])
    record = logging.LogRecord("wsiengine", logging.ERROR, __file__, 1, "cannot open '%s' (%s): %s",
                               (str(entry.path), "SMITH_J.svs", "x__SMITH_J"), None)
    text = formatter.format(record)
    assert "SMITH" not in text and text.count("slide-00000000000a") == 3


def test_pipeline_run_refuses_to_name_outputs_after_the_file_when_anonymizing(tmp_path, cmu_small):
    pipe = we.Pipeline(anonymize_ids=True, report=False)
    with pytest.raises(ConfigError, match="anonymous slide_id"):
        pipe.run(cmu_small, tmp_path / "out")


def test_a_url_target_needs_a_local_map(tmp_path, cmu_small):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(cmu_small, folder / "a.svs")
    with pytest.raises(ConfigError, match="needs id_map"):
        we.run_batch(folder, "memory://anon-results", workers=1, anonymize_ids=True, report=False)
    assert not os.path.exists(tmp_path / "private")


def test_without_the_flag_outputs_do_name_the_file(slides, tmp_path):
    """The search above can fail: a plain run records the names it hides."""
    out = tmp_path / "results"
    main(["run", str(slides), "-o", str(out), "--workers", "1", "--quiet", "--no-report"])
    with pytest.raises(AssertionError):
        _assert_no_identifiers(out)
    assert not (out / "private").exists()
