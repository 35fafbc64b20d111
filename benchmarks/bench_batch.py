#!/usr/bin/env python
"""Batch throughput: ``run_batch`` with 1 and 2 worker processes against a plain sequential loop.

    python benchmarks/bench_batch.py                              # 6 generated 8192 x 8192 slides, 3 rounds
    python benchmarks/bench_batch.py --n-slides 6 --size 16384x16384 --rounds 2
    python benchmarks/bench_batch.py --slides DIR [--mpp-csv FILE]  # an existing folder of slides
    ... [--encoder NAME|PATH] [--mil default|none|DIR] [--target-mpp X] [--tile-px N]
        [--workers 2] [--parallel slides|chunks|auto] [--json FILE]

Slides are generated with :func:`wsiengine.testing.synthetic.make_pyramidal_slide` into a
temporary folder (0.25 µm/px, seeds 0..n-1, 1-3 tissue blobs so tissue amounts differ);
generation is not timed. Every mode processes the same slides into a fresh results folder, in a
fresh interpreter, timed from the call (imports of ``wsiengine`` done before the clock starts):

- **baseline**: one ``Pipeline(...)`` built once, then ``pipe.run(slide, out)`` for each slide in
  turn: the same stages, no Dask batch, no summary or resume bookkeeping;
- **run_batch, 1 worker** (``workers=1``): in this process, ``cores`` encoder threads;
- **run_batch, 2 workers** (``workers=2``, ``parallel="slides"``): a local ``dask.distributed``
  cluster of 2 processes with ``cores // 2`` encoder threads each, one slide per worker at a
  time (``--parallel chunks`` splits each slide's tiles over the workers instead), started and
  closed by ``run_batch``: its start-up (and each worker loading the pipeline) is inside the
  figure, as a user pays it. Cluster start-up alone (``LocalCluster`` + ``Client`` until the
  workers are up, then the pipeline loaded in each) is measured apart.

Defaults are the shipped encoder and MIL head; the pipeline then tiles at the head's tiling
(96 px at 0.972 µm/px). Modes run in rotated order over ``--rounds`` rounds; medians are
reported. Ratios are tiles/s of a mode over tiles/s of the baseline. All modes and rounds must
give each slide the same number of tiles and the same probability (within 1e-5); a line says
whether they did. The 1-minute load average and the cores kept busy by other processes during
each phase are printed, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

from _harness import busy_cpu_s, cpu_model, package_versions

RESULT_MARK = "@@BENCH_RESULT@@ "
PROB_TOL = 1e-5
REPO = Path(__file__).resolve().parents[1]
if (REPO / "wsiengine" / "__init__.py").is_file() and str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))  # benchmark the checkout this script belongs to


def _emit(result: dict[str, Any]) -> None:
    print(RESULT_MARK + json.dumps(result), flush=True)


def _settings(args: dict[str, Any]) -> dict[str, Any]:
    """The run settings of the benchmark (flat names of :class:`wsiengine.RunConfig`)."""
    return {"encoder": args["encoder"], "mil": args["mil"], "target_mpp": args["target_mpp"],
            "tile_px": args["tile_px"]}


def _mpps(args: dict[str, Any]) -> dict[str, tuple[float, float] | None]:
    if not args.get("mpp_csv"):
        return {sid: None for sid, _ in args["entries"]}
    from wsiengine.resolution import lookup_mpp, read_mpp_csv

    table = read_mpp_csv(args["mpp_csv"])
    return {sid: lookup_mpp(table, path) for sid, path in args["entries"]}


# -- phases (each in its own interpreter) ---------------------------------------------------------
def phase_baseline(args: dict[str, Any]) -> None:
    """One Pipeline built once, then a plain loop of ``Pipeline.run`` over the slides."""
    import wsiengine as we

    mpps = _mpps(args)
    start = time.perf_counter()
    pipe = we.Pipeline(we.RunConfig.load(**_settings(args)))
    build_s = time.perf_counter() - start
    slides: dict[str, dict[str, Any]] = {}
    for sid, path in args["entries"]:
        try:
            res = pipe.run(path, out=args["out"], slide_id=sid, mpp=mpps[sid])
            slides[sid] = {"status": "done", "n_tiles": res.n_tiles, "probability": res.probability,
                           "seconds": res.timings.get("total")}
        except Exception as exc:  # noqa: BLE001 - reported, and fails the agreement check
            slides[sid] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    seconds = time.perf_counter() - start
    _emit({"seconds": seconds, "build_s": build_s, "slides": slides,
           "tiling": {"target_mpp": pipe.tiling.target_mpp, "tile_px": pipe.tiling.tile_px}})


def phase_batch(args: dict[str, Any]) -> None:
    """``run_batch(workers=N)`` into a fresh results folder (whole slides per worker unless
    ``--parallel`` says otherwise)."""
    from wsiengine.batch import run_batch

    extra = {"parallel": args["parallel"]}
    if args.get("chunk_tiles"):
        extra["chunk_tiles"] = args["chunk_tiles"]
    start = time.perf_counter()
    summary = run_batch(args["slides_dir"], args["out"], workers=args["workers"], mpp_csv=args.get("mpp_csv"),
                        **_settings(args), **extra)
    seconds = time.perf_counter() - start
    slides = {r.slide_id: {"status": r.status, "n_tiles": r.n_tiles, "probability": r.probability,
                           "seconds": r.seconds, "error": r.error} for r in summary.rows}
    _emit({"seconds": seconds, "slides": slides, "workers": summary.workers, "counts": summary.counts})


def _load_worker_pipeline(settings: dict[str, Any], threads: int) -> float:
    """In a worker: import the engine and load the pipeline as ``run_batch``'s first task does; seconds."""
    start = time.perf_counter()
    from wsiengine import RunConfig
    from wsiengine.batch.run import _pipeline

    _pipeline(RunConfig.load(**settings, threads=threads, num_workers=threads))
    return time.perf_counter() - start


