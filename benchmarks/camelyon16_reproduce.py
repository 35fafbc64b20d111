"""CAMELYON16 slide-level metastasis detection, end to end: tiling -> encoding -> 5-fold ABMIL.

Reproduces the usual CAMELYON16 weakly supervised benchmark with wsiengine and prints the
slide-level test AUC next to published anchors::

    python benchmarks/camelyon16_reproduce.py /data/CAMELYON16 --work /scratch/c16-uni \\
        --encoder uni --weights uni.onnx --providers cuda
    python benchmarks/camelyon16_reproduce.py /data/CAMELYON16 --work /scratch/c16-default   # shipped encoder, CPU
    python benchmarks/camelyon16_reproduce.py /data/CAMELYON16 --work /tmp/c16-smoke --limit 4 --folds 2 --max-epochs 3

Run it again with the same ``--work`` to resume: slides whose feature store is complete are not
embedded again (training and the report are redone).

Layout (the official distribution, https://camelyon17.grand-challenge.org/Data/, CC0)::

    ROOT/training/normal/normal_001.tif ... normal_160.tif
    ROOT/training/tumor/tumor_001.tif ... tumor_111.tif
    ROOT/testing/images/test_001.tif ... test_130.tif
    ROOT/testing/reference.csv       one row per test slide, no header:
                                     test_001,Tumor,Macro,Primary / test_002,Normal,,
                                     (a header row is accepted; ``--reference PATH`` overrides)

Slide ids are the file names without ``.tif``, lower-cased. Training labels come from the
folder, test labels from the reference file (column 2: Tumor/Normal).

Protocol (fixed below as module constants)
------------------------------------------
* **Split**: the official one. Train = the 270 training slides (159 or 160 normal, 110 or 111
  tumour, depending on the release; see :data:`EXCLUDED_SLIDES`), test = the 129/130 official
  test slides. For k = 0..4, fold k of a seeded stratified 5-fold partition of the *training*
  slides is the validation set of split k (early stopping, decision threshold), the other four
  folds train, and the official test set is the test set of every split. Test labels are used
  only to score.
* **Excluded slides** (:data:`EXCLUDED_SLIDES`, default ``normal_086`` and ``test_049``): the
  organisers renamed ``Normal_086`` to ``Tumor_111`` after finding metastases in it (a copy that
  still holds ``normal_086`` has it mislabelled, one that holds both has a duplicate), and
  removed ``Test_049`` (a duplicate slide) from the slide-level evaluation. ``test_114`` (not
  exhaustively annotated) was removed only from the lesion-level (FROC) evaluation and is kept.
  ``normal_144`` has black (zero) pixels instead of white glass in parts of its background,
  which some pipelines whiten before tissue detection; it is kept (the engine's
  saturation-based tissue detection does not count black as tissue). See :data:`KNOWN_ISSUES`.
* **Patch budget**: patches at :data:`TARGET_MPP` = 0.5 µm/px (20x), :data:`TILE_PX` = 224 px
  (the encoder spec's own ``target_mpp`` / ``patch_px`` take precedence when they differ, as in
  ``wsiengine embed``), tissue fraction >= :data:`MIN_TISSUE` = 0.25. A slide with more than
  :data:`MAX_TILES_PER_SLIDE` = 40,000 tissue tiles has a uniform random subset of that many
  embedded (seeded by :data:`TILE_SUBSAMPLE_SEED` and the slide id, so independent of
  ``--seed``; ``TileGrid.subset``). During training a bag is subsampled to
  :data:`TRAIN_MAX_TILES` = 8,192 tiles each time it is drawn; validation and test use every
  embedded tile.
* **MIL**: gated-attention ABMIL (Ilse et al. 2018) with a tile head, or ``--model clam_sb``;
  Adam lr 2e-4, weight decay 1e-4, dropout 0.25, hidden 512 / attention 256 (CLAM's "small"
  size), up to 100 epochs, early stopping after 20 epochs without a better validation AUC
  (minimum 10), class-balanced bag sampling, Youden threshold on validation
  (:data:`TRAIN_CONFIG`).
* **Report**: per split test AUC, their mean ± sd, and the **ensemble AUC** (the mean of the
  five splits' probabilities per test slide, with a 95 % bootstrap CI), plus balanced accuracy,
  sensitivity and specificity at the validation-chosen thresholds (for the ensemble: the mean
  of the five thresholds), next to the anchors.

Published anchors (CAMELYON16 official test set, slide-level AUC, as reported by each paper
under its own protocol and features, so they are reference points, not a like-for-like
comparison):

* CLAM-SB, ResNet-50 features: 0.936 -- Lu, Williamson, Chen, Chen, Barbieri & Mahmood,
  "Data-efficient and weakly supervised computational pathology on whole-slide images",
  Nature Biomedical Engineering 5, 555-570 (2021).
* TransMIL: 0.931 -- Shao, Bian, Chen, Wang, Zhang, Ji & Zhang, "TransMIL: Transformer based
  correlated multiple instance learning for whole slide image classification", NeurIPS 2021.
* DTFD-MIL: 0.946 -- Zhang, Meng, Zhao, Li, Yang, Sun, Ji & Zhang, "DTFD-MIL: Double-tier
  feature distillation multiple instance learning for histopathology whole slide image
  classification", CVPR 2022.

Outputs (``--work WORK``)::

    WORK/features/SLIDE_ID.zarr   one complete feature store per slide (wsiengine.store layout)
    WORK/tiles.csv                per slide: split, label, status, tissue tiles, embedded tiles, seconds, error
    WORK/labels.csv               slide_id,label,class,part of every embedded slide
    WORK/splits.csv, WORK/splits/fold{k}.csv   the partition (``wsiengine train-mil --split``)
    WORK/mil/                     train_mil's output: model.onnx + config.json (MILHead.load),
                                  metrics.json, predictions.csv, roc.png, folds/<split>/
    WORK/results.json             everything the printed table shows, plus provenance

Expected cost (estimates, not measurements of this script on CAMELYON16): the 399 slides are
about 0.243 µm/px and 50k-200k px a side; at 0.5 µm/px and 224 px they give of the order of
5,000-40,000 tissue tiles each, a few million tiles in all. Embedding dominates: at the
~110 patches/s measured end to end for the default encoder on a 2-core CPU that is a day or
more; on one modern GPU with a ViT-L encoder (UNI) through TensorRT, a few hours, usually
bounded by slide reading. Features take about 4 KB per tile for D = 1,024 (tens of GB). MIL
training: minutes per split on a GPU (``--device auto``), about an hour for five splits on CPU.
Failures are isolated per slide: a slide that cannot be read is logged, listed at the end and
left out of training, and the others go on.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

logger = logging.getLogger("wsiengine.camelyon16")

# -- protocol constants ----------------------------------------------------------------------

#: The official CAMELYON16 slide ids (releases hold either normal_086 or tumor_111, see below).
OFFICIAL_TRAIN_NORMAL: tuple[str, ...] = tuple(f"normal_{i:03d}" for i in range(1, 161))
OFFICIAL_TRAIN_TUMOR: tuple[str, ...] = tuple(f"tumor_{i:03d}" for i in range(1, 112))
OFFICIAL_TEST: tuple[str, ...] = tuple(f"test_{i:03d}" for i in range(1, 131))

#: Slides left out of training and evaluation (see the module docstring and KNOWN_ISSUES).
EXCLUDED_SLIDES: tuple[str, ...] = ("normal_086", "test_049")

#: What the literature reports about individual slides; only EXCLUDED_SLIDES acts on it.
KNOWN_ISSUES: dict[str, str] = {
    "normal_086": "contains metastases; renamed Tumor_111 by the organisers (old copies hold it mislabelled as "
                  "normal, new ones hold tumor_111 instead)",
    "test_049": "duplicate slide; removed by the organisers from slide- and lesion-level evaluation",
    "test_114": "tumour not exhaustively annotated; removed from lesion-level (FROC) evaluation only (kept here)",
    "normal_144": "background partly black (zero pixels) instead of glass, which some pipelines whiten before tissue "
                  "detection; kept here (the engine's saturation-based detector does not count black as tissue)",
}

TARGET_MPP = 0.5                 # µm/px of the patches (20x), unless the encoder's spec says otherwise
TILE_PX = 224                    # patch side, px at TARGET_MPP, unless the encoder's spec says otherwise
MIN_TISSUE = 0.25                # minimum tissue fraction of a kept tile
MAX_TILES_PER_SLIDE = 40_000     # tiles embedded per slide at most (seeded uniform subsample beyond)
TILE_SUBSAMPLE_SEED = 0          # seeds that subsample with the slide id; independent of --seed
TRAIN_MAX_TILES = 8192           # training-time bag subsample (MILTrainConfig.max_tiles)
FOLDS = 5

#: MILTrainConfig values for CAMELYON16 (model, folds, seed, max_epochs come from the command line).
TRAIN_CONFIG: dict[str, Any] = dict(
    lr=2e-4, weight_decay=1e-4, dropout=0.25, patience=20, min_epochs=10, hidden_dim=512, attn_dim=256,
    max_tiles=TRAIN_MAX_TILES, balanced=True, threshold_rule="youden", tile_weight=0.5,
)
MAX_EPOCHS = 100

#: Published slide-level test AUCs on CAMELYON16 (each under its own protocol and features).
ANCHORS: tuple[dict[str, Any], ...] = (
    {"method": "CLAM-SB (ResNet-50 features)", "test_auc": 0.936,
     "reference": "Lu et al. 2021, Nature Biomedical Engineering 5:555-570"},
    {"method": "TransMIL", "test_auc": 0.931, "reference": "Shao et al., NeurIPS 2021"},
    {"method": "DTFD-MIL", "test_auc": 0.946, "reference": "Zhang et al., CVPR 2022"},
)

SLIDE_SUFFIXES = (".tif", ".tiff")
NORMAL, TUMOR = 0, 1
CLASS_NAMES = {NORMAL: "normal", TUMOR: "tumor"}


class LayoutError(Exception):
    """ROOT is not a CAMELYON16 copy in the official layout (the message lists what is missing)."""


# -- 1. slides and labels --------------------------------------------------------------------

@dataclass
class Cohort:
    """The slides to use: ``{slide_id: path}`` per part, labels for all of them."""

    train: dict[str, Path]
    test: dict[str, Path]
    labels: dict[str, int]
    excluded: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def part(self, slide_id: str) -> str:
        return "train" if slide_id in self.train else "test"

    def counts(self, among: Sequence[str] | None = None) -> dict[str, dict[str, int]]:
        """Slides per part and class (of those in ``among`` when given)."""
        keep = set(among) if among is not None else None
        out = {}
        for part, ids in (("train", self.train), ("test", self.test)):
            y = [self.labels[s] for s in ids if keep is None or s in keep]
            out[part] = {"normal": y.count(NORMAL), "tumor": y.count(TUMOR)}
        return out


def _slide_files(folder: Path) -> dict[str, Path]:
    return {p.stem.lower(): p for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES and not p.name.startswith(".")}


def _label_word(text: str) -> int | None:
    from wsiengine.models.training.mil_data import NEGATIVE_NAMES, POSITIVE_NAMES

    word = text.strip().lower()
    return NORMAL if word in NEGATIVE_NAMES else TUMOR if word in POSITIVE_NAMES else None


def read_reference(path: Path) -> dict[str, int]:
    """``{test_id: 0/1}`` from the official ``reference.csv`` (``test_001,Tumor,Macro,Primary``,
    no header), or the same with a header row (id and label columns found by name)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [[c.strip() for c in row] for row in csv.reader(fh) if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LayoutError(f"cannot read the test reference '{path}': {exc}") from exc
    if not rows:
        raise LayoutError(f"the test reference '{path}' is empty")
    id_col, label_col = 0, 1
    first = rows[0]
    if len(first) < 2 or _label_word(first[1]) is None:  # a header row
        names = [c.lower() for c in first]
        id_col = next((i for i, c in enumerate(names) if c in ("image", "slide", "slide_id", "id", "name", "case")), 0)
        label_col = next((i for i, c in enumerate(names) if c in ("class", "label", "type", "diagnosis", "ground_truth")),
                         1)
        rows = rows[1:]
    labels: dict[str, int] = {}
    bad = []
    for line, row in enumerate(rows, start=1):
        if len(row) <= max(id_col, label_col):
            bad.append(f"row {line} {row}")
            continue
        slide_id = row[id_col].lower()
        for suffix in SLIDE_SUFFIXES:
            slide_id = slide_id.removesuffix(suffix)
        value = _label_word(row[label_col])
        if not slide_id or value is None:
            bad.append(f"row {line} {row}")
            continue
        labels[slide_id] = value
    if bad:
        raise LayoutError(f"the test reference '{path}' has {len(bad)} unreadable row(s) ({'; '.join(bad[:5])}); "
                          "expected rows like 'test_001,Tumor,Macro,Primary' or 'test_002,Normal,,'")
    return labels


def find_slides(root: Path, reference: Path | None = None, *, limit: int | None = None,
                exclude: Sequence[str] = EXCLUDED_SLIDES) -> Cohort:
    """Find the slides of a CAMELYON16 copy in the official layout, with their labels.

    Raises
    ------
    LayoutError
        Listing every missing folder or file, test slides the reference does not label, or a
        class with no slides.
    """
    root = Path(root).expanduser()
    reference = Path(reference).expanduser() if reference else root / "testing" / "reference.csv"
    if not root.is_dir():
        raise LayoutError(f"'{root}' is not a folder; pass the root of a CAMELYON16 copy "
                          "(holding training/normal, training/tumor, testing/images, testing/reference.csv)")
    folders = {"training/normal": root / "training" / "normal", "training/tumor": root / "training" / "tumor",
               "testing/images": root / "testing" / "images"}
    missing = [f"folder {name}/" for name, p in folders.items() if not p.is_dir()]
    if not reference.is_file():
        missing.append(f"test reference {reference if reference != root / 'testing' / 'reference.csv' else 'testing/reference.csv'}")
    files = {name: _slide_files(p) for name, p in folders.items() if p.is_dir()}
    missing += [f"slides (*.tif) in {name}/" for name, found in files.items() if not found]
    if missing:
        raise LayoutError(f"'{root}' is not a CAMELYON16 copy in the official layout; missing: {'; '.join(missing)}. "
                          "Expected ROOT/training/normal/normal_001.tif ..., ROOT/training/tumor/tumor_001.tif ..., "
                          "ROOT/testing/images/test_001.tif ... and ROOT/testing/reference.csv (or --reference PATH).")
    ref = read_reference(reference)
    notes: list[str] = []
    normal, tumor, test = files["training/normal"], files["training/tumor"], files["testing/images"]
    unlabelled = sorted(s for s in test if s not in ref)
    if unlabelled:
        raise LayoutError(f"{len(unlabelled)} test slide(s) have no row in '{reference}': "
                          f"{', '.join(unlabelled[:20])}{' ...' if len(unlabelled) > 20 else ''}")
    both = sorted(set(normal) & set(tumor))
    if both:
        raise LayoutError(f"slide id(s) in both training/normal and training/tumor: {', '.join(both)}")
    if limit is None:  # compare with the official lists: say what this copy lacks
        for name, have, official in (("training/normal", normal, OFFICIAL_TRAIN_NORMAL),
                                     ("training/tumor", tumor, OFFICIAL_TRAIN_TUMOR),
                                     ("testing/images", test, OFFICIAL_TEST)):
            lacking = [s for s in official if s not in have and s not in exclude
                       and s not in ("normal_086", "tumor_111")]
            if lacking:
                notes.append(f"{name}: {len(have)} slides; lacks {len(lacking)} official one(s): "
                             f"{', '.join(lacking[:10])}{' ...' if len(lacking) > 10 else ''}")
        unreferenced = sorted(s for s in ref if s not in test and s not in exclude)
        if unreferenced:
            notes.append(f"{len(unreferenced)} slide(s) in the reference have no image: {', '.join(unreferenced[:10])}")
    excluded = sorted(s for s in exclude if s in normal or s in tumor or s in test)
    drop = set(exclude)
    groups = {
        ("train", NORMAL): sorted(s for s in normal if s not in drop),
        ("train", TUMOR): sorted(s for s in tumor if s not in drop),
        ("test", NORMAL): sorted(s for s in test if s not in drop and ref[s] == NORMAL),
        ("test", TUMOR): sorted(s for s in test if s not in drop and ref[s] == TUMOR),
    }
    if limit is not None:
        groups = {k: v[:limit] for k, v in groups.items()}
    empty = [f"{part} {CLASS_NAMES[c]}" for (part, c), ids in groups.items() if not ids]
    if empty:
        raise LayoutError(f"no slides for: {', '.join(empty)} (after exclusions {list(exclude)}); "
                          "training and AUC need both classes in both parts")
    paths = {**normal, **tumor, **test}
    train = {s: paths[s] for (part, _), ids in groups.items() if part == "train" for s in ids}
    test_set = {s: paths[s] for (part, _), ids in groups.items() if part == "test" for s in ids}
    labels = {s: c for (_, c), ids in groups.items() for s in ids}
    return Cohort(train=dict(sorted(train.items())), test=dict(sorted(test_set.items())), labels=labels,
                  excluded=excluded, notes=notes)


# -- 2. tiling and embedding -----------------------------------------------------------------

@dataclass
class SlideRecord:
    """One slide's embedding outcome (a row of WORK/tiles.csv)."""

    slide_id: str
    part: str
    label: int
    status: str = "pending"          # embedded | skipped (store already complete) | failed
    tissue_tiles: int | None = None  # tiles passing MIN_TISSUE before the budget
    tiles: int | None = None         # tiles embedded
    seconds: float = 0.0
    error: str = ""

    FIELDS = ("slide_id", "part", "label", "status", "tissue_tiles", "tiles", "seconds", "error")

    def row(self) -> list[Any]:
        return [self.slide_id, self.part, self.label, self.status, "" if self.tissue_tiles is None else self.tissue_tiles,
                "" if self.tiles is None else self.tiles, f"{self.seconds:.2f}", self.error]


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        write(fh)
    os.replace(tmp, path)


def _write_manifest(path: Path, records: Sequence[SlideRecord]) -> None:
    def write(fh: Any) -> None:
        w = csv.writer(fh)
        w.writerow(SlideRecord.FIELDS)
        w.writerows(r.row() for r in records)

    _write_atomic(path, write)


def _previous_manifest(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh)}


