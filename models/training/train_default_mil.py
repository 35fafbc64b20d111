"""Train the shipped default MIL head (``MILHead.load("default")``) from PCam-mosaic slides.

    python -m wsiengine.models.training.train_default_mil --work /tmp/mil-default          # writes models/weights/mil-default/
    python -m wsiengine.models.training.train_default_mil --work /tmp/mil-default --out /tmp/head --no-card
    python -m wsiengine.models.training.train_default_mil --work /tmp/mil-default --reference-only   # reference.npz + card

Protocol (fixed seeds; PCam is CC0, derived from CAMELYON16):

1. **Slides.** PCam-mosaic "lymph-node" slides (:mod:`wsiengine.testing.mosaic`) are written from
   PCam *train* (training slides), *valid* (validation slides) and *test* (test slides), half of
   them positive with one lesion of 4-113 real tumour patches.
2. **Pipeline.** Each slide goes through the real pipeline: ``open_slide`` -> ``detect_tissue``
   -> ``plan_tiles`` at the slide's own 0.972 µm/px with 96-px tiles (one tile per PCam patch)
   -> the default encoder (``lymphnode-lite0``, ONNX Runtime, fp32) -> a Zarr feature store.
3. **Tile classifier.** An L2-regularised logistic regression on the training slides' tile
   embeddings against their patch labels; its L2 strength is chosen on the validation slides'
   tiles (AUC).
4. **Slide head.** An ensemble of :data:`ENSEMBLE` gated-attention ABMIL heads
   (:mod:`wsiengine.models.training.mil_train`; two embedding layers, different initialisations and
   sampling orders) trained on the training slides, each early-stopped on the validation
   slides; the ensemble's decision threshold is chosen on the validation slides only. (On the
   validation slides a 5-member ensemble was steadier than a single head, which swings by
   +-0.05 AUC with the seed, and two embedding layers beat one: 0.984 vs 0.930.)
5. **Export.** The ensemble's mean slide probability and attention plus the tile classifier's
   tumour probability as one ONNX graph (:class:`~wsiengine.models.training.mil.MILEnsemble` inside
   :class:`~wsiengine.models.training.mil.MILWithTileClassifier`),
   verified against torch, with its figures on the test slides and on all PCam test patches
   in ``config.json``, and the model card ``models/cards/mil-default.md`` regenerated.
6. **Embedding reference.** ``reference.npz``: an :class:`~wsiengine.ood.EmbeddingReference`
   of every tile of the training slides (:func:`~wsiengine.models.training.mil_train.fit_reference`, as
   ``train-mil`` writes it), for the out-of-distribution check ``MILHead.reference``.
   ``--reference-only`` rewrites it (and the card) for the existing head without training.

The ``--work`` folder keeps slides and stores, so a rerun resumes and reuses them. The head that
was in ``--out`` before is read first, and its figures go into the card as "before".
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ...aggregate import CONFIG_NAME, REFERENCE_NAME, MILHead, default_head_path
from ...atomic import atomic_write
from ...config import MILTrainConfig, TilingConfig
from ...encode import Encoder
from ...errors import WsiEngineError
from ...ood import EmbeddingReference
from ...testing.mosaic import PCAM_MPP, MosaicSlide, PatchPool, load_mosaic_dataset, make_mosaic_dataset
from .mil import MILEnsemble, MILWithTileClassifier
from .mil_data import FeatureBags, Split
from .mil_export import save_mil_head
from .mil_metrics import binary_metrics, bootstrap_auc_ci, roc_auc, select_threshold
from .mil_train import fit_reference, predict_bags, train_mil
from .pcam import pcam_split

__all__ = ["SPLITS", "HEAD_CONFIG", "prepare_split", "embed_slides", "tile_dataset", "fit_tile_classifier",
           "top_attention_in_lesion", "write_reference", "main"]

logger = logging.getLogger("wsiengine")

SEED = 0
#: Mosaic slides per PCam split (half positive).
SPLITS = {"train": 96, "valid": 32, "test": 48}
#: The slide head's training configuration (the tile head is the separate logistic regression).
HEAD_CONFIG = MILTrainConfig(model="abmil", seed=SEED, max_epochs=60, min_epochs=10, patience=15, lr=2e-4,
                             weight_decay=1e-4, hidden_dim=128, attn_dim=128, dropout=0.25, embed_layers=2,
                             tile_weight=0.0, max_tiles=0, balanced=True, threshold_rule="youden")
#: ABMIL heads averaged in the shipped graph.
ENSEMBLE = 5
#: L2 penalties (per tile, on standardised features) tried for the tile classifier.
TILE_L2_GRID = (1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0)
TILE_PX = 96
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PCAM = ROOT / ".." / "shared" / "data" / "pcam"
CARD = Path(__file__).resolve().parents[1] / "cards" / "mil-default.md"


def prepare_split(work: Path, pcam: Path, split: str, n_slides: int, seed: int = SEED) -> list[MosaicSlide]:
    """Write (or reuse) ``work/slides/<split>/``: ``n_slides`` mosaic slides from PCam ``split``."""
    out = work / "slides" / split
    if (out / "slides.csv").is_file():
        slides = load_mosaic_dataset(out)
        if len(slides) == n_slides and all(s.path.is_file() for s in slides):
            return slides
    return make_mosaic_dataset(out, PatchPool.from_pcam(pcam, split), n_slides, seed=seed, prefix=split)


def embed_slides(slides: Sequence[MosaicSlide], features_dir: Path, encoder: Encoder, *, progress: bool = False
                 ) -> list[Path]:
    """The real pipeline per slide, into ``features_dir/SLIDE_ID.zarr``; complete stores are reused."""
    from ...pipeline import embed_slide
    from ...slide import open_slide
    from ...store import open_store
    from ...tiling import plan_tiles
    from ...tissue import detect_tissue

    paths = []
    for i, s in enumerate(slides, 1):
        path = features_dir / f"{s.slide_id}.zarr"
        try:
            open_store(path)
        except WsiEngineError:
            slide = open_slide(s.path)
            grid = plan_tiles(slide, detect_tissue(slide),
                              config=TilingConfig(target_mpp=slide.mpp[0], tile_px=TILE_PX, min_tissue=0.25))
            started = time.perf_counter()
            embed_slide(slide, grid, encoder, path)
            if progress:
                print(f"  [{i}/{len(slides)}] {s.slide_id}: {len(grid)} tiles in {time.perf_counter() - started:.1f} s",
                      file=sys.stderr)
        paths.append(path)
    return paths


def tile_dataset(slides: Sequence[MosaicSlide], features_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every tile's embedding and its patch label (1 iff the tile's centre is in a lesion)."""
    from ...store import read_features

    xs, ys = [], []
    for s in slides:
        coords, features = read_features(features_dir / f"{s.slide_id}.zarr")
        xs.append(features)
        ys.append(s.labels_at(coords, TILE_PX))
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64)


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float) -> nn.Linear:
    linear = nn.Linear(x.shape[1], 1, dtype=torch.float64)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    pos = float(y.mean())
    weight = torch.where(y > 0.5, 0.5 / pos, 0.5 / (1 - pos))  # class-balanced
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(linear(x).squeeze(-1), y, weight=weight)
        loss = loss + 0.5 * l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return linear


