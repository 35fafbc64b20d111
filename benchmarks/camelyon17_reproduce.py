"""CAMELYON17 patient-level pN staging with the default pipeline, scored against the official labels.

Runs wsiengine (tissue -> tiles -> encoder -> MIL head -> report -> node category) on every
lymph node of the chosen CAMELYON17 patients, stages each patient by the CAMELYON17 rules
(:mod:`wsiengine.staging`) and prints the quadratic weighted Cohen's kappa on the patients' pN
stages next to the published figures::

    python benchmarks/camelyon17_reproduce.py /data/CAMELYON17 --work /scratch/c17            # all labelled patients
    python benchmarks/camelyon17_reproduce.py /data/CAMELYON17 --work /scratch/c17-gpu --providers cuda
    python benchmarks/camelyon17_reproduce.py /data/CAMELYON17 --work /scratch/c17-mine --mil my_head/ --split test
    python benchmarks/camelyon17_reproduce.py /data/CAMELYON17 --work /tmp/c17-smoke --limit 2         # smoke run

Run it again with the same ``--work`` to resume: nodes whose results are complete (same
settings) are not run again (:func:`wsiengine.batch.run_batch` resumes by itself); staging and
scoring are redone.

Layout (the official distribution, https://camelyon17.grand-challenge.org/Data/, CC0)::

    ROOT/training/center_0/patient_000_node_0.tif ... patient_019_node_4.tif
    ROOT/training/center_1/patient_020_node_0.tif ... patient_039_node_4.tif
    ...
    ROOT/training/center_4/patient_080_node_0.tif ... patient_099_node_4.tif
    ROOT/training/stage_labels.csv    (or ROOT/stage_labels.csv; ``--labels PATH`` overrides)
                                      header ``patient,stage``, then one row per patient and per node:
                                      patient_000.zip,pN0 / patient_000_node_0.tif,negative / ...
    ROOT/testing/patients/patient_100_node_0.tif ... patient_199_node_4.tif   (optional)

100 training patients, 20 per centre (patient number // 20 is the centre), 5 nodes (slides)
each. Node labels are ``negative``, ``itc``, ``micro``, ``macro`` (read as negative, itc,
micrometastasis, macrometastasis; the long names are accepted too); patient stages are ``pN0``,
``pN0(i+)``, ``pN1mi``, ``pN1`` and ``pN2``. Other files in the folders (annotations, archives)
are ignored. The test patients' (100-199) labels were not part of the release; a user who has
them passes them with ``--labels`` (repeatable: ``--labels ROOT/training/stage_labels.csv
--labels test_labels.csv``), and their slides are looked for in ``ROOT/testing/patients/``.

Everything read is checked: a labels file is read whole only up to :data:`MAX_LABELS_BYTES`;
an id that is not ``patient_NNN`` / ``patient_NNN_node_N`` (with or without ``.zip`` / ``.tif``,
any case), a label outside the lists above, an id listed twice, a patient without its five
node rows or a node without its patient's stage is an error naming the row. Slide files must be
regular files inside ROOT: a link that leads outside ROOT is refused (the node is reported, the
patient is incomplete), and a node file found in another centre's folder than its number says
is an error. The engine names results by file name (:func:`wsiengine.slide.slide_id_for`), so
each node is linked into ``WORK/slides/`` under its canonical lower-case name and the ids the
engine reports back are checked against the nodes asked for.

Protocol (fixed below as module constants)
------------------------------------------
* **Patients** (``--split``, default ``all``): the default pipeline was trained on PCam-mosaic
  slides cut from CAMELYON16 (see ``models/cards/``), never on CAMELYON17, so by default every
  labelled patient is evaluated (the 100 training patients; the test patients too when their
  labels are given). For anyone who tunes anything on CAMELYON17 (a head passed with ``--mil``,
  thresholds, settings) the split is fixed by centre: **tune** on the patients of
  :data:`TUNE_CENTRES` = centres 0, 1, 2 (patients 000-059) and report **test** = the patients of
  :data:`TEST_CENTRES` = centres 3, 4 (patients 060-099) plus every labelled official test
  patient (100-199). Never tune on ``--split test``. Note that CAMELYON16 (hence PCam) came from
  two of the five CAMELYON17 hospitals, so not every centre is new to the default models.
* **Nodes**: every node of a selected patient (five each). ``--limit N`` keeps the first N
  patients of the split in id order (a smoke run; its figures mean nothing).
* **Node category**: the report's category; ``indeterminate`` is staged and scored as negative
  (as :mod:`wsiengine.staging` does) and counted separately.
* **Patient stage**: :func:`wsiengine.staging.pn_stage` of the node categories (ITC-only nodes
  are not positive). A patient with a node whose slide is missing, refused or failed is
  ``incomplete``: never a silent pN0. It is named, shown in the confusion matrix's
  ``incomplete`` column, and left out of the kappa (which is computed on complete patients and
  says on how many).
* **Scores**: quadratic weighted Cohen's kappa (:func:`wsiengine.evaluate.quadratic_weighted_kappa`)
  of the patient stages over pN0 < pN0(i+) < pN1mi < pN1 < pN2 (the challenge's metric) and of
  the node categories over negative < itc < micro < macro; both confusion matrices (rows truth,
  columns called); the share of ITC nodes detected (called anything but negative).
  The truth of a patient is its official stage (a stage that disagrees with the stage its
  official node labels give is reported as a note).

Published anchors (Bandi, Geessink, Manson, ... & Litjens, "From detection of individual
metastases to classification of lymph node status at the patient level: the CAMELYON17
challenge", IEEE Transactions on Medical Imaging 38(2):550-560, 2019; on the **official test
set** of 100 patients, so a figure on the training patients is a reference point, not a
like-for-like comparison):

* best single algorithm: kappa 0.89 (submissions ranged from 0.89 to -0.13);
* best combination of the top algorithms (ensemble): kappa 0.93;
* isolated tumour cells: every team detected fewer than 40 % of ITC nodes.

Outputs (``--work WORK``)::

    WORK/slides/NODE_ID.tif         links to the node slides in ROOT (remade each run)
    WORK/results/                   run_batch's output: summary.csv, NODE_ID.zarr, .report.json/.md, .geojson, ...
    WORK/patients.csv               patient_id,slide_id of the evaluated nodes (wsiengine.staging.read_patients)
    WORK/stages.csv                 write_stages: one row per patient (pN stage, counts, missing, uncertain)
    WORK/patient_reports/           write_patient_reports: PATIENT_ID.patient.md / .patient.json
    WORK/per_node.csv               per node: truth, called, category, largest deposit, foci, probability, status, error
    WORK/per_patient.csv            per patient: centre, split, truth, called, agreement, missing nodes
    WORK/results.json               everything the printed table shows, plus provenance

Expected cost (estimates, not measurements of this script on CAMELYON17): the 500 training
slides are scanned at about 0.23-0.25 µm/px (40x), tens of thousands of px a side; the default
encoder reads 96-px tiles at about 0.97 µm/px (0.0087 mm² each), so a node with 50-200 mm² of
tissue gives some 6,000-23,000 tiles, a few million in all. Slide reading and encoding dominate:
at the ~110 tiles/s measured end to end for the default encoder on a 2-core CPU that is of the
order of a day; a few hours with ``--providers cuda`` and several ``--workers``. Failures are
isolated per slide (the node is reported, its patient is incomplete, the others go on).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import hashlib
import io
import json
import logging
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

logger = logging.getLogger("wsiengine.camelyon17")

# -- protocol constants ----------------------------------------------------------------------

#: Official patient numbers: training (labels released) and test (labels withheld at release).
TRAIN_PATIENTS = range(0, 100)
TEST_PATIENTS = range(100, 200)
PATIENTS_PER_CENTRE = 20          # training patient NNN comes from centre NNN // 20
CENTRES: tuple[int, ...] = (0, 1, 2, 3, 4)
NODES_PER_PATIENT = 5             # node_0 ... node_4

#: The fixed split by centre (see the module docstring): tune only on TUNE_CENTRES.
TUNE_CENTRES: tuple[int, ...] = (0, 1, 2)
TEST_CENTRES: tuple[int, ...] = (3, 4)
SPLITS: tuple[str, ...] = ("all", "tune", "test")
DEFAULT_SPLIT = "all"

#: Node labels as the official file writes them (and the long names), -> the engine's categories.
NODE_LABEL_NAMES: dict[str, str] = {
    "negative": "negative", "itc": "itc", "micro": "micrometastasis", "macro": "macrometastasis",
    "micrometastasis": "micrometastasis", "macrometastasis": "macrometastasis",
}
#: Node categories in order of severity (wsiengine.evaluate.NODE_LABELS).
NODE_CATEGORIES: tuple[str, ...] = ("negative", "itc", "micrometastasis", "macrometastasis")
#: Patient stages in order (wsiengine.evaluate.PN_LABELS); pN3 needs 10 positive nodes, beyond CAMELYON17's 5.
PATIENT_STAGES: tuple[str, ...] = ("pN0", "pN0(i+)", "pN1mi", "pN1", "pN2")
INCOMPLETE = "incomplete"
#: The called column for a node without a result (missing, refused or failed slide).
NO_RESULT = "no result"

#: Where the labels file is looked for, relative to ROOT, in order.
LABELS_CANDIDATES: tuple[str, ...] = ("training/stage_labels.csv", "stage_labels.csv")
MAX_LABELS_BYTES = 1 << 20        # the official file is about 15 KB
SLIDE_SUFFIXES = (".tif", ".tiff")
TRAINING_FOLDER = "training"
TEST_FOLDER = "testing/patients"

#: Published figures on the official CAMELYON17 test set (Bandi et al. 2019).
ANCHORS: dict[str, Any] = {
    "kappa_best_single": 0.89, "kappa_ensemble": 0.93, "itc_detection_below": 0.40,
    "reference": "Bandi et al., IEEE Transactions on Medical Imaging 38(2):550-560, 2019 (official test set, "
                 "100 patients)",
}

_PATIENT_ID = re.compile(r"patient_(\d{3})")
_NODE_ID = re.compile(r"patient_(\d{3})_node_(\d)")
_HEADER_ID = ("patient", "patient_id", "id", "name", "case", "slide", "file")
_HEADER_LABEL = ("stage", "label", "class", "pn_stage", "category")


class LayoutError(Exception):
    """ROOT is not a CAMELYON17 copy in the official layout (the message says what is wrong)."""


class LabelsError(LayoutError):
    """A labels file that cannot be used (the message names the file and the rows)."""


# -- 1. labels -------------------------------------------------------------------------------

def parse_id(text: str) -> tuple[str, int, int | None]:
    """``(canonical id, patient number, node number or None)`` of a labels-file id.

    ``patient_000.zip`` / ``Patient_000`` -> ``("patient_000", 0, None)``;
    ``patient_000_node_3.tif`` -> ``("patient_000_node_3", 0, 3)``. ValueError for anything else.
    """
    name = text.strip().lower()
    for suffix in (".zip", *SLIDE_SUFFIXES):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    m = _NODE_ID.fullmatch(name)
    if m:
        return name, int(m.group(1)), int(m.group(2))
    m = _PATIENT_ID.fullmatch(name)
    if m:
        return name, int(m.group(1)), None
    raise ValueError(f"{text!r} is not a patient id (patient_NNN[.zip]) or node id (patient_NNN_node_N[.tif])")


def node_label(text: str) -> str:
    """The engine's node category for an official node label (``micro`` -> ``micrometastasis``);
    ValueError for an unknown one."""
    word = text.strip().lower()
    if word not in NODE_LABEL_NAMES:
        raise ValueError(f"unknown node label {text!r} (expected {', '.join(('negative', 'itc', 'micro', 'macro'))})")
    return NODE_LABEL_NAMES[word]


def stage_label(text: str) -> str:
    """The canonical pN stage for an official patient label (case-insensitive); ValueError otherwise."""
    word = text.strip()
    for stage in PATIENT_STAGES:
        if word.lower() == stage.lower():
            return stage
    raise ValueError(f"unknown patient stage {text!r} (expected {', '.join(PATIENT_STAGES)})")


@dataclass
class Labels:
    """Official labels: ``stages`` ``{patient_id: pN stage}``, ``nodes`` ``{node_id: category}``
    (categories as the engine names them), ``sources`` the files they were read from."""

    stages: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, str] = field(default_factory=dict)
    sources: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def nodes_of(self, patient_id: str) -> list[str]:
        return [f"{patient_id}_node_{k}" for k in range(NODES_PER_PATIENT)]


def _read_capped(path: Path, limit: int) -> bytes:
    try:
        if not path.is_file():
            raise LabelsError(f"the labels file '{path}' is not a file")
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise LabelsError(f"cannot read the labels file '{path}': {exc.strerror or exc}") from None
    if len(data) > limit:
        raise LabelsError(f"the labels file '{path}' is larger than {limit >> 10} KiB; is it stage_labels.csv?")
    return data


def read_labels(path: str | os.PathLike[str], into: Labels | None = None) -> Labels:
    """The labels of one ``stage_labels.csv`` (header ``patient,stage`` optional), added to
    ``into`` when given (an id already there is a duplicate).

    Raises
    ------
    LabelsError
        Naming every bad row (up to ten): an unreadable file, a file over
        :data:`MAX_LABELS_BYTES`, an id that is not ``patient_NNN`` / ``patient_NNN_node_N``, a
        patient outside 000-199, an unknown label, a node label on a patient or a stage on a
        node, an id listed twice, a patient without all five node rows, a node row whose
        patient has no stage row.
    """
    path = Path(path).expanduser()
    labels = into if into is not None else Labels()
    data = _read_capped(path, MAX_LABELS_BYTES)
    try:
        text = data.decode("utf-8-sig")
        rows = [[c.strip() for c in row] for row in csv.reader(io.StringIO(text))]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise LabelsError(f"the labels file '{path}' is not a CSV text file: {exc}") from None
    numbered = [(line, row) for line, row in enumerate(rows, start=1) if any(row)]
    if not numbered:
        raise LabelsError(f"the labels file '{path}' is empty")
    id_col, label_col = 0, 1
    first = [c.lower() for c in numbered[0][1]]
    if first and first[0] in _HEADER_ID:  # a header row: find the columns by name
        id_col = next(i for i, c in enumerate(first) if c in _HEADER_ID)
        label_col = next((i for i, c in enumerate(first) if c in _HEADER_LABEL), 1)
        numbered = numbered[1:]
    bad: list[str] = []
    stages: dict[str, str] = {}
    nodes: dict[str, str] = {}
    seen_line: dict[str, int] = {}
    for line, row in numbered:
        if len(row) <= max(id_col, label_col) or not row[id_col] or not row[label_col]:
            bad.append(f"line {line} {row}: needs an id and a label")
            continue
        try:
            canonical, patient, node = parse_id(row[id_col])
        except ValueError as exc:
            bad.append(f"line {line}: {exc}")
            continue
        if patient not in TRAIN_PATIENTS and patient not in TEST_PATIENTS:
            bad.append(f"line {line}: {canonical} is not a CAMELYON17 patient (000-199)")
            continue
        if node is not None and node >= NODES_PER_PATIENT:
            bad.append(f"line {line}: {canonical}: CAMELYON17 patients have nodes 0-{NODES_PER_PATIENT - 1}")
            continue
        if canonical in seen_line or canonical in labels.stages or canonical in labels.nodes:
            where = f"line {seen_line[canonical]}" if canonical in seen_line else "an earlier labels file"
            bad.append(f"line {line}: {canonical} is listed twice (also {where})")
            continue
        seen_line[canonical] = line
        try:
            if node is None:
                stages[canonical] = stage_label(row[label_col])
            else:
                nodes[canonical] = node_label(row[label_col])
        except ValueError as exc:
            bad.append(f"line {line}: {canonical}: {exc}")
    if not bad:
        for patient in stages:
            absent = [n for n in labels.nodes_of(patient) if n not in nodes]
            if absent:
                bad.append(f"{patient} has a stage but no row for {', '.join(absent)}")
        for node in nodes:
            patient = node.rsplit("_node_", 1)[0]
            if patient not in stages and patient not in labels.stages:
                bad.append(f"{node} has a label but its patient {patient} has no stage row")
    if bad:
        raise LabelsError(f"the labels file '{path}' has {len(bad)} problem(s): {'; '.join(bad[:10])}"
                          + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
                          + ". Expected the official stage_labels.csv: 'patient,stage', then rows like "
                            "'patient_000.zip,pN0' and 'patient_000_node_0.tif,negative' "
                            "(node labels negative/itc/micro/macro; stages " + ", ".join(PATIENT_STAGES) + ")")
    if not stages:
        raise LabelsError(f"the labels file '{path}' labels no patient (rows like 'patient_000.zip,pN0')")
    labels.stages.update(stages)
    labels.nodes.update(nodes)
    labels.sources.append({"path": str(path.resolve()), "sha256": hashlib.sha256(data).hexdigest(),
                           "patients": str(len(stages)), "nodes": str(len(nodes))})
    from wsiengine.staging import pn_stage

    for patient, stage in stages.items():
        implied = pn_stage([nodes[n] for n in labels.nodes_of(patient)])
        if implied != stage:
            labels.notes.append(f"{patient}: official stage {stage}, but its node labels give {implied}; "
                                "scored against the official stage")
    return labels


def find_labels(root: Path, given: Sequence[str | os.PathLike[str]] | None) -> Labels:
    """The labels of ``given`` files (all merged), else the first of :data:`LABELS_CANDIDATES` in ROOT."""
    paths = [Path(p).expanduser() for p in given] if given else [root / c for c in LABELS_CANDIDATES if (root / c).is_file()]
    if not paths:
        raise LayoutError(f"no labels file in '{root}' (looked for {', '.join(LABELS_CANDIDATES)}); "
                          "pass the official stage_labels.csv with --labels PATH")
    if not given and len(paths) > 1:
        logger.info("labels: using %s (also present: %s)", paths[0], ", ".join(map(str, paths[1:])))
        paths = paths[:1]
    labels = Labels()
    for path in paths:
        read_labels(path, into=labels)
    return labels


# -- 2. the fixed split ----------------------------------------------------------------------

def centre_of(patient_number: int) -> int | None:
    """The centre of a training patient (number // 20), None for an official test patient."""
    return patient_number // PATIENTS_PER_CENTRE if patient_number in TRAIN_PATIENTS else None


def split_of(patient_number: int) -> str:
    """``tune`` (a training patient of TUNE_CENTRES) or ``test`` (TEST_CENTRES, or an official
    test patient)."""
    centre = centre_of(patient_number)
    return "tune" if centre is not None and centre in TUNE_CENTRES else "test"


def select_patients(labels: Labels, split: str, limit: int | None = None) -> list[str]:
    """The labelled patients of ``split`` (``all``, ``tune``, ``test``) in id order, the first
    ``limit`` of them when given."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    chosen = sorted(p for p in labels.stages if split == "all" or split_of(parse_id(p)[1]) == split)
    return chosen[:limit] if limit is not None else chosen


# -- 3. slides -------------------------------------------------------------------------------

@dataclass
class NodeFiles:
    """Node slides found under ROOT: ``found`` ``{node_id: real path}``, ``refused``
    ``{node_id: why}`` (links out of ROOT, not regular files)."""

    found: dict[str, Path] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    shown: dict[str, str] = field(default_factory=dict)  # node_id -> path relative to ROOT


def _node_folders(root: Path) -> list[tuple[Path, int | None]]:
    """The folders that may hold node slides, with the centre each stands for (None: test patients)."""
    folders = [(root / TRAINING_FOLDER / f"center_{c}", c) for c in CENTRES] + [(root / TEST_FOLDER, None)]
    return [(f, c) for f, c in folders if f.is_dir()]


def find_node_files(root: str | os.PathLike[str]) -> NodeFiles:
    """Every ``patient_NNN_node_N.tif`` in ``ROOT/training/center_*/`` and ``ROOT/testing/patients/``.

    A file whose real path lies outside ROOT (a link) or that is not a regular file is refused,
    not read. Raises LayoutError when ROOT has none of those folders, when a training node sits
    in another centre's folder than its number says (or a test patient's in a training folder),
    or when one node is found twice.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise LayoutError(f"'{root}' is not a folder; pass the root of a CAMELYON17 copy "
                          "(holding training/center_0 ... training/center_4)")
    folders = _node_folders(root)
    if not folders:
        raise LayoutError(f"'{root}' is not a CAMELYON17 copy in the official layout: none of "
                          f"{TRAINING_FOLDER}/center_0 ... center_4 or {TEST_FOLDER}/ is there")
    files = NodeFiles()
    real_root = root.resolve()
    problems: list[str] = []
    for folder, centre in folders:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            name = entry.name
            if name.startswith(".") or not name.lower().endswith(SLIDE_SUFFIXES):
                continue
            try:
                node_id, patient, node = parse_id(name)
            except ValueError:
                continue  # not a node slide (an unrelated file)
            if node is None:
                continue
            shown = f"{folder.relative_to(root).as_posix()}/{name}"
            expected = centre_of(patient)
            if centre is not None and expected != centre:
                problems.append(f"{shown} is in center_{centre}, but patient {patient:03d} belongs to "
                                + (f"center_{expected}" if expected is not None else TEST_FOLDER))
                continue
            if centre is None and expected is not None:
                problems.append(f"{shown}: training patient {patient:03d} belongs in "
                                f"{TRAINING_FOLDER}/center_{expected}")
                continue
            if node_id in files.shown:
                problems.append(f"{node_id} is there twice ({files.shown[node_id]} and {shown})")
                continue
            files.shown[node_id] = shown
            path = Path(entry.path)
            try:
                real = path.resolve(strict=True)
            except (OSError, RuntimeError) as exc:
                files.refused[node_id] = f"{shown}: cannot be resolved ({exc})"
                continue
            if not real.is_relative_to(real_root):
                files.refused[node_id] = f"{shown} is a link to '{real}', outside ROOT; refused"
            elif not real.is_file():
                files.refused[node_id] = f"{shown} is not a regular file; refused"
            else:
                files.found[node_id] = real
    if problems:
        raise LayoutError(f"'{root}' is not in the official layout: {'; '.join(problems[:10])}"
                          + (f"; and {len(problems) - 10} more" if len(problems) > 10 else ""))
    return files