def budget(grid: Any, slide_id: str, max_tiles: int) -> Any:
    """``grid`` unchanged, or a uniform random subset of ``max_tiles`` rows (grid order kept),
    seeded by :data:`TILE_SUBSAMPLE_SEED` and the slide id, so the same on every run."""
    if max_tiles <= 0 or len(grid) <= max_tiles:
        return grid
    rng = np.random.default_rng([TILE_SUBSAMPLE_SEED, zlib.crc32(slide_id.encode())])
    return grid.subset(rng.choice(len(grid), max_tiles, replace=False))


def _check_existing(path: Path, encoder_info: dict[str, Any], target_mpp: float, tile_px: int) -> int:
    """Tiles in a complete store at ``path``, after checking it came from this encoder and tiling.

    Raises StoreError (incomplete or unreadable: the caller re-embeds) or ConfigError (made with
    another encoder or tiling: mixing them would corrupt the experiment)."""
    from wsiengine.errors import ConfigError
    from wsiengine.store import open_store

    group = open_store(path)
    attrs = dict(group.attrs)
    enc = attrs.get("encoder") or {}
    spec = enc.get("spec") or {}
    grid = attrs.get("grid") or {}
    want = encoder_info["spec"]
    problems = []
    if spec.get("name") != want.get("name") or (enc.get("sha256") and enc.get("sha256") != encoder_info.get("sha256")):
        problems.append(f"encoder {spec.get('name')!r} ({str(enc.get('sha256'))[:12]}) instead of "
                        f"{want.get('name')!r} ({str(encoder_info.get('sha256'))[:12]})")
    if grid and (not math.isclose(float(grid.get("target_mpp", target_mpp)), target_mpp, rel_tol=1e-6)
                 or int(grid.get("tile_px", tile_px)) != tile_px):
        problems.append(f"tiles of {grid.get('tile_px')} px at {grid.get('target_mpp')} µm/px instead of "
                        f"{tile_px} px at {target_mpp} µm/px")
    if problems:
        raise ConfigError(f"'{path}' was made with {'; '.join(problems)}. Use another --work folder for this "
                          "encoder, or delete WORK/features to start again.")
    return int(group["features"].shape[0])


