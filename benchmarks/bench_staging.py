"""CAMELYON17-style staging on PCam-mosaic patients: node categories, pN stages, deposit sizes.

    python benchmarks/bench_staging.py --work /tmp/staging --patients 10          # 50 nodes from PCam test
    python benchmarks/bench_staging.py --work /tmp/staging --patients 4 --precision int8
    python benchmarks/bench_staging.py --work /tmp/staging-small --patients 1 --small   # plumbing check (tests)

Patients (seeded) of five lymph nodes each, their target stages drawn evenly from pN0, pN0(i+),
pN1mi, pN1 and pN2, and node categories that give that stage. Each node is a PCam-mosaic slide
(:mod:`wsiengine.testing.mosaic`) from PCam **test** patches (``--split``; never tune on it):
two or three tissue pieces (one or two for a macrometastasis node, which must hold it; a slide
never repeats a patch, and PCam test has about 1,065 usable normal ones), and for a positive node one
lesion of real tumour patches sized for its category: ITC (one patch, about 0.09-0.13 mm),
micrometastasis (target 0.3-1.5 mm) or macrometastasis (2.4-3.5 mm). The truth is measured on
the lesion polygon itself: its greatest dimension (Feret diameter, mm) gives the node's true
category (AJCC/CAP: <= 0.2 mm ITC, <= 2 mm micro), so a lesion that grew smaller than planned
is scored as what it is.

Then the default pipeline (``wsiengine run`` with ``--patients``) runs on the folder, and the
benchmark prints, with the CAMELYON17 anchors beside them (best single algorithm kappa 0.89,
ensemble 0.93, fewer than 40 % of ITCs detected by every team):

- node-category quadratic weighted kappa and confusion matrix (negative, itc, micro, macro);
- patient pN kappa and confusion matrix;
- the median relative error of the largest-deposit size on micro/macro nodes the pipeline sized;
- the mean IoU of the GeoJSON tumour regions with the lesion, on micro/macro nodes;
- the median number of tumour foci on negative nodes; the ITC detection rate;
- the lesion-level FROC score (CAMELYON16) of the tile scores.

``--work`` keeps slides and results, so a rerun resumes. Needs PCam (``../shared/data/pcam``
or ``--pcam``).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PCAM = (ROOT / ".." / "shared" / "data" / "pcam").resolve()
ANCHORS = {"kappa_best_single": 0.89, "kappa_ensemble": 0.93, "itc_detection_below": 0.40}


def region_iou(results: Path, slides: Path, slide_id: str) -> float | None:
    """IoU of the GeoJSON tumour regions with the true lesions (None if the node has no lesion)."""
    from wsiengine.geojson import TUMOR_CLASS, annotations_to_geometry, read_geojson

    truth = annotations_to_geometry(read_geojson(slides / f"{slide_id}.lesions.geojson"))
    if truth.is_empty:
        return None
    path = results / f"{slide_id}.geojson"
    called = annotations_to_geometry(read_geojson(path), TUMOR_CLASS, object_type="annotation") if path.is_file() else None
    if called is None or called.is_empty:
        return 0.0
    return float(truth.intersection(called).area / truth.union(called).area)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for slides and results (reused)")
    parser.add_argument("--pcam", type=Path, default=DEFAULT_PCAM, help="PCam folder (default: %(default)s)")
    parser.add_argument("--split", default="test", help="PCam split the nodes are made of (default: test)")
    parser.add_argument("--patients", type=int, default=10, help="patients of five nodes (default 10)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "int8"], help="encoder precision")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="tiny nodes and lesions: a plumbing check, not figures")
    args = parser.parse_args(argv)

    from wsiengine.batch import run_batch
    from wsiengine.evaluate import (NODE_LABELS, PN_LABELS, confusion_matrix, detections_from_tiles, froc,
                                    quadratic_weighted_kappa)
    from wsiengine.geojson import annotations_to_geometry, read_geojson
    from wsiengine.staging import (pn_stage, read_node, read_patients, stage_patients, write_patient_reports,
                                   write_stages)
    from wsiengine.store import open_result
    from wsiengine.testing.mosaic import PCAM_MPP, PatchPool
    from wsiengine.testing.nodes import make_nodes, plan_patients

    started = time.perf_counter()
    slides, results = args.work / "slides", args.work / "results"
    nodes = plan_patients(args.patients, args.seed)
    make_nodes(nodes, PatchPool.from_pcam(args.pcam, args.split), slides, small=args.small)
    patients_csv = args.work / "patients.csv"
    with patients_csv.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["patient_id", "slide_id"])
        writer.writerows((n.patient_id, n.slide_id) for n in nodes)
    with (args.work / "truth.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(asdict(nodes[0])))
        writer.writeheader()
        writer.writerows(asdict(n) for n in nodes)
    made = time.perf_counter()
    summary = run_batch(slides, results, precision=args.precision, providers="cpu")
    ran = time.perf_counter()
    failed = [r.slide_id for r in summary.rows if r.status == "failed"]
    staged = stage_patients(read_patients(patients_csv), results)
    write_stages(staged, results / "stages.csv")
    write_patient_reports(staged, results / "patients")
    stages = {s.patient_id: s for s in staged}

    called_nodes = {n.slide_id: read_node(results, n.slide_id) for n in nodes}
    node_truth = [n.true_category for n in nodes]
    node_called = [(called_nodes[n.slide_id].category if called_nodes[n.slide_id] else "negative") for n in nodes]
    node_called = ["negative" if c == "indeterminate" else c for c in node_called]
    patients = sorted({n.patient_id for n in nodes})
    truth_stage = {p: pn_stage([n.true_category for n in nodes if n.patient_id == p]) for p in patients}
    called_stage = {p: stages[p].pn_stage for p in patients}

    size_errors, ious, negative_foci, itc_hits, itc_total = [], [], [], 0, 0
    detections, lesions = {}, {}
    for n in nodes:
        node = called_nodes[n.slide_id]
        if n.true_category in ("micrometastasis", "macrometastasis"):
            if node is not None and node.largest_mm:
                size_errors.append(abs(node.largest_mm - n.true_mm) / n.true_mm)
            iou = region_iou(results, slides, n.slide_id)
            ious.append(0.0 if iou is None else iou)
        if n.true_category == "negative" and node is not None:
            negative_foci.append(node.foci)
        if n.true_category == "itc":
            itc_total += 1
            itc_hits += int(node is not None and node.category not in ("negative", "indeterminate"))
        store_path = results / f"{n.slide_id}.zarr"
        if store_path.is_dir():
            store = open_result(store_path)
            detections[n.slide_id] = detections_from_tiles(store.tile_grid(), store.tile_scores, threshold=0.05,
                                                           local_maxima=True)
            lesions[n.slide_id] = annotations_to_geometry(read_geojson(slides / f"{n.slide_id}.lesions.geojson"))
    froc_result = froc(detections, lesions, PCAM_MPP) if detections else None

    node_kappa = quadratic_weighted_kappa(node_truth, node_called, NODE_LABELS)
    patient_kappa = quadratic_weighted_kappa([truth_stage[p] for p in patients], [called_stage[p] for p in patients],
                                             PN_LABELS + ("pN3", "incomplete"))
    figures = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": platform.machine(),
        "patients": len(patients), "nodes": len(nodes), "split": args.split, "precision": args.precision,
        "small": args.small, "failed": failed,
        "node_kappa": node_kappa, "patient_kappa": patient_kappa,
        "node_confusion": confusion_matrix(node_truth, node_called, NODE_LABELS).tolist(),
        "patient_confusion": confusion_matrix([truth_stage[p] for p in patients], [called_stage[p] for p in patients],
                                              PN_LABELS + ("pN3", "incomplete")).tolist(),
        "median_size_error": float(np.median(size_errors)) if size_errors else None, "n_sized": len(size_errors),
        "mean_iou": float(np.mean(ious)) if ious else None, "n_iou": len(ious),
        "negative_foci_median": float(np.median(negative_foci)) if negative_foci else None,
        "itc_detected": itc_hits, "itc_total": itc_total,
        "froc": froc_result.score if froc_result is not None else None,
        "seconds": {"slides": made - started, "pipeline": ran - made, "total": time.perf_counter() - started},
        "anchors": ANCHORS,
    }
    (args.work / "staging.json").write_text(json.dumps(figures, indent=1))
    print(f"# CAMELYON17-style staging on PCam-mosaic patients ({figures['date']})")
    print(f"{len(patients)} patients, {len(nodes)} nodes from PCam {args.split}; default pipeline, encoder "
          f"{args.precision}; slides {made - started:.0f} s, pipeline {ran - made:.0f} s"
          + (" [--small: plumbing check, not figures]" if args.small else ""))
    if failed:
        print(f"failed slides: {', '.join(failed)}")
    print("\n| figure | value | CAMELYON17 anchor |\n| --- | --- | --- |")
    print(f"| node-category kappa (quadratic) | {node_kappa:.3f} | |")
    print(f"| patient pN kappa (quadratic) | {patient_kappa:.3f} | 0.89 best single algorithm, 0.93 ensemble |")
    size = figures["median_size_error"]
    print(f"| median largest-deposit size error, micro/macro ({len(size_errors)}) | "
          f"{'-' if size is None else f'{size:.0%}'} | |")
    iou = figures["mean_iou"]
    print(f"| mean IoU of GeoJSON tumour regions, micro/macro ({len(ious)}) | {'-' if iou is None else f'{iou:.2f}'} | |")
    foci = figures["negative_foci_median"]
    print(f"| median tumour foci on negative nodes | {'-' if foci is None else f'{foci:g}'} | |")
    print(f"| ITC nodes detected | {itc_hits}/{itc_total} | every team < 40 % |")
    froc_text = "-" if figures["froc"] is None else f"{figures['froc']:.3f}"
    print(f"| lesion FROC score (tile scores) | {froc_text} | |")
    print("\nnode confusion (rows truth, columns called): " + ", ".join(NODE_LABELS))
    for label, row in zip(NODE_LABELS, figures["node_confusion"]):
        print(f"  {label:<16} {row}")
    print("patient confusion (rows truth, columns called): " + ", ".join(PN_LABELS + ("pN3", "incomplete")))
    for label, row in zip(PN_LABELS + ("pN3", "incomplete"), figures["patient_confusion"]):
        print(f"  {label:<10} {row}")
    print(f"\nwrote {args.work / 'staging.json'}, {args.work / 'truth.csv'}, {results / 'stages.csv'} and "
          f"{results / 'patients'}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
