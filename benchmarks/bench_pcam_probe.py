"""Linear probe on real PCam lymph-node patches: each encoder's embeddings vs a colour-histogram baseline.

    python benchmarks/bench_pcam_probe.py                     # imagenet-lite0 and default; 4,000 train, all 3,000 valid and test
    python benchmarks/bench_pcam_probe.py --encoders imagenet-lite0 default --cache /tmp/pcam-cache
    python benchmarks/bench_pcam_probe.py --encoder default --n-train all --providers cuda

A balanced random subset of PCam train (``--n-train``, n/2 per class; label 1 = tumour), all of
PCam valid and all of PCam test (or balanced subsets) are embedded once with each encoder of
``--encoders`` (``--encoder NAME`` for one), the same patches for every one (96 px at 0.972 µm/px,
resized to the encoder's input inside ``Encoder.embed_with_scores``). The probe is an
L2-regularised logistic regression on standardised features (scikit-learn); C is chosen from a
grid by valid AUC, the decision threshold that maximises balanced accuracy on valid is kept too,
and only then is test scored once: accuracy at 0.5 and at the valid threshold, AUC with a 95 %
percentile bootstrap CI (1,000 seeded resamples, the same for every row). An encoder with its own
tile classifier (``has_tile_scores``) also has its ``tumour_probability`` output scored, with no
fitting (threshold from valid). The same probe runs in the same process on a colour baseline
(3 x 16-bin RGB histograms + per-channel mean and sd, 54 features); paired bootstrap CIs of the
AUC differences vs the colour baseline and vs the first encoder. A learning curve refits the probe
(C re-chosen on valid) on balanced subsets of the embedded train patches (200, 1,000, 4,000 and
``--n-train``; several draws below ``--n-train``), the same subsets for every encoder. Nothing is
chosen on test. Prints one side-by-side summary.
Data: ``../shared/data/pcam/{train,valid,test}/{0,1}/*.jpg`` or ``--data``. ``--cache DIR`` keeps
features in ``DIR/*.npz`` keyed by encoder (sha256 + spec) and file list, so a rerun skips embedding.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fewshot import DEFAULT_DATA, load_patches  # noqa: E402  (shared PCam helpers)

SPLITS = ("train", "valid", "test")
C_GRID = tuple(float(c) for c in np.logspace(-7, 3, 21))  # half-decade steps, 1e-7 .. 1000
CURVE_SIZES = (200, 1000, 4000)
N_BOOT = 1000
HIST_BINS = 16
COLOUR_VERSION = "rgb-hist16-meanstd-v1"


# -- data ------------------------------------------------------------------------------------
def pick_balanced(files: dict[int, list[Path]], n: int | None, rng: np.random.Generator) -> tuple[list[Path], np.ndarray]:
    """n/2 random paths per label (all paths when n is None), sorted within each label -> paths, labels."""
    paths: list[Path] = []
    labels: list[int] = []
    for label in (0, 1):
        pool = files[label]
        if n is None:
            chosen = pool
        else:
            if n // 2 > len(pool):
                raise SystemExit(f"asked for {n // 2} patches of label {label}, only {len(pool)} exist")
            chosen = [pool[i] for i in sorted(rng.choice(len(pool), size=n // 2, replace=False))]
        paths += chosen
        labels += [label] * len(chosen)
    return paths, np.asarray(labels, dtype=np.int64)


def colour_features(images: np.ndarray) -> np.ndarray:
    """``(B, H, W, 3)`` uint8 -> ``(B, 54)`` float32: 16-bin histogram per RGB channel (fractions) + mean, sd (/255)."""
    b = images.shape[0]
    flat = images.reshape(b, -1, 3)
    idx = (flat >> 4).astype(np.int32)  # 256 / 16 levels per bin
    idx += np.arange(b, dtype=np.int32)[:, None, None] * 3 * HIST_BINS + np.arange(0, 3 * HIST_BINS, HIST_BINS, dtype=np.int32)
    hist = np.bincount(idx.ravel(), minlength=b * 3 * HIST_BINS).reshape(b, 3 * HIST_BINS) / flat.shape[1]
    mean = flat.mean(axis=1, dtype=np.float64)
    sd = np.sqrt(np.maximum((flat.astype(np.float32) ** 2).mean(axis=1, dtype=np.float64) - mean**2, 0.0))
    return np.concatenate([hist, mean / 255.0, sd / 255.0], axis=1).astype(np.float32)


def featurise(encoder, paths: list[Path], timings: dict[str, float],
              batch: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Decode each JPEG once -> (encoder embeddings (N, D), colour features (N, 54), the encoder's own
    tumour probability (N,) or None); adds seconds to ``timings``."""
    emb, col, scores = [], [], []
    for i in range(0, len(paths), batch):
        t0 = time.perf_counter()
        images = load_patches(paths[i : i + batch])
        t1 = time.perf_counter()
        e, p = encoder.embed_with_scores(images)
        emb.append(e)
        scores.append(p)
        t2 = time.perf_counter()
        col.append(colour_features(images))
        t3 = time.perf_counter()
        timings["decode"] += t1 - t0
        timings["embed"] += t2 - t1
        timings["colour"] += t3 - t2
    return np.concatenate(emb), np.concatenate(col), (np.concatenate(scores) if encoder.has_tile_scores else None)


