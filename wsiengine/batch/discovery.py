"""Which files of a folder are slides, and the collision-free ids their outputs are named by."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..slide import slide_id_for

__all__ = ["SLIDE_EXTENSIONS", "SlideEntry", "discover_slides"]

#: File extensions taken as slides without probing (case-insensitive).
SLIDE_EXTENSIONS = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide",
                              ".bif", ".dcm", ".qptiff", ".btf"})
#: Extensions never probed (results, tables, documents, archives).
_NOT_SLIDES = frozenset({".csv", ".txt", ".json", ".geojson", ".md", ".xml", ".log", ".py", ".zip", ".gz",
                         ".tar", ".pdf", ".html", ".yaml", ".yml", ".ini", ".npz", ".npy", ".pt", ".onnx"})
@dataclass(frozen=True)
class SlideEntry:
    """A discovered slide: its id (unique in the folder) and path."""

    slide_id: str
    path: Path


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
    not collide; an id taken twice anyway gets a ``-2``, ``-3`` suffix in path order. Hidden
    entries, Zarr stores, MIRAX data folders and ``exclude`` folders are skipped.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise ConfigError(f"slide folder '{root}' does not exist")
    if root.is_file():
        return [SlideEntry(slide_id_for(root), root)]
    excluded = {Path(e).expanduser().resolve() for e in exclude}
    mirax_data = {p.with_suffix("") for p in root.rglob("*.mrxs")}
    entries: list[SlideEntry] = []
    taken: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not d.endswith(".zarr")
                             and not d.endswith(".partial") and (here / d).resolve() not in excluded
                             and here / d not in mirax_data)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = here / name
            suffix = path.suffix.lower()
            if suffix not in SLIDE_EXTENSIONS:
                if not probe_unknown or suffix in _NOT_SLIDES or not _probe(path):
                    continue
            rel = path.relative_to(root)
            sid = "__".join([*rel.parent.parts, slide_id_for(rel.name)])
            count = taken.get(sid, 0) + 1
            taken[sid] = count
            entries.append(SlideEntry(sid if count == 1 else f"{sid}-{count}", path))
    return entries
