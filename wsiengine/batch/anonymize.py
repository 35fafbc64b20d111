"""Anonymous slide ids: results a user can share without the patient names in file names.

Slide files and folders are often named after patients or record numbers. With
``outputs.anonymize_ids`` (``--anonymize-ids``) every slide is named by a random id
(``slide-1a2b3c4d5e6f``) and no shared output records its file name or path:

* ``summary.csv`` has the anonymous id and an empty ``path`` column;
* stores record the id and ``slide-….svs`` as the slide's name, no path;
* GeoJSON feature ids, reports (JSON, Markdown, image names) and heatmap files carry the id only;
* error texts in ``summary.csv`` and the lines of ``wsiengine.log`` have the slide's path, file
  name and original id replaced by the anonymous id.

The one link back is the private mapping file (``outputs.id_map``, default
``OUT/private/slide-ids.csv``; its folder is readable by its owner only): ``anonymous_id,
slide_id, path`` per slide. A rerun reads it, so each slide keeps its id and resumes; a slide
new to the folder gets a new random id. Ids are random, not hashes of names, so they cannot be
reversed by hashing a list of likely names. Keep the file, and never share it.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path

from ..atomic import atomic_write
from ..errors import ConfigError, OutputError, log_safe
from .discovery import SlideEntry

__all__ = ["ID_MAP_NAME", "ANONYMOUS_ID", "anonymize_entries", "read_id_map", "redact", "identifying_names",
           "RedactingFormatter"]

logger = logging.getLogger("wsiengine")

#: where the mapping goes inside a local results folder when ``id_map`` is not set
ID_MAP_NAME = "private/slide-ids.csv"
#: the form of an anonymous id (anything else read from a mapping file is ignored)
ANONYMOUS_ID = re.compile(r"slide-[0-9a-f]{12}")
_FIELDS = ("anonymous_id", "slide_id", "path")


def read_id_map(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{original slide id (case-folded): anonymous id}`` from a mapping file (empty when there
    is none). Rows whose anonymous id is not of :data:`ANONYMOUS_ID`'s form, or that repeat an
    id, are ignored with a warning."""
    return {row["slide_id"].casefold(): row["anonymous_id"] for row in _read_rows(Path(path))}


def _read_rows(path: Path) -> list[dict[str, str]]:
    """The valid rows of a mapping file, first row of an original id kept; none when there is no file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the private slide-id map '{path}': {exc}") from exc
    rows: list[dict[str, str]] = []
    seen_ids: set[str] = set()
    seen_originals: set[str] = set()
    for raw in csv.DictReader(io.StringIO(text)):
        row = {k: (raw.get(k) or "") for k in _FIELDS}
        anonymous, original = row["anonymous_id"].strip(), row["slide_id"]
        if not ANONYMOUS_ID.fullmatch(anonymous) or not original or anonymous in seen_ids:
            logger.warning("%s: ignoring a row that is not 'slide-' and 12 hex digits with a slide id (%s)",
                           log_safe(path.name), log_safe(anonymous[:40]))
            continue
        seen_ids.add(anonymous)
        if original.casefold() not in seen_originals:
            seen_originals.add(original.casefold())
            rows.append({**row, "anonymous_id": anonymous})
    return rows


def anonymize_entries(entries: Sequence[SlideEntry], id_map: str | os.PathLike[str]) -> list[SlideEntry]:
    """``entries`` under their anonymous ids (known ones from ``id_map``, new ones random), the
    mapping file rewritten atomically with every slide it knows (owner-only permissions)."""
    path = Path(id_map).expanduser()
    rows = _read_rows(path)
    known = {row["slide_id"].casefold(): row["anonymous_id"] for row in rows}
    used = set(known.values())
    out = []
    for entry in entries:
        anonymous = known.get(entry.slide_id.casefold())
        if anonymous is None:
            anonymous = _new_id(used)
            known[entry.slide_id.casefold()] = anonymous
            rows.append({"anonymous_id": anonymous, "slide_id": entry.slide_id, "path": str(entry.path.absolute())})
        used.add(anonymous)
        out.append(SlideEntry(anonymous, entry.path, source_id=entry.slide_id))
    _write_map(path, rows)
    return out


def _new_id(used: set[str]) -> str:
    while True:
        candidate = f"slide-{secrets.token_hex(6)}"
        if candidate not in used:
            return candidate


def _write_map(path: Path, rows: list[dict[str, str]]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with atomic_write(path) as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(text.getvalue().encode("utf-8"))
    except OSError as exc:
        raise OutputError(f"cannot write the private slide-id map '{path}': {exc.strerror or exc}") from exc


def identifying_names(entry: SlideEntry) -> list[str]:
    """What of an anonymized slide's identity may appear in a message (its path as given and
    absolute, file name, original id of 4 characters or more), longest first; none for others."""
    if not entry.anonymous:
        return []
    names = {str(entry.path), str(entry.path.absolute()), entry.path.name}
    if len(entry.source_id) >= 4:
        names.add(entry.source_id)
    return sorted((n for n in names if n), key=len, reverse=True)


def redact(entry: SlideEntry, text: str) -> str:
    """``text`` with an anonymized slide's identifying names replaced by its id."""
    for name in identifying_names(entry):
        text = text.replace(name, entry.slide_id)
    return text


class RedactingFormatter(logging.Formatter):
    """A log formatter that replaces each anonymized slide's path, file name and original id by
    its anonymous id (for ``wsiengine.log`` of an anonymized run)."""

    def __init__(self, fmt: str, entries: Sequence[SlideEntry]) -> None:
        super().__init__(fmt)
        self._ids = {name: e.slide_id for e in entries for name in identifying_names(e)}
        names = sorted(self._ids, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, names))) if names else None

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda m: self._ids[m.group(0)], text)
