"""The batch's records: ``summary.csv`` (one row per slide) and the inputs failed slides were tried with."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .discovery import SlideEntry
from .location import ResultsLocation

__all__ = ["SUMMARY_NAME", "SUMMARY_FIELDS", "FAILURES_NAME", "SummaryRow", "BatchSummary", "read_summary",
           "write_summary", "failure_inputs", "read_failures", "write_failures"]

SUMMARY_NAME = "summary.csv"
SUMMARY_FIELDS = ("slide_id", "path", "status", "label", "probability", "category", "largest_mm", "n_tiles", "seconds",
                  "error")
#: Text columns a spreadsheet could take as a formula; escaped on write (:func:`_escape_cell`).
_TEXT_FIELDS = ("slide_id", "path", "status", "label", "category", "error")
#: First characters that make a spreadsheet cell a formula (OWASP CSV injection), fullwidth forms included;
#: a newline too, as a carriage return may be read back as one.
_FORMULA_STARTS = frozenset("=+-@\t\r\n\uff1d\uff0b\uff0d\uff20")
#: What each failed slide was tried with (so a rerun retries it only when something changed).
FAILURES_NAME = ".wsiengine-failures.json"


@dataclass
class SummaryRow:
    """One slide's line in ``summary.csv``."""

    slide_id: str
    path: str
    status: str  # done | failed | skipped
    label: str = ""
    probability: float | None = None
    category: str = ""  # the node's: negative, itc, micrometastasis, macrometastasis, indeterminate
    largest_mm: float | None = None
    n_tiles: int | None = None
    seconds: float | None = None
    error: str = ""

    def as_csv(self) -> dict[str, Any]:
        row = asdict(self)
        row["probability"] = "" if self.probability is None else f"{self.probability:.6f}"
        row["largest_mm"] = "" if self.largest_mm is None else f"{self.largest_mm:.4f}"
        row["n_tiles"] = "" if self.n_tiles is None else self.n_tiles
        row["seconds"] = "" if self.seconds is None else f"{self.seconds:.2f}"
        for name in _TEXT_FIELDS:
            row[name] = _escape_cell(row[name])
        return row


def _escape_cell(value: str) -> str:
    """``value`` made safe to open in a spreadsheet: a text starting with ``=``, ``+``, ``-``,
    ``@``, a tab, a carriage return or a newline (after any single quotes) gets a leading ``'``, as OWASP
    recommends, so it is never run as a formula; :func:`_unescape_cell` undoes it exactly."""
    return "'" + value if value.lstrip("'")[:1] in _FORMULA_STARTS else value


def _unescape_cell(value: str) -> str:
    """The real value of a cell written by :func:`_escape_cell`."""
    return value[1:] if value.startswith("'") and value.lstrip("'")[:1] in _FORMULA_STARTS else value


@dataclass
class BatchSummary:
    """The rows of a batch run (in discovery order) and where they were written."""

    rows: list[SummaryRow]
    out_dir: Path | str
    seconds: float = 0.0
    workers: int = 1
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def path(self) -> Path | str:
        """``summary.csv`` (a path, or a URL for URL targets)."""
        if isinstance(self.out_dir, str):
            return f"{self.out_dir}/{SUMMARY_NAME}"
        return self.out_dir / SUMMARY_NAME


def read_summary(path: str | os.PathLike[str] | ResultsLocation) -> list[SummaryRow]:
    """Rows of an existing ``summary.csv`` (a results folder, URL, or the file; empty when absent)."""
    if isinstance(path, ResultsLocation):
        text = path.read_text(SUMMARY_NAME)
    else:
        p = Path(path)
        if p.is_dir():
            p = p / SUMMARY_NAME
        text = p.read_bytes().decode("utf-8") if p.is_file() else None  # no newline translation: csv handles them
    if not text:
        return []
    rows = []
    for r in csv.DictReader(io.StringIO(text, newline="")):
        r = {k: _unescape_cell(v) if k in _TEXT_FIELDS and isinstance(v, str) else v for k, v in r.items()}
        rows.append(SummaryRow(
            slide_id=r["slide_id"], path=r["path"], status=r["status"], label=r.get("label", "") or "",
            probability=float(r["probability"]) if r.get("probability") else None,
            category=r.get("category", "") or "", largest_mm=float(r["largest_mm"]) if r.get("largest_mm") else None,
            n_tiles=int(r["n_tiles"]) if r.get("n_tiles") else None,
            seconds=float(r["seconds"]) if r.get("seconds") else None, error=r.get("error", "") or ""))
    return rows


def write_summary(out: ResultsLocation, rows: Sequence[SummaryRow]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=SUMMARY_FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow(row.as_csv())
    out.write_bytes(SUMMARY_NAME, text.getvalue().encode("utf-8"))


def failure_inputs(entry: SlideEntry, key: str, mpp: tuple[float, float] | None) -> dict[str, Any]:
    """What a failed slide was tried with; a rerun retries it when any of this changed."""
    try:
        stat = entry.path.stat()
        file_id = [stat.st_size, stat.st_mtime_ns]
    except OSError:
        file_id = None
    return {"path": entry.shown_path, "file": file_id, "config_key": key, "mpp": list(mpp) if mpp else None}


def read_failures(out: ResultsLocation) -> dict[str, Any]:
    try:
        return dict(json.loads(out.read_text(FAILURES_NAME) or "{}"))
    except (ValueError, TypeError):
        return {}


def write_failures(out: ResultsLocation, failures: dict[str, Any]) -> None:
    out.write_bytes(FAILURES_NAME, json.dumps(failures, indent=1).encode())
