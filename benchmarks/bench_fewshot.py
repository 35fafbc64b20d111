"""Few-shot curve on real PCam lymph-node patches: kNN and prototype accuracy vs examples per class.

    python benchmarks/bench_fewshot.py                                  # imagenet-lite0 and default; k = 1, 2, 5, 10; 10 draws; 1,000 test patches
    python benchmarks/bench_fewshot.py --models imagenet-lite0 default --shots 1 5 20 --draws 20 --n-test 2000
    python benchmarks/bench_fewshot.py --model default --providers cuda

For every k (labelled tiles per class) and draw, a support set of k normal (label 0) and k tumour
(label 1) patches is drawn at random from PCam train, and a :class:`wsiengine.FewShotClassifier`
classifies a fixed, balanced random subset of PCam test. Every encoder of ``--models`` (``--model
NAME`` for one) sees the same test subset and the same support draws; patches are decoded once and
embedded once per encoder (96 px, resized to the encoder's input inside ``Encoder.embed``).
Prints, per encoder, accuracy mean ± sd over the draws (and min..max) per method, with the date.
Data: ``../shared/data/pcam/{train,test}/{0,1}/*.jpg`` or ``--data``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = (ROOT / ".." / "shared" / "data" / "pcam").resolve()


def load_patches(paths: list[Path]) -> np.ndarray:
    from PIL import Image

    out = []
    for path in paths:
        with Image.open(path) as im:
            out.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return np.stack(out)


def embed_images(encoder, images: np.ndarray, batch: int = 128) -> np.ndarray:
    feats = [encoder.embed(images[i : i + batch]) for i in range(0, len(images), batch)]
    return np.concatenate(feats) if feats else np.zeros((0, encoder.embed_dim), np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="PCam folder with train/ and test/ (default: %(default)s)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--models", nargs="+", default=["imagenet-lite0", "default"],
                       help="encoders: 'default', registry names or .onnx paths (default: %(default)s)")
    which.add_argument("--model", help="one encoder (same as --models NAME)")
    parser.add_argument("--providers", default="auto", help="ONNX Runtime providers: auto, cpu, cuda, tensorrt")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 5, 10], help="labelled tiles per class")
    parser.add_argument("--draws", type=int, default=10, help="random support sets per k")
    parser.add_argument("--n-test", type=int, default=1000, help="balanced PCam test patches to classify")
    parser.add_argument("--methods", nargs="+", default=["knn", "prototype"], choices=["knn", "prototype"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = [args.model] if args.model else args.models

    import wsiengine
    from wsiengine import Encoder
    from wsiengine.fewshot import FewShotClassifier

    for split in ("train", "test"):
        for label in ("0", "1"):
            if not (args.data / split / label).is_dir():
                print(f"PCam folder {args.data / split / label} is absent; pass --data", file=sys.stderr)
                return 2

    rng = np.random.default_rng(args.seed)
    files = {
        (split, label): sorted((args.data / split / str(label)).glob("*.jpg"))
        for split in ("train", "test")
        for label in (0, 1)
    }
    per_class = args.n_test // 2
    test_paths, test_labels = [], []
    for label in (0, 1):
        pool = files[("test", label)]
        pick = rng.choice(len(pool), size=per_class, replace=False)
        test_paths += [pool[i] for i in sorted(pick)]
        test_labels += [label] * per_class
    test_labels = np.asarray(test_labels)

    # every draw's support indices first, so that each train patch is embedded once
    draws: dict[tuple[int, int], dict[int, np.ndarray]] = {}
    for k in args.shots:
        for d in range(args.draws):
            draws[(k, d)] = {label: rng.choice(len(files[("train", label)]), size=k, replace=False) for label in (0, 1)}
    needed = {label: sorted({int(i) for s in draws.values() for i in s[label]}) for label in (0, 1)}

    t0 = time.perf_counter()
    test_images = load_patches(test_paths)
    train_images = {label: load_patches([files[("train", label)][i] for i in needed[label]]) for label in (0, 1)}
    decode_s = time.perf_counter() - t0
    n_patches = len(test_paths) + sum(len(v) for v in needed.values())

    print(f"# Few-shot tile classification on PCam ({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)")
    print(f"wsiengine {wsiengine.__version__}, python {platform.python_version()}, {platform.machine()}; "
          f"encoders: {', '.join(names)}")
    print(f"test: {len(test_paths)} PCam test patches ({per_class} per class, seed {args.seed}); "
          f"support: k per class from PCam train, {args.draws} draws per k, the same for every encoder; "
          f"kNN = similarity-weighted vote of min(5, k) neighbours; prototype = nearest class mean (cosine)")
    print(f"decoded {n_patches} patches once in {decode_s:.1f} s")
    for name in names:
        encoder = Encoder.load(name, providers=args.providers)
        t0 = time.perf_counter()
        test_feats = embed_images(encoder, test_images)
        train_feats = {label: dict(zip(needed[label], embed_images(encoder, train_images[label]))) for label in (0, 1)}
        embed_s = time.perf_counter() - t0

        results: dict[tuple[str, int], list[float]] = {}
        t0 = time.perf_counter()
        for (k, d), support in draws.items():
            x = np.stack([train_feats[label][int(i)] for label in (0, 1) for i in support[label]])
            y = np.repeat([0, 1], k)
            for method in args.methods:
                clf = FewShotClassifier(x, y, method=method)
                acc = float(np.mean(clf.predict(test_feats) == test_labels))
                results.setdefault((method, k), []).append(acc)
        classify_s = time.perf_counter() - t0

        print(f"\n## {name}: {encoder!r} ({encoder.path.name})\n")
        print(f"embedded {n_patches} patches in {embed_s:.1f} s; {len(draws) * len(args.methods)} classifications "
              f"in {classify_s:.2f} s")
        print()
        print("| k per class | " + " | ".join(f"{m} accuracy (mean ± sd) | {m} min..max" for m in args.methods) + " |")
        print("|" + "---|" * (1 + 2 * len(args.methods)))
        for k in args.shots:
            cells = []
            for method in args.methods:
                a = np.asarray(results[(method, k)])
                sd = a.std(ddof=1) if len(a) > 1 else 0.0
                cells += [f"{a.mean():.3f} ± {sd:.3f}", f"{a.min():.3f}..{a.max():.3f}"]
            print(f"| {k} | " + " | ".join(cells) + " |")
    print("\nchance = 0.500 (balanced test set)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
