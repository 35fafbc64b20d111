"""Slide-level training data for MIL: labels, feature stores, and train/validation/test splits.

No torch here; :mod:`wsiengine.models.training.mil_train` trains on what this module loads.

>>> labels = read_labels_csv("labels.csv")                 # {"slide_a": 1, "slide_b": 0, ...}
>>> bags = FeatureBags.from_stores("results/", labels)      # one SLIDE_ID.zarr per labelled slide
>>> splits = stratified_kfold_splits(bags.slide_ids, bags.labels, folds=5, seed=0)
>>> splits = read_split_files(["splits_0.csv"], bags.slide_ids)   # or the user's own

**labels.csv** has a header with the columns ``slide_id`` and ``label`` (others are ignored).
Labels are 0/1 (or true/false), or two class names: ``normal``/``negative``/``benign`` read as
0 and ``tumor``/``tumour``/``positive``/``metastasis``/``malignant`` as 1.

**Split files** are CSV, in one of two layouts:

* long: columns ``slide_id,split`` with ``split`` in ``train``/``val``/``test`` (``validation``
  also accepted) and an optional ``fold`` column, one split per distinct fold value;
* wide (CLAM's ``splits_K.csv``): columns ``train``, ``val``, ``test``, each listing slide ids.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from ...atomic import atomic_write
from ...errors import MissingFeaturesError, StoreError, TrainingDataError

__all__ = ["read_labels_csv", "FeatureBags", "Split", "stratified_kfold_splits", "read_split_files",
           "write_splits_csv", "NEGATIVE_NAMES", "POSITIVE_NAMES"]

logger = logging.getLogger("wsiengine")

NEGATIVE_NAMES = frozenset({"0", "false", "no", "neg", "negative", "normal", "benign"})
POSITIVE_NAMES = frozenset({"1", "true", "yes", "pos", "positive", "tumor", "tumour", "metastasis", "metastatic",
                            "malignant", "cancer"})
_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "test": "test", "testing": "test"}


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise TrainingDataError(f"'{path}' does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]
            header = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TrainingDataError(f"cannot read '{path}' as CSV: {exc}") from exc
    return header, rows


def read_labels_csv(path: str | os.PathLike[str]) -> dict[str, int]:
    """``{slide_id: 0 or 1}`` from a CSV with ``slide_id`` and ``label`` columns, in file order.

    Raises
    ------
    TrainingDataError
        Missing columns, unreadable labels, a slide listed twice with different labels, a
        single class, or no rows.
    """
    path = Path(path).expanduser()
    header, rows = _read_csv(path)
    if "slide_id" not in header or "label" not in header:
        raise TrainingDataError(f"'{path}' needs a header with the columns slide_id,label; it has {header}")
    labels: dict[str, int] = {}
    bad: list[str] = []
    for line, row in enumerate(rows, start=2):
        slide_id, text = row.get("slide_id", ""), row.get("label", "").lower()
        if not slide_id:
            if any(row.values()):
                bad.append(f"line {line}: empty slide_id")
            continue
        if text in NEGATIVE_NAMES:
            value = 0
        elif text in POSITIVE_NAMES:
            value = 1
        else:
            bad.append(f"line {line}: {slide_id!r} has label {row.get('label')!r}")
            continue
        if labels.get(slide_id, value) != value:
            bad.append(f"line {line}: {slide_id!r} is listed again with a different label")
        labels[slide_id] = value
    if bad:
        raise TrainingDataError(f"'{path}': {len(bad)} unreadable row(s): {'; '.join(bad[:10])}"
                                f"{' ...' if len(bad) > 10 else ''}. Labels are 0/1 or a class name "
                                f"({sorted(NEGATIVE_NAMES)} -> 0, {sorted(POSITIVE_NAMES)} -> 1)")
    if not labels:
        raise TrainingDataError(f"'{path}' lists no slides")
    counts = np.bincount(list(labels.values()), minlength=2)
    if counts.min() == 0:
        raise TrainingDataError(f"'{path}' has only one class ({int(counts[0])} negative, {int(counts[1])} "
                                "positive slides); a slide classifier needs both")
    return labels


def _encoder_name(described: object) -> str | None:
    """The encoder name in a store's ``encoder`` attribute (``Encoder.describe()``: under ``spec``)."""
    if not isinstance(described, dict):
        return None
    spec = described.get("spec")
    name = spec.get("name") if isinstance(spec, dict) else None
    return str(name or described.get("name") or "") or None


