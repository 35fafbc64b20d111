"""Train, evaluate and export attention-MIL heads on slide feature stores (torch; the ``[train]`` extra).

>>> from wsiengine.config import MILTrainConfig
>>> from wsiengine.models.training.mil_train import train_mil_from_stores
>>> result = train_mil_from_stores("results/", "labels.csv", "mil_model/", MILTrainConfig(model="abmil", folds=5))
>>> result.overall["test"]["auc"], result.head_dir          # MILHead.load(result.head_dir) runs it without torch

For each split (stratified k-fold, or the user's split files) a fresh head trains on the
training slides, one bag at a time, drawn class-balanced; after every epoch it is evaluated on
the validation slides, and training stops when the validation AUC (ties broken by validation
loss) has not improved for ``patience`` epochs; the best epoch is kept. The decision threshold
is then chosen on the validation predictions only (:func:`~wsiengine.models.training.mil_metrics.select_threshold`)
and applied unchanged to the test slides. Each split's head is exported to ONNX (verified against
torch). The head of the split with the best validation AUC becomes the output head.

The output folder (written as ``OUT.partial`` and renamed when complete)::

    OUT/
      model.onnx, config.json      the selected head: wsiengine.MILHead.load("OUT/")
      metrics.json                 per split and overall: AUC, balanced accuracy, sensitivity,
                                   specificity at the threshold, calibration table, history, config
      predictions.csv              slide_id,split,part,label,probability,predicted
      splits.csv                   slide_id,split,fold: the partition used (re-usable with --split)
      reference.npz                the selected split's training tiles as an EmbeddingReference
                                   (out-of-distribution check: MILHead.load("OUT/").reference)
      roc.png                      test ROC per split and pooled, with operating points
      folds/<split>/               every split's head (model.onnx, config.json)
"""

from __future__ import annotations

import copy
import csv
import datetime as dt
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ...aggregate import REFERENCE_NAME
from ...atomic import replace_directory
from ...config import MILTrainConfig, physical_cores
from ...errors import ConfigError, StoreError, TrainingDataError
from ...ood import EmbeddingReference
from .mil import build_mil
from .mil_data import FeatureBags, Split, read_labels_csv, read_split_files, stratified_kfold_splits, write_splits_csv
from .mil_export import save_mil_head
from .mil_metrics import BinaryMetrics, binary_metrics, calibration_table, plot_roc, roc_auc, select_threshold

__all__ = ["FoldResult", "MILTrainResult", "train_fold", "train_mil", "train_mil_from_stores", "predict_bags",
           "fit_reference", "REFERENCE_COMPONENTS", "REFERENCE_MAX_TILES"]

logger = logging.getLogger("wsiengine")

#: Principal components of the head's embedding reference (reference.npz; 32 x 1280 float32 = 160 kB).
REFERENCE_COMPONENTS = 32
#: At most this many training tiles (a seeded uniform subsample) go into the reference.
REFERENCE_MAX_TILES = 200_000


