"""Patient-level pN staging from per-node findings, by the CAMELYON17 rules.

>>> patients = read_patients("patients.csv")             # {"patient_000": ["patient_000_node_0", ...], ...}
>>> stages = stage_patients(patients, "results/")        # each node's SLIDE_ID.report.json
>>> stages[0].pn_stage, stages[0].n_positive, stages[0].missing
>>> write_stages(stages, "stages.csv"); write_patient_reports(stages, "results/patients/")

A node's category is its report's ``findings.category.code``: ``negative``, ``itc`` (largest
deposit <= 0.2 mm), ``micrometastasis`` (> 0.2 and <= 2 mm), ``macrometastasis`` (> 2 mm) or
``indeterminate``. The patient's stage (:func:`pn_stage`, CAMELYON17's simplification of AJCC 8):

* ``pN0``: no ITC, micro- or macrometastasis;
* ``pN0(i+)``: only ITCs (ITC-only nodes are not positive nodes);
* ``pN1mi``: micrometastases, no macrometastasis;
* ``pN1``: 1-3 positive nodes (micro or macro), at least one macrometastasis;
* ``pN2``: 4-9 positive nodes, at least one macrometastasis;
* ``pN3``: 10 or more positive nodes with a macrometastasis (AJCC; beyond CAMELYON17's 5 nodes).

A patient with a node missing from the results is ``incomplete`` (the missing slides named),
never a silent ``pN0``. An ``indeterminate`` node is staged as negative and named in
``uncertain``, so the stage says which nodes a pathologist must review.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write
from .errors import ConfigError, ReportError
from .report import DISCLAIMER, validate_report

__all__ = ["PN_STAGES", "INCOMPLETE", "NodeResult", "PatientStage", "pn_stage", "read_patients", "read_node",
           "stage_patients", "write_stages", "write_patient_reports", "STAGE_COLUMNS"]

PN_STAGES = ("pN0", "pN0(i+)", "pN1mi", "pN1", "pN2", "pN3")
INCOMPLETE = "incomplete"
#: Node categories a report may give; the first four are staged, ``indeterminate`` counts as negative.
NODE_CATEGORIES = ("negative", "itc", "micrometastasis", "macrometastasis", "indeterminate")
STAGE_COLUMNS = ("patient_id", "pn_stage", "n_nodes", "n_positive", "n_macro", "n_micro", "n_itc", "n_negative",
                 "missing", "uncertain", "largest_mm")
#: An id (patient or slide) names files: one safe file-name component.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
#: Limits on a patients file read from anywhere.
MAX_PATIENTS_BYTES = 16 << 20
MAX_REPORT_BYTES = 32 << 20


def pn_stage(categories: Sequence[str]) -> str:
    """The pN stage of one patient from its nodes' categories (module docstring rules)."""
    unknown = sorted(set(categories) - set(NODE_CATEGORIES))
    if unknown:
        raise ConfigError(f"unknown node categories {unknown}; expected {', '.join(NODE_CATEGORIES)}")
    macro = sum(c == "macrometastasis" for c in categories)
    positive = macro + sum(c == "micrometastasis" for c in categories)
    if macro:
        return "pN1" if positive <= 3 else "pN2" if positive <= 9 else "pN3"
    if positive:
        return "pN1mi"
    if "itc" in categories:
        return "pN0(i+)"
    return "pN0"


@dataclass(frozen=True)
class NodeResult:
    """One node (slide) of a patient, as its report says.

    ``category`` is the report's code; ``largest_mm`` the largest deposit (mm) or None;
    ``probability`` the slide's metastasis probability; ``low_confidence`` the report's flag for
    a size near a category boundary; ``evidence`` up to three (x, y) level-0 px of the top tiles.
    """

    slide_id: str
    category: str
    largest_mm: float | None = None
    foci: int = 0
    total_area_mm2: float = 0.0
    probability: float | None = None
    low_confidence: bool = False
    evidence: tuple[tuple[int, int], ...] = ()
    report: str | None = None