def _list_ids(ids: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


class FeatureBags:
    """The labelled slides' tile embeddings, read from their Zarr stores on demand.

    Bags are cached in memory up to ``cache_bytes`` (least recently used evicted first), so a
    cohort larger than memory still trains; a cached bag is returned without a copy.

    Attributes
    ----------
    slide_ids : list[str]
    labels : np.ndarray
        ``(S,)`` int64 0/1.
    paths : list[Path]
        The stores, ``FEATURES_DIR/SLIDE_ID.zarr``.
    n_tiles : np.ndarray
        ``(S,)`` int64 tiles per slide.
    in_dim : int
        D, the embedding size (the same for every store).
    encoder : str or None
        The encoder that wrote the features (from the stores' attributes), when they agree.
    target_mpp, tile_px : float, int or None
        The tiling the stores share (µm/px and pixels at that resolution), None when they differ.
    """

    def __init__(self, slide_ids: Sequence[str], labels: Sequence[int], paths: Sequence[Path], n_tiles: Sequence[int],
                 in_dim: int, encoder: str | None = None, cache_bytes: int = 4 << 30) -> None:
        self.slide_ids = list(slide_ids)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.paths = [Path(p) for p in paths]
        self.n_tiles = np.asarray(n_tiles, dtype=np.int64)
        self.in_dim = int(in_dim)
        self.encoder = encoder
        self.target_mpp: float | None = None
        self.tile_px: int | None = None
        self.cache_bytes = int(cache_bytes)
        self._index = {s: i for i, s in enumerate(self.slide_ids)}
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __repr__(self) -> str:
        pos = int(self.labels.sum())
        return (f"FeatureBags({len(self)} slides: {pos} positive, {len(self) - pos} negative; D={self.in_dim}; "
                f"{int(self.n_tiles.sum()):,} tiles; encoder={self.encoder!r})")

    def index(self, slide_ids: Iterable[str]) -> np.ndarray:
        """Positions of ``slide_ids`` in this collection."""
        try:
            return np.array([self._index[s] for s in slide_ids], dtype=np.int64)
        except KeyError as exc:
            raise TrainingDataError(f"slide {exc.args[0]!r} is not among the labelled slides with features") from None

    @classmethod
    def from_stores(cls, features_dir: str | os.PathLike[str], labels: Mapping[str, int], *,
                    cache_bytes: int = 4 << 30) -> "FeatureBags":
        """Find ``FEATURES_DIR/SLIDE_ID.zarr`` for every labelled slide and check them.

        Raises
        ------
        MissingFeaturesError
            Some labelled slides have no complete store; the message lists every one (and
            says which are incomplete), so the user can embed them or drop them from the CSV.
        TrainingDataError
            The folder does not exist, stores disagree on D or encoder, or a store is empty.
        """
        from ...store import open_store

        root = Path(features_dir).expanduser()
        if not root.is_dir():
            raise TrainingDataError(f"features folder '{root}' does not exist; pass the folder holding the "
                                    "SLIDE_ID.zarr stores written by `wsiengine embed`")
        missing: list[str] = []
        incomplete: list[str] = []
        unreadable: list[str] = []
        found: list[tuple[str, int, Path, int, int, str | None]] = []
        grids: set[tuple[float | None, int | None]] = set()
        for slide_id, label in labels.items():
            path = root / f"{slide_id}.zarr"
            if not path.exists():
                if (root / f"{slide_id}.zarr.partial").exists():
                    incomplete.append(slide_id)
                else:
                    missing.append(slide_id)
                continue
            try:
                group = open_store(path)
                features = group["features"]
            except StoreError as exc:
                (incomplete if "incomplete" in str(exc) else unreadable).append(f"{slide_id} ({exc})")
                continue
            except (KeyError, OSError, ValueError) as exc:
                unreadable.append(f"{slide_id} ({type(exc).__name__}: {exc})")
                continue
            n, d = (int(s) for s in features.shape)
            encoder = _encoder_name(group.attrs.get("encoder"))
            grid = group.attrs.get("grid") or {}
            grids.add((grid.get("target_mpp"), grid.get("tile_px")))
            found.append((slide_id, int(label), path, n, d, encoder))
        if missing or incomplete or unreadable:
            parts = []
            if missing:
                parts.append(f"{len(missing)} have no store: {_list_ids(missing)}")
            if incomplete:
                parts.append(f"{len(incomplete)} have an incomplete store: {_list_ids(incomplete)}")
            if unreadable:
                parts.append(f"{len(unreadable)} have an unreadable store: {_list_ids(unreadable)}")
            raise MissingFeaturesError(
                f"{len(missing) + len(incomplete) + len(unreadable)} of {len(labels)} labelled slides have no "
                f"features in '{root}' ({'; '.join(parts)}). Embed them (`wsiengine embed SLIDE -o "
                f"{root}/SLIDE_ID.zarr`) or remove them from the labels CSV.",
                missing + [s.split(" ")[0] for s in incomplete + unreadable])
        dims = sorted({f[4] for f in found})
        if len(dims) > 1:
            by_dim = {d: [f[0] for f in found if f[4] == d] for d in dims}
            raise TrainingDataError("the feature stores hold embeddings of different sizes: " + "; ".join(
                f"D={d}: {_list_ids(ids, 5)}" for d, ids in by_dim.items()) + ". Embed every slide with one encoder.")
        encoders = sorted({f[5] for f in found if f[5]})
        if len(encoders) > 1:
            raise TrainingDataError(f"the feature stores come from different encoders {encoders}; embed every slide "
                                    "with one encoder")
        empty = [f[0] for f in found if f[3] == 0]
        if empty:
            raise TrainingDataError(f"{len(empty)} slide(s) have no tiles (empty bags): {_list_ids(empty)}; check "
                                    "their tissue detection or drop them from the labels CSV")
        if len(grids) > 1:
            logger.warning("the feature stores were tiled at different resolutions or tile sizes (target_mpp, tile_px): "
                           "%s; a head trained on them expects a mixture", sorted(grids, key=str))
        bags = cls([f[0] for f in found], [f[1] for f in found], [f[2] for f in found], [f[3] for f in found],
                   dims[0], encoders[0] if encoders else None, cache_bytes)
        if len(grids) == 1:
            bags.target_mpp, bags.tile_px = next(iter(grids))
        return bags

    @classmethod
    def from_arrays(cls, bags: Mapping[str, np.ndarray], labels: Mapping[str, int]) -> "FeatureBags":
        """In-memory bags ``{slide_id: (N, D) float32}`` (tests, notebooks); every bag is cached."""
        ids = [s for s in labels if s in bags]
        missing = [s for s in labels if s not in bags]
        if missing:
            raise MissingFeaturesError(f"{len(missing)} labelled slides have no features: {_list_ids(missing)}",
                                       missing)
        arrays = [np.ascontiguousarray(bags[s], dtype=np.float32) for s in ids]
        dims = {a.shape[1] for a in arrays}
        if len(dims) != 1:
            raise TrainingDataError(f"bags have different embedding sizes {sorted(dims)}")
        out = cls(ids, [labels[s] for s in ids], [Path(s) for s in ids], [len(a) for a in arrays], dims.pop(),
                  cache_bytes=sum(a.nbytes for a in arrays) + 1)
        for i, a in enumerate(arrays):
            out._put(i, a)
        return out

    def _put(self, i: int, array: np.ndarray) -> None:
        if array.nbytes > self.cache_bytes:
            return
        while self._cache and self._cached_bytes + array.nbytes > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.nbytes
        self._cache[i] = array
        self._cached_bytes += array.nbytes

    def features(self, i: int) -> np.ndarray:
        """Bag ``i``'s ``(N, D)`` float32 embeddings (a cached array is shared: do not modify it)."""
        cached = self._cache.get(i)
        if cached is not None:
            self._cache.move_to_end(i)
            return cached
        from ...store import open_store

        try:
            array = np.ascontiguousarray(open_store(self.paths[i])["features"][:], dtype=np.float32)
        except (StoreError, KeyError, OSError, ValueError) as exc:
            raise TrainingDataError(f"cannot read the features of {self.slide_ids[i]!r} from '{self.paths[i]}': "
                                    f"{exc}") from exc
        if not np.isfinite(array).all():
            raise TrainingDataError(f"the features of {self.slide_ids[i]!r} hold NaN or infinite values; re-embed it")
        self._put(i, array)
        return array


@dataclass(frozen=True)
class Split:
    """One train/validation/test partition of slide ids (``test`` may be empty)."""

    name: str
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...] = ()

    def check(self, labels: Mapping[str, int]) -> None:
        """Raise :class:`TrainingDataError` unless the parts are disjoint, labelled, and train
        and validation each hold both classes."""
        parts = {"train": self.train, "val": self.val, "test": self.test}
        for a in parts:
            for b in parts:
                if a < b and set(parts[a]) & set(parts[b]):
                    both = sorted(set(parts[a]) & set(parts[b]))
                    raise TrainingDataError(f"split {self.name}: {len(both)} slide(s) are in both {a} and {b}: "
                                            f"{_list_ids(both)}")
        unknown = [s for ids in parts.values() for s in ids if s not in labels]
        if unknown:
            raise TrainingDataError(f"split {self.name} names {len(unknown)} slide(s) without a label and features: "
                                    f"{_list_ids(unknown)}")
        for part in ("train", "val"):
            counts = np.bincount([labels[s] for s in parts[part]], minlength=2)
            if counts.min() == 0:
                raise TrainingDataError(f"split {self.name}: its {part} set needs both classes, it has "
                                        f"{int(counts[0])} negative and {int(counts[1])} positive slides")


