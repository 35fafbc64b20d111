"""What a results folder holds, for the viewer: its slides and patients by id, each mapped to the
files that belong to it. Nothing else in the folder is reachable.

Ids come from the engine (``summary.csv``'s slide ids, the ``SLIDE_ID.zarr`` stores,
``patients/PATIENT_ID.patient.json``) and must be plain file-name ids; a URL names an id, never a
path, and an id that is not in the catalog is a 404.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["SAFE_ID", "ViewSlide", "Catalog", "read_json_file"]

logger = logging.getLogger("wsiengine")

#: An id the viewer accepts: letters, digits, '.', '_' and '-', starting with a letter or digit.
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
#: The largest JSON file (report, GeoJSON, patient) the viewer reads, bytes.
MAX_JSON_BYTES = 64 << 20


def read_json_file(path: Path, limit: int = MAX_JSON_BYTES) -> Any:
    """A JSON file's value, refusing files over ``limit`` bytes or that are not regular files."""
    if not path.is_file():
        raise FileNotFoundError(path)
    if path.stat().st_size > limit:
        raise ValueError(f"'{path.name}' is larger than {limit >> 20} MiB")
    return json.loads(path.read_text(encoding="utf-8"))


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (links resolved) lies in ``folder``."""
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


@dataclass(frozen=True)
class ViewSlide:
    """One slide of the results folder and its files (None where absent).

    Attributes
    ----------
    slide_id : str
    row : dict
        Its ``summary.csv`` row (strings).
    store : Path or None
        ``SLIDE_ID.zarr`` (a finished run).
    report_json, geojson : Path or None
        ``SLIDE_ID.report.json`` and ``SLIDE_ID.geojson``.
    report_dir : Path or None
        ``SLIDE_ID.report/`` (evidence and thumbnail images).
    slide_path : Path or None
        The slide file, when it can be found (see :meth:`Catalog.load`).
    """

    slide_id: str
    row: dict[str, str] = field(default_factory=dict)
    store: Path | None = None
    report_json: Path | None = None
    geojson: Path | None = None
    report_dir: Path | None = None
    slide_path: Path | None = None


@dataclass
class Catalog:
    """The slides and patients of a results folder (see the module docstring)."""

    results: Path
    slides: dict[str, ViewSlide]
    patients: dict[str, Path]
    slides_dir: Path | None = None

    @classmethod
    def load(cls, results: str | os.PathLike[str], slides_dir: str | os.PathLike[str] | None = None) -> "Catalog":
        """Read ``results`` (a ``wsiengine run`` folder). Each slide file is looked for, in order, in
        ``slides_dir`` (by the file name the store records), at the absolute path the store records,
        and at its path relative to the results folder."""
        from ..batch import read_summary

        folder = Path(results).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"'{folder}' is not a results folder (no such directory)")
        extra = Path(slides_dir).expanduser() if slides_dir else None
        if extra is not None and not extra.is_dir():
            raise ConfigError(f"--slides '{extra}' is not a directory")
        rows = {r.slide_id: r.as_csv() for r in read_summary(folder)}
        ids = set(rows)
        ids.update(p.name[:-5] for p in folder.glob("*.zarr") if p.is_dir())
        slides: dict[str, ViewSlide] = {}
        for slide_id in sorted(ids):
            if not SAFE_ID.fullmatch(slide_id):
                logger.warning("view: skipping slide id %r (not a plain file-name id)", slide_id[:80])
                continue
            slides[slide_id] = cls._slide(folder, slide_id, rows.get(slide_id, {}), extra)
        patients: dict[str, Path] = {}
        for path in sorted((folder / "patients").glob("*.patient.json")):
            patient = path.name[: -len(".patient.json")]
            if SAFE_ID.fullmatch(patient) and path.is_file() and _inside(path, folder):
                patients[patient] = path
        return cls(folder, slides, patients, extra)

    @staticmethod
    def _slide(folder: Path, slide_id: str, row: dict[str, Any], extra: Path | None) -> ViewSlide:
        def own(name: str, *, directory: bool = False) -> Path | None:
            path = folder / name
            ok = path.is_dir() if directory else path.is_file()
            return path if ok and _inside(path, folder) else None

        store = own(f"{slide_id}.zarr", directory=True)
        slide_path = None
        if store is not None:
            slide_path = _find_slide_file(store, folder, extra)
        return ViewSlide(slide_id, {k: str(v) for k, v in row.items()}, store, own(f"{slide_id}.report.json"),
                         own(f"{slide_id}.geojson"), own(f"{slide_id}.report", directory=True), slide_path)


def _find_slide_file(store_path: Path, results: Path, extra: Path | None) -> Path | None:
    """The slide file a store was made from (see :meth:`Catalog.load`), or None."""
    from ..errors import WsiEngineError
    from ..store import open_result

    try:
        slide = open_result(store_path).slide
    except (WsiEngineError, OSError, ValueError) as exc:
        logger.warning("view: cannot read the store %s: %s", store_path.name, exc)
        return None
    candidates: list[Path] = []
    name = slide.get("name")
    if extra is not None and isinstance(name, str) and name and Path(name).name == name:
        candidates.append(extra / name)
    if isinstance(slide.get("path"), str) and slide["path"]:
        candidates.append(Path(slide["path"]))
    if isinstance(slide.get("path_from_results"), str) and slide["path_from_results"]:
        candidates.append(results / slide["path_from_results"])
    for path in candidates:
        try:
            if path.is_file():
                return path
        except OSError:
            continue
    return None
