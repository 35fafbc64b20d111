"""Linear probe on real PCam lymph-node patches: encoder embeddings vs a colour-histogram baseline.

    python benchmarks/bench_pcam_probe.py                                   # 4,000 train, all 3,000 valid and test
    python benchmarks/bench_pcam_probe.py --n-train all --cache /tmp/pcam-cache --providers cuda

A balanced random subset of PCam train (``--n-train``, n/2 per class; label 1 = tumour), all of
PCam valid and all of PCam test (or balanced subsets) are embedded once with the chosen encoder
(96 px at 0.972 µm/px, resized to the encoder's input inside ``Encoder.embed``). The probe is an
L2-regularised logistic regression on standardised features (scikit-learn); C is chosen from a
grid by valid AUC, the decision threshold that maximises balanced accuracy on valid is kept too,
and only then is test scored once: accuracy at 0.5 and at the valid threshold, AUC with a 95 %
percentile bootstrap CI (1,000 seeded resamples). The same probe runs in the same process on a
colour baseline (3 x 16-bin RGB histograms + per-channel mean and sd, 54 features), with a paired
bootstrap CI of the AUC difference. A learning curve refits the probe (C re-chosen on valid) on
balanced subsets of the embedded train patches (200, 1,000, 4,000 and ``--n-train``; several
draws below ``--n-train``). Nothing is chosen on test.
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


def featurise(encoder, paths: list[Path], timings: dict[str, float], batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Decode each JPEG once -> (encoder embeddings (N, D), colour features (N, 54)); adds seconds to ``timings``."""
    emb, col = [], []
    for i in range(0, len(paths), batch):
        t0 = time.perf_counter()
        images = load_patches(paths[i : i + batch])
        t1 = time.perf_counter()
        emb.append(encoder.embed(images))
        t2 = time.perf_counter()
        col.append(colour_features(images))
        t3 = time.perf_counter()
        timings["decode"] += t1 - t0
        timings["embed"] += t2 - t1
        timings["colour"] += t3 - t2
    return np.concatenate(emb), np.concatenate(col)


def cache_key(encoder_id: dict, data: Path, paths: list[Path]) -> str:
    """Hash of the encoder identity, the colour-feature version and the file list (relative names)."""
    h = hashlib.sha256(json.dumps(encoder_id, sort_keys=True).encode())
    h.update(COLOUR_VERSION.encode())
    for p in paths:
        h.update(str(p.relative_to(data)).encode() + b"\0")
    return h.hexdigest()[:24]