def stratified_kfold_splits(slide_ids: Sequence[str], labels: Sequence[int], folds: int = 5, *, seed: int = 0,
                            val_fraction: float = 0.2) -> list[Split]:
    """Stratified k-fold splits: split i tests on fold i and validates on a stratified
    ``val_fraction`` of the other slides (at least one of each class); the rest train.

    ``folds=1`` gives one split with no test set. Deterministic in ``seed``.
    """
    ids = list(slide_ids)
    y = np.asarray(labels, dtype=np.int64)
    if len(ids) != len(y):
        raise TrainingDataError(f"{len(ids)} slide ids but {len(y)} labels")
    counts = np.bincount(y, minlength=2)
    need = max(folds, 2) + (1 if folds > 1 else 0)
    if counts.min() < need:
        raise TrainingDataError(f"{folds}-fold stratified splits need at least {need} slides of each class "
                                f"(train, validation and test each hold both); there are {int(counts[0])} negative "
                                f"and {int(counts[1])} positive slides. Use fewer folds or a split file.")
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(ids), dtype=np.int64)
    offset = 0
    for c in (0, 1):
        members = rng.permutation(np.flatnonzero(y == c))
        fold_of[members] = (np.arange(len(members)) + offset) % max(folds, 1)
        offset += len(members)  # continue the round-robin so fold sizes stay even across classes
    splits = []
    for k in range(folds):
        test = np.flatnonzero(fold_of == k) if folds > 1 else np.array([], dtype=np.int64)
        rest = np.setdiff1d(np.arange(len(ids)), test)
        fold_rng = np.random.default_rng([seed, k])
        val_parts = []
        for c in (0, 1):
            members = fold_rng.permutation(rest[y[rest] == c])
            n_val = min(max(1, int(round(val_fraction * len(members)))), len(members) - 1)
            val_parts.append(members[:n_val])
        val = np.sort(np.concatenate(val_parts))
        train = np.setdiff1d(rest, val)
        splits.append(Split(name=f"fold{k}", train=tuple(ids[i] for i in train), val=tuple(ids[i] for i in val),
                            test=tuple(ids[i] for i in test)))
    return splits


