"""The per-slide Zarr v3 store: written under a temporary name, renamed when complete.

Layout (this module writes the parts that exist so far; see the README)::

    SLIDE_ID.zarr/                 group; attrs: schema_version, engine_version, complete, ...
      tiles/coords                 (N, 2) int64 level-0 x, y
      tiles/tissue_fraction        (N,) float32
      tiles/grid_index             (N, 2) int64 row, col in the tile lattice
      features                     (N, D) float32, rows in grid order

Features arrive batch by batch in any order; they are buffered per Zarr chunk and each chunk
is written once, when all its rows are in, so memory holds at most the chunks being filled,
never the slide's features. The store is built at ``SLIDE_ID.zarr.partial`` and renamed to
``SLIDE_ID.zarr`` by :meth:`FeatureWriter.commit` only when every row is written: a store
under the final name is complete, and a crash leaves only a ``.partial`` that the next run
replaces.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StoreError
from .tiling import TileGrid

__all__ = ["SCHEMA_VERSION", "FeatureWriter", "read_features", "open_store"]

logger = logging.getLogger("wsiengine")

#: version of the on-disk layout; readers refuse newer ones
SCHEMA_VERSION = 1


def _engine_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("wsiengine")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


class FeatureWriter:
    """Stream a slide's tile embeddings into a new Zarr store.

    Parameters
    ----------
    path : path
        Final store path (``.../SLIDE_ID.zarr``).
    grid : TileGrid
        The tiles; their coordinates are written at once.
    embed_dim : int
        Embedding length D.
    attrs : dict
        JSON-serialisable provenance stored in the group's attributes.
    chunk_rows : int
        Rows per Zarr chunk of ``features``.
    """

    def __init__(self, path: str | os.PathLike[str], grid: TileGrid, embed_dim: int, *, attrs: dict[str, Any] | None = None, chunk_rows: int = 512) -> None:
        import zarr

        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.n = len(grid)
        self.embed_dim = int(embed_dim)
        self.chunk_rows = max(1, min(int(chunk_rows), max(1, self.n)))
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.group = zarr.open_group(str(self.partial), mode="w", zarr_format=3)
            self.group.attrs.update({
                "schema_version": SCHEMA_VERSION,
                "engine_version": _engine_version(),
                "complete": False,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "n_tiles": self.n,
                "embed_dim": self.embed_dim,
                "grid": {
                    "target_mpp": grid.target_mpp, "tile_px": grid.tile_px, "overlap_px": grid.overlap_px,
                    "read_level": grid.read_level, "read_size": list(grid.read_size),
                    "tile_size_level0": list(grid.tile_size_level0), "grid_shape": list(grid.grid_shape),
                    "slide_dimensions": list(grid.slide_dimensions), "slide_mpp": list(grid.slide_mpp),
                },
                **(attrs or {}),
            })
            tiles = self.group.create_group("tiles")
            tiles.create_array("coords", data=np.asarray(grid.coords, np.int64), chunks=(max(1, min(65536, self.n)), 2))
            tiles.create_array("tissue_fraction", data=np.asarray(grid.tissue_fraction, np.float32), chunks=(max(1, min(65536, self.n)),))
            tiles.create_array("grid_index", data=np.asarray(grid.grid_index, np.int64), chunks=(max(1, min(65536, self.n)), 2))
            self.features = self.group.create_array(
                "features", shape=(self.n, self.embed_dim), dtype="float32", chunks=(self.chunk_rows, self.embed_dim), fill_value=np.nan,
            )
        except OSError as exc:
            raise StoreError(f"cannot create the result store '{self.partial}': {exc}. Check the disk has space and is writable.") from exc
        self._pending: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # chunk -> (rows, filled mask)
        self.rows_written = 0

    def write(self, index: np.ndarray, features: np.ndarray) -> None:
        """Add embeddings for grid rows ``index`` (any order, each row once)."""
        index = np.asarray(index, dtype=np.int64)
        features = np.asarray(features, dtype=np.float32)
        if features.shape != (len(index), self.embed_dim):
            raise StoreError(f"features of shape {features.shape} for {len(index)} rows; expected (rows, {self.embed_dim})")
        for chunk in np.unique(index // self.chunk_rows):
            start = int(chunk) * self.chunk_rows
            stop = min(start + self.chunk_rows, self.n)
            sel = (index >= start) & (index < stop)
            buffer, filled = self._pending.get(int(chunk)) or (np.empty((stop - start, self.embed_dim), np.float32), np.zeros(stop - start, bool))
            rows = index[sel] - start
            if filled[rows].any():
                raise StoreError(f"grid rows {index[sel][filled[rows]].tolist()[:5]} were written twice")
            buffer[rows] = features[sel]
            filled[rows] = True
            if filled.all():
                self._flush(start, stop, buffer)
                self._pending.pop(int(chunk), None)
            else:
                self._pending[int(chunk)] = (buffer, filled)

    def _flush(self, start: int, stop: int, rows: np.ndarray) -> None:
        try:
            self.features[start:stop] = rows
        except OSError as exc:
            raise StoreError(f"writing features to '{self.partial}' failed: {exc}. Check free disk space.") from exc
        self.rows_written += stop - start

    def commit(self, **attrs: Any) -> Path:
        """Check every row is written, mark the store complete and move it to its final name."""
        if self.rows_written != self.n or self._pending:
            missing = self.n - self.rows_written
            raise StoreError(f"store '{self.path.name}' is missing {missing} of {self.n} feature rows; not committed")
        self.group.attrs.update({**attrs, "complete": True})
        if self.path.exists():
            old = self.path.with_name(self.path.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.path, old)
            os.replace(self.partial, self.path)
            shutil.rmtree(old)
        else:
            os.replace(self.partial, self.path)
        return self.path

    def abort(self) -> None:
        """Remove the partial store."""
        shutil.rmtree(self.partial, ignore_errors=True)

    def __enter__(self) -> "FeatureWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def open_store(path: str | os.PathLike[str]):
    """Open a committed store read-only (a ``zarr.Group``), refusing incomplete or newer ones."""
    import zarr

    p = Path(path)
    if not p.exists():
        raise StoreError(f"result store '{p}' does not exist")
    group = zarr.open_group(str(p), mode="r")
    version = int(group.attrs.get("schema_version", -1))
    if version > SCHEMA_VERSION:
        raise StoreError(f"'{p.name}' has schema version {version}; this wsiengine reads up to {SCHEMA_VERSION}. Upgrade wsiengine.")
    if not group.attrs.get("complete", False):
        raise StoreError(f"'{p.name}' is incomplete (its run did not finish); rerun the slide")
    return group


def read_features(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(coords (N, 2) int64, features (N, D) float32)`` of a committed store (loads all rows)."""
    group = open_store(path)
    return np.asarray(group["tiles/coords"][:]), np.asarray(group["features"][:])