def phase_startup(args: dict[str, Any]) -> None:
    """A local cluster as ``run_batch`` starts it: until the workers are up; then every worker
    importing the engine and loading the pipeline (in parallel); then the cluster's close."""
    from dask.distributed import Client, LocalCluster

    from wsiengine.config import physical_cores

    start = time.perf_counter()
    cluster = LocalCluster(n_workers=args["workers"], threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    client.wait_for_workers(args["workers"])
    startup_s = time.perf_counter() - start
    start = time.perf_counter()
    client.run(_load_worker_pipeline, _settings(args), max(1, physical_cores() // args["workers"]))
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    client.close()
    cluster.close()
    _emit({"seconds": startup_s, "worker_load_s": load_s, "close_s": time.perf_counter() - start})


PHASES = {"baseline": phase_baseline, "batch": phase_batch, "startup": phase_startup}


# -- the parent -----------------------------------------------------------------------------------
def _load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run_phase(name: str, args: dict[str, Any], *, label: str = "", verbose: bool = True) -> dict[str, Any]:
    """Run a phase in a fresh interpreter; adds its CPU seconds (own, children included), the
    cores other processes kept busy meanwhile, and the 1-minute load average before and after."""
    command = [sys.executable, str(Path(__file__).resolve()), "--_phase", name, "--_args", json.dumps(args)]
    load_before = _load1()
    busy0, own0, wall0 = busy_cpu_s(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    busy1, own1, wall = busy_cpu_s(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - wall0
    own = (own1.ru_utime - own0.ru_utime) + (own1.ru_stime - own0.ru_stime)
    other = None
    if busy0 is not None and busy1 is not None and wall > 0:
        other = round(max(0.0, (busy1 - busy0) - own) / wall, 2)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
            result.update(cpu_s=round(own, 2), other_load_cores=other, load1_before=load_before, load1_after=_load1())
            if verbose:
                print(f"  {label or name:<9} {result['seconds']:6.2f} s, load {load_before} -> {result['load1_after']}, "
                      f"other processes {other} cores", file=sys.stderr, flush=True)
            return result
    return {"error": f"phase {name} exited with {proc.returncode} and no result: {proc.stderr[-3000:]}"}


def machine_info() -> dict[str, Any]:
    model = cpu_model()
    from wsiengine.config import physical_cores

    return {"cpu_model": model, "logical_cores": os.cpu_count(), "physical_cores": physical_cores(),
            "platform": platform.platform(), "python": platform.python_version()}


def versions() -> dict[str, str]:
    return package_versions(("wsiengine", "onnxruntime", "dask", "distributed", "numpy"))


def preread(paths: list[str]) -> None:
    """Read every slide once so each phase finds them in the page cache."""
    for p in paths:
        with open(p, "rb") as handle:
            while handle.read(1 << 24):
                pass


def generate(folder: Path, n: int, width: int, height: int, mpp: float) -> list[dict[str, Any]]:
    """``n`` slides, seeds 0..n-1, 1-3 tissue blobs (seed % 3 + 1) so tissue amounts differ."""
    from wsiengine.testing.synthetic import make_pyramidal_slide

    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for seed in range(n):
        path = folder / f"synthetic-{width}x{height}-seed{seed}.tiff"
        start = time.perf_counter()
        slide = make_pyramidal_slide(path, width=width, height=height, mpp=mpp, seed=seed, tissue=seed % 3 + 1)
        made.append({"path": str(path), "seconds": round(time.perf_counter() - start, 2),
                     "tissue_fraction": round(slide.tissue_fraction, 4)})
    return made


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def check_agreement(runs: dict[str, list[dict[str, Any]]], ids: list[str]) -> dict[str, Any]:
    """Same tiles and probabilities (within PROB_TOL) for every slide in every mode and round."""
    problems: list[str] = []
    max_dp = 0.0
    reference: dict[str, dict[str, Any]] = {}
    for mode, results in runs.items():
        for r, res in enumerate(results):
            for sid in ids:
                got = res["slides"].get(sid)
                if got is None or got["status"] != "done":
                    problems.append(f"{mode} round {r}: {sid} {got['status'] if got else 'missing'}"
                                    f"{': ' + got.get('error', '') if got else ''}")
                    continue
                ref = reference.setdefault(sid, got)
                if got["n_tiles"] != ref["n_tiles"]:
                    problems.append(f"{mode} round {r}: {sid} has {got['n_tiles']} tiles, expected {ref['n_tiles']}")
                p, q = got["probability"], ref["probability"]
                if (p is None) != (q is None):
                    problems.append(f"{mode} round {r}: {sid} probability {p} vs {q}")
                elif p is not None:
                    max_dp = max(max_dp, abs(p - q))
    if max_dp > PROB_TOL:
        problems.append(f"probabilities differ by up to {max_dp:.2e} (> {PROB_TOL:g})")
    tiles = sum(reference[s]["n_tiles"] for s in ids if s in reference)
    return {"ok": not problems, "problems": problems, "max_abs_dp": max_dp, "tiles": tiles,
            "per_slide_tiles": {s: reference[s]["n_tiles"] for s in ids if s in reference},
            "per_slide_probability": {s: reference[s]["probability"] for s in ids if s in reference}}


def summarise(report: dict[str, Any]) -> None:
    """Medians per mode, slides/hour, tiles/s and ratios vs the baseline."""
    n, tiles = len(report["entries"]), report["check"]["tiles"]
    figures = {}
    for mode, results in report["runs"].items():
        secs = [r["seconds"] for r in results]
        wall = _median(secs)
        slide_s = _median([sum(x.get("seconds") or 0.0 for x in r["slides"].values()) for r in results])
        procs = report["settings"]["workers"] if mode == "batch2" else 1
        figures[mode] = {"wall_s": wall, "wall_min": min(secs), "wall_max": max(secs), "slide_s": slide_s,
                         "busy": slide_s / (procs * wall),
                         "slides_per_hour": n / wall * 3600, "tiles_per_s": tiles / wall,
                         "cpu_ms_per_tile": _median([r["cpu_s"] for r in results]) / max(1, tiles) * 1e3,
                         "other_load_cores_max": max((r.get("other_load_cores") or 0.0) for r in results)}
    base = figures["baseline"]["tiles_per_s"]
    for f in figures.values():
        f["ratio"] = f["tiles_per_s"] / base
    report["figures"] = figures
    if report.get("startup"):
        report["startup_s"] = _median([r["seconds"] for r in report["startup"]])
        report["close_s"] = _median([r["close_s"] for r in report["startup"]])
        report["worker_load_s"] = _median([r["worker_load_s"] for r in report["startup"]])


MODE_LABELS = {
    "baseline": "baseline: one `Pipeline`, `run` per slide in a loop",
    "batch1": "`run_batch(workers=1)` (in-process)",
    "batch2": "`run_batch(workers={w}{p})` (LocalCluster, incl. start-up)",
}


def format_report(report: dict[str, Any]) -> str:
    m, v, s, f = report["machine"], report["versions"], report["settings"], report["figures"]
    n, check = len(report["entries"]), report["check"]
    w = s["workers"]
    threads = {"baseline": m["physical_cores"], "batch1": m["physical_cores"], "batch2": max(1, m["physical_cores"] // w)}
    lines = [
        "wsiengine batch benchmark",
        f"date    : {report['date']}",
        f"machine : {m['cpu_model']}, {m['physical_cores']} physical / {m['logical_cores']} logical cores, {m['platform']}",
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"slides  : {n} in {report['slides_dir']}" + (f" (generated {s['size']} at {s['mpp']} µm/px, tissue "
                                                      + ", ".join(f"{g['tissue_fraction']:.0%}" for g in report["generated"])
                                                      + f"; {sum(g['seconds'] for g in report['generated']):.0f} s, not timed)"
                                                      if report.get("generated") else ""),
        f"pipeline: encoder {s['encoder']}, MIL {s['mil']}, tiles {report['tiling']['tile_px']} px at "
        f"{report['tiling']['target_mpp']} µm/px; {check['tiles']} tiles in all "
        f"({', '.join(str(t) for t in check['per_slide_tiles'].values())})",
        f"rounds  : {s['rounds']} (modes in rotated order; medians); multi-worker run_batch parallel={s['parallel']!r}",
        "",
    ]
    rows = [("mode", "wall s", "slides/hour", "tiles/s", "vs baseline", "CPU ms/tile", "note")]
    for mode in ("baseline", "batch1", "batch2"):
        x = f[mode]
        note = f"{f'{w} processes x ' if mode == 'batch2' else '1 process x '}{threads[mode]} encoder threads; " \
               f"{x['wall_min']:.1f}-{x['wall_max']:.1f} s; slides {x['slide_s']:.1f} s in all ({x['busy']:.0%} busy)"
        rows.append((mode, f"{x['wall_s']:.1f}", f"{x['slides_per_hour']:.0f}", f"{x['tiles_per_s']:.0f}",
                     f"{x['ratio']:.2f}x", f"{x['cpu_ms_per_tile']:.1f}", note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    if "startup_s" in report:
        lines.append(f"cluster start-up (LocalCluster(n_workers={w}, threads_per_worker=1) + Client, workers up): "
                     f"{report['startup_s']:.2f} s; then the workers importing the engine and loading the pipeline "
                     f"{report['worker_load_s']:.2f} s; close {report['close_s']:.2f} s (medians of {len(report['startup'])}); "
                     f"all inside the {w}-worker wall time")
    b = report["runs"]["baseline"][0]
    lines.append(f"baseline Pipeline build (encoder + head load): {b['build_s']:.2f} s, inside its wall time")
    lines.append("ratios: tiles/s of the mode / tiles/s of the baseline (> 1 is faster); 'slides ... s in all' sums the "
                 "per-slide seconds, 'busy' is that over (processes x wall)")
    if check["ok"]:
        lines.append(f"check   : OK - all modes and rounds gave every slide the same tile count ({check['tiles']} tiles) "
                     f"and the same probability (max |dp| = {check['max_abs_dp']:.1e} <= {PROB_TOL:g})")
    else:
        lines.append("check   : MISMATCH - " + "; ".join(check["problems"][:10]))
    loads = [(r.get("load1_before"), r.get("load1_after")) for rs in report["runs"].values() for r in rs]
    flat = [x for pair in loads for x in pair if x is not None]
    noise = max(x["other_load_cores_max"] for x in f.values())
    if flat:
        lines.append(f"load    : 1-min load average {min(flat):.2f}-{max(flat):.2f} around the phases "
                     f"(start {report['load1_start']}, end {report['load1_end']}); other processes kept up to "
                     f"{noise:.2f} cores busy during a phase")
    used = sorted({r.get("workers") for r in report["runs"]["batch2"]} - {None})
    if used and used != [w]:
        lines.append(f"WARNING : run_batch(workers={w}) ran with {', '.join(map(str, used))} worker(s) (it caps workers "
                     "at the cores and the number of slides): the multi-worker row does not measure what it says")
    if noise >= 0.25:
        lines.append(f"WARNING : other processes kept up to {noise:.2f} cores busy; figures are pessimistic")
    lines += ["", "markdown:", "",
              "| mode | wall (s) | slides/hour | tiles/s | vs baseline |",
              "| --- | --- | --- | --- | --- |"]
    for mode in ("baseline", "batch1", "batch2"):
        x = f[mode]
        label = MODE_LABELS[mode].format(w=w, p="" if s["parallel"] == "slides" else f", parallel={s['parallel']!r}") + \
            f", {f'{w} x ' if mode == 'batch2' else ''}{threads[mode]} thread{'s' if threads[mode] > 1 else ''}"
        lines.append(f"| {label} | {x['wall_s']:.1f} | {x['slides_per_hour']:,.0f} | {x['tiles_per_s']:.0f} | "
                     f"{x['ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", metavar="DIR", help="benchmark this folder of slides instead of generated ones")
    parser.add_argument("--mpp-csv", metavar="FILE", help="with --slides: slide,mpp CSV for slides without resolution")
    parser.add_argument("--n-slides", type=int, default=6, help="generated slides (default 6)")
    parser.add_argument("--size", default="8192x8192", metavar="WxH", help="generated slide size (default 8192x8192)")
    parser.add_argument("--mpp", type=float, default=0.25, help="generated slides' level-0 µm/px (default 0.25)")
    parser.add_argument("--keep", metavar="DIR", help="write the generated slides into DIR and keep them")
    parser.add_argument("--encoder", default="default", help="encoder name or .onnx path (default: default)")
    parser.add_argument("--mil", default="default", help="MIL head: default, none, or a train-mil folder")
    parser.add_argument("--target-mpp", type=float, default=None, help="tile resolution (default: the head's)")
    parser.add_argument("--tile-px", type=int, default=None, help="tile size (default: the head's)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the parallel mode (default 2)")
    parser.add_argument("--chunk-tiles", type=int, help="tiles per chunk with --parallel chunks (run_batch default 1024)")
    parser.add_argument("--parallel", default="slides", choices=["slides", "chunks", "auto"],
                        help="run_batch's parallel mode for the multi-worker run (default slides: one slide per worker)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all modes, rotated; medians reported (default 3)")
    parser.add_argument("--json", metavar="FILE", help="also write the full results as JSON")
    parser.add_argument("--_phase", help=argparse.SUPPRESS)
    parser.add_argument("--_args", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts._phase:
        PHASES[opts._phase](json.loads(opts._args))
        return 0

    from wsiengine.batch import discover_slides

    report: dict[str, Any] = {"date": date.today().isoformat(), "machine": machine_info(), "versions": versions(),
                              "load1_start": _load1()}
    workdir = Path(tempfile.mkdtemp(prefix="wsiengine-bench-batch-"))
    try:
        if opts.slides:
            slides_dir = Path(opts.slides)
            if not slides_dir.is_dir():
                parser.error(f"--slides {slides_dir} is not a folder")
        else:
            try:
                width, height = (int(v) for v in opts.size.lower().split("x"))
            except ValueError:
                parser.error(f"--size takes WxH, e.g. 8192x8192, got {opts.size!r}")
            slides_dir = Path(opts.keep) if opts.keep else workdir / "slides"
            print(f"generating {opts.n_slides} slides of {width}x{height} into {slides_dir} ...", file=sys.stderr, flush=True)
            report["generated"] = generate(slides_dir, opts.n_slides, width, height, opts.mpp)
        entries = [(e.slide_id, str(e.path)) for e in discover_slides(slides_dir)]
        if not entries:
            parser.error(f"no slides under {slides_dir}")
        report["slides_dir"] = str(slides_dir)
        report["entries"] = entries
        report["settings"] = {"encoder": opts.encoder, "mil": opts.mil, "target_mpp": opts.target_mpp,
                              "tile_px": opts.tile_px, "workers": opts.workers, "parallel": opts.parallel, "chunk_tiles": opts.chunk_tiles,
                              "rounds": opts.rounds,
                              "size": None if opts.slides else opts.size, "mpp": None if opts.slides else opts.mpp}
        common = {"entries": entries, "slides_dir": str(slides_dir), "encoder": opts.encoder, "mil": opts.mil,
                  "target_mpp": opts.target_mpp, "tile_px": opts.tile_px, "mpp_csv": opts.mpp_csv,
                  "parallel": opts.parallel, "chunk_tiles": opts.chunk_tiles}
        modes = [("baseline", "baseline", {}), ("batch1", "batch", {"workers": 1}),
                 ("batch2", "batch", {"workers": opts.workers}), ("startup", "startup", {"workers": opts.workers})]
        runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "batch1": [], "batch2": []}
        report["startup"] = []
        paths = [p for _, p in entries]
        for r in range(max(1, opts.rounds)):
            print(f"round {r + 1}/{opts.rounds}", file=sys.stderr, flush=True)
            for key, phase, extra in modes[r % len(modes):] + modes[:r % len(modes)]:
                out = workdir / f"results-{key}-{r}"
                preread(paths)
                res = run_phase(phase, {**common, **extra, "out": str(out)}, label=key)
                shutil.rmtree(out, ignore_errors=True)
                if "error" in res:
                    print(f"{key}: {res['error']}", file=sys.stderr)
                    return 1
                (report["startup"] if key == "startup" else runs[key]).append(res)
        report["runs"] = runs
        report["tiling"] = runs["baseline"][0]["tiling"]
        report["load1_end"] = _load1()
        report["check"] = check_agreement(runs, [sid for sid, _ in entries])
        summarise(report)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if opts.json:
        Path(opts.json).write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    return 0 if report["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