def cache_key(encoder_id: dict, data: Path, paths: list[Path]) -> str:
    """Hash of the encoder identity, the colour-feature version and the file list (relative names)."""
    h = hashlib.sha256(json.dumps(encoder_id, sort_keys=True).encode())
    h.update(COLOUR_VERSION.encode())
    for p in paths:
        h.update(str(p.relative_to(data)).encode() + b"\0")
    return h.hexdigest()[:24]


def load_or_featurise(encoder, encoder_id: dict | None, cache: Path | None, data: Path, split: str,
                      paths: list[Path], timings: dict[str, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, bool]:
    """Features for one split, from ``cache`` when present there -> (emb, colour, own scores or None, came_from_cache)."""
    target = None
    if cache is not None:
        target = cache / f"pcam-{split}-{encoder.spec.name}-{len(paths)}-{cache_key(encoder_id, data, paths)}.npz"
        if target.is_file():
            with np.load(target) as z:
                if "scores" in z or not encoder.has_tile_scores:  # caches from before scores were kept: redo
                    return z["embeddings"], z["colour"], (z["scores"] if "scores" in z else None), True
    emb, col, scores = featurise(encoder, paths, timings)
    if target is not None:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".partial.npz")
        np.savez(tmp, embeddings=emb, colour=col, **({"scores": scores} if scores is not None else {}))
        os.replace(tmp, target)
    return emb, col, scores, False


# -- probe -----------------------------------------------------------------------------------
@dataclass
class ProbeResult:
    n_train: int
    c: float
    valid_auc: float
    threshold: float  # maximises balanced accuracy on valid
    test_prob: np.ndarray
    test_auc: float
    test_acc_05: float
    test_acc_thr: float


def fit_probe(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray,
              x_te: np.ndarray, y_te: np.ndarray) -> ProbeResult:
    """Standardise + L2 logistic regression; C by valid AUC, threshold by valid balanced accuracy; score test once."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_tr)
    s_tr, s_va, s_te = scaler.transform(x_tr), scaler.transform(x_va), scaler.transform(x_te)
    best: tuple[float, float, object] | None = None
    clf = LogisticRegression(max_iter=3000, warm_start=True)  # along the C path, each fit starts from the last
    for c in C_GRID:
        clf.set_params(C=c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(s_tr, y_tr)
        auc = roc_auc_score(y_va, clf.decision_function(s_va))
        if best is None or auc > best[0]:
            best = (auc, c, copy.deepcopy(clf))
    _, c, clf = best
    return score(clf.predict_proba(s_va)[:, 1], y_va, clf.predict_proba(s_te)[:, 1], y_te, n_train=len(y_tr), c=c)


def score(p_va: np.ndarray, y_va: np.ndarray, p_te: np.ndarray, y_te: np.ndarray, n_train: int = 0,
          c: float = float("nan")) -> ProbeResult:
    """Valid AUC and the threshold that maximises balanced accuracy on valid; then test, once."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, thr = roc_curve(y_va, p_va)
    threshold = float(np.clip(thr[int(np.argmax(tpr - fpr))], 0.0, 1.0))  # max (tpr + tnr) / 2
    return ProbeResult(
        n_train=n_train, c=c, valid_auc=float(roc_auc_score(y_va, p_va)), threshold=threshold, test_prob=p_te,
        test_auc=float(roc_auc_score(y_te, p_te)),
        test_acc_05=float(np.mean((p_te >= 0.5) == y_te)),
        test_acc_thr=float(np.mean((p_te >= threshold) == y_te)),
    )


