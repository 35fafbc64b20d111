"""Which files of a folder are slides, and the collision-free ids their outputs are named by."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, log_safe
from ..slide import slide_id_for

__all__ = ["SLIDE_EXTENSIONS", "SlideEntry", "discover_slides"]

logger = logging.getLogger("wsiengine")

#: File extensions taken as slides without probing (case-insensitive).
SLIDE_EXTENSIONS = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide",
                              ".bif", ".dcm", ".qptiff", ".btf"})
#: Extensions never probed (results, tables, documents, archives).
_NOT_SLIDES = frozenset({".csv", ".txt", ".json", ".geojson", ".md", ".xml", ".log", ".py", ".zip", ".gz",
                         ".tar", ".pdf", ".html", ".yaml", ".yml", ".ini", ".npz", ".npy", ".pt", ".onnx"})
@dataclass(frozen=True)
class SlideEntry:
    """A discovered slide: its id (unique in the folder) and path; ``source_id`` is the id it
    had before it was anonymized (:mod:`wsiengine.batch.anonymize`), else None."""

    slide_id: str
    path: Path
    source_id: str | None = None

    @property
    def anonymous(self) -> bool:
        return self.source_id is not None

    @property
    def shown_path(self) -> str:
        """The path outputs record: none for an anonymized slide."""
        return "" if self.anonymous else str(self.path)


def _probe(path: Path) -> bool:
    from ..slide import open_slide

    try:
        open_slide(path, require_mpp=False).close()
        return True
    except Exception:  # noqa: BLE001 - anything that does not open is not a slide
        return False


def discover_slides(root: str | os.PathLike[str], *, probe_unknown: bool = True,
                    exclude: Iterable[str | os.PathLike[str]] = ()) -> list[SlideEntry]:
    """Every slide under ``root`` (recursive, sorted): files with a slide extension
    (:data:`SLIDE_EXTENSIONS`), and, with ``probe_unknown``, other files that open as a slide.

    Ids are the path relative to ``root`` without its slide suffix, folders joined by ``__``
    (``a/b/x.svs`` -> ``a__b__x``; ``x.svs`` -> ``x``), so equal stems in different folders do
    not collide. Ids are unique ignoring case (results folders may be case-insensitive) and
    depend on the slide's own path, not on which other files are there (see :func:`_assign_ids`):
    when several files have the same id (``x.svs`` and ``x.tif``), the first in path order keeps
    it and each other gets its extension (``x-tif``), or, when that is another slide's id too, a
    hash of its relative path (``x-tif-1a2b3c4d``). Hidden entries, Zarr stores, MIRAX data
    folders and ``exclude`` folders are skipped; symlinked folders are followed, each real
    folder once (a link back to a folder already searched is logged and skipped).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise ConfigError(f"slide folder '{root}' does not exist")
    if root.is_file():
        return [SlideEntry(slide_id_for(root), root)]
    excluded = {Path(e).expanduser().resolve() for e in exclude}
    mirax_data = {p.with_suffix("") for p in root.rglob("*.mrxs")}
    found: list[tuple[str, Path]] = []
    visited = {root.resolve()}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not d.endswith(".zarr")
                             and not d.endswith(".partial") and (here / d).resolve() not in excluded
                             and here / d not in mirax_data)
        for d in list(dirnames):  # symlinked folders are followed, each real folder once (no cycles)
            real = (here / d).resolve()
            if real in visited:
                logger.warning("%s: skipped, a link to a folder already searched (%s)", log_safe(here / d), log_safe(real))
                dirnames.remove(d)
            else:
                visited.add(real)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = here / name
            suffix = path.suffix.lower()
            if suffix not in SLIDE_EXTENSIONS:
                if not probe_unknown or suffix in _NOT_SLIDES or not _probe(path):
                    continue
            rel = path.relative_to(root)
            found.append(("__".join([*rel.parent.parts, slide_id_for(rel.name)]), path))
    return [SlideEntry(sid, path) for sid, path in zip(_assign_ids(found, root), (p for _, p in found))]


def _assign_ids(found: list[tuple[str, Path]], root: Path) -> list[str]:
    """Unique ids (compared ignoring case) for ``(natural id, path)`` pairs in path order.

    Every natural id is reserved first, so a slide whose name is ``x-2.svs`` always keeps ``x-2``
    whatever else is in the folder. Of several slides with one natural id the first in path
    order keeps it; each other gets ``ID-EXT`` (``x.tif`` -> ``x-tif``) or, when that is taken,
    ``ID-EXT-HASH`` (8 hex digits of the SHA-256 of its path relative to ``root``), then a counter
    as a last resort. A derived id depends only on the slide's own path, so adding an unrelated
    file renames no other slide.
    """
    taken = {sid.casefold() for sid, _ in found}
    first: set[str] = set()
    ids: list[str] = []
    for sid, path in found:
        key = sid.casefold()
        if key not in first:
            first.add(key)
            ids.append(sid)
            continue
        ext = "".join(ch for ch in path.name[len(slide_id_for(path.name)):].lower() if ch.isalnum()) or "slide"
        digest = hashlib.sha256(path.relative_to(root).as_posix().encode("utf-8", "surrogateescape")).hexdigest()[:8]
        candidates = [f"{sid}-{ext}", f"{sid}-{ext}-{digest}"]
        candidates += (f"{sid}-{ext}-{digest}-{n}" for n in range(2, len(found) + 3))
        new = next(c for c in candidates if c.casefold() not in taken)
        taken.add(new.casefold())
        ids.append(new)
    return ids