@dataclass
class FoldResult:
    """One split's trained head and its evaluation.

    Attributes
    ----------
    split : Split
    model : torch.nn.Module
        The head at its best epoch (eval mode, CPU).
    best_epoch, epochs_run : int
        1-based epoch kept, and epochs trained before stopping.
    threshold : float
        Chosen on the validation slides.
    val, test : BinaryMetrics or None
        At ``threshold`` (``test`` None when the split has no test slides).
    predictions : dict
        ``{"val": (ids, labels, probs), "test": (...)}``.
    history : list of dict
        Per epoch: ``epoch``, ``train_loss``, ``val_loss``, ``val_auc``.
    seconds : float
    """

    split: Split
    model: torch.nn.Module
    best_epoch: int
    epochs_run: int
    threshold: float
    val: BinaryMetrics
    test: BinaryMetrics | None
    predictions: dict[str, tuple[list[str], np.ndarray, np.ndarray]]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    best_val_loss: float = float("nan")

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (no model)."""
        return {
            "split": self.split.name,
            "n_train": len(self.split.train), "n_val": len(self.split.val), "n_test": len(self.split.test),
            "best_epoch": self.best_epoch, "epochs_run": self.epochs_run, "threshold": self.threshold,
            "val": self.val.to_dict(), "test": self.test.to_dict() if self.test else None,
            "val_loss": self.best_val_loss, "seconds": round(self.seconds, 2), "history": self.history,
        }


@dataclass
class MILTrainResult:
    """Every split's result, the pooled metrics and where the selected head was written."""

    folds: list[FoldResult]
    selected: str
    overall: dict[str, Any]
    out_dir: Path | None = None

    @property
    def head_dir(self) -> Path | None:
        """The folder :meth:`wsiengine.MILHead.load` opens (None when nothing was written)."""
        return self.out_dir


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but torch sees no CUDA GPU; use device='cpu' or 'auto'")
    return torch.device(name)


def _build(config: MILTrainConfig, in_dim: int) -> torch.nn.Module:
    common = dict(hidden_dim=config.hidden_dim, attn_dim=config.attn_dim, dropout=config.dropout,
                  embed_layers=config.embed_layers)
    if config.model.lower().replace("-", "_") == "abmil":
        return build_mil("abmil", in_dim, tile_head=config.tile_weight > 0, **common)
    return build_mil("clam_sb", in_dim, k_sample=config.k_sample, bag_weight=config.bag_weight, **common)


def _bag_loss(model: torch.nn.Module, x: torch.Tensor, label: int, config: MILTrainConfig) -> torch.Tensor:
    if getattr(model, "name", "") == "abmil":
        loss, _ = model.loss(x, label, tile_weight=config.tile_weight)
    else:
        loss, _ = model.loss(x, label)
    return loss


@torch.no_grad()
def predict_bags(model: torch.nn.Module, bags: FeatureBags, indices: Sequence[int], device: torch.device | str = "cpu"
                 ) -> np.ndarray:
    """Positive-class probabilities ``(len(indices),)`` of whole bags (every tile), model in eval mode."""
    model.eval()
    out = np.empty(len(indices), dtype=np.float64)
    for j, i in enumerate(indices):
        x = torch.from_numpy(np.array(bags.features(int(i)), copy=False)).to(device)
        out[j] = float(torch.sigmoid(model(x)[0]).reshape(-1)[0])
    return out