def read_split_files(paths: Sequence[str | os.PathLike[str]], slide_ids: Sequence[str] | None = None) -> list[Split]:
    """Read user split files (long or wide layout, see the module docstring), one or more splits
    per file. With ``slide_ids`` given, every named slide must be among them."""
    splits: list[Split] = []
    for raw in paths:
        path = Path(raw).expanduser()
        header, rows = _read_csv(path)
        if {"train", "val", "test"} & set(header) and "slide_id" not in header:
            parts = {p: tuple(r[p] for r in rows if r.get(p)) for p in ("train", "val", "test")}
            splits.append(Split(path.stem, parts["train"], parts["val"], parts["test"]))
            continue
        if "slide_id" not in header or "split" not in header:
            raise TrainingDataError(f"split file '{path}' needs the columns slide_id,split[,fold] (or CLAM's "
                                    f"train,val,test columns); it has {header}")
        folds: dict[str, dict[str, list[str]]] = {}
        for line, row in enumerate(rows, start=2):
            part = _SPLIT_NAMES.get(row["split"].lower())
            if part is None:
                raise TrainingDataError(f"'{path}' line {line}: split {row['split']!r} is not train, val or test")
            fold = row.get("fold") or ""
            folds.setdefault(fold, {"train": [], "val": [], "test": []})[part].append(row["slide_id"])
        for fold, parts in folds.items():
            name = (f"fold{fold}" if fold.isdigit() else fold) if fold else path.stem
            splits.append(Split(name, tuple(parts["train"]), tuple(parts["val"]), tuple(parts["test"])))
    if slide_ids is not None:
        known = set(slide_ids)
        unknown = sorted({s for sp in splits for s in sp.train + sp.val + sp.test} - known)
        if unknown:
            raise MissingFeaturesError(f"the split file(s) name {len(unknown)} slide(s) that are not labelled slides "
                                       f"with features: {_list_ids(unknown)}", unknown)
    return splits


def write_splits_csv(splits: Sequence[Split], path: str | os.PathLike[str]) -> None:
    """Write ``slide_id,split,fold`` rows (the long layout :func:`read_split_files` reads)."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["slide_id", "split", "fold"])
    for sp in splits:
        for part in ("train", "val", "test"):
            for s in getattr(sp, part):
                writer.writerow([s, part, sp.name])
    with atomic_write(path) as fh:
        fh.write(text.getvalue().encode("utf-8"))
