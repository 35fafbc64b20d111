"""Deposit rules of a ``train-mil`` head, chosen from slide labels only, against a plain threshold.

    python benchmarks/bench_mosaic_mil.py --work /tmp/mosaic            # slides, stores and head-abmil-seed0
    python benchmarks/bench_deposit_rules.py --work /tmp/mosaic         # then this

A head trained on slide labels has no tile labels to calibrate on. The rules
(:func:`wsiengine.deposits.rules_from_slide_labels`) come from its **validation** slides' labels
(the ``val`` part of the head's ``splits.csv``); the figures are measured on the **test** mosaic
slides against their true lesions, for the plain rule (tile score >= 0.5, no smoothing, any tile a
focus: what every head had before) and for the slide-label rules:

- mean IoU of the deposits with the lesions of positive slides;
- median ratio of the largest deposit's Feret diameter to the largest lesion's;
- foci on negative slides (median, and the share of negative slides with any).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np


def _slides(work: Path, head, ids: list[str], labels: dict[str, int]) -> list[dict]:
    from wsiengine.geojson import annotations_to_geometry, read_geojson
    from wsiengine.store import open_result

    out = []
    for slide_id in ids:
        store = open_result(work / "features" / f"{slide_id}.zarr")
        lesion_file = work / "slides" / slide_id.split("-")[0] / f"{slide_id}.lesions.geojson"
        lesion = annotations_to_geometry(read_geojson(lesion_file)) if lesion_file.is_file() else None
        out.append({"id": slide_id, "grid": store.tile_grid(), "label": labels[slide_id], "lesion": lesion,
                    "scores": head.predict(np.asarray(store.group["features"][:])).tile_scores,
                    "mpp": tuple(float(v) for v in store.slide["mpp"])})
    return out


def measure(slides: list[dict], rules) -> dict:
    from wsiengine.deposits import find_deposits
    from wsiengine.geojson import max_diameter

    ious, ratios, negative_foci = [], [], []
    for s in slides:
        found = find_deposits(s["grid"], s["scores"], s["mpp"], rules)
        if s["label"] == 1 and s["lesion"] is not None and not s["lesion"].is_empty:
            outline = found.outline()
            ious.append(float(s["lesion"].intersection(outline).area / s["lesion"].union(outline).area))
            largest = max(getattr(s["lesion"], "geoms", [s["lesion"]]), key=lambda g: g.area)
            ratios.append((found.largest_mm or 0.0) / (max_diameter(largest, s["mpp"]) / 1000))
        elif s["label"] == 0:
            negative_foci.append(found.foci)
    return {"mean_iou": float(np.mean(ious)) if ious else None, "size_ratio_median": float(np.median(ratios)) if ratios
            else None, "negative_foci_median": float(np.median(negative_foci)) if negative_foci else None,
            "negative_with_focus": float(np.mean(np.asarray(negative_foci) > 0)) if negative_foci else None,
            "n_positive": len(ious), "n_negative": len(negative_foci)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="bench_mosaic_mil.py's --work folder")
    parser.add_argument("--head", default="head-abmil-seed0", help="head folder inside --work (default: %(default)s)")
    args = parser.parse_args(argv)

    from wsiengine.aggregate import MILHead
    from wsiengine.deposits import DepositRules, rules_from_slide_labels

    head_dir = args.work / args.head
    head = MILHead.load(head_dir)
    with (head_dir / "splits.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    split = head.config.get("selected_split") or rows[0]["fold"]
    parts: dict[str, list[str]] = {}
    for row in rows:
        if row["fold"] == split:
            parts.setdefault(row["split"], []).append(row["slide_id"])
    with (args.work / "labels.csv").open(newline="") as fh:
        labels = {r["slide_id"]: int(r["label"]) for r in csv.DictReader(fh)}
    val = _slides(args.work, head, parts["val"], labels)
    test = _slides(args.work, head, parts["test"], labels)
    rules = rules_from_slide_labels([s["grid"] for s in val], [s["scores"] for s in val], [s["label"] for s in val])
    figures = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"), "head": str(head_dir),
               "n_val": len(val), "n_test": len(test), "rules": rules.to_dict(),
               "plain": measure(test, DepositRules()), "slide_label_rules": measure(test, rules)}
    print(f"# Deposit rules from slide labels ({figures['date']}): {head.name}, rules from {len(val)} validation "
          f"slides, figures on {len(test)} test slides")
    print(f"rules: grow {rules.grow_threshold:.3f}, seed {rules.seed_threshold:.3f}, smoothing {rules.smoothing:g}\n")
    print("| test mosaic slides | tile score >= 0.5 | slide-label rules |\n| --- | --- | --- |")
    a, b = figures["plain"], figures["slide_label_rules"]
    print(f"| mean deposit IoU with the lesion ({a['n_positive']} positive) | {a['mean_iou']:.2f} | {b['mean_iou']:.2f} |")
    print(f"| median largest-deposit / largest-lesion size | {a['size_ratio_median']:.2f} | {b['size_ratio_median']:.2f} |")
    print(f"| foci on negative slides, median ({a['n_negative']} negative) | {a['negative_foci_median']:g} | "
          f"{b['negative_foci_median']:g} |")
    print(f"| negative slides with any focus | {a['negative_with_focus']:.0%} | {b['negative_with_focus']:.0%} |")
    (args.work / "deposit_rules_bench.json").write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