@dataclass(frozen=True)
class TileClassifier:
    """A logistic regression on raw embeddings, folded into one ``nn.Linear`` (D -> 1), and how it was chosen."""

    linear: nn.Linear
    l2: float
    val_auc: float
    grid: dict[str, float]


def fit_tile_classifier(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray
                        ) -> TileClassifier:
    """Class-balanced L2 logistic regression on standardised features; the L2 strength is
    chosen on the validation tiles' AUC. The standardisation is folded into the returned layer."""
    mean = x_train.mean(0, dtype=np.float64)
    std = x_train.std(0, dtype=np.float64) + 1e-6
    xt = torch.from_numpy((x_train - mean) / std)
    yt = torch.from_numpy(y_train.astype(np.float64))
    xv = torch.from_numpy((x_val - mean) / std)
    scores: dict[str, float] = {}
    best = None
    for l2 in TILE_L2_GRID:
        linear = _fit_logistic(xt, yt, l2)
        with torch.no_grad():
            auc = roc_auc(y_val, linear(xv).squeeze(-1).numpy())
        scores[f"{l2:g}"] = round(auc, 6)
        if best is None or auc > best[1] + 1e-9:
            best = (linear, auc, l2)
    linear, auc, l2 = best
    folded = nn.Linear(x_train.shape[1], 1)
    with torch.no_grad():
        w = linear.weight[0].numpy() / std
        folded.weight.copy_(torch.from_numpy(w[None]).float())
        folded.bias.copy_(torch.tensor([float(linear.bias[0]) - float(w @ mean)]))
    return TileClassifier(folded, l2, auc, scores)