def link_slides(nodes: dict[str, Path], folder: Path) -> None:
    """Make ``folder/NODE_ID<suffix>`` a link to each node's slide, so the engine names its
    results by the canonical node id; links of earlier runs that are not wanted now are
    removed. LayoutError when the folder holds anything else (it is this script's)."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {f"{node_id}{path.suffix.lower()}": path for node_id, path in nodes.items()}
    for entry in os.scandir(folder):
        p = Path(entry.path)
        if not entry.is_symlink():
            raise LayoutError(f"'{p}' is not a link this script made; WORK/slides/ holds only links to the "
                              "CAMELYON17 slides. Move it away or use another --work")
        if entry.name not in wanted or os.readlink(p) != str(wanted[entry.name]):
            p.unlink()
    for name, target in wanted.items():
        link = folder / name
        if not link.is_symlink():
            try:
                link.symlink_to(target)
            except OSError as exc:
                raise LayoutError(f"cannot make the link '{link}' -> '{target}': {exc.strerror or exc}; "
                                  "this script needs a --work folder that can hold symbolic links") from None


# -- 4. results, staging and scores ----------------------------------------------------------

@dataclass
class NodeRow:
    """One node of the evaluation: its truth and what the run made of it."""

    patient_id: str
    node_id: str
    centre: int | None
    split: str
    truth: str
    status: str                   # done | skipped | failed | missing | refused | no report
    category: str = ""            # the report's category (indeterminate kept), "" without a result
    largest_mm: float | None = None
    foci: int | None = None
    probability: float | None = None
    error: str = ""
    slide: str = ""

    @property
    def called(self) -> str:
        """The scored call: the category with indeterminate as negative, or NO_RESULT."""
        if not self.category:
            return NO_RESULT
        return "negative" if self.category == "indeterminate" else self.category

    def to_row(self) -> dict[str, Any]:
        return {"patient_id": self.patient_id, "node_id": self.node_id,
                "centre": "" if self.centre is None else self.centre, "split": self.split, "truth": self.truth,
                "called": self.called, "category": self.category,
                "largest_mm": "" if self.largest_mm is None else f"{self.largest_mm:.3f}",
                "foci": "" if self.foci is None else self.foci,
                "probability": "" if self.probability is None else f"{self.probability:.4f}",
                "status": self.status, "error": _cell(self.error), "slide": _cell(self.slide)}


NODE_COLUMNS = ("patient_id", "node_id", "centre", "split", "truth", "called", "category", "largest_mm", "foci",
                "probability", "status", "error", "slide")
PATIENT_COLUMNS = ("patient_id", "centre", "split", "truth", "truth_from_nodes", "called", "agree", "missing",
                   "uncertain")


def _cell(text: str) -> str:
    """A CSV cell a spreadsheet will not run as a formula (text from errors and file names)."""
    text = " ".join(str(text).split())
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    from wsiengine.atomic import atomic_write

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path) as fh:
        fh.write(buffer.getvalue().encode("utf-8"))


def collect_nodes(patients: Sequence[str], labels: Labels, files: NodeFiles, rows: dict[str, Any],
                  results: Path) -> list[NodeRow]:
    """Each node of ``patients`` with its truth and the run's result: ``rows`` are run_batch's
    summary rows by slide id; a node with none (not found, refused), a failed one, and one
    whose report is absent or unreadable have no category (``status`` says why)."""
    from wsiengine.errors import ReportError
    from wsiengine.staging import read_node

    out = []
    for patient in patients:
        number = parse_id(patient)[1]
        for node_id in labels.nodes_of(patient):
            row = NodeRow(patient, node_id, centre_of(number), split_of(number), labels.nodes[node_id], "missing",
                          slide=files.shown.get(node_id, ""))
            if node_id in files.refused:
                row.status, row.error = "refused", files.refused[node_id]
            elif node_id not in files.found:
                row.error = "no slide file in ROOT"
            elif node_id not in rows:
                row.error = "the engine reported no result for it"
            elif rows[node_id].status == "failed":
                row.status, row.error = "failed", rows[node_id].error or "failed"
            else:
                row.status = rows[node_id].status
                try:
                    node = read_node(results, node_id)
                except ReportError as exc:
                    node, row.error = None, str(exc)
                if node is None:
                    row.status, row.error = "no report", row.error or "the run wrote no report (a MIL head is needed)"
                else:
                    row.category, row.largest_mm, row.foci, row.probability = (
                        node.category, node.largest_mm, node.foci, node.probability)
            out.append(row)
    return out


def stage(nodes: Sequence[NodeRow], work: Path, results: Path) -> list[Any]:
    """Each patient's :class:`wsiengine.staging.PatientStage` from its nodes' reports, through
    the staging API (``WORK/patients.csv`` -> read_patients -> stage_patients); a patient with a
    node without a result is ``incomplete`` and names it in ``missing``. Writes ``WORK/stages.csv``
    and ``WORK/patient_reports/``."""
    from wsiengine.staging import read_patients, stage_patients, write_patient_reports, write_stages

    _write_csv(work / "patients.csv", ("patient_id", "slide_id"),
               [{"patient_id": n.patient_id, "slide_id": n.node_id} for n in nodes])
    patients = read_patients(work / "patients.csv")
    unavailable = {n.node_id for n in nodes if not n.category}
    staged = stage_patients({p: [s for s in slides if s not in unavailable] for p, slides in patients.items()},
                            results)
    out = []
    for st in staged:
        absent = tuple(s for s in patients[st.patient_id] if s in unavailable)
        if absent:
            st = dataclasses.replace(st, pn_stage=INCOMPLETE, missing=absent + tuple(st.missing))
        out.append(st)
    write_stages(out, work / "stages.csv")
    write_patient_reports(out, work / "patient_reports")
    return out


def patient_rows(stages: Sequence[Any], labels: Labels) -> list[dict[str, Any]]:
    """One ``per_patient.csv`` row per staged patient."""
    from wsiengine.staging import pn_stage

    rows = []
    for st in stages:
        number = parse_id(st.patient_id)[1]
        truth = labels.stages[st.patient_id]
        centre = centre_of(number)
        rows.append({"patient_id": st.patient_id, "centre": "" if centre is None else centre,
                     "split": split_of(number), "truth": truth,
                     "truth_from_nodes": pn_stage([labels.nodes[n] for n in labels.nodes_of(st.patient_id)]),
                     "called": st.pn_stage, "agree": "" if st.pn_stage == INCOMPLETE else int(st.pn_stage == truth),
                     "missing": ";".join(st.missing), "uncertain": ";".join(st.uncertain)})
    return rows


def score(nodes: Sequence[NodeRow], patients: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The figures: node and patient kappa (None when nothing could be scored), both confusion
    matrices (with a ``no result`` / ``incomplete`` column), the ITC detection rate."""
    from wsiengine.evaluate import confusion_matrix, quadratic_weighted_kappa

    node_cols = NODE_CATEGORIES + (NO_RESULT,)
    scored = [n for n in nodes if n.category]
    node_kappa = (quadratic_weighted_kappa([n.truth for n in scored], [n.called for n in scored], NODE_CATEGORIES)
                  if scored else None)
    stage_labels = PATIENT_STAGES + ("pN3",)
    stage_cols = stage_labels + (INCOMPLETE,)
    complete = [p for p in patients if p["called"] != INCOMPLETE]
    patient_kappa = (quadratic_weighted_kappa([p["truth"] for p in complete], [p["called"] for p in complete],
                                              stage_labels) if complete else None)
    itc = [n for n in nodes if n.truth == "itc"]
    itc_scored = [n for n in itc if n.category]
    itc_hits = sum(n.called != "negative" for n in itc_scored)
    return {
        "patient_kappa": patient_kappa,
        "patients_scored": len(complete), "patients": len(patients),
        "patient_accuracy": (sum(p["called"] == p["truth"] for p in complete) / len(complete)) if complete else None,
        "patient_labels": list(stage_cols),
        "patient_confusion": confusion_matrix([p["truth"] for p in patients], [p["called"] for p in patients],
                                              stage_cols)[: len(PATIENT_STAGES)].tolist(),
        "incomplete": {p["patient_id"]: p["missing"].split(";") for p in patients if p["called"] == INCOMPLETE},
        "node_kappa": node_kappa, "nodes_scored": len(scored), "nodes": len(nodes),
        "node_labels": list(node_cols),
        "node_confusion": confusion_matrix([n.truth for n in nodes], [n.called for n in nodes],
                                           node_cols)[: len(NODE_CATEGORIES)].tolist(),
        "indeterminate": sum(n.category == "indeterminate" for n in nodes),
        "itc_detected": itc_hits, "itc_scored": len(itc_scored), "itc_nodes": len(itc),
        "itc_rate": itc_hits / len(itc_scored) if itc_scored else None,
        "unavailable": {n.node_id: f"{n.status}: {n.error}" for n in nodes if not n.category},
    }