def embed_cohort(cohort: Cohort, features_dir: Path, encoder: Any, manifest: Path, *, target_mpp: float,
                 tile_px: int, batch_size: int, mpp: float | None, progress: bool,
                 say: Callable[[str], None]) -> list[SlideRecord]:
    """Tile and embed every slide of ``cohort`` into ``features_dir/SLIDE_ID.zarr``, skipping
    slides whose complete store exists. A slide that fails is recorded and the others go on."""
    from wsiengine import detect_tissue, embed_slide, open_slide, plan_tiles
    from wsiengine.config import TilingConfig
    from wsiengine.errors import ConfigError, StoreError

    features_dir.mkdir(parents=True, exist_ok=True)
    previous = _previous_manifest(manifest)
    encoder_info = encoder.describe()
    ids = list(cohort.train) + list(cohort.test)
    paths = {**cohort.train, **cohort.test}
    records: list[SlideRecord] = []
    for n, slide_id in enumerate(ids, start=1):
        rec = SlideRecord(slide_id, cohort.part(slide_id), cohort.labels[slide_id])
        records.append(rec)
        out = features_dir / f"{slide_id}.zarr"
        if out.exists():
            try:
                rec.tiles = _check_existing(out, encoder_info, target_mpp, tile_px)
                old = previous.get(slide_id, {})
                rec.tissue_tiles = int(old["tissue_tiles"]) if old.get("tissue_tiles") else rec.tiles
                rec.status = "skipped"
                continue
            except ConfigError:
                _write_manifest(manifest, records)
                raise
            except (StoreError, KeyError, OSError, ValueError) as exc:
                logger.warning("%s: existing store is unusable (%s); embedding again", slide_id, exc)
                shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        try:
            with open_slide(paths[slide_id], mpp=mpp) as slide:
                mask = detect_tissue(slide)
                grid = plan_tiles(slide, mask, config=TilingConfig(target_mpp=target_mpp, tile_px=tile_px,
                                                                   min_tissue=MIN_TISSUE))
                rec.tissue_tiles = len(grid)
                if len(grid) == 0:
                    raise RuntimeError(f"no tiles with >= {MIN_TISSUE:.0%} tissue (tissue detection found "
                                       f"{mask.tissue_fraction:.1%} of the slide)")
                grid = budget(grid, slide_id, MAX_TILES_PER_SLIDE)
                embed_slide(slide, grid, encoder, out, batch_size=batch_size, progress=progress)
                rec.tiles = len(grid)
            rec.status = "embedded"
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one slide's failure never stops the others
            rec.status, rec.error = "failed", f"{type(exc).__name__}: {exc}"
            logger.debug("%s failed", slide_id, exc_info=True)
            print(f"FAILED {slide_id} ({paths[slide_id]}): {rec.error}", file=sys.stderr)
        rec.seconds = time.perf_counter() - started
        if rec.status == "embedded":
            capped = f" (of {rec.tissue_tiles}, budget {MAX_TILES_PER_SLIDE})" if rec.tiles != rec.tissue_tiles else ""
            say(f"[{n}/{len(ids)}] {slide_id}: {rec.tiles} tiles{capped} in {rec.seconds:.1f} s")
        _write_manifest(manifest, records)
    _write_manifest(manifest, records)
    return records