def top_attention_in_lesion(head: MILHead, slides: Sequence[MosaicSlide], features_dir: Path) -> tuple[int, int]:
    """``(hits, positives)``: positive slides whose most attended tile lies in a lesion."""
    from ...store import read_features

    hits = positives = 0
    for s in slides:
        if s.label != 1:
            continue
        coords, features = read_features(features_dir / f"{s.slide_id}.zarr")
        top = int(head.predict(features).attention.argmax())
        hits += int(s.labels_at(coords[top:top + 1], TILE_PX)[0])
        positives += 1
    return hits, positives


def write_reference(bags: FeatureBags, train_ids: Sequence[str], out: Path) -> EmbeddingReference:
    """Fit the head's embedding reference on every tile of its training slides and write
    ``out/reference.npz`` (the same code path as ``train-mil``)."""
    reference = fit_reference(bags, train_ids, seed=SEED,
                              source=f"every tile of the {len(train_ids)} PCam-mosaic training slides (from PCam "
                                     "train) that the ABMIL ensemble and the tile classifier were trained on")
    reference.save(out / REFERENCE_NAME)
    return reference


def reference_figures(reference: EmbeddingReference, path: Path, encoder: Encoder, test_tiles: np.ndarray
                      ) -> dict[str, float]:
    """The card's reference line: file size, and the fractions beyond the 0.99 quantile of the
    held-out mosaic test tiles and of 64 featureless patches (32 solid colours, 32 uniform noise)."""
    rng = np.random.default_rng(SEED)
    colours = rng.integers(0, 256, (32, 1, 1, 3), dtype=np.uint8)
    featureless = np.concatenate([np.broadcast_to(colours, (32, TILE_PX, TILE_PX, 3)),
                                  rng.integers(0, 256, (32, TILE_PX, TILE_PX, 3), dtype=np.uint8)])
    return {"kb": path.stat().st_size / 1024, "n_tiles": reference.n_tiles, "n_components": reference.n_components,
            "test_tiles": reference.outlier_fraction(test_tiles, 0.99),
            "featureless": reference.outlier_fraction(encoder.embed(featureless), 0.99)}


def _pcam_test_patches(pcam: Path, encoder: Encoder, batch: int = 128) -> tuple[np.ndarray, np.ndarray]:
    images, labels = pcam_split(pcam, "test")
    return np.concatenate([encoder.embed(images[i:i + batch]) for i in range(0, len(images), batch)]), labels


def _reference_line(r: dict | None) -> str:
    if not r:
        return ""
    import textwrap

    line = (f"- **Embedding reference:** `reference.npz` ({r['kb']:.0f} KB): mean, {r['n_components']} principal "
            f"components and distance quantiles of the {r['n_tiles']:,} training-slide tile embeddings, for the "
            f"out-of-distribution check (`MILHead.reference`); beyond its 0.99 quantile lie "
            f"{r['test_tiles']:.1%} of the mosaic test tiles and {r['featureless']:.0%} of solid-colour and noise "
            "patches (`python -m wsiengine.models.training.train_default_mil --reference-only`).")
    return textwrap.fill(line, width=100, subsequent_indent="  ", break_on_hyphens=False) + "\n"