def load_or_featurise(encoder, encoder_id: dict | None, cache: Path | None, data: Path, split: str,
                      paths: list[Path], timings: dict[str, float]) -> tuple[np.ndarray, np.ndarray, bool]:
    """Features for one split, from ``cache`` when present there -> (emb, colour, came_from_cache)."""
    target = None
    if cache is not None:
        target = cache / f"pcam-{split}-{encoder.spec.name}-{len(paths)}-{cache_key(encoder_id, data, paths)}.npz"
        if target.is_file():
            with np.load(target) as z:
                return z["embeddings"], z["colour"], True
    emb, col = featurise(encoder, paths, timings)
    if target is not None:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".partial.npz")
        np.savez(tmp, embeddings=emb, colour=col)
        os.replace(tmp, target)
    return emb, col, False


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
    from sklearn.metrics import roc_auc_score, roc_curve
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
    valid_auc, c, clf = best
    p_va = clf.predict_proba(s_va)[:, 1]
    fpr, tpr, thr = roc_curve(y_va, p_va)
    threshold = float(np.clip(thr[int(np.argmax(tpr - fpr))], 0.0, 1.0))  # max (tpr + tnr) / 2
    p_te = clf.predict_proba(s_te)[:, 1]
    return ProbeResult(
        n_train=len(y_tr), c=c, valid_auc=float(valid_auc), threshold=threshold, test_prob=p_te,
        test_auc=float(roc_auc_score(y_te, p_te)),
        test_acc_05=float(np.mean((p_te >= 0.5) == y_te)),
        test_acc_thr=float(np.mean((p_te >= threshold) == y_te)),
    )


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
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="PCam folder with train/, valid/, test/ (default: %(default)s)")
    parser.add_argument("--encoder", default="default", help="encoder: 'default', a registry name with weights, or an .onnx path")
    parser.add_argument("--providers", default="auto", help="ONNX Runtime providers: auto, cpu, cuda, tensorrt")
    parser.add_argument("--n-train", type=parse_n, default=4000, help="balanced PCam train patches, or 'all' (default 4000)")
    parser.add_argument("--n-valid", type=parse_n, default=None, help="balanced PCam valid patches, or 'all' (default all)")
    parser.add_argument("--n-test", type=parse_n, default=None, help="balanced PCam test patches, or 'all' (default all)")
    parser.add_argument("--curve-draws", type=int, default=5, help="random train subsets per learning-curve size below --n-train")
    parser.add_argument("--cache", type=Path, default=None, help="folder for an .npz feature cache (default: off)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

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

    encoder = Encoder.load(args.encoder, providers=args.providers)
    encoder_id = None
    if args.cache is not None:
        desc = encoder.describe()
        encoder_id = {"spec": desc["spec"], "sha256": desc["sha256"]}
    feats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    timings = {"decode": 0.0, "embed": 0.0, "colour": 0.0}
    n_embedded, cached = 0, []
    encoder.embed(np.zeros((2, 96, 96, 3), np.uint8))  # warm-up (Numba, ONNX Runtime), outside the timings
    load_before = os.getloadavg()[0]
    t_wall = time.perf_counter()
    for split in SPLITS:
        paths, _ = picked[split]
        emb, col, hit = load_or_featurise(encoder, encoder_id, args.cache, args.data, split, paths, timings)
        if hit:
            cached.append(split)
        else:
            n_embedded += len(paths)
        feats[split] = (emb, col)
    featurise_s = time.perf_counter() - t_wall
    load_after = os.getloadavg()[0]
    y = {split: picked[split][1] for split in SPLITS}

    t0 = time.perf_counter()
    (e_tr, c_tr), (e_va, c_va), (e_te, c_te) = feats["train"], feats["valid"], feats["test"]
    enc_res = fit_probe(e_tr, y["train"], e_va, y["valid"], e_te, y["test"])
    col_res = fit_probe(c_tr, y["train"], c_va, y["valid"], c_te, y["test"])
    boot = bootstrap_aucs(y["test"], [enc_res.test_prob, col_res.test_prob], seed=args.seed)
    enc_ci, col_ci = ci(boot[:, 0]), ci(boot[:, 1])
    diff_ci = ci(boot[:, 0] - boot[:, 1])

    # learning curve: balanced subsets of the embedded train pool, C re-chosen on valid each time
    n_pool = len(y["train"])
    idx_by_label = [np.flatnonzero(y["train"] == label) for label in (0, 1)]
    sizes = sorted({s for s in CURVE_SIZES if s < n_pool} | {n_pool})
    curve_rng = np.random.default_rng(args.seed + 1)
    curve: dict[int, dict[str, list[float]]] = {}
    for size in sizes:
        draws = 1 if size == n_pool else args.curve_draws
        for _ in range(draws):
            if size == n_pool:
                sub = np.arange(n_pool)
                r_enc, r_col = enc_res, col_res
            else:
                sub = np.concatenate([curve_rng.choice(ix, size=size // 2, replace=False) for ix in idx_by_label])
                r_enc = fit_probe(e_tr[sub], y["train"][sub], e_va, y["valid"], e_te, y["test"])
                r_col = fit_probe(c_tr[sub], y["train"][sub], c_va, y["valid"], c_te, y["test"])
            row = curve.setdefault(size, {"enc": [], "col": []})
            row["enc"].append(r_enc.test_auc)
            row["col"].append(r_col.test_auc)
    probe_s = time.perf_counter() - t0

    # -- report ---------------------------------------------------------------------------
    provider = encoder.providers[0]
    print(f"# PCam linear probe ({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)")
    print(f"wsiengine {wsiengine.__version__}, encoder {encoder.spec.name} ({encoder.path.name}, {encoder.embed_dim}-d), "
          f"ONNX Runtime {onnxruntime.__version__} {provider}, scikit-learn {sklearn.__version__}")
    print(f"machine: {platform.platform()}, {cpu_name()}, {os.cpu_count()} cores, python {platform.python_version()}; "
          f"1-min load average {load_before:.2f} before / {load_after:.2f} after featurising")
    print(f"data: {args.data}; train {len(y['train'])} ({np.sum(y['train'] == 1)} tumour), "
          f"valid {len(y['valid'])} ({np.sum(y['valid'] == 1)} tumour), test {len(y['test'])} ({np.sum(y['test'] == 1)} tumour); seed {args.seed}")
    if n_embedded:
        print(f"embedding throughput: {n_embedded} patches, Encoder.embed (96 -> {encoder.spec.input_px} px resize, normalise, "
              f"inference, batch 32) {timings['embed']:.1f} s = {n_embedded / timings['embed']:.0f} patches/s; "
              f"with JPEG decode and colour features {featurise_s:.1f} s = {n_embedded / featurise_s:.0f} patches/s"
              + (f"; from cache: {', '.join(cached)}" if cached else ""))
    else:
        print(f"embedding throughput: n/a, all features from cache {args.cache}")
    print(f"probes: standardised features, L2 logistic regression, C in 1e-7..1e3 (21 half-decade steps) chosen on valid AUC; "
          f"test AUC 95 % CI from {N_BOOT} seeded bootstrap resamples; all fits and bootstraps {probe_s:.1f} s")
    for name, res in (("encoder", enc_res), ("colour", col_res)):
        edge = " (grid edge)" if res.c in (C_GRID[0], C_GRID[-1]) else ""
        print(f"  {name}: C = {res.c:.3g}{edge}, valid AUC {res.valid_auc:.3f}, valid threshold {res.threshold:.3f}")
    print()
    print("| features | train patches | test AUC (95 % CI) | test accuracy @ 0.5 | test accuracy @ valid threshold |")
    print("| --- | --- | --- | --- | --- |")
    for label, res, (lo, hi) in (
        (f"`{encoder.spec.name}` encoder ({encoder.embed_dim}-d)", enc_res, enc_ci),
        ("colour baseline (54-d RGB histograms)", col_res, col_ci),
    ):
        print(f"| {label} | {res.n_train:,} | {res.test_auc:.3f} ({lo:.3f}–{hi:.3f}) | {res.test_acc_05:.3f} | "
              f"{res.test_acc_thr:.3f} (t = {res.threshold:.3f}) |")
    print()
    print(f"encoder vs colour baseline: test AUC {enc_res.test_auc:.3f} vs {col_res.test_auc:.3f}, "
          f"difference {enc_res.test_auc - col_res.test_auc:+.3f} (paired bootstrap 95 % CI {diff_ci[0]:+.3f} to {diff_ci[1]:+.3f}); "
          f"test error at 0.5 {1 - enc_res.test_acc_05:.3f} vs {1 - col_res.test_acc_05:.3f} "
          f"({(1 - col_res.test_acc_05) / max(1 - enc_res.test_acc_05, 1e-9):.2f}x fewer errors)")
    print()
    print(f"learning curve (test AUC; balanced train subsets, C re-chosen on valid; mean ± sd over "
          f"{args.curve_draws} draws below {n_pool:,}):")
    print()
    print("| train patches (half tumour) | encoder test AUC | colour baseline test AUC |")
    print("| --- | --- | --- |")
    for size in sizes:
        cells = []
        for key in ("enc", "col"):
            a = np.asarray(curve[size][key])
            cells.append(f"{a.mean():.3f} ± {a.std(ddof=1):.3f}" if len(a) > 1 else f"{a[0]:.3f}")
        print(f"| {size:,} | " + " | ".join(cells) + " |")
    print("\nchance: AUC 0.500, accuracy 0.500 (balanced valid and test)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