@dataclass(frozen=True)
class PatientStage:
    """A patient's pN stage and the nodes behind it; ``missing``: slides without a result."""

    patient_id: str
    pn_stage: str
    nodes: tuple[NodeResult, ...]
    missing: tuple[str, ...] = ()
    uncertain: tuple[str, ...] = field(default=())

    def _count(self, category: str) -> int:
        return sum(n.category == category for n in self.nodes)

    @property
    def n_nodes(self) -> int:
        return len(self.nodes) + len(self.missing)

    @property
    def n_macro(self) -> int:
        return self._count("macrometastasis")

    @property
    def n_micro(self) -> int:
        return self._count("micrometastasis")

    @property
    def n_itc(self) -> int:
        return self._count("itc")

    @property
    def n_positive(self) -> int:
        """Nodes with a micro- or macrometastasis (ITC-only nodes are not positive)."""
        return self.n_macro + self.n_micro

    @property
    def largest_mm(self) -> float | None:
        sizes = [n.largest_mm for n in self.nodes if n.largest_mm is not None and n.category != "negative"]
        return max(sizes) if sizes else None

    def to_row(self) -> dict[str, Any]:
        """One ``STAGES.csv`` row (:data:`STAGE_COLUMNS`)."""
        largest = self.largest_mm
        return {"patient_id": self.patient_id, "pn_stage": self.pn_stage, "n_nodes": self.n_nodes,
                "n_positive": self.n_positive, "n_macro": self.n_macro, "n_micro": self.n_micro, "n_itc": self.n_itc,
                "n_negative": self._count("negative") + self._count("indeterminate"),
                "missing": ";".join(self.missing), "uncertain": ";".join(self.uncertain),
                "largest_mm": "" if largest is None else f"{largest:.3f}"}

    def to_dict(self) -> dict[str, Any]:
        """The patient report's JSON document."""
        return {"format": "wsiengine.patient_stage", "format_version": 1, **self.to_row(),
                "missing": list(self.missing), "uncertain": list(self.uncertain),
                "nodes": [{"slide_id": n.slide_id, "category": n.category, "largest_mm": n.largest_mm, "foci": n.foci,
                           "total_area_mm2": n.total_area_mm2, "probability": n.probability,
                           "low_confidence": n.low_confidence, "evidence": [list(e) for e in n.evidence],
                           "report": n.report} for n in self.nodes],
                "rules": "CAMELYON17: ITC-only nodes are not positive; pN1 = 1-3 positive nodes with at least one "
                         "macrometastasis; pN2 = 4-9; pN1mi = micrometastases only; pN0(i+) = ITCs only",
                "disclaimer": DISCLAIMER}


def _check_id(value: str, what: str, where: str) -> str:
    if not _ID.fullmatch(value) or value in (".", ".."):
        raise ConfigError(f"{where}: {what} {value!r} is not an id of letters, digits, '.', '_' and '-' "
                          "(at most 200, starting with a letter or digit)")
    return value


