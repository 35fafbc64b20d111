"""Where a batch's results go: a local folder, or an fsspec URL."""

from __future__ import annotations

import os
from pathlib import Path

from ..atomic import atomic_write

__all__ = ["ResultsLocation"]


class ResultsLocation:
    """Where results go: a local folder, or an fsspec URL (``s3://bucket/run``, ``file:///...``).

    Local files are written atomically by rename. On a URL, small files are written as whole
    objects, and a slide's outputs are made in a local staging folder and uploaded by
    :meth:`publish`: GeoJSON and PNG first, then the store with its root ``zarr.json`` (which
    says ``complete: true``) last, so a store that opens is a finished one.
    """

    def __init__(self, target: str | os.PathLike[str]) -> None:
        text = os.fspath(target)
        self.is_url = "://" in text
        if self.is_url:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(text)
            self.root = self.root.rstrip("/")
            self.target = text.rstrip("/")
            self.fs.makedirs(self.root, exist_ok=True)
        else:
            self.path = Path(text).expanduser()
            self.path.mkdir(parents=True, exist_ok=True)
            self.target = str(self.path)

    def __str__(self) -> str:
        return self.target

    def join(self, name: str) -> str:
        """The path or URL of ``name`` in the results."""
        return f"{self.target}/{name}" if self.is_url else str(self.path / name)

    def write_bytes(self, name: str, data: bytes) -> None:
        if self.is_url:
            self.fs.pipe_file(f"{self.root}/{name}", data)
        else:
            with atomic_write(self.path / name) as fh:
                fh.write(data)

    def read_text(self, name: str) -> str | None:
        try:
            if self.is_url:
                return self.fs.cat_file(f"{self.root}/{name}").decode("utf-8")
            return (self.path / name).read_text(encoding="utf-8")
        except (OSError, FileNotFoundError):
            return None

    def _put(self, local: Path, remote: str) -> None:
        parent = remote.rsplit("/", 1)[0]
        if parent not in self._made:
            self.fs.makedirs(parent, exist_ok=True)  # object stores: a no-op; file systems need folders
            self._made.add(parent)
        self.fs.put_file(str(local), remote)

    def publish(self, staging: Path, slide_id: str) -> None:
        """Upload one slide's outputs from ``staging`` (URL targets only)."""
        self._made: set[str] = set()
        assets = staging / f"{slide_id}.report"
        for f in sorted(p for p in assets.rglob("*") if p.is_file()) if assets.is_dir() else ():
            self._put(f, f"{self.root}/{slide_id}.report/{f.relative_to(assets).as_posix()}")
        for side in (f"{slide_id}.geojson", f"{slide_id}.heatmap.png", f"{slide_id}.report.md", f"{slide_id}.report.json"):
            if (staging / side).is_file():
                self._put(staging / side, f"{self.root}/{side}")
        store = staging / f"{slide_id}.zarr"
        remote = f"{self.root}/{slide_id}.zarr"
        if self.fs.exists(remote):
            self.fs.rm(remote, recursive=True)
        files = sorted(p for p in store.rglob("*") if p.is_file())
        root_meta = store / "zarr.json"
        for f in files:
            if f != root_meta:
                self._put(f, f"{remote}/{f.relative_to(store).as_posix()}")
        self._put(root_meta, f"{remote}/zarr.json")  # last: the store opens only once it is all there