# -- 3. labels, splits, training -------------------------------------------------------------

def make_splits(train_ids: Sequence[str], train_labels: Sequence[int], test_ids: Sequence[str], folds: int,
                seed: int) -> list[Any]:
    """Split k validates on fold k of a seeded stratified partition of the training slides,
    trains on the other folds, and tests on the official test slides."""
    from wsiengine.models.training.mil_data import Split
    from wsiengine.errors import TrainingDataError

    y = np.asarray(train_labels, dtype=np.int64)
    counts = np.bincount(y, minlength=2)
    if folds < 2:
        raise TrainingDataError(f"--folds must be >= 2 (fold k validates split k), got {folds}")
    if counts.min() < folds:
        raise TrainingDataError(f"{folds} folds need at least {folds} training slides of each class; there are "
                                f"{int(counts[0])} normal and {int(counts[1])} tumour slides with features")
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(y), dtype=np.int64)
    offset = 0
    for c in (NORMAL, TUMOR):
        members = rng.permutation(np.flatnonzero(y == c))
        fold_of[members] = (np.arange(len(members)) + offset) % folds
        offset += len(members)  # continue the round-robin so fold sizes stay even
    ids = list(train_ids)
    return [Split(name=f"fold{k}", train=tuple(ids[i] for i in np.flatnonzero(fold_of != k)),
                  val=tuple(ids[i] for i in np.flatnonzero(fold_of == k)), test=tuple(test_ids))
            for k in range(folds)]


