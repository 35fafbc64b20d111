"""PCam-mosaic slides through the whole pipeline: slide AUC and attention localisation.

    python benchmarks/bench_mosaic_mil.py --work /tmp/mil-default          # reuses slides/stores there
    python benchmarks/bench_mosaic_mil.py --work /tmp/mosaic --train 64 --valid 24 --test 48 --model clam_sb

Slides are PCam-mosaic "lymph nodes" (:mod:`wsiengine.testing.mosaic`): training slides from
PCam train, validation slides from PCam valid, test slides from PCam test, half positive with
one lesion of 4-113 real tumour patches. Each goes through the real pipeline (``open_slide``,
``detect_tissue``, ``plan_tiles`` at the slide's 0.972 µm/px with 96-px tiles, the default
encoder in ONNX Runtime, a Zarr store), then ``wsiengine train-mil --split`` trains a head
(early stopping and threshold on the validation slides), and the exported ONNX head is run
by :class:`wsiengine.MILHead` on the test slides. Printed per head: test slide AUC with a 95 %
bootstrap CI, balanced accuracy / sensitivity / specificity at the validation threshold, and
how often the most attended tile of a positive test slide lies inside its lesion (chance: the
lesion's share of the slide's tiles, printed beside it). The shipped ``default`` head is
scored on the same test slides for comparison; when ``--work`` is the folder
``python -m wsiengine.models.training.train_default_mil`` used, its slides are the ones it was trained
and tested on.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PCAM = (ROOT / ".." / "shared" / "data" / "pcam").resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, type=Path, help="folder for slides, stores and heads (reused)")
    parser.add_argument("--pcam", type=Path, default=DEFAULT_PCAM)
    parser.add_argument("--train", type=int, default=96, help="training slides (PCam train)")
    parser.add_argument("--valid", type=int, default=32, help="validation slides (PCam valid)")
    parser.add_argument("--test", type=int, default=48, help="test slides (PCam test)")
    parser.add_argument("--model", default="abmil", choices=["abmil", "clam_sb"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--providers", default="cpu")
    args = parser.parse_args(argv)

    from wsiengine import Encoder, MILHead
    from wsiengine.cli import main as cli
    from wsiengine.models.training.mil_metrics import binary_metrics, bootstrap_auc_ci
    from wsiengine.models.training.train_default_mil import embed_slides, prepare_split
    from wsiengine.store import read_features

    if not args.pcam.is_dir():
        print(f"PCam not found at {args.pcam} (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    encoder = Encoder.load("default", providers=args.providers)
    fdir = args.work / "features"
    fdir.mkdir(parents=True, exist_ok=True)
    slides = {}
    for split, n in (("train", args.train), ("valid", args.valid), ("test", args.test)):
        slides[split] = prepare_split(args.work, args.pcam, split, n)
        t0 = time.perf_counter()
        embed_slides(slides[split], fdir, encoder)
        print(f"{split}: {n} slides embedded/reused in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    pipeline_s = time.perf_counter() - started  # small when the stores already existed in --work
    n_tiles = {k: sum(len(read_features(fdir / f"{s.slide_id}.zarr")[0]) for s in v) for k, v in slides.items()}

    labels_csv, split_csv = args.work / "labels.csv", args.work / "split.csv"
    with open(labels_csv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "label"])
        w.writerows((s.slide_id, s.label) for v in slides.values() for s in v)
    with open(split_csv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "split"])
        for part, split in (("train", "train"), ("val", "valid"), ("test", "test")):
            w.writerows((s.slide_id, part) for s in slides[split])
    head_dir = args.work / f"head-{args.model}-seed{args.seed}"
    t0 = time.perf_counter()
    code = cli(["-q", "train-mil", "--features", str(fdir), "--labels", str(labels_csv), "--split", str(split_csv),
                "--model", args.model, "--seed", str(args.seed), "-o", str(head_dir), "--overwrite"])
    if code:
        return code
    train_s = time.perf_counter() - t0

    rows = []
    for name, head in ((f"train-mil {args.model}", MILHead.load(head_dir)), ("shipped default", MILHead.load("default"))):
        probs, ys, hits, chance = [], [], [], []
        for s in slides["test"]:
            coords, feats = read_features(fdir / f"{s.slide_id}.zarr")
            pred = head.predict(feats)
            probs.append(pred.probability)
            ys.append(s.label)
            if s.label:
                tile_labels = s.labels_at(coords)
                hits.append(int(tile_labels[int(pred.attention.argmax())]))
                chance.append(float(tile_labels.mean()))
        m = binary_metrics(probs, ys, head.threshold)
        lo, hi = bootstrap_auc_ci(ys, probs)
        rows.append((name, m, lo, hi, int(np.sum(hits)), len(hits), float(np.mean(chance))))

    print(f"\nPCam-mosaic MIL benchmark, {dt.date.today().isoformat()}, encoder default ({encoder.spec.name}, "
          f"{encoder.precision}, {encoder.providers[0]}), {platform.machine()} {platform.system()}")
    print(f"slides train/valid/test {args.train}/{args.valid}/{args.test} (half positive); tiles "
          f"{n_tiles['train']:,}/{n_tiles['valid']:,}/{n_tiles['test']:,}; pipeline (or reuse of --work) {pipeline_s:.0f} s, "
          f"train-mil {train_s:.0f} s\n")
    print("| head | test slide AUC (95 % CI) | bal. acc. | sensitivity | specificity | top-attention tile in lesion | chance |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, m, lo, hi, h, n, ch in rows:
        print(f"| {name} | {m.auc:.3f} ({lo:.3f}-{hi:.3f}) | {m.balanced_accuracy:.3f} | {m.sensitivity:.3f} | "
              f"{m.specificity:.3f} | {h}/{n} ({h / max(n, 1):.0%}) | {ch:.0%} |")
    summary = {"date": dt.date.today().isoformat(), "rows": [
        {"head": name, **m.to_dict(), "auc_ci": [lo, hi], "top_attention_in_lesion": [h, n], "chance": ch}
        for name, m, lo, hi, h, n, ch in rows]}
    (args.work / "bench_mosaic_mil.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