def _bce(probs: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def _epoch_order(labels: np.ndarray, balanced: bool, rng: np.random.Generator) -> np.ndarray:
    """Positions into the training set for one epoch: class-balanced with replacement, or a permutation."""
    n = len(labels)
    if not balanced:
        return rng.permutation(n)
    counts = np.bincount(labels, minlength=2).astype(np.float64)
    weights = 1.0 / counts[labels]
    return rng.choice(n, size=n, replace=True, p=weights / weights.sum())


def train_fold(bags: FeatureBags, split: Split, config: MILTrainConfig, *, fold_index: int = 0,
               progress: bool = False) -> FoldResult:
    """Train one head on ``split.train``, early-stop and choose the threshold on ``split.val``,
    evaluate on ``split.test``. Deterministic in ``config.seed`` and ``fold_index`` for a given
    thread count. The test labels are only used to compute the test metrics."""
    from tqdm.auto import tqdm

    split.check(dict(zip(bags.slide_ids, bags.labels.tolist())))
    started = time.perf_counter()
    device = _device(config.device)
    train_idx, val_idx, test_idx = (bags.index(getattr(split, p)) for p in ("train", "val", "test"))
    train_y, val_y = bags.labels[train_idx], bags.labels[val_idx]
    torch.manual_seed(config.seed * 1009 + fold_index)
    rng = np.random.default_rng([config.seed, fold_index])
    model = _build(config, bags.in_dim).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    best_state, best_auc, best_loss, best_epoch, since_best = None, -math.inf, math.inf, 0, 0
    history: list[dict[str, float]] = []
    epochs = tqdm(range(1, config.max_epochs + 1), desc=split.name, unit="epoch", disable=not progress, leave=False)
    for epoch in epochs:
        model.train()
        optimiser.zero_grad()
        losses = []
        order = _epoch_order(train_y, config.balanced, rng)
        for step, pos in enumerate(order, start=1):
            i = int(train_idx[pos])
            features = bags.features(i)
            if config.max_tiles and len(features) > config.max_tiles:
                features = features[np.sort(rng.choice(len(features), config.max_tiles, replace=False))]
            x = torch.from_numpy(np.array(features, copy=False)).to(device)
            loss = _bag_loss(model, x, int(bags.labels[i]), config)
            (loss / config.accumulate).backward()
            losses.append(float(loss.detach()))
            if step % config.accumulate == 0 or step == len(order):
                optimiser.step()
                optimiser.zero_grad()
        val_probs = predict_bags(model, bags, val_idx, device)
        val_auc, val_loss = roc_auc(val_y, val_probs), _bce(val_probs, val_y)
        history.append({"epoch": epoch, "train_loss": round(float(np.mean(losses)), 6),
                        "val_loss": round(val_loss, 6), "val_auc": round(val_auc, 6)})
        if val_auc > best_auc + 1e-9 or (val_auc >= best_auc - 1e-9 and val_loss < best_loss - 1e-9):
            best_state = copy.deepcopy(model.state_dict())
            best_auc, best_loss, best_epoch, since_best = val_auc, val_loss, epoch, 0
        else:
            since_best += 1
        epochs.set_postfix(val_auc=f"{val_auc:.3f}", best=f"{best_auc:.3f}@{best_epoch}")
        if epoch >= config.min_epochs and since_best >= config.patience:
            break
    epochs.close()
    model.load_state_dict(best_state)
    model = model.to("cpu").eval()

    val_probs = predict_bags(model, bags, val_idx)
    threshold = select_threshold(val_probs, val_y, rule=config.threshold_rule)
    predictions = {"val": ([bags.slide_ids[i] for i in val_idx], val_y, val_probs)}
    val_metrics = binary_metrics(val_probs, val_y, threshold)
    test_metrics = None
    if len(test_idx):
        test_probs = predict_bags(model, bags, test_idx)
        test_y = bags.labels[test_idx]
        predictions["test"] = ([bags.slide_ids[i] for i in test_idx], test_y, test_probs)
        test_metrics = binary_metrics(test_probs, test_y, threshold)
    result = FoldResult(split=split, model=model, best_epoch=best_epoch, epochs_run=len(history), threshold=threshold,
                        val=val_metrics, test=test_metrics, predictions=predictions, history=history,
                        seconds=time.perf_counter() - started, best_val_loss=round(best_loss, 6))
    logger.info("%s: best epoch %d/%d, val AUC %.3f, threshold %.3f%s (%.1f s)", split.name, best_epoch, len(history),
                val_metrics.auc, threshold, f", test AUC {test_metrics.auc:.3f}" if test_metrics else "",
                result.seconds)
    return result


def _mean_sd(values: list[float | None]) -> dict[str, float | None]:
    vals = np.array([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))])
    if len(vals) == 0:
        return {"mean": None, "sd": None}
    return {"mean": float(vals.mean()), "sd": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}