def write_labels(path: Path, records: Sequence[SlideRecord]) -> dict[str, int]:
    labels = {r.slide_id: r.label for r in records if r.status in ("embedded", "skipped")}

    def write(fh: Any) -> None:
        w = csv.writer(fh)
        w.writerow(["slide_id", "label", "class", "part"])
        w.writerows([r.slide_id, r.label, CLASS_NAMES[r.label], r.part] for r in records if r.slide_id in labels)

    _write_atomic(path, write)
    return labels


# -- 4. results ------------------------------------------------------------------------------

def _stats(values: Sequence[int]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "min": None, "median": None, "mean": None, "max": None, "total": 0}
    a = np.asarray(values)
    return {"n": len(a), "min": int(a.min()), "median": float(np.median(a)), "mean": round(float(a.mean()), 1),
            "max": int(a.max()), "total": int(a.sum())}


def _none(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


def summarise(result: Any, records: Sequence[SlideRecord], cohort: Cohort, *, encoder_info: dict[str, Any],
              config: Any, args: argparse.Namespace, target_mpp: float, tile_px: int,
              seconds: dict[str, float]) -> dict[str, Any]:
    """results.json: per split and ensemble test metrics next to the anchors, with provenance."""
    from wsiengine.models.training.mil_metrics import binary_metrics, bootstrap_auc_ci, roc_auc

    folds = []
    test_probs: dict[str, list[float]] = {}
    test_labels: dict[str, int] = {}
    for f in result.folds:
        m = f.test
        folds.append({"split": f.split.name, "n_train": len(f.split.train), "n_val": len(f.split.val),
                      "n_test": len(f.split.test), "best_epoch": f.best_epoch, "epochs_run": f.epochs_run,
                      "threshold": f.threshold, "val_auc": _none(f.val.auc),
                      "test_auc": _none(m.auc) if m else None,
                      "test_balanced_accuracy": _none(m.balanced_accuracy) if m else None,
                      "test_sensitivity": _none(m.sensitivity) if m else None,
                      "test_specificity": _none(m.specificity) if m else None})
        if "test" in f.predictions:
            ids, ys, ps = f.predictions["test"]
            for s, yv, p in zip(ids, ys, ps):
                test_probs.setdefault(s, []).append(float(p))
                test_labels[s] = int(yv)
    aucs = [f["test_auc"] for f in folds if f["test_auc"] is not None]
    across = {"mean": float(np.mean(aucs)) if aucs else None,
              "sd": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else (0.0 if aucs else None)}
    ensemble: dict[str, Any] = {"auc": None}
    ids = sorted(test_probs)
    if ids:
        y = np.array([test_labels[s] for s in ids])
        p = np.array([np.mean(test_probs[s]) for s in ids])
        threshold = float(np.mean([f.threshold for f in result.folds]))
        m = binary_metrics(p, y, threshold)
        both = 0 < y.sum() < len(y)
        lo, hi = bootstrap_auc_ci(y, p, resamples=1000, seed=0) if both else (float("nan"), float("nan"))
        ensemble = {"auc": roc_auc(y, p) if both else None, "auc_ci95": [_none(lo), _none(hi)],
                    "threshold": threshold, "threshold_rule": "mean of the splits' validation thresholds",
                    "balanced_accuracy": _none(m.balanced_accuracy), "sensitivity": _none(m.sensitivity),
                    "specificity": _none(m.specificity), "n_test": len(ids), "n_test_tumor": int(y.sum()),
                    "probabilities": {s: round(float(v), 6) for s, v in zip(ids, p)}}
    ok = [r for r in records if r.status in ("embedded", "skipped")]
    tiles = [r.tiles for r in ok if r.tiles is not None]
    tissue = [r.tissue_tiles for r in ok if r.tissue_tiles is not None]
    anchors = [{**a, "difference": (round(ensemble["auc"] - a["test_auc"], 4) if ensemble["auc"] is not None
                                    else None)} for a in ANCHORS]
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "benchmark": "CAMELYON16 slide-level metastasis detection (official train/test split)",
        "root": str(Path(args.root).resolve()),
        "encoder": {"name": encoder_info["spec"].get("name"), "embed_dim": encoder_info["spec"].get("embed_dim"),
                    "file": encoder_info.get("file"), "sha256": encoder_info.get("sha256"),
                    "providers": encoder_info.get("providers")},
        "protocol": {"target_mpp": target_mpp, "tile_px": tile_px, "min_tissue": MIN_TISSUE,
                     "max_tiles_per_slide": MAX_TILES_PER_SLIDE, "tile_subsample_seed": TILE_SUBSAMPLE_SEED,
                     "train_max_tiles": config.max_tiles, "folds": len(result.folds), "seed": config.seed,
                     "excluded_slides": list(EXCLUDED_SLIDES), "limit": args.limit},
        "mil_config": config.to_dict(),
        "slides": {"counts": cohort.counts([r.slide_id for r in ok]), "found": cohort.counts(),
                   "excluded_present": cohort.excluded,
                   "failed": {r.slide_id: r.error for r in records if r.status == "failed"},
                   "embedded_now": sum(r.status == "embedded" for r in records),
                   "resumed": sum(r.status == "skipped" for r in records), "notes": cohort.notes},
        "tiles_per_slide": {"embedded": _stats(tiles), "tissue": _stats(tissue),
                            "capped_by_budget": sum(1 for r in ok if r.tiles is not None and r.tissue_tiles is not None
                                                    and r.tiles < r.tissue_tiles)},
        "folds": folds,
        "test_auc_across_splits": across,
        "ensemble": ensemble,
        "anchors": anchors,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "outputs": {"work": str(Path(args.work).resolve()), "mil": str(result.out_dir) if result.out_dir else None},
        "environment": {"python": platform.python_version(), "platform": platform.platform(),
                        "wsiengine": _engine_version()},
    }