def _card(figures: dict, reference: dict | None = None) -> str:
    f = figures
    slide, tiles, pcam = f["mosaic_test"], f["tile_classifier"], f["pcam_test_patches"]
    return f"""# Model card: `default` MIL head (ABMIL + tile tumour classifier, PCam-mosaic)

`MILHead.load("default")`, `wsiengine predict --mil default`: the slide-level head wsiengine
runs when no other is given. Trained {f['date']} by `python -m wsiengine.models.training.train_default_mil`
(fixed seeds; the script regenerates this card and the weights in `models/weights/mil-default/`).

## What it is
- **Input:** `(N, 1280)` tile embeddings from the `default` encoder (`{f.get('encoder', 'default')}`, ONNX),
  of 96-px tiles at about **0.97 µm/px (10x)**. Another encoder's features (even of the same width)
  mean something else: embed with this one.
- **Slide output:** probability of lymph-node metastasis, the mean of {f['ensemble']} gated-attention ABMIL
  heads (Ilse et al. 2018; two 128-wide embedding layers; {f['n_params']:,} parameters in all), label at the threshold
  **{f['threshold']:.3f}** (chosen on validation slides by Youden's J), and attention over tiles (sums to 1).
- **Tile output:** tumour probability per tile from an L2 logistic regression on the embeddings
  (L2 {tiles['l2']:g}, chosen on validation tiles), so heatmaps show tumour probability, not only attention.
- **Size:** {f['onnx_kb']:.0f} KB of ONNX; runs in ONNX Runtime on CPU, no torch.
{_reference_line(reference)}
## Training data
PatchCamelyon (CC0; Veeling et al. 2018, from CAMELYON16 lymph-node sections; 96-px patches,
10x). PCam-mosaic slides (`wsiengine.testing.mosaic`): tissue regions tiled with real normal
patches; positive slides carry one lesion of 4-113 real tumour patches. {f['n_slides']['train']} training
slides from PCam **train**, {f['n_slides']['valid']} validation slides from PCam **valid** (early stopping,
threshold, tile L2), {f['n_slides']['test']} test slides from PCam **test** (reported only). Every slide
went through the real pipeline (tissue detection, tiling at the slide's 0.972 µm/px, default encoder).

## Figures (measured {f['date']}, {f['machine']})
| data | metric | value |
| --- | --- | --- |
| mosaic test slides ({slide['n']}, {slide['n_positive']} positive) | slide AUC (95 % bootstrap CI) | **{slide['auc']:.3f}** ({f['auc_ci'][0]:.3f}-{f['auc_ci'][1]:.3f}) |
| | balanced accuracy / sensitivity / specificity at the threshold | {slide['balanced_accuracy']:.3f} / {slide['sensitivity']:.3f} / {slide['specificity']:.3f} |
| | top-attention tile inside the lesion (positive slides) | {f['top_attention_hits']}/{f['top_attention_positives']} ({f['top_attention_rate']:.0%}) |
| | single heads of the ensemble: slide AUC | {min(f['member_test_auc']):.3f}-{max(f['member_test_auc']):.3f} |
| mosaic validation slides ({f['val']['n']}) | slide AUC (ensemble; chose threshold and settings) | {f['val']['auc']:.3f} |
| PCam test patches ({pcam['n']:,}) | tile classifier AUC / accuracy at 0.5 | **{pcam['auc']:.3f}** / {pcam['accuracy']:.3f} |
| mosaic test tiles ({f['mosaic_test_tiles']['n']:,}) | tile classifier AUC | {f['mosaic_test_tiles']['auc']:.3f} |
{_before_after(f)}
## Intended use and limits
- **The threshold is set by the validation slides, and PCam valid's normal patches look more
  like tumour than train's or test's** (with this encoder, a median of 9.5 tiles per negative
  validation slide score above 0.9, against 1 in training and 3 in test slides). Youden's J on
  the validation slides therefore puts the threshold at {f['threshold']:.3f}: no test negative
  passes it, but neither do the positives with the smallest lesions (sensitivity
  {slide['sensitivity']:.2f} at a slide AUC of {slide['auc']:.3f}). The probability ranks slides well;
  the label is conservative. Choose your own threshold on validation slides of your own lab.
- H&E lymph-node sections at ~10x (0.9-1.0 µm/px), embedded with the `default` encoder; a
  research baseline and a working default for the pipeline, **not a diagnostic device**.
- Trained on synthetic mosaics of PCam patches, not on whole CAMELYON16 slides: real slides
  have stain variation, artefacts, fat, capsule and tissue-edge context it has never seen, and
  whole-slide AUC on CAMELYON16 will be lower than these figures. For real studies, train a head
  with `wsiengine train-mil` on your own slides (and ideally a pathology foundation encoder).
- PCam labels mark tumour in a patch's central 32x32 px; tile probabilities inherit that.
- The encoder was fine-tuned on PCam train, which comes from CAMELYON16: figures on CAMELYON16
  slides (and on these PCam mosaics) are not independent of its training data.
"""