def learning_curve(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray, x_te: np.ndarray,
                   y_te: np.ndarray, full: ProbeResult, draws: int, seed: int) -> dict[int, list[float]]:
    """Test AUCs of the probe refitted (C re-chosen on valid) on ``draws`` balanced subsets of the train pool per
    size below it (``full`` at the pool size). The subsets depend only on labels and seed: every feature set sees the same."""
    n_pool = len(y_tr)
    idx_by_label = [np.flatnonzero(y_tr == label) for label in (0, 1)]
    rng = np.random.default_rng(seed)
    curve = {n_pool: [full.test_auc]}
    for size in sorted(s for s in CURVE_SIZES if s < n_pool):
        curve[size] = []
        for _ in range(draws):
            sub = np.concatenate([rng.choice(ix, size=size // 2, replace=False) for ix in idx_by_label])
            curve[size].append(fit_probe(x_tr[sub], y_tr[sub], x_va, y_va, x_te, y_te).test_auc)
    return dict(sorted(curve.items()))


def bootstrap_aucs(y: np.ndarray, probs: list[np.ndarray], seed: int, n_boot: int = N_BOOT) -> np.ndarray:
    """AUC of each score vector on the same ``n_boot`` seeded test resamples -> (n_boot, len(probs))."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, len(probs)))
    i = 0
    while i < n_boot:
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() == y[idx].max():
            continue
        out[i] = [roc_auc_score(y[idx], p[idx]) for p in probs]
        i += 1
    return out


def ci(values: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_n(text: str) -> int | None:
    if text.lower() == "all":
        return None
    n = int(text)
    if n < 2 or n % 2:
        raise argparse.ArgumentTypeError("give an even number >= 2 (n/2 per class) or 'all'")
    return n


# -- main ------------------------------------------------------------------------------------
@dataclass
class EncoderRun:
    name: str  # as asked on the command line
    title: str  # registry name, file, dimension
    probe: ProbeResult
    curve: dict[int, list[float]]
    own: ProbeResult | None  # the encoder's own tumour_probability output, no fitting
    throughput: str


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="PCam folder with train/, valid/, test/ (default: %(default)s)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--encoders", nargs="+", default=["imagenet-lite0", "default"],
                       help="encoders: 'default', registry names with weights, or .onnx paths (default: %(default)s)")
    which.add_argument("--encoder", help="one encoder (same as --encoders NAME)")
    parser.add_argument("--providers", default="auto", help="ONNX Runtime providers: auto, cpu, cuda, tensorrt")
    parser.add_argument("--n-train", type=parse_n, default=4000, help="balanced PCam train patches, or 'all' (default 4000)")
    parser.add_argument("--n-valid", type=parse_n, default=None, help="balanced PCam valid patches, or 'all' (default all)")
    parser.add_argument("--n-test", type=parse_n, default=None, help="balanced PCam test patches, or 'all' (default all)")
    parser.add_argument("--curve-draws", type=int, default=5, help="random train subsets per learning-curve size below --n-train")
    parser.add_argument("--cache", type=Path, default=None, help="folder for an .npz feature cache (default: off)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = [args.encoder] if args.encoder else args.encoders

    import onnxruntime
    import sklearn

    import wsiengine
    from wsiengine import Encoder

    for split in SPLITS:
        for label in ("0", "1"):
            if not (args.data / split / label).is_dir():
                print(f"PCam folder {args.data / split / label} is absent; pass --data", file=sys.stderr)
                return 2
    files = {split: {label: sorted((args.data / split / str(label)).glob("*.jpg")) for label in (0, 1)} for split in SPLITS}

    rng = np.random.default_rng(args.seed)
    # train: one random order per class, so every learning-curve subset is a balanced draw from the embedded pool
    picked = {
        "train": pick_balanced(files["train"], args.n_train, rng),
        "valid": pick_balanced(files["valid"], args.n_valid, rng),
        "test": pick_balanced(files["test"], args.n_test, rng),
    }
    y = {split: picked[split][1] for split in SPLITS}

    runs: list[EncoderRun] = []
    colour: dict[str, np.ndarray] = {}
    providers: list[str] = []
    load_before = os.getloadavg()[0]
    t_probe = 0.0
    for name in names:
        encoder = Encoder.load(name, providers=args.providers)
        providers = encoder.providers
        encoder_id = None
        if args.cache is not None:
            desc = encoder.describe()
            encoder_id = {"spec": desc["spec"], "sha256": desc["sha256"]}
        feats: dict[str, np.ndarray] = {}
        scores: dict[str, np.ndarray | None] = {}
        timings = {"decode": 0.0, "embed": 0.0, "colour": 0.0}
        n_embedded, cached = 0, []
        encoder.embed(np.zeros((2, 96, 96, 3), np.uint8))  # warm-up (Numba, ONNX Runtime), outside the timings
        t_wall = time.perf_counter()
        for split in SPLITS:
            paths, _ = picked[split]
            emb, col, own, hit = load_or_featurise(encoder, encoder_id, args.cache, args.data, split, paths, timings)
            if hit:
                cached.append(split)
            else:
                n_embedded += len(paths)
            feats[split], scores[split] = emb, own
            colour.setdefault(split, col)  # the same patches for every encoder
        featurise_s = time.perf_counter() - t_wall
        if n_embedded:
            throughput = (f"{n_embedded} patches, Encoder.embed_with_scores (96 -> {encoder.spec.input_px} px resize, "
                          f"normalise, inference, batch 32) {timings['embed']:.1f} s = {n_embedded / timings['embed']:.0f} "
                          f"patches/s; with JPEG decode and colour features {featurise_s:.1f} s = "
                          f"{n_embedded / featurise_s:.0f} patches/s" + (f"; from cache: {', '.join(cached)}" if cached else ""))
        else:
            throughput = f"n/a, all features from cache {args.cache}"

        t0 = time.perf_counter()
        xy = (feats["train"], y["train"], feats["valid"], y["valid"], feats["test"], y["test"])
        probe = fit_probe(*xy)
        curve = learning_curve(*xy, full=probe, draws=args.curve_draws, seed=args.seed + 1)
        own = score(scores["valid"], y["valid"], scores["test"], y["test"]) if encoder.has_tile_scores else None
        t_probe += time.perf_counter() - t0
        title = f"`{encoder.spec.name}` ({encoder.path.name}, {encoder.spec.input_px} px, {encoder.embed_dim}-d)"
        runs.append(EncoderRun(name, title, probe, curve, own, throughput))
    load_after = os.getloadavg()[0]

    t0 = time.perf_counter()
    xy = (colour["train"], y["train"], colour["valid"], y["valid"], colour["test"], y["test"])
    col_res = fit_probe(*xy)
    col_curve = learning_curve(*xy, full=col_res, draws=args.curve_draws, seed=args.seed + 1)
    # one set of seeded test resamples for every score vector: paired CIs of any difference
    rows: list[tuple[str, ProbeResult]] = [(f"{r.title} linear probe", r.probe) for r in runs]
    rows += [(f"{r.title} own `tumour_probability` (no fitting)", r.own) for r in runs if r.own is not None]
    rows.append(("colour baseline (54-d RGB histograms) linear probe", col_res))
    boot = bootstrap_aucs(y["test"], [res.test_prob for _, res in rows], seed=args.seed)
    t_probe += time.perf_counter() - t0

    # -- report ---------------------------------------------------------------------------
    print(f"# PCam linear probe ({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)")
    print(f"wsiengine {wsiengine.__version__}, ONNX Runtime {onnxruntime.__version__} {providers[0]}, "
          f"scikit-learn {sklearn.__version__}; encoders: {', '.join(names)}")
    print(f"machine: {platform.platform()}, {cpu_name()}, {os.cpu_count()} cores, python {platform.python_version()}; "
          f"1-min load average {load_before:.2f} before / {load_after:.2f} after featurising")
    print(f"data: {args.data}; train {len(y['train'])} ({np.sum(y['train'] == 1)} tumour), "
          f"valid {len(y['valid'])} ({np.sum(y['valid'] == 1)} tumour), test {len(y['test'])} ({np.sum(y['test'] == 1)} tumour); "
          f"seed {args.seed}; the same patches for every encoder")
    print(f"probes: standardised features, L2 logistic regression, C in 1e-7..1e3 (21 half-decade steps) chosen on valid AUC; "
          f"threshold maximising valid balanced accuracy; test AUC 95 % CI from {N_BOOT} seeded bootstrap resamples "
          f"(the same resamples for every row); all fits and bootstraps {t_probe:.1f} s")
    for r in runs:
        print(f"embedding throughput, {r.name}: {r.throughput}")
    print()
    print("| features | train patches | C | valid AUC | test AUC (95 % CI) | test accuracy @ 0.5 | test accuracy @ valid threshold |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for i, (label, res) in enumerate(rows):
        lo, hi = ci(boot[:, i])
        c = "—" if np.isnan(res.c) else f"{res.c:.3g}" + (" (grid edge)" if res.c in (C_GRID[0], C_GRID[-1]) else "")
        n_train = "0 (no fitting)" if res.n_train == 0 else f"{res.n_train:,}"
        print(f"| {label} | {n_train} | {c} | {res.valid_auc:.3f} | {res.test_auc:.3f} ({lo:.3f}–{hi:.3f}) | "
              f"{res.test_acc_05:.3f} | {res.test_acc_thr:.3f} (t = {res.threshold:.3f}) |")
    print()
    print("test AUC differences (paired bootstrap 95 % CI):")
    col_i = len(rows) - 1
    for i, (label, res) in enumerate(rows[:-1]):
        lo, hi = ci(boot[:, i] - boot[:, col_i])
        print(f"  {label} - colour baseline: {res.test_auc - col_res.test_auc:+.3f} ({lo:+.3f} to {hi:+.3f}); "
              f"test error at 0.5 {1 - res.test_acc_05:.3f} vs {1 - col_res.test_acc_05:.3f}")
    for i, (label, res) in enumerate(rows[1:-1], start=1):
        lo, hi = ci(boot[:, i] - boot[:, 0])
        print(f"  {label} - {rows[0][0]}: {res.test_auc - rows[0][1].test_auc:+.3f} ({lo:+.3f} to {hi:+.3f})")
    print()
    n_pool = len(y["train"])
    print(f"learning curve (linear-probe test AUC; balanced train subsets, the same for every column, C re-chosen on valid; "
          f"mean ± sd over {args.curve_draws} draws below {n_pool:,}):")
    print()
    print("| train patches (half tumour) | " + " | ".join(r.name for r in runs) + " | colour baseline |")
    print("| --- |" + " --- |" * (len(runs) + 1))
    for size in col_curve:
        cells = []
        for curve in [r.curve for r in runs] + [col_curve]:
            a = np.asarray(curve[size])
            cells.append(f"{a.mean():.3f} ± {a.std(ddof=1):.3f}" if len(a) > 1 else f"{a[0]:.3f}")
        print(f"| {size:,} | " + " | ".join(cells) + " |")
    print("\nchance: AUC 0.500, accuracy 0.500 (balanced valid and test)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