def _engine_version() -> str:
    import wsiengine

    return wsiengine.__version__


def _f(v: Any, digits: int = 3) -> str:
    return "  -  " if v is None else f"{v:.{digits}f}"


def format_table(res: dict[str, Any]) -> str:
    """The printed report: per split, mean ± sd and ensemble test metrics, then the anchors."""
    enc, t, c = res["encoder"], res["tiles_per_slide"], res["slides"]["counts"]
    lines = [
        f"CAMELYON16 slide-level test AUC -- {res['date']}",
        f"encoder {enc['name']} ({enc['embed_dim']}-d, sha256 {str(enc['sha256'])[:12]}, {', '.join(enc['providers'] or [])}); "
        f"MIL {res['mil_config']['model']}, {res['protocol']['folds']} splits, seed {res['protocol']['seed']}",
        f"slides: train {c['train']['normal']} normal + {c['train']['tumor']} tumour, test {c['test']['normal']} normal "
        f"+ {c['test']['tumor']} tumour; excluded by protocol: {', '.join(EXCLUDED_SLIDES) or 'none'} "
        f"({len(res['slides']['excluded_present'])} present in this copy); failed {len(res['slides']['failed'])}",
        f"tiles/slide ({res['protocol']['tile_px']} px at {res['protocol']['target_mpp']} µm/px, budget "
        f"{res['protocol']['max_tiles_per_slide']:,}): min {t['embedded']['min']}, median {t['embedded']['median']}, "
        f"mean {t['embedded']['mean']}, max {t['embedded']['max']} ({t['embedded']['total']:,} in all; "
        f"{t['capped_by_budget']} slide(s) capped)",
        "",
        f"{'split':<10} {'epoch':>5} {'thresh':>6} {'val AUC':>8} {'test AUC':>8} {'bal.acc':>7} {'sens':>5} {'spec':>5}",
    ]
    for f in res["folds"]:
        lines.append(f"{f['split']:<10} {f['best_epoch']:>5} {f['threshold']:>6.3f} {_f(f['val_auc']):>8} "
                     f"{_f(f['test_auc']):>8} {_f(f['test_balanced_accuracy']):>7} {_f(f['test_sensitivity'], 2):>5} "
                     f"{_f(f['test_specificity'], 2):>5}")
    a = res["test_auc_across_splits"]
    if a["mean"] is not None:
        lines.append(f"{'mean ± sd':<10} {'':>5} {'':>6} {'':>8} {a['mean']:.3f} ± {a['sd']:.3f}")
    e = res["ensemble"]
    if e.get("auc") is not None:
        lo, hi = e["auc_ci95"]
        ci = f" (95% CI {lo:.3f}-{hi:.3f})" if lo is not None else ""
        lines.append(f"{'ensemble':<10} {'':>5} {e['threshold']:>6.3f} {'':>8} {e['auc']:>8.3f} "
                     f"{_f(e['balanced_accuracy']):>7} {_f(e['sensitivity'], 2):>5} {_f(e['specificity'], 2):>5}{ci}")
    lines += ["", "published anchors (test AUC; each paper's own protocol and features):"]
    for anchor in res["anchors"]:
        diff = f"   ours {anchor['difference']:+.3f}" if anchor["difference"] is not None else ""
        lines.append(f"  {anchor['method']:<30} {anchor['test_auc']:.3f}   {anchor['reference']:<56}{diff}")
    if res["slides"]["failed"]:
        lines += ["", f"{len(res['slides']['failed'])} slide(s) failed and were left out:"]
        lines += [f"  {s}: {err}" for s, err in res["slides"]["failed"].items()]
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="camelyon16_reproduce.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", metavar="ROOT", help="CAMELYON16 copy in the official layout (training/, testing/)")
    p.add_argument("--work", required=True, metavar="DIR", help="output and resume folder")
    p.add_argument("--reference", metavar="PATH", help="test labels CSV (default ROOT/testing/reference.csv)")
    p.add_argument("--encoder", default="default", help="'default', a registry name (with --weights), or an .onnx path")
    p.add_argument("--weights", help="the exported .onnx for a registry encoder")
    p.add_argument("--providers", default="auto", help="auto, tensorrt, cuda or cpu (comma-separated for a list)")
    p.add_argument("--allow-fallback", action="store_true", help="fall back to CPU when a GPU provider is missing")
    p.add_argument("--mpp", type=float, help="level-0 µm/px for slides whose files carry none")
    p.add_argument("--model", default="abmil", choices=["abmil", "clam_sb"])
    p.add_argument("--folds", type=int, default=FOLDS, help=f"stratified folds of the training slides (default {FOLDS})")
    p.add_argument("--max-epochs", type=int, default=MAX_EPOCHS)
    p.add_argument("--seed", type=int, default=0, help="seeds the fold partition and training")
    p.add_argument("--batch-size", type=int, default=64, help="patches per encoder batch")
    p.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"], help="where MIL trains")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads for MIL training (0 = physical cores)")
    p.add_argument("--cache-gb", type=float, default=4.0, help="memory for caching bags between epochs, GiB")
    p.add_argument("--limit", type=int, metavar="N", help="first N slides per class and part (smoke tests)")
    p.add_argument("--quiet", action="store_true", help="no progress or per-slide lines; the table and errors only")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 2 on a layout, configuration or training-data error."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
    say: Callable[[str], None] = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    progress = sys.stderr.isatty() and not args.quiet
    if args.limit is not None and args.limit < 1:
        print("error: --limit must be >= 1", file=sys.stderr)
        return 2
    from wsiengine.errors import WsiEngineError

    try:
        return _run(args, say, progress)
    except LayoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WsiEngineError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace, say: Callable[[str], None], progress: bool) -> int:
    started = time.perf_counter()
    cohort = find_slides(Path(args.root), Path(args.reference) if args.reference else None, limit=args.limit)
    c = cohort.counts()
    say(f"CAMELYON16 at {args.root}: train {c['train']['normal']} normal + {c['train']['tumor']} tumour, "
        f"test {c['test']['normal']} normal + {c['test']['tumor']} tumour"
        + (f"; excluded {', '.join(cohort.excluded)}" if cohort.excluded else ""))
    for note in cohort.notes:
        logger.warning("%s", note)

    from wsiengine import Encoder

    providers = args.providers.split(",") if "," in args.providers else args.providers
    encoder = Encoder.load(args.encoder, weights=args.weights, providers=providers, allow_fallback=args.allow_fallback)
    target_mpp = float(getattr(encoder.spec, "target_mpp", None) or TARGET_MPP)
    tile_px = int(getattr(encoder.spec, "patch_px", None) or TILE_PX)
    say(f"encoder {encoder.spec.name} ({encoder.embed_dim}-d) on {encoder.providers[0]}; "
        f"{tile_px} px tiles at {target_mpp} µm/px, min tissue {MIN_TISSUE}, at most {MAX_TILES_PER_SLIDE:,} per slide")

    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    features_dir = work / "features"
    records = embed_cohort(cohort, features_dir, encoder, work / "tiles.csv", target_mpp=target_mpp,
                           tile_px=tile_px, batch_size=args.batch_size, mpp=args.mpp, progress=progress, say=say)
    t_embed = time.perf_counter()
    failed = [r for r in records if r.status == "failed"]
    resumed = sum(r.status == "skipped" for r in records)
    say(f"features: {sum(r.status == 'embedded' for r in records)} slide(s) embedded, {resumed} already done"
        + (f", {len(failed)} failed ({', '.join(r.slide_id for r in failed)})" if failed else ""))

    try:
        from wsiengine.config import MILTrainConfig
        from wsiengine.models.training.mil_data import FeatureBags, write_splits_csv
        from wsiengine.models.training.mil_train import train_mil
    except ImportError as exc:
        print(f"error: MIL training needs torch, onnx and matplotlib (pip install 'wsiengine[train]'): {exc}",
              file=sys.stderr)
        return 2
    labels = write_labels(work / "labels.csv", records)
    config = MILTrainConfig(model=args.model, folds=args.folds, seed=args.seed, max_epochs=args.max_epochs,
                            device=args.device, threads=args.threads, cache_gb=args.cache_gb,
                            **{**TRAIN_CONFIG, "min_epochs": min(TRAIN_CONFIG["min_epochs"], args.max_epochs)})
    bags = FeatureBags.from_stores(features_dir, labels, cache_bytes=int(config.cache_gb * (1 << 30)))
    train_ids = [s for s in bags.slide_ids if s in cohort.train]
    test_ids = [s for s in bags.slide_ids if s in cohort.test]
    splits = make_splits(train_ids, [labels[s] for s in train_ids], test_ids, args.folds, args.seed)
    write_splits_csv(splits, work / "splits.csv")
    (work / "splits").mkdir(exist_ok=True)
    for sp in splits:
        write_splits_csv([sp], work / "splits" / f"{sp.name}.csv")
    say(f"training {args.model} on {len(train_ids)} slides ({args.folds} splits, up to {args.max_epochs} epochs), "
        f"testing on {len(test_ids)}")
    provenance = {"benchmark": "camelyon16", "labels_csv": str((work / "labels.csv").resolve()),
                  "features_dir": str(features_dir.resolve()), "split_files": [str((work / "splits.csv").resolve())]}
    result = train_mil(bags, splits, config, work / "mil", progress=progress, overwrite=True, provenance=provenance)
    t_train = time.perf_counter()

    res = summarise(result, records, cohort, encoder_info=encoder.describe(), config=config, args=args,
                    target_mpp=target_mpp, tile_px=tile_px,
                    seconds={"embed": t_embed - started, "train": t_train - t_embed, "total": t_train - started})
    _write_atomic(work / "results.json", lambda fh: json.dump(res, fh, indent=2))
    print(format_table(res))
    print(f"\nwrote {work / 'results.json'}, {work / 'mil'} (MILHead.load), {work / 'tiles.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