# -- 5. report -------------------------------------------------------------------------------

def _f(v: float | None, digits: int = 3) -> str:
    return "undefined" if v is None else f"{v:.{digits}f}"


def _short(name: str) -> str:
    return {"micrometastasis": "micro", "macrometastasis": "macro"}.get(name, name)


def format_table(res: dict[str, Any]) -> str:
    """The printed report: the figures beside the anchors, both confusion matrices, what is missing."""
    from wsiengine.errors import log_safe

    s, a = res["scores"], res["anchors"]
    rate = s["itc_rate"]
    lines = [
        f"CAMELYON17 patient pN staging -- {res['date']}",
        f"{res['patients']['evaluated']} patients ({res['protocol']['split']} split"
        + (f", first {res['protocol']['limit']}" if res["protocol"]["limit"] else "") + f"), {s['nodes']} nodes; "
        f"settings {json.dumps(res['settings'])}; {res['run']['processed']} node(s) run now, "
        f"{res['run']['resumed']} resumed, {res['run']['failed']} failed",
        "",
        "| figure | value | CAMELYON17 anchor (official test set) |",
        "| --- | --- | --- |",
        f"| patient pN kappa (quadratic), {s['patients_scored']}/{s['patients']} patients | "
        f"{_f(s['patient_kappa'])} | {a['kappa_best_single']} best single algorithm, {a['kappa_ensemble']} ensemble "
        "of the top algorithms |",
        f"| patient stage accuracy, {s['patients_scored']}/{s['patients']} patients | {_f(s['patient_accuracy'])} | |",
        f"| node-category kappa (quadratic), {s['nodes_scored']}/{s['nodes']} nodes | {_f(s['node_kappa'])} | |",
        f"| ITC nodes detected | {s['itc_detected']}/{s['itc_scored']}"
        + (f" ({rate:.0%})" if rate is not None else "") + f" | every team < {a['itc_detection_below']:.0%} |",
        f"| indeterminate nodes (scored as negative) | {s['indeterminate']} | |",
    ]
    if s["patients_scored"] < 10:
        lines.append(f"(only {s['patients_scored']} complete patient(s): the kappas mean little)")
    lines += ["", "patient confusion (rows truth, columns called): " + ", ".join(s["patient_labels"])]
    lines += [f"  {label:<8} {row}" for label, row in zip(s["patient_labels"], s["patient_confusion"])]
    lines += ["node confusion (rows truth, columns called): " + ", ".join(map(_short, s["node_labels"]))]
    lines += [f"  {_short(label):<8} {row}" for label, row in zip(s["node_labels"], s["node_confusion"])]
    if s["incomplete"]:
        lines += ["", f"{len(s['incomplete'])} patient(s) INCOMPLETE (a node without a result; not staged, not in "
                      "the kappa):"]
        lines += [f"  {p}: {', '.join(nodes)}" for p, nodes in s["incomplete"].items()]
        lines += [f"  {n}: {log_safe(why)}" for n, why in s["unavailable"].items()]
    if res["labels"]["notes"]:
        lines += ["", "label notes:"] + [f"  {n}" for n in res["labels"]["notes"]]
    lines += ["", f"anchors: {a['reference']}; figures on training patients are reference points, "
                  "not a like-for-like comparison"]
    if res["settings"].get("mil") and res["protocol"]["split"] != "test":
        lines.append("a head of your own (--mil): if anything was tuned on CAMELYON17, report --split test only")
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="camelyon17_reproduce.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", metavar="ROOT", help="CAMELYON17 copy in the official layout (training/center_0 ...)")
    p.add_argument("--work", required=True, metavar="DIR", help="output and resume folder")
    p.add_argument("--labels", action="append", metavar="PATH",
                   help="stage_labels.csv (repeatable, e.g. training and test labels; default ROOT/training/"
                        "stage_labels.csv, else ROOT/stage_labels.csv)")
    p.add_argument("--split", choices=SPLITS, default=DEFAULT_SPLIT,
                   help=f"patients to evaluate: all labelled, tune (centres {TUNE_CENTRES}) or test (centres "
                        f"{TEST_CENTRES} and the official test patients) (default {DEFAULT_SPLIT})")
    p.add_argument("--limit", type=int, metavar="N", help="first N patients of the split (smoke runs)")
    p.add_argument("--precision", choices=["auto", "fp32", "fp16", "int8"], help="encoder precision (default auto)")
    p.add_argument("--providers", help="auto, tensorrt, cuda or cpu (comma-separated for a list; default auto)")
    p.add_argument("--mil", metavar="PATH", help="a MIL head folder of your own (default: the shipped head)")
    p.add_argument("--workers", type=int, help="local worker processes (default: the engine's)")
    p.add_argument("--config", metavar="TOML", help="a wsiengine run configuration file")
    p.add_argument("--retry-failed", action="store_true", help="run slides that failed before again")
    p.add_argument("--quiet", action="store_true", help="the table and errors only")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark: 0 on success, 1 when no patient could be staged, 2 on a layout,
    labels or configuration error."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
    say: Callable[[str], None] = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    if args.limit is not None and args.limit < 1:
        print("error: --limit must be >= 1", file=sys.stderr)
        return 2
    from wsiengine.errors import WsiEngineError

    try:
        return _run(args, say)
    except LayoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WsiEngineError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    started = time.perf_counter()
    root = Path(args.root).expanduser()
    files = find_node_files(root)
    labels = find_labels(root, args.labels)
    for note in labels.notes:
        logger.warning("%s", note)
    patients = select_patients(labels, args.split, args.limit)
    if not patients:
        raise LayoutError(f"no labelled patient in the {args.split} split (labelled: {len(labels.stages)})")
    wanted = [n for p in patients for n in labels.nodes_of(p)]
    present = {n: files.found[n] for n in wanted if n in files.found}
    say(f"CAMELYON17 at {root}: {len(patients)} patient(s) (split {args.split!r}), {len(wanted)} nodes, "
        f"{len(present)} slide(s) found" + (f", {len(wanted) - len(present)} missing or refused"
                                             if len(present) < len(wanted) else ""))

    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    results = work / "results"
    settings = {k: v for k, v in (("precision", args.precision), ("providers", args.providers), ("mil", args.mil),
                                  ("workers", args.workers)) if v is not None}
    if args.retry_failed:
        settings["retry_failed"] = True
    rows: dict[str, Any] = {}
    if present:
        link_slides(present, work / "slides")
        from wsiengine.batch import run_batch

        summary = run_batch(work / "slides", results, args.config, progress=sys.stderr.isatty() and not args.quiet,
                            **settings)
        for r in summary.rows:
            if r.slide_id not in present:  # never trust a name: only the nodes asked for count
                logger.warning("the engine reported an unexpected slide id %r; ignored", r.slide_id)
                continue
            rows[r.slide_id] = r
    else:
        (work / "slides").mkdir(exist_ok=True)
    ran = time.perf_counter()

    nodes = collect_nodes(patients, labels, files, rows, results)
    staged = stage(nodes, work, results)
    per_patient = patient_rows(staged, labels)
    _write_csv(work / "per_node.csv", NODE_COLUMNS, [n.to_row() for n in nodes])
    _write_csv(work / "per_patient.csv", PATIENT_COLUMNS, per_patient)
    scores = score(nodes, per_patient)

    res = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "benchmark": "CAMELYON17 patient pN staging (quadratic weighted kappa)",
        "root": str(root.resolve()),
        "labels": {"files": labels.sources, "notes": labels.notes},
        "protocol": {"split": args.split, "tune_centres": list(TUNE_CENTRES), "test_centres": list(TEST_CENTRES),
                     "limit": args.limit, "indeterminate": "scored as negative",
                     "incomplete": "left out of the patient kappa, counted in the confusion matrix"},
        "settings": settings | ({"config": str(args.config)} if args.config else {}),
        "patients": {"evaluated": len(patients), "labelled": len(labels.stages), "ids": patients},
        "run": {"processed": sum(r.status == "done" for r in rows.values()),
                "resumed": sum(r.status == "skipped" for r in rows.values()),
                "failed": sum(r.status == "failed" for r in rows.values())},
        "scores": scores,
        "anchors": ANCHORS,
        "seconds": {"pipeline": round(ran - started, 1), "total": round(time.perf_counter() - started, 1)},
        "outputs": {"work": str(work.resolve()), "results": str(results.resolve())},
        "environment": {"python": platform.python_version(), "platform": platform.platform(),
                        "wsiengine": _engine_version()},
    }
    from wsiengine.atomic import atomic_write

    with atomic_write(work / "results.json") as fh:
        fh.write(json.dumps(res, indent=2).encode("utf-8"))
    print(format_table(res))
    print(f"\nwrote {work / 'per_node.csv'}, {work / 'per_patient.csv'}, {work / 'stages.csv'}, "
          f"{work / 'patient_reports'}/ and {work / 'results.json'}")
    if scores["patients_scored"] == 0:
        print("error: no patient could be staged (every one has a node without a result; see above)", file=sys.stderr)
        return 1
    return 0


def _engine_version() -> str:
    import wsiengine

    return wsiengine.__version__


if __name__ == "__main__":
    sys.exit(main())