def read_patients(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """``PATIENTS.csv`` (columns ``patient_id,slide_id``, one row per node) -> ``{patient: [slide ids]}``,
    patients and their nodes in file order. ConfigError for a missing column, an unsafe id, an
    empty file, or a slide listed twice."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_PATIENTS_BYTES:
            raise ConfigError(f"'{path}' is larger than {MAX_PATIENTS_BYTES >> 20} MiB; is it a patients table?")
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"cannot read the patients table '{path}': {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"'{path}' is not UTF-8 text; write PATIENTS.csv with columns patient_id,slide_id") from None
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"patient_id", "slide_id"} <= {f.strip() for f in reader.fieldnames}:
        raise ConfigError(f"'{path}' needs the columns patient_id,slide_id (found {reader.fieldnames})")
    patients: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for line, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if isinstance(v, str) or v is None}
        patient = _check_id(row.get("patient_id", ""), "patient_id", f"{path.name} line {line}")
        slide = _check_id(row.get("slide_id", ""), "slide_id", f"{path.name} line {line}")
        if slide in owner:
            raise ConfigError(f"{path.name} line {line}: slide {slide!r} is listed twice "
                              f"(patients {owner[slide]!r} and {patient!r})")
        owner[slide] = patient
        patients.setdefault(patient, []).append(slide)
    if not patients:
        raise ConfigError(f"'{path}' lists no patients")
    return patients


def read_node(results_dir: str | os.PathLike[str], slide_id: str) -> NodeResult | None:
    """The node result of ``slide_id`` from ``RESULTS_DIR/SLIDE_ID.report.json`` (validated
    against the report schema), or None when that file does not exist. ReportError when it
    exists but is not a valid report, or names another slide."""
    _check_id(slide_id, "slide_id", "node")
    folder = Path(results_dir)
    path = folder / f"{slide_id}.report.json"
    if not path.is_file():
        return None
    if path.resolve().parent != folder.resolve():
        raise ReportError(f"'{path}' leads outside the results folder; refusing to read it")
    if path.stat().st_size > MAX_REPORT_BYTES:
        raise ReportError(f"'{path}' is larger than {MAX_REPORT_BYTES >> 20} MiB; not a report")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ReportError(f"cannot read the report '{path}': {exc}") from None
    if not isinstance(document, dict):
        raise ReportError(f"'{path}' is not a report (a JSON object)")
    try:
        validate_report(document)
    except ReportError as exc:
        raise ReportError(f"'{path}': {exc}") from None
    recorded = document["slide"]["slide_id"]
    if recorded != slide_id:
        raise ReportError(f"'{path}' is the report of slide {recorded!r}, not {slide_id!r}")
    findings = document["findings"]
    deposits = findings["deposits"]
    evidence = tuple((int(e["x"]), int(e["y"])) for e in findings.get("evidence", [])[:3]
                     if isinstance(e, Mapping) and isinstance(e.get("x"), (int, float)) and isinstance(e.get("y"), (int, float)))
    return NodeResult(slide_id=slide_id, category=findings["category"]["code"], largest_mm=deposits.get("largest_mm"),
                      foci=int(deposits.get("foci", 0)), total_area_mm2=float(deposits.get("total_area_mm2", 0.0)),
                      probability=findings["metastasis"].get("probability"),
                      low_confidence=bool(findings["category"].get("low_confidence", False)),
                      evidence=evidence, report=path.name)


def stage_patients(patients: Mapping[str, Sequence[str]], results_dir: str | os.PathLike[str]) -> list[PatientStage]:
    """Each patient's :class:`PatientStage` from the node reports in ``results_dir``; a patient
    with a missing node is ``incomplete`` (its ``missing`` names the slides)."""
    stages = []
    for patient, slides in patients.items():
        nodes, missing = [], []
        for slide in slides:
            node = read_node(results_dir, slide)
            (missing.append(slide) if node is None else nodes.append(node))
        uncertain = tuple(n.slide_id for n in nodes if n.category == "indeterminate" or n.low_confidence)
        stage = INCOMPLETE if missing else pn_stage([n.category for n in nodes])
        stages.append(PatientStage(patient, stage, tuple(nodes), tuple(missing), uncertain))
    return stages


def write_stages(stages: Sequence[PatientStage], path: str | os.PathLike[str]) -> Path:
    """``STAGES.csv``: one row per patient (:data:`STAGE_COLUMNS`), written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=STAGE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for stage in stages:  # no cell needs formula escaping: ids start with a letter or digit (read_patients)
        writer.writerow(stage.to_row())
    path = Path(path)
    with atomic_write(path) as fh:
        fh.write(buffer.getvalue().encode("utf-8"))
    return path


def write_patient_reports(stages: Sequence[PatientStage], folder: str | os.PathLike[str]) -> list[Path]:
    """``folder/PATIENT_ID.patient.md`` and ``.patient.json`` per patient (atomic); returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for stage in stages:
        document = stage.to_dict()
        for suffix, data in ((".patient.json", json.dumps(document, indent=2)), (".patient.md", render_patient(stage))):
            path = folder / f"{stage.patient_id}{suffix}"
            with atomic_write(path) as fh:
                fh.write(data.encode("utf-8"))
            written.append(path)
    return written


def render_patient(stage: PatientStage) -> str:
    """A patient report in Markdown: the stage, each node's category and evidence, the disclaimer."""
    lines = [f"# Patient {stage.patient_id}: {stage.pn_stage}", ""]
    if stage.missing:
        lines += [f"**Incomplete:** no result for {', '.join(stage.missing)}; the stage needs every node.", ""]
    if stage.uncertain:
        lines += [f"**Review:** {', '.join(stage.uncertain)} (indeterminate, or a deposit near a size boundary); "
                  "indeterminate nodes are staged as negative.", ""]
    lines += [f"{stage.n_nodes} nodes: {stage.n_macro} macrometastasis, {stage.n_micro} micrometastasis, "
              f"{stage.n_itc} ITC only; {stage.n_positive} positive (ITC-only nodes are not positive).", "",
              "| node | category | largest deposit | foci | probability | evidence (level-0 px) | report |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for n in stage.nodes:
        size = "-" if n.largest_mm is None else f"{n.largest_mm:.2f} mm" + (" (near a boundary)" if n.low_confidence else "")
        prob = "-" if n.probability is None else f"{n.probability:.3f}"
        evidence = ", ".join(f"({x}, {y})" for x, y in n.evidence) or "-"
        lines.append(f"| {n.slide_id} | {n.category} | {size} | {n.foci} | {prob} | {evidence} | {n.report or '-'} |")
    for slide in stage.missing:
        lines.append(f"| {slide} | missing | - | - | - | - | - |")
    lines += ["", "Rules (CAMELYON17): ITC-only nodes are not positive; pN1 = 1-3 positive nodes with at least one "
              "macrometastasis; pN2 = 4-9; pN1mi = micrometastases only; pN0(i+) = ITCs only.", "", f"*{DISCLAIMER}*", ""]
    return "\n".join(lines)