def _overall(folds: list[FoldResult]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in ("val", "test"):
        have = [f for f in folds if part in f.predictions]
        if not have:
            continue
        labels = np.concatenate([f.predictions[part][1] for f in have])
        probs = np.concatenate([f.predictions[part][2] for f in have])
        thresholds = np.concatenate([np.full(len(f.predictions[part][1]), f.threshold) for f in have])
        pooled = binary_metrics(probs, labels, thresholds).to_dict()
        pooled["threshold"] = None  # each split's own threshold
        per_fold = [getattr(f, part).to_dict() for f in have]
        out[part] = {
            "pooled": pooled,
            "across_splits": {k: _mean_sd([m[k] for m in per_fold]) for k in
                              ("auc", "balanced_accuracy", "sensitivity", "specificity", "accuracy", "f1", "brier")},
            "calibration": [vars(b) for b in calibration_table(probs, labels)],
            "n_splits": len(have),
        }
    return out


def _select(folds: list[FoldResult]) -> FoldResult:
    """The split with the best validation AUC; ties go to the lower validation loss, then the first."""
    return min(folds, key=lambda f: (-f.val.auc, f.best_val_loss, folds.index(f)))


def train_mil(bags: FeatureBags, splits: Sequence[Split], config: MILTrainConfig | None = None,
              out_dir: str | os.PathLike[str] | None = None, *, progress: bool = False, overwrite: bool = False,
              provenance: dict[str, Any] | None = None) -> MILTrainResult:
    """Train one head per split, evaluate, and (with ``out_dir``) write the output folder
    described in the module docstring.

    Parameters
    ----------
    bags : FeatureBags
        Labelled slides and their features.
    splits : sequence of Split
        From :func:`~wsiengine.models.training.mil_data.stratified_kfold_splits` or split files.
    config : MILTrainConfig
    out_dir : path, optional
        Output folder; refused if it exists unless ``overwrite``.
    progress : bool
        Show a progress bar per split.
    provenance : dict, optional
        Extra JSON-ready keys stored in ``metrics.json`` and the heads' configs (``labels``, ``features``).
    """
    config = config or MILTrainConfig()
    if not splits:
        raise TrainingDataError("no splits to train on")
    labels = dict(zip(bags.slide_ids, bags.labels.tolist()))
    for sp in splits:
        sp.check(labels)
    out = Path(out_dir).expanduser() if out_dir is not None else None
    if out is not None and out.exists() and not overwrite:
        raise ConfigError(f"output folder '{out}' exists; choose another or pass overwrite=True (--overwrite)")
    threads = torch.get_num_threads()
    torch.set_num_threads(int(config.threads or min(physical_cores(), 8)))
    try:
        folds = [train_fold(bags, sp, config, fold_index=k, progress=progress) for k, sp in enumerate(splits)]
    finally:
        torch.set_num_threads(threads)
    selected = _select(folds)
    result = MILTrainResult(folds=folds, selected=selected.split.name, overall=_overall(folds))
    if out is not None:
        _write_outputs(result, bags, config, out, provenance or {})
        result.out_dir = out
    return result


def _head_config(fold: FoldResult, bags: FeatureBags, config: MILTrainConfig, provenance: dict[str, Any]
                 ) -> dict[str, Any]:
    return {
        "encoder": bags.encoder,
        "target_mpp": bags.target_mpp,
        "tile_px": bags.tile_px,
        "class_names": ["negative", "positive"],
        "tile_score": ("tumour probability from the tile head (MIL pseudo-labels)"
                       if fold.model.__class__.__name__ == "ABMIL" and getattr(fold.model, "tile_head", None) is not None
                       else "positive-class instance classifier probability" if fold.model.__class__.__name__ == "CLAMSB"
                       else "attention / max attention (relative)"),
        "split": fold.split.name,
        "threshold_rule": config.threshold_rule,
        "metrics": {"val": fold.val.to_dict(), "test": fold.test.to_dict() if fold.test else None},
        "training": {"config": config.to_dict(), "best_epoch": fold.best_epoch, "epochs_run": fold.epochs_run,
                     "n_train": len(fold.split.train), "n_val": len(fold.split.val), "n_test": len(fold.split.test),
                     "date": dt.date.today().isoformat(), **provenance},
    }


def _store_encoder_sha256(bags: FeatureBags, indices: np.ndarray) -> str | None:
    """The encoder file's SHA-256 recorded in the first of these slides' stores (None for in-memory bags)."""
    from ...store import open_store

    if not len(indices):
        return None
    try:
        described = open_store(bags.paths[int(indices[0])]).attrs.get("encoder")
    except (StoreError, OSError, ValueError, KeyError):
        return None
    sha = described.get("sha256") if isinstance(described, dict) else None
    return str(sha) if sha else None


def fit_reference(bags: FeatureBags, slide_ids: Sequence[str], *, source: str = "", seed: int = 0,
                  n_components: int = REFERENCE_COMPONENTS, max_tiles: int = REFERENCE_MAX_TILES
                  ) -> EmbeddingReference:
    """An :class:`~wsiengine.ood.EmbeddingReference` of every tile of ``slide_ids`` (a head's
    training slides), streamed one bag at a time; at most ``max_tiles`` tiles, a seeded uniform
    subsample when they hold more. The encoder's name comes from the stores (``bags.encoder``),
    its file hash from the first store's attributes."""
    indices = bags.index(slide_ids)
    if not len(indices):
        raise TrainingDataError("no training slides to fit an embedding reference on")
    started = time.perf_counter()
    reference = EmbeddingReference.fit((bags.features(int(i)) for i in indices), n_components=n_components,
                                       max_tiles=max_tiles, seed=seed, encoder=bags.encoder,
                                       encoder_sha256=_store_encoder_sha256(bags, indices),
                                       source=source or f"tile embeddings of {len(indices)} training slides")
    logger.info("%r in %.1f s", reference, time.perf_counter() - started)
    return reference


def slide_label_deposit_rules(head_dir: Path, bags: FeatureBags, val_ids: Sequence[str]) -> dict[str, Any] | None:
    """The deposit rules of an exported head from its validation slides' labels only
    (:func:`wsiengine.deposits.rules_from_slide_labels`), ready for ``config.json``; None when
    the slides have no stored tile grid or no negative validation slide."""
    from ...aggregate import MILHead
    from ...deposits import rules_from_slide_labels
    from ...errors import InputError
    from ...store import open_result

    indices = bags.index(val_ids)
    if not len(indices):
        return None
    head = MILHead.load(head_dir, threads=1)
    grids, scores, labels = [], [], []
    try:
        for i in indices:
            grids.append(open_result(bags.paths[int(i)]).tile_grid())
            scores.append(head.predict(bags.features(int(i))).tile_scores)
            labels.append(int(bags.labels[int(i)]))
        rules = rules_from_slide_labels(grids, scores, labels)
    except (StoreError, OSError, InputError, ConfigError) as exc:
        logger.warning("no deposit rules for %s: %s", head_dir.name, exc)
        return None
    n_negative = labels.count(0)
    return dict(rules.to_dict(), fitted_on=(
        f"slide labels only ({len(labels)} validation slides, {n_negative} negative): seed above the highest smoothed "
        "tile score of 90 % of the negative slides, grow at the 99th percentile of their tiles; sizes not calibrated "
        "(no tile labels)"))


def _write_outputs(result: MILTrainResult, bags: FeatureBags, config: MILTrainConfig, out: Path,
                   provenance: dict[str, Any]) -> None:
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    name = f"{config.model}-{bags.encoder or 'features'}"
    for fold in result.folds:
        head_dir = partial / "folds" / fold.split.name
        save_mil_head(fold.model, head_dir, bags.in_dim, fold.threshold, f"{name}-{fold.split.name}",
                      _head_config(fold, bags, config, provenance))
        rules = slide_label_deposit_rules(head_dir, bags, fold.split.val)
        if rules is not None:
            cfg = json.loads((head_dir / "config.json").read_text())
            cfg["deposit_rules"] = rules
            (head_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    chosen = next(f for f in result.folds if f.split.name == result.selected)
    for file in ("model.onnx", "config.json"):
        shutil.copy2(partial / "folds" / chosen.split.name / file, partial / file)
    head_cfg = json.loads((partial / "config.json").read_text())
    head_cfg["name"] = name
    head_cfg["selected_split"] = chosen.split.name
    head_cfg["cross_validation"] = result.overall
    (partial / "config.json").write_text(json.dumps(head_cfg, indent=2))
    where = f" in {provenance['features_dir']}" if provenance.get("features_dir") else ""
    fit_reference(bags, chosen.split.train, seed=config.seed,
                  source=f"tile embeddings of the {len(chosen.split.train)} training slides of split "
                         f"{chosen.split.name!r}{where}").save(partial / REFERENCE_NAME)

    metrics = {"date": dt.datetime.now().isoformat(timespec="seconds"), "model": config.model, "encoder": bags.encoder,
               "in_dim": bags.in_dim, "n_slides": len(bags), "n_positive": int(bags.labels.sum()),
               "selected_split": result.selected, "config": config.to_dict(), **provenance,
               "splits": [f.summary() for f in result.folds], "overall": result.overall}
    (partial / "metrics.json").write_text(json.dumps(metrics, indent=2))

    with open(partial / "predictions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide_id", "split", "part", "label", "probability", "predicted"])
        for fold in result.folds:
            for part, (ids, ys, ps) in fold.predictions.items():
                for s, y, p in zip(ids, ys, ps):
                    writer.writerow([s, fold.split.name, part, int(y), f"{p:.6f}", int(p >= fold.threshold)])
    write_splits_csv([f.split for f in result.folds], partial / "splits.csv")

    part = "test" if any("test" in f.predictions for f in result.folds) else "val"
    curves = [(f.split.name, f.predictions[part][1], f.predictions[part][2]) for f in result.folds
              if part in f.predictions and 0 < f.predictions[part][1].sum() < len(f.predictions[part][1])]
    thresholds = {f.split.name: f.threshold for f in result.folds}
    if len(curves) > 1:
        curves.append(("pooled", np.concatenate([c[1] for c in curves]), np.concatenate([c[2] for c in curves])))
    if curves:
        plot_roc(curves, partial / "roc.png", title=f"{config.model} on {bags.encoder or 'features'}, {part} slides",
                 thresholds=thresholds if len(curves) <= 11 else None)
    replace_directory(partial, out)


def train_mil_from_stores(features_dir: str | os.PathLike[str], labels_csv: str | os.PathLike[str],
                          out_dir: str | os.PathLike[str] | None, config: MILTrainConfig | None = None, *,
                          split_files: Sequence[str | os.PathLike[str]] = (), progress: bool = False,
                          overwrite: bool = False) -> MILTrainResult:
    """``wsiengine train-mil``: labels CSV + ``FEATURES_DIR/SLIDE_ID.zarr`` stores -> trained heads.

    Splits are stratified k-fold (``config.folds``, ``config.seed``) unless ``split_files`` are
    given. Raises :class:`~wsiengine.errors.MissingFeaturesError` listing every labelled slide
    without a complete store, before any training.
    """
    config = config or MILTrainConfig()
    labels = read_labels_csv(labels_csv)
    bags = FeatureBags.from_stores(features_dir, labels, cache_bytes=int(config.cache_gb * (1 << 30)))
    if split_files:
        splits = read_split_files(split_files, bags.slide_ids)
    else:
        splits = stratified_kfold_splits(bags.slide_ids, bags.labels, config.folds, seed=config.seed,
                                         val_fraction=config.val_fraction)
    logger.info("%r; %d split(s)", bags, len(splits))
    provenance = {"labels_csv": str(Path(labels_csv).resolve()), "features_dir": str(Path(features_dir).resolve()),
                  "split_files": [str(Path(p).resolve()) for p in split_files]}
    return train_mil(bags, splits, config, out_dir, progress=progress, overwrite=overwrite, provenance=provenance)
