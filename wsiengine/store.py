"""The per-slide Zarr v3 store: written under a temporary name, renamed when complete.

Layout (schema version 2; version 1 stores, features only, are still read)::

    SLIDE_ID.zarr/                 group; attrs: schema_version, engine_version, complete, created,
                                   slide (path, name, dimensions, mpp, mpp_source, backend, vendor,
                                   fingerprint), grid, config (tissue, tiling, stream), encoder
                                   (spec, file, sha256, providers), mil (name, model, path, sha256,
                                   threshold), prediction (probability, label, label_name,
                                   threshold, n_tiles), timings (seconds per stage)
      tiles/coords                 (N, 2) int64 level-0 x, y of each tile's top-left corner
      tiles/tissue_fraction        (N,) float32
      tiles/grid_index             (N, 2) int64 row, col in the tile lattice
      features                     (N, D) float32, rows in grid order
      attention                    (N,) float32, sums to 1            (with a MIL head)
      tile_scores                  (N,) float32 in [0, 1]             (with a MIL head)
      tissue_mask                  (H, W) uint8 0/1 at attrs mask_mpp; attrs level0_per_mask_px
      thumbnail                    (h, w, 3) uint8 RGB at attrs mpp; attrs level0_per_px
      heatmaps/<name>/<level>      multiscale rasters (wsiengine.heatmap; OME-NGFF multiscales)

Features arrive batch by batch in any order; they are buffered per Zarr chunk and each chunk
is written once, when all its rows are in, so memory holds at most the chunks being filled,
never the slide's features. The store is built at ``SLIDE_ID.zarr.partial`` and renamed to
``SLIDE_ID.zarr`` by :meth:`FeatureWriter.commit` only when every row is written: a store
under the final name is complete, and a crash leaves only a ``.partial`` that the next run
replaces. :func:`open_result` reads a committed store back as a :class:`ResultStore`.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import replace_directory
from .errors import StoreError
from .tiling import TileGrid

__all__ = ["SCHEMA_VERSION", "FeatureWriter", "ResultStore", "read_features", "open_store", "open_result",
           "slide_fingerprint", "verify_store"]

logger = logging.getLogger("wsiengine")

#: version of the on-disk layout; readers refuse newer ones
SCHEMA_VERSION = 2
#: bytes hashed at each end of a slide file by :func:`slide_fingerprint`
_FINGERPRINT_BYTES = 4 << 20


def slide_fingerprint(path: str | os.PathLike[str]) -> str:
    """A content fingerprint of a slide file: SHA-256 over its size and its first and last
    4 MiB (headers, tile offsets and the last tiles), fast on multi-gigabyte files. A folder
    (MIRAX data, DICOM series) is fingerprinted by its files' names and sizes plus the same
    sample of its largest file."""
    import hashlib

    from .hashing import update_digest

    p = Path(path)
    digest = hashlib.sha256()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            digest.update(f"{f.relative_to(p)}:{f.stat().st_size};".encode())
        if not files:
            return "sha256s:" + digest.hexdigest()
        p = max(files, key=lambda f: f.stat().st_size)
    size = p.stat().st_size
    digest.update(str(size).encode())
    update_digest(digest, p, sample_bytes=_FINGERPRINT_BYTES)
    return "sha256s:" + digest.hexdigest()


def engine_version() -> str:
    """The installed wsiengine version, recorded in stores and reports."""
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
                "engine_version": engine_version(),
                "complete": False,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "n_tiles": self.n,
                "embed_dim": self.embed_dim,
                "grid": {
                    "target_mpp": grid.target_mpp, "tile_px": grid.tile_px, "overlap_px": grid.overlap_px,
                    "read_level": grid.read_level, "read_size": list(grid.read_size),
                    "tile_size_level0": list(grid.tile_size_level0), "grid_shape": list(grid.grid_shape),
                    "slide_dimensions": list(grid.slide_dimensions), "slide_mpp": list(grid.slide_mpp),
                    "stride_level_px": list(grid.stride_level_px),
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

    def add_array(self, name: str, data: np.ndarray, *, chunks: tuple[int, ...] | None = None,
                  attrs: dict[str, Any] | None = None) -> None:
        """Write a whole array (``attention``, ``tile_scores``, ``tissue_mask``, ...) into the partial store."""
        data = np.asarray(data)
        if chunks is None:
            chunks = tuple(max(1, min(s, 4096 if data.ndim > 1 else 65536)) for s in data.shape) or None
        try:
            array = self.group.create_array(name, data=data, chunks=chunks, overwrite=True)
        except OSError as exc:
            raise StoreError(f"writing {name!r} to '{self.partial}' failed: {exc}. Check free disk space.") from exc
        if attrs:
            array.attrs.update(attrs)

    def commit(self, **attrs: Any) -> Path:
        """Check every row is written, mark the store complete and move it to its final name."""
        if self.rows_written != self.n or self._pending:
            missing = self.n - self.rows_written
            raise StoreError(f"store '{self.path.name}' is missing {missing} of {self.n} feature rows; not committed")
        verify_store(self.group, self.partial.name)  # e.g. the partial folder was removed under the writer
        self.group.attrs.update({**attrs, "complete": True})
        return replace_directory(self.partial, self.path)

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

    text = os.fspath(path)
    url = "://" in text
    p = Path(text) if not url else _UrlPath(text)
    if not url and not p.exists():
        raise StoreError(f"result store '{p}' does not exist")
    if url:
        import fsspec

        fs, root = fsspec.core.url_to_fs(text)
        if not fs.exists(root.rstrip("/") + "/zarr.json"):
            raise StoreError(f"result store '{text}' does not exist (or its upload did not finish)")
    try:
        group = zarr.open_group(text if url else str(p), mode="r")
    except Exception as exc:  # noqa: BLE001 - zarr raises several types for a folder that is not a group
        raise StoreError(f"'{p}' is not a wsiengine result store (not a Zarr group: {type(exc).__name__}: {exc})") from exc
    verify_attributes(dict(group.attrs), p.name)
    version = int(group.attrs.get("schema_version", -1))
    if version > SCHEMA_VERSION:
        raise StoreError(f"'{p.name}' has schema version {version}; this wsiengine reads up to {SCHEMA_VERSION}. Upgrade wsiengine.")
    if not group.attrs.get("complete", False):
        raise StoreError(f"'{p.name}' is incomplete (its run did not finish); rerun the slide")
    verify_store(group, p.name)
    return group


# -- the attributes a store's readers rely on, checked before any is used ----------------------
_INT, _NUM, _STR, _BOOL = "integer", "number", "string", "boolean"


def _is_kind(value: Any, kind: Any) -> bool:
    if isinstance(kind, tuple):  # (element kind, length): a fixed-length list
        return (isinstance(value, list) and len(value) == kind[1]
                and all(_is_kind(v, kind[0]) for v in value))
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _NUM:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == _STR:
        return isinstance(value, str)
    if kind == _BOOL:
        return isinstance(value, bool)
    return isinstance(value, kind)  # dict, list


#: ``{key: (kind, required)}`` at the top level and in each recorded section; a kind may end in
#: ``?`` (None allowed). Extra keys are allowed (newer minor versions, user additions).
_ATTRIBUTES: dict[str, tuple[Any, bool]] = {
    "schema_version": (_INT, False), "n_tiles": (_INT, False), "embed_dim": (_INT, False), "complete": (_BOOL, False),
    "status": (_STR, False), "config_key": (_STR + "?", False),  # slide_id: sanitised where it names files
    "slide": (dict, False), "grid": (dict, True), "config": (dict, False), "encoder": (dict, False),
    "mil": ("dict?", False), "prediction": ("dict?", False), "timings": (dict, False), "outputs": (list, False),
}
_SECTIONS: dict[str, dict[str, tuple[Any, bool]]] = {
    "slide": {"path": (_STR + "?", False), "path_from_results": (_STR + "?", False), "name": (_STR, False),
              "dimensions": ((_INT, 2), False), "mpp": ((_NUM, 2), False), "mpp_source": (_STR, False),
              "backend": (_STR, False), "vendor": (_STR + "?", False), "fingerprint": (_STR, False)},
    "grid": {"grid_shape": ((_INT, 2), True), "target_mpp": (_NUM, True), "tile_px": (_INT, True),
             "overlap_px": (_INT, False), "read_level": (_INT, True), "read_size": ((_INT, 2), True),
             "stride_level_px": ((_INT, 2), False), "tile_size_level0": ((_NUM, 2), True),
             "slide_dimensions": ((_INT, 2), True), "slide_mpp": ((_NUM, 2), True)},
    "encoder": {"spec": (dict, False), "file": (_STR, False), "sha256": (_STR + "?", False), "providers": (list, False)},
    "mil": {"name": (_STR + "?", False), "model": (_STR + "?", False), "path": (_STR + "?", False),
            "sha256": (_STR + "?", False), "threshold": (_NUM, False), "class_names": ((_STR, 2), False),
            "target_mpp": (_NUM + "?", False), "tile_px": (_INT + "?", False)},
    "prediction": {"probability": (_NUM, True), "label": (_INT, True), "label_name": (_STR, False),
                   "threshold": (_NUM, False), "n_tiles": (_INT, False), "top_attention_tile": (_INT, False)},
}


#: the most cells a store's tile lattice may declare (a raster of this many float64 is 800 MB):
#: 10,000 x 10,000 tiles, far beyond any slide (a 200,000 px slide in 224 px tiles is 893 x 893)
MAX_GRID_CELLS = 100_000_000
#: the largest tile a store may declare, pixels per side
MAX_TILE_PX = 16_384


def _grid_size_problems(grid: dict[str, Any], n_tiles: Any) -> list[str]:
    """Declared sizes that readers would allocate from (heatmap rasters, tile reads), checked
    before any allocation: positive, a lattice of at most :data:`MAX_GRID_CELLS` cells holding
    at least ``n_tiles`` tiles, tiles of at most :data:`MAX_TILE_PX` px."""
    problems = []
    rows, cols = grid["grid_shape"]
    if rows < 0 or cols < 0 or rows * cols > MAX_GRID_CELLS:
        problems.append(f"grid.grid_shape {rows} x {cols} is not a tile lattice this engine writes "
                        f"(at most {MAX_GRID_CELLS:,} cells)")
    elif isinstance(n_tiles, int) and not isinstance(n_tiles, bool) and not 0 <= n_tiles <= rows * cols:
        problems.append(f"n_tiles {n_tiles} does not fit the {rows} x {cols} tile lattice")
    sizes = [grid["tile_px"], *grid["read_size"], *(grid.get("stride_level_px") or [1, 1])]
    if any(not isinstance(v, int) or not 0 < v <= MAX_TILE_PX for v in sizes):
        problems.append(f"grid tile sizes {sizes} are not between 1 and {MAX_TILE_PX:,} px")
    if any(not (isinstance(v, (int, float)) and 0 < v < 1e9) for v in (*grid["slide_dimensions"], grid["target_mpp"])):
        problems.append("grid.slide_dimensions / target_mpp are not positive sizes")
    return problems


def _check_entries(values: dict[str, Any], schema: dict[str, tuple[Any, bool]], where: str) -> list[str]:
    problems = []
    for key, (kind, required) in schema.items():
        if key not in values:
            if required:
                problems.append(f"{where}{key} is missing")
            continue
        value = values[key]
        optional = isinstance(kind, str) and kind.endswith("?")
        base = {"dict?": dict}.get(kind, kind[:-1] if optional else kind) if isinstance(kind, str) else kind
        if value is None and optional:
            continue
        if not _is_kind(value, base):
            want = (f"{base[1]} {base[0]}s" if isinstance(base, tuple) else getattr(base, "__name__", base))
            problems.append(f"{where}{key} should be {want}, got {str(value)[:40]!r}")
    return problems


def verify_attributes(attrs: dict[str, Any], name: str = "store") -> None:
    """Check the attributes a store's readers use (types, list lengths, finite numbers) before any
    is used: a received store is untrusted. Raises :class:`~wsiengine.errors.StoreError` naming
    each bad entry."""
    problems = _check_entries(attrs, _ATTRIBUTES, "")
    for section, schema in _SECTIONS.items():
        value = attrs.get(section)
        if isinstance(value, dict):
            problems += _check_entries(value, schema, f"{section}.")
    grid = attrs.get("grid")
    if isinstance(grid, dict) and not problems:
        problems += _grid_size_problems(grid, attrs.get("n_tiles"))
    spec = (attrs.get("encoder") or {}).get("spec") if isinstance(attrs.get("encoder"), dict) else None
    if isinstance(spec, dict) and "name" in spec and not isinstance(spec["name"], str):
        problems.append(f"encoder.spec.name should be string, got {str(spec['name'])[:40]!r}")
    if problems:
        raise StoreError(f"'{name}' has damaged metadata ({'; '.join(problems[:8])}"
                         f"{'; ...' if len(problems) > 8 else ''}); rerun the slide (wsiengine run redoes it)")


def _shape(group: Any, name: str) -> tuple[int, ...] | None:
    """The shape of array ``name`` in ``group``, or None when it is missing or not an array."""
    try:
        node = group[name]
    except (KeyError, FileNotFoundError, ValueError):
        return None
    except Exception:  # noqa: BLE001 - zarr raises several types for damaged metadata
        return None
    shape = getattr(node, "shape", None)
    return tuple(int(n) for n in shape) if shape is not None else None


def verify_store(group: Any, name: str = "store") -> None:
    """Check that a store marked complete holds what the schema requires, with consistent shapes:
    ``tiles/coords`` (N, 2) with N the recorded ``n_tiles``, ``features`` (N, D) with D the
    recorded ``embed_dim``, and from schema version 2 ``tiles/tissue_fraction`` (N,) and
    ``tiles/grid_index`` (N, 2); ``attention`` and ``tile_scores`` (N,) when present or when a
    prediction is recorded. Raises :class:`~wsiengine.errors.StoreError` naming what is wrong."""
    problems: list[str] = []
    coords = _shape(group, "tiles/coords")
    n = group.attrs.get("n_tiles")
    if coords is None:
        problems.append("tiles/coords is missing")
    elif len(coords) != 2 or coords[1] != 2:
        problems.append(f"tiles/coords has shape {coords}, expected (N, 2)")
    elif n is not None and coords[0] != int(n):
        problems.append(f"tiles/coords has {coords[0]} rows but the store records {n} tiles")
    if n is None and coords is not None:
        n = coords[0]
    n = None if n is None else int(n)
    required: dict[str, tuple[int | None, ...]] = {"features": (n, group.attrs.get("embed_dim"))}
    if int(group.attrs.get("schema_version", 1)) >= 2:
        required.update({"tiles/tissue_fraction": (n,), "tiles/grid_index": (n, 2)})
    optional = {"attention": (n,), "tile_scores": (n,)}
    if group.attrs.get("prediction") and n:
        required.update(optional)
    for array, expected in {**optional, **required}.items():
        shape = _shape(group, array)
        if shape is None:
            if array in required:
                problems.append(f"{array} is missing")
            continue
        if len(shape) != len(expected) or any(e is not None and int(e) != s for e, s in zip(expected, shape)):
            want = "(" + ", ".join("N" if e is None else str(e) for e in expected) + ("," if len(expected) == 1 else "") + ")"
            problems.append(f"{array} has shape {shape}, expected {want}")
    problems += _declared_size_problems(group)
    if problems:
        raise StoreError(f"'{name}' is marked complete but is damaged ({'; '.join(problems)}); "
                         "rerun the slide (wsiengine run redoes it)")


#: the most values an image the store holds (thumbnail, tissue mask, one heatmap level) may declare
MAX_IMAGE_VALUES = 2**28
#: the widest embedding a store may declare
MAX_EMBED_DIM = 65_536


def _declared_size_problems(group: Any) -> list[str]:
    """Arrays whose declared shape is beyond what this engine writes (read before any is loaded,
    so a received store cannot make a reader allocate terabytes from a few bytes of metadata)."""
    problems = []
    features = _shape(group, "features")
    if features is not None and len(features) == 2 and features[1] > MAX_EMBED_DIM:
        problems.append(f"features declares {features[1]:,} dimensions (at most {MAX_EMBED_DIM:,})")
    images = ["thumbnail", "tissue_mask"]
    try:
        heatmaps = group["heatmaps"]
        images += [f"heatmaps/{n}/{level}" for n in list(heatmaps.group_keys())[:16]
                   for level in list(heatmaps[n].array_keys())[:16]]
    except Exception:  # noqa: BLE001 - no heatmaps (version 1) or a damaged group: readers say so
        pass
    for name in images:
        shape = _shape(group, name)
        if shape is not None and math.prod(shape) > MAX_IMAGE_VALUES:
            problems.append(f"{name} declares shape {shape} ({math.prod(shape):,} values, at most {MAX_IMAGE_VALUES:,})")
    return problems


class ResultStore:
    """A committed per-slide store, read-only (:func:`open_result`).

    Arrays are read on access (``features`` loads all N x D values). Missing optional parts
    (``attention`` without a MIL head, ``heatmaps`` of version-1 stores) are None or empty.
    """

    def __init__(self, path: Path, group: Any) -> None:
        self.path = path
        self.group = group
        self.attrs: dict[str, Any] = dict(group.attrs)

    def __repr__(self) -> str:
        pred = self.prediction
        label = f", {pred.get('label_name')} p={pred.get('probability'):.3f}" if pred else ""
        return f"<ResultStore '{self.path.name}' v{self.schema_version}, {self.n_tiles} tiles{label}>"

    def _array(self, name: str) -> np.ndarray | None:
        try:
            return np.asarray(self.group[name][:])
        except KeyError:
            return None

    schema_version = property(lambda self: int(self.attrs.get("schema_version", 1)))
    n_tiles = property(lambda self: int(self.attrs.get("n_tiles", self.group["tiles/coords"].shape[0])))
    coords = property(lambda self: np.asarray(self.group["tiles/coords"][:]), doc="(N, 2) int64 level-0 x, y")
    tissue_fraction = property(lambda self: np.asarray(self.group["tiles/tissue_fraction"][:]))
    grid_index = property(lambda self: np.asarray(self.group["tiles/grid_index"][:]))
    features = property(lambda self: np.asarray(self.group["features"][:]), doc="(N, D) float32")
    attention = property(lambda self: self._array("attention"), doc="(N,) float32 or None")
    tile_scores = property(lambda self: self._array("tile_scores"), doc="(N,) float32 or None")
    tissue_mask = property(lambda self: self._array("tissue_mask"), doc="(H, W) uint8 or None")
    thumbnail = property(lambda self: self._array("thumbnail"), doc="(h, w, 3) uint8 or None")
    slide = property(lambda self: dict(self.attrs.get("slide") or {}))
    grid = property(lambda self: dict(self.attrs.get("grid") or {}))
    config = property(lambda self: dict(self.attrs.get("config") or {}))
    encoder = property(lambda self: dict(self.attrs.get("encoder") or {}))
    mil = property(lambda self: dict(self.attrs.get("mil") or {}) or None)
    prediction = property(lambda self: dict(self.attrs.get("prediction") or {}) or None)
    node = property(lambda self: dict(self.attrs.get("node") or {}) or None,
                    doc="the node's findings (category, largest_mm, foci, total_area_mm2, ...) or None")
    tile_deposit = property(lambda self: self._array("tile_deposit"), doc="(N,) int32 deposit rank per tile or None")
    timings = property(lambda self: dict(self.attrs.get("timings") or {}))

    def array_attrs(self, name: str) -> dict[str, Any]:
        """Attributes of one array (e.g. ``tissue_mask``'s ``mask_mpp``)."""
        return dict(self.group[name].attrs)

    def tile_grid(self) -> TileGrid:
        """The :class:`~wsiengine.tiling.TileGrid` the store was written from (coordinates and lattice)."""
        g = self.grid
        if not g:
            raise StoreError(f"'{self.path.name}' records no grid")
        return TileGrid(coords=self.coords, tissue_fraction=self.tissue_fraction, grid_index=self.grid_index,
                        grid_shape=tuple(g["grid_shape"]), target_mpp=float(g["target_mpp"]), tile_px=int(g["tile_px"]),
                        overlap_px=int(g.get("overlap_px", 0)), read_level=int(g["read_level"]),
                        read_size=tuple(g["read_size"]), stride_level_px=tuple(g.get("stride_level_px") or
                                                                              _stride(g)),
                        tile_size_level0=tuple(g["tile_size_level0"]), slide_dimensions=tuple(g["slide_dimensions"]),
                        slide_mpp=tuple(g["slide_mpp"]))

    def tissue_polygons(self):
        """Tissue outlines (shapely MultiPolygon, level-0 px) from the stored mask; None without one."""
        from .tissue import mask_to_polygons

        raster = self.tissue_mask
        if raster is None:
            return None
        scale = self.array_attrs("tissue_mask").get("level0_per_mask_px", [1.0, 1.0])
        return mask_to_polygons(raster.astype(bool), (float(scale[0]), float(scale[1])))

    def heatmap_names(self) -> list[str]:
        """Names under ``heatmaps/``."""
        from .heatmap import list_heatmaps

        return list_heatmaps(self.group)


class _UrlPath(str):
    """A store URL with the few ``Path`` attributes messages use (``name``, ``stem``)."""

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]

    @property
    def stem(self) -> str:
        return self.name.rsplit(".", 1)[0]


def _stride(grid: dict[str, Any]) -> tuple[int, int]:
    """Stride in read-level pixels for stores written before it was recorded (no overlap assumed)."""
    tile, overlap = int(grid["tile_px"]), int(grid.get("overlap_px", 0))
    return tuple(int(round(r * (tile - overlap) / tile)) for r in grid["read_size"])


def open_result(path: str | os.PathLike[str]) -> ResultStore:
    """Open a committed per-slide store for reading; refuses incomplete stores and newer schemas."""
    text = os.fspath(path)
    return ResultStore(_UrlPath(text) if "://" in text else Path(text), open_store(text))


def read_features(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(coords (N, 2) int64, features (N, D) float32)`` of a committed store (loads all rows)."""
    group = open_store(path)
    return np.asarray(group["tiles/coords"][:]), np.asarray(group["features"][:])