def _previous_figures(out: Path) -> dict | None:
    """The figures of the head now in ``out`` (the "before" of a retraining), if any."""
    try:
        config = json.loads((out / CONFIG_NAME).read_text())
        m = config["metrics"]
        return {"encoder": m.get("encoder") or ("imagenet-lite0" if config.get("encoder") == "default" else config.get("encoder")),
                "date": m["date"], "slide_auc": m["mosaic_test"]["auc"], "auc_ci": m["auc_ci"],
                "pcam_test_tile_auc": m["pcam_test_patches"]["auc"], "mosaic_test_tile_auc": m["mosaic_test_tiles"]["auc"],
                "top_attention_rate": m.get("top_attention_rate"), "balanced_accuracy": m["mosaic_test"]["balanced_accuracy"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _before_after(f: dict) -> str:
    p = f.get("previous")
    if not p:
        return ""
    slide, tiles, pcam = f["mosaic_test"], f["mosaic_test_tiles"], f["pcam_test_patches"]
    return f"""
## Before and after the encoder change
The same protocol and seeds (the slides regenerated from the same seeds; tile counts move a
little where tissue detection changed), with the head trained on `{p['encoder']}` embeddings
({p['date']}) and now on `{f['encoder']}` embeddings ({f['date']}):

| figure (test data) | `{p['encoder']}` | `{f['encoder']}` |
| --- | --- | --- |
| mosaic slide AUC ({slide['n']} slides) | {p['slide_auc']:.3f} ({p['auc_ci'][0]:.3f}-{p['auc_ci'][1]:.3f}) | **{slide['auc']:.3f}** ({f['auc_ci'][0]:.3f}-{f['auc_ci'][1]:.3f}) |
| balanced accuracy at the threshold | {p['balanced_accuracy']:.3f} | {slide['balanced_accuracy']:.3f} |
| tile classifier AUC, PCam test patches | {p['pcam_test_tile_auc']:.3f} | **{pcam['auc']:.3f}** |
| tile classifier AUC, mosaic test tiles | {p['mosaic_test_tile_auc']:.3f} | **{tiles['auc']:.3f}** |
| top-attention tile in the lesion | {(p['top_attention_rate'] or 0):.0%} | {f['top_attention_rate']:.0%} |
"""


def _reference_only(bags: FeatureBags, train_ids: Sequence[str], out: Path, encoder: Encoder, test_tiles: np.ndarray,
                    *, card: bool) -> int:
    """``--reference-only``: write ``out/reference.npz`` for the trained head there and, with
    ``card``, regenerate the card from the head's recorded figures plus the reference line."""
    reference = write_reference(bags, train_ids, out)
    ref_figures = reference_figures(reference, out / REFERENCE_NAME, encoder, test_tiles)
    if card:
        CARD.write_text(_card(json.loads((out / CONFIG_NAME).read_text())["metrics"], ref_figures))
    print(f"wrote {out / REFERENCE_NAME}: {reference!r}; {json.dumps(ref_figures)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, type=Path, help="folder for slides and feature stores (reused)")
    parser.add_argument("--pcam", type=Path, default=DEFAULT_PCAM, help="PCam folder with train/valid/test")
    parser.add_argument("--out", type=Path, help="head folder (default: the package's models/weights/mil-default)")
    parser.add_argument("--no-card", action="store_true", help="do not rewrite models/cards/mil-default.md")
    parser.add_argument("--providers", default="cpu")
    parser.add_argument("--reference-only", action="store_true",
                        help="only (re)write OUT/reference.npz and the card for the existing head in OUT, no training")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    torch.manual_seed(SEED)
    encoder = Encoder.load("default", providers=args.providers, precision="fp32")
    out = args.out or default_head_path()
    previous = _previous_figures(out)
    slides, features = {}, {}
    for split, n in SPLITS.items():
        t0 = time.perf_counter()
        slides[split] = prepare_split(args.work, args.pcam.resolve(), split, n)
        features[split] = args.work / "features"
        features[split].mkdir(parents=True, exist_ok=True)
        embed_slides(slides[split], features[split], encoder, progress=True)
        print(f"{split}: {len(slides[split])} slides ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    fdir = args.work / "features"

    labels = {s.slide_id: s.label for split in SPLITS for s in slides[split]}
    bags = FeatureBags.from_stores(fdir, labels)
    parts = [tuple(s.slide_id for s in slides[k]) for k in ("train", "valid", "test")]
    if args.reference_only:
        if not (out / CONFIG_NAME).is_file():
            parser.error(f"--reference-only needs a trained head in '{out}' (no {CONFIG_NAME} there)")
        return _reference_only(bags, parts[0], out, encoder, tile_dataset(slides["test"], fdir)[0], card=not args.no_card)
    # the same partition once per member: train_mil seeds member k with (seed, k)
    result = train_mil(bags, [Split(f"member{k}", *parts) for k in range(ENSEMBLE)], HEAD_CONFIG)
    for fold in result.folds:
        print(f"ABMIL {fold.split.name}: best epoch {fold.best_epoch}, val AUC {fold.val.auc:.3f}", file=sys.stderr)
    ensemble = MILEnsemble([f.model for f in result.folds]).eval()
    val_idx, test_idx = bags.index(parts[1]), bags.index(parts[2])
    val_probs, test_probs = predict_bags(ensemble, bags, val_idx), predict_bags(ensemble, bags, test_idx)
    threshold = select_threshold(val_probs, bags.labels[val_idx], rule=HEAD_CONFIG.threshold_rule)
    val_metrics = binary_metrics(val_probs, bags.labels[val_idx], threshold)
    test_metrics = binary_metrics(test_probs, bags.labels[test_idx], threshold)
    print(f"ensemble: val AUC {val_metrics.auc:.3f}, threshold {threshold:.3f}, test AUC {test_metrics.auc:.3f}",
          file=sys.stderr)

    x_tr, y_tr = tile_dataset(slides["train"], fdir)
    x_va, y_va = tile_dataset(slides["valid"], fdir)
    x_te, y_te = tile_dataset(slides["test"], fdir)
    tiles = fit_tile_classifier(x_tr, y_tr, x_va, y_va)
    model = MILWithTileClassifier(ensemble, tiles.linear).eval()
    with torch.no_grad():
        te_scores = torch.sigmoid(tiles.linear(torch.from_numpy(x_te)).squeeze(-1)).numpy()
        px, py = _pcam_test_patches(args.pcam.resolve(), encoder)
        p_scores = torch.sigmoid(tiles.linear(torch.from_numpy(px)).squeeze(-1)).numpy()
    pcam_metrics = binary_metrics(p_scores, py, 0.5)

    figures = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, ONNX Runtime CPU",
        "n_slides": dict(SPLITS), "threshold": threshold, "ensemble": ENSEMBLE,
        "n_params": sum(p.numel() for p in model.parameters()),
        "val": val_metrics.to_dict(), "mosaic_test": test_metrics.to_dict(),
        "member_val_auc": [round(f.val.auc, 4) for f in result.folds],
        "member_test_auc": [round(f.test.auc, 4) for f in result.folds],
        "auc_ci": bootstrap_auc_ci(bags.labels[test_idx], test_probs),
        "tile_classifier": {"l2": tiles.l2, "val_auc": tiles.val_auc, "l2_grid_val_auc": tiles.grid},
        "pcam_test_patches": pcam_metrics.to_dict(),
        "mosaic_test_tiles": binary_metrics(te_scores, y_te, 0.5).to_dict(),
        "best_epochs": [f.best_epoch for f in result.folds],
        "encoder": encoder.spec.name,
        "previous": previous,
    }
    save_mil_head(model, out, bags.in_dim, threshold, "default", {
        "encoder": encoder.spec.name, "target_mpp": PCAM_MPP, "tile_px": TILE_PX, "class_names": ["normal", "metastasis"],
        "tile_score": "tumour probability from a logistic-regression tile classifier (PCam train tiles)",
        "intended_input": f"H&E lymph node, 96-px tiles at ~0.97 um/px (10x), {encoder.spec.name} embeddings",
        "training": {"script": "python -m wsiengine.models.training.train_default_mil", "seed": SEED,
                     "config": HEAD_CONFIG.to_dict(), "data": "PCam-mosaic slides from PCam train/valid/test (CC0)"},
        "metrics": figures,
    })
    reference = write_reference(bags, parts[0], out)
    ref_figures = reference_figures(reference, out / REFERENCE_NAME, encoder, x_te)
    head = MILHead.load(out)
    hits, positives = top_attention_in_lesion(head, slides["test"], fdir)
    figures.update(top_attention_hits=hits, top_attention_positives=positives,
                   top_attention_rate=hits / max(positives, 1), onnx_kb=(out / "model.onnx").stat().st_size / 1024)
    cfg = json.loads((out / "config.json").read_text())
    cfg["metrics"] = figures
    with atomic_write(out / "config.json") as fh:
        fh.write(json.dumps(cfg, indent=2, default=float).encode())
    if not args.no_card:
        CARD.write_text(_card(figures, ref_figures))
    print(json.dumps({k: figures[k] for k in ("mosaic_test", "pcam_test_patches", "top_attention_rate")}, indent=1,
                     default=float))
    print(f"wrote {out} in {time.perf_counter() - started:.0f} s")
    print("the new head has no tile calibration or deposit rules yet: run "
          "python -m wsiengine.models.training.fit_deposit_rules --work DIR --write-head")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
