#!/usr/bin/env python
"""Benchmark tissue detection, tile planning and patch streaming against a plain OpenSlide loop.

    python benchmarks/bench_tiling.py SLIDE [--target-mpp 0.5] [--tile-px 224] [--batch-size 64] [--workers N]
    python benchmarks/bench_tiling.py --generate 32768x32768 [--keep DIR] [--pen] [--seed 0]
    ... [--json [FILE]]      machine-readable results ("-" or no value: stdout, instead of the table)

For wsiengine it measures ``we.detect_tissue`` (mask ms; the first, JIT-compiling call is
reported separately as warm-up), ``we.plan_tiles`` (plan ms) and ``we.stream_patches``
(patches/s over all batches, and the time to the first batch), after a one-patch warm-up call
that is reported apart (the first call in a process imports dask's scheduler). The **baseline**, in the same run,
is a single-threaded loop of ``openslide.OpenSlide.read_region`` over the same grid: same
level-0 coordinates, read level and read size, converted to an RGB numpy array and, when the
grid resamples, resized to ``tile_px`` with PIL's box filter. The ratio is wsiengine / baseline.

Each measured phase runs in a fresh interpreter (this script re-invoked with a hidden
``--_phase`` flag), so its peak RSS (VmHWM) is its own: imports included, nothing left
over from another phase. The grid planned in the mask phase is handed to the stream and
baseline phases through a temporary file. The slide file is read through once beforehand so
every phase starts with the same (warm) page cache.

The Numba tissue kernel alone (``wsiengine.kernels.segment_tissue``) is also timed on a
2048 x 2048 thumbnail of the slide, when it can be imported (goal: <= 100 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import busy_cpu_s, cpu_model, package_versions

RESULT_MARK = "@@BENCH_RESULT@@ "
REPO = Path(__file__).resolve().parents[1]
if (REPO / "wsiengine" / "__init__.py").is_file() and str(REPO) not in sys.path:
    # Benchmark the checkout this script belongs to (wsiengine.kernels still comes from the install's mapping).
    sys.path.insert(1, str(REPO))


# -- helpers shared by the phases ---------------------------------------------------------------
def _peak_rss_mb() -> float:
    """Peak resident set size of this process, MB.

    On Linux, VmHWM from /proc (the high-water mark of this process's own memory; ru_maxrss
    would carry over the parent's peak across fork + exec). Elsewhere ru_maxrss.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _emit(result: dict[str, Any]) -> None:
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    print(RESULT_MARK + json.dumps(result), flush=True)


def _load_synthetic():
    """wsiengine.testing.synthetic; loaded from its file when the package cannot be imported
    (e.g. while the Numba kernels are missing): it needs none of the engine."""
    try:
        from wsiengine.testing import synthetic

        return synthetic
    except ImportError:
        import importlib.util

        path = REPO / "wsiengine" / "testing" / "synthetic.py"
        spec = importlib.util.spec_from_file_location("_wsiengine_synthetic", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module


# -- phases (each in its own interpreter) -----------------------------------------------------------
def phase_generate(args: dict[str, Any]) -> None:
    synthetic = _load_synthetic()
    start = time.perf_counter()
    slide = synthetic.make_pyramidal_slide(
        args["path"], width=args["width"], height=args["height"], mpp=args["mpp"], pen=args["pen"], seed=args["seed"],
    )
    seconds = time.perf_counter() - start
    _emit({
        "seconds": round(seconds, 2),
        "file_mb": round(Path(args["path"]).stat().st_size / 2**20, 1),
        "tissue_fraction": round(slide.tissue_fraction, 4),
        "levels": list(slide.level_dimensions),
    })


def phase_engine(args: dict[str, Any]) -> None:
    """Mask and plan (and the kernel alone); saves the grid for the later phases."""
    import pickle

    import numpy as np

    import wsiengine as we

    rss_imports = _current_rss_mb()
    slide = we.open_slide(args["slide"], backend=args["backend"])
    start = time.perf_counter()
    we.detect_tissue(slide)  # includes Numba JIT compilation (or cache loading)
    warmup_ms = (time.perf_counter() - start) * 1e3
    times = []
    for _ in range(args["repeat"]):
        start = time.perf_counter()
        mask = we.detect_tissue(slide)
        times.append((time.perf_counter() - start) * 1e3)
    mask_ms = min(times)
    times = []
    for _ in range(args["repeat"]):
        start = time.perf_counter()
        grid = we.plan_tiles(slide, mask, target_mpp=args["target_mpp"], tile_px=args["tile_px"], min_tissue=args["min_tissue"])
        times.append((time.perf_counter() - start) * 1e3)
    plan_ms = min(times)

    with open(args["grid_pickle"], "wb") as handle:
        pickle.dump(grid, handle)
    np.savez(
        args["grid_npz"], coords=grid.coords, read_level=grid.read_level, read_size=np.array(grid.read_size),
        tile_px=grid.tile_px, resamples=grid.resamples,
    )
    _emit({
        "backend": slide.backend_name,
        "dimensions": list(slide.dimensions),
        "level_count": slide.level_count,
        "level_downsamples": [round(d, 3) for d in slide.level_downsamples],
        "mpp": list(slide.mpp),
        "mpp_source": slide.mpp_source,
        "mask_warmup_ms": round(warmup_ms, 1),
        "mask_ms": round(mask_ms, 1),
        "mask_shape": list(mask.raster.shape),
        "mask_mpp": list(mask.mask_mpp),
        "tissue_fraction": round(mask.tissue_fraction, 4),
        "plan_ms": round(plan_ms, 2),
        "tiles": len(grid),
        "grid_shape": list(grid.grid_shape),
        "read_level": grid.read_level,
        "read_size": list(grid.read_size),
        "resamples": bool(grid.resamples),
        "rss_after_imports_mb": round(rss_imports, 1),
    })


def phase_kernel(args: dict[str, Any]) -> None:
    """The tissue kernel alone on a 2048 x 2048 thumbnail."""
    import math

    import numpy as np
    from PIL import Image

    try:
        import wsiengine as we
        from wsiengine.kernels import TissueSegmentParams, segment_tissue
    except ImportError as exc:
        _emit({"skipped": f"wsiengine.kernels not importable: {exc}"})
        return
    side = 2048
    slide = we.open_slide(args["slide"], backend=args["backend"])
    w, h = slide.dimensions
    mpp = max(w * slide.mpp[0], h * slide.mpp[1]) / side
    thumb, (tmx, tmy) = slide.thumbnail(max(mpp, min(slide.mpp)))
    thumb = np.ascontiguousarray(np.asarray(Image.fromarray(thumb).resize((side, side), Image.Resampling.BOX)))
    px_um = mpp  # µm per thumbnail pixel
    config = we.TissueConfig()
    try:  # the parameters detect_tissue derives from the config, at this thumbnail's resolution
        params = TissueSegmentParams(
            closing_radius_px=int(round(config.closing_um / px_um)),
            opening_radius_px=int(round(config.opening_um / px_um)),
            max_hole_px=int(config.max_hole_um2 / px_um**2),
            min_object_px=int(math.ceil(config.min_object_um2 / px_um**2)),
            reject_pen=config.reject_pen,
        )
    except TypeError:
        params = TissueSegmentParams()
    start = time.perf_counter()
    segment_tissue(thumb, params)
    warmup_ms = (time.perf_counter() - start) * 1e3
    times = []
    for _ in range(max(3, args["repeat"])):
        start = time.perf_counter()
        segment_tissue(thumb, params)
        times.append((time.perf_counter() - start) * 1e3)
    _emit({"thumbnail_px": [side, side], "thumbnail_mpp": round(mpp, 3), "warmup_ms": round(warmup_ms, 1),
           "ms": round(min(times), 2), "median_ms": round(sorted(times)[len(times) // 2], 2)})


def phase_stream(args: dict[str, Any]) -> None:
    import pickle

    import wsiengine as we

    with open(args["grid_pickle"], "rb") as handle:
        grid = pickle.load(handle)
    slide = we.open_slide(args["slide"], backend=args["backend"])
    rss_imports = _current_rss_mb()
    # Warm-up: the first call in a process imports dask's scheduler modules and starts threads;
    # timed apart on one patch (the grid's last), as the JIT warm-up of the mask is.
    start = time.perf_counter()
    for _ in we.stream_patches(slide, grid.subset([len(grid) - 1]), batch_size=args["batch_size"],
                               num_workers=args["workers"] or None):
        pass
    warmup_ms = (time.perf_counter() - start) * 1e3
    patches = checksum = 0
    first = None
    cpu = _cpu_s()
    start = time.perf_counter()
    for batch in we.stream_patches(slide, grid, batch_size=args["batch_size"], num_workers=args["workers"] or None):
        if first is None:
            first = time.perf_counter() - start
        patches += len(batch)
        checksum += int(batch.images[:, 0, 0, 0].sum())  # touch the pixels
    seconds = time.perf_counter() - start
    cpu = _cpu_s() - cpu
    assert patches == len(grid), f"streamed {patches} of {len(grid)} patches"
    _emit({
        "patches": patches,
        "seconds": round(seconds, 3),
        "cpu_ms_per_patch": round(cpu / max(1, patches) * 1e3, 2),
        "cpu_utilisation": round(cpu / seconds, 2) if seconds > 0 else None,
        "patches_per_s": round(patches / seconds, 1) if seconds > 0 else None,
        "first_batch_ms": round((first or 0) * 1e3, 1),
        "warmup_ms": round(warmup_ms, 1),
        "workers": args["workers"] or (os.cpu_count() or 1),
        "rss_after_imports_mb": round(rss_imports, 1),
    })


def phase_baseline(args: dict[str, Any]) -> None:
    import numpy as np
    import openslide
    from PIL import Image

    grid = np.load(args["grid_npz"])
    coords = grid["coords"]
    level = int(grid["read_level"])
    read_size = tuple(int(v) for v in grid["read_size"])
    tile = int(grid["tile_px"])
    resamples = bool(grid["resamples"])
    slide = openslide.OpenSlide(args["slide"])
    rss_imports = _current_rss_mb()
    checksum = 0
    x, y = coords[-1]  # warm-up read, as in the stream phase
    np.asarray(slide.read_region((int(x), int(y)), level, read_size).convert("RGB"))
    cpu = _cpu_s()
    start = time.perf_counter()
    for x, y in coords:
        image = slide.read_region((int(x), int(y)), level, read_size).convert("RGB")
        if resamples:
            image = image.resize((tile, tile), Image.Resampling.BOX)
        array = np.asarray(image)
        checksum += int(array[0, 0, 0])
    seconds = time.perf_counter() - start
    cpu = _cpu_s() - cpu
    _emit({
        "patches": int(len(coords)),
        "seconds": round(seconds, 3),
        "cpu_ms_per_patch": round(cpu / max(1, len(coords)) * 1e3, 2),
        "cpu_utilisation": round(cpu / seconds, 2) if seconds > 0 else None,
        "patches_per_s": round(len(coords) / seconds, 1) if seconds > 0 else None,
        "rss_after_imports_mb": round(rss_imports, 1),
    })


PHASES = {
    "generate": phase_generate,
    "engine": phase_engine,
    "kernel": phase_kernel,
    "stream": phase_stream,
    "baseline": phase_baseline,
}


# -- the parent ------------------------------------------------------------------------------------
def run_phase(name: str, args: dict[str, Any], *, quiet: bool) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--_phase", name, "--_args", json.dumps(args)]
    if not quiet:
        print(f"  running phase {name} ...", file=sys.stderr, flush=True)
    busy0, own0, wall0 = busy_cpu_s(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=None if not quiet else subprocess.PIPE, text=True)
    busy1, own1, wall = busy_cpu_s(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - wall0
    # Cores kept busy by *other* processes while the phase ran: a noisy-neighbour indicator.
    other = None
    if busy0 is not None and busy1 is not None and wall > 0:
        own = (own1.ru_utime - own0.ru_utime) + (own1.ru_stime - own0.ru_stime)
        other = round(max(0.0, (busy1 - busy0) - own) / wall, 2)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
            result["other_load_cores"] = other
            return result
    tail = (proc.stderr or "")[-2000:] if quiet else ""
    return {"error": f"phase {name} exited with {proc.returncode} and no result. {tail}".strip()}


def machine_info() -> dict[str, Any]:
    model = cpu_model()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        import psutil

        memory_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        memory_gb = None
    return {"cpu_model": model, "cores": os.cpu_count(), "usable_cores": usable, "memory_gb": memory_gb,
            "platform": platform.platform(), "python": platform.python_version()}


def versions() -> dict[str, str]:
    out = package_versions(("wsiengine", "numpy", "openslide-python", "openslide-bin", "tiffslide", "tifffile",
                            "imagecodecs", "pillow", "dask", "numba"))
    try:
        import openslide

        out["libopenslide"] = openslide.__library_version__
    except Exception:  # noqa: BLE001
        pass
    return out


def preread(path: Path) -> float:
    """Read the file once so every phase finds it in the page cache; seconds taken."""
    start = time.perf_counter()
    with open(path, "rb") as handle:
        while handle.read(1 << 24):
            pass
    return time.perf_counter() - start


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median patches/s over rounds (with best and worst), largest peak RSS; the first error if any."""
    for run in runs:
        if "error" in run:
            return run
    rates = sorted(r["patches_per_s"] for r in runs)
    median = rates[len(rates) // 2] if len(rates) % 2 else (rates[len(rates) // 2 - 1] + rates[len(rates) // 2]) / 2
    middle = min(runs, key=lambda r: abs(r["patches_per_s"] - median))
    return {
        **middle,
        "patches_per_s": round(median, 1),
        "patches_per_s_min": rates[0],
        "patches_per_s_max": rates[-1],
        "rounds": len(runs),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "cpu_ms_per_patch": sorted(r["cpu_ms_per_patch"] for r in runs)[len(runs) // 2],
        "other_load_cores_max": max((r.get("other_load_cores") or 0.0) for r in runs),
        "runs": runs,
    }


def format_table(report: dict[str, Any]) -> str:
    m, v, s = report["machine"], report["versions"], report["settings"]
    lines = [
        "wsiengine tiling benchmark",
        f"machine : {m['cpu_model']}, {m['usable_cores']} usable of {m['cores']} cores, {m['memory_gb']} GB, {m['platform']}",
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"slide   : {report['slide']}",
        f"settings: target_mpp={s.get('target_mpp')} tile_px={s.get('tile_px')} batch_size={s.get('batch_size')} "
        f"workers={s.get('workers') or 'auto'} min_tissue={s.get('min_tissue')} backend={s.get('backend')}",
    ]
    gen = report.get("generate")
    if gen:
        if "error" in gen:
            lines.append(f"generate: ERROR {gen['error']}")
        else:
            lines.append(
                f"generate: {gen['seconds']:.1f} s, peak RSS {gen['peak_rss_mb']:.0f} MB, {gen['file_mb']:.0f} MB file, "
                f"tissue {gen['tissue_fraction']:.1%}, levels {gen['levels']}"
            )
    e = report["engine"]
    if "error" in e:
        lines.append(f"engine  : ERROR {e['error']}")
        return "\n".join(lines)
    lines.append(
        f"          {e['dimensions'][0]}x{e['dimensions'][1]} px, {e['level_count']} levels {e['level_downsamples']}, "
        f"{e['mpp'][0]:.4g} µm/px ({e['mpp_source']}), backend {e['backend']}"
    )
    lines.append(
        f"grid    : {e['tiles']} tiles of {e['grid_shape'][0]}x{e['grid_shape'][1]}, read level {e['read_level']}, "
        f"read {e['read_size'][0]}x{e['read_size'][1]} px, resamples={e['resamples']}; tissue {e['tissue_fraction']:.1%} "
        f"on a {e['mask_shape'][1]}x{e['mask_shape'][0]} mask"
    )
    lines.append("")
    rows = [("phase", "figure", "peak RSS MB", "note")]
    rows.append(("mask (detect_tissue)", f"{e['mask_ms']:.1f} ms", f"{e['peak_rss_mb']:.0f}", f"warm-up (JIT) {e['mask_warmup_ms']:.0f} ms"))
    rows.append(("plan (plan_tiles)", f"{e['plan_ms']:.2f} ms", "(same)", ""))
    k = report.get("kernel") or {}
    if "ms" in k:
        rows.append(("kernel segment_tissue 2048²", f"{k['ms']:.1f} ms", f"{k['peak_rss_mb']:.0f}",
                     f"goal <= 100 ms; warm-up {k['warmup_ms']:.0f} ms"))
    elif k:
        rows.append(("kernel segment_tissue 2048²", "n/a", "", k.get("skipped") or k.get("error", "")))
    st, bl = report["stream"], report["baseline"]
    if "error" in st:
        rows.append(("stream_patches", "ERROR", "", st["error"][:80]))
    else:
        rows.append(("stream_patches", f"{st['patches_per_s']:.0f} patches/s", f"{st['peak_rss_mb']:.0f}",
                     f"{st['patches']} patches, {st['workers']} workers; median of {st['rounds']} "
                     f"({st['patches_per_s_min']:.0f}-{st['patches_per_s_max']:.0f}); {st['cpu_ms_per_patch']:.2f} CPU ms/patch; "
                     f"first batch {st['first_batch_ms']:.0f} ms; warm-up call {st['warmup_ms']:.0f} ms; "
                     f"{st['rss_after_imports_mb']:.0f} MB after imports"))
    if "error" in bl:
        rows.append(("baseline openslide loop", "ERROR", "", bl["error"][:80]))
    else:
        rows.append(("baseline openslide loop", f"{bl['patches_per_s']:.0f} patches/s", f"{bl['peak_rss_mb']:.0f}",
                     f"{bl['patches']} patches, 1 thread; median of {bl['rounds']} "
                     f"({bl['patches_per_s_min']:.0f}-{bl['patches_per_s_max']:.0f}); {bl['cpu_ms_per_patch']:.2f} CPU ms/patch; "
                     f"{bl['rss_after_imports_mb']:.0f} MB after imports"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for n, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    noise = max([(report.get(k) or {}).get("other_load_cores_max") or 0.0 for k in ("stream", "baseline")]
                + [(report.get(k) or {}).get("other_load_cores") or 0.0 for k in ("generate", "engine", "kernel")])
    if noise >= 0.25:
        lines.append("")
        lines.append(f"WARNING: other processes kept up to {noise:.2f} cores busy during the measurements; "
                     "throughput figures are pessimistic (see other_load_cores in --json)")
    ratio = report.get("ratio")
    if ratio:
        lines.append("")
        lines.append(f"ratio wsiengine / baseline: {ratio['throughput']:.2f}x patches/s, {ratio['peak_rss']:.2f}x peak RSS, "
                     f"{ratio['cpu_per_patch']:.2f}x CPU time per patch")
        lines.append("(patches/s are medians over alternated rounds; on a shared machine CPU ms/patch is the steadier figure)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("slide", nargs="?", help="slide to benchmark")
    parser.add_argument("--generate", metavar="WxH", help="benchmark a synthetic slide of this size (e.g. 32768x32768) instead")
    parser.add_argument("--keep", metavar="DIR", help="with --generate: write the slide into DIR and keep it")
    parser.add_argument("--mpp", type=float, default=0.25, help="with --generate: level-0 µm/px (default 0.25)")
    parser.add_argument("--seed", type=int, default=0, help="with --generate: seed (default 0)")
    parser.add_argument("--pen", action="store_true", help="with --generate: add pen strokes")
    parser.add_argument("--target-mpp", type=float, default=0.5)
    parser.add_argument("--tile-px", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="stream_patches reader threads (default: one per core)")
    parser.add_argument("--min-tissue", type=float, default=0.25)
    parser.add_argument("--backend", default="auto", choices=["auto", "tifffile", "openslide", "tiffslide"], help="wsiengine backend")
    parser.add_argument("--repeat", type=int, default=3, help="timed repeats of mask and plan (best is reported)")
    parser.add_argument("--rounds", type=int, default=3, help="stream and baseline runs, alternated; medians are reported (default 3)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--no-preread", action="store_true", help="do not warm the page cache with the slide file first")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE", help="write results as JSON (to FILE, or stdout instead of the table)")
    parser.add_argument("--_phase", help=argparse.SUPPRESS)
    parser.add_argument("--_args", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)

    if opts._phase:
        PHASES[opts._phase](json.loads(opts._args))
        return 0
    if bool(opts.slide) == bool(opts.generate):
        parser.error("give a SLIDE or --generate WxH (one of them)")
    quiet = opts.json == "-"

    report: dict[str, Any] = {"machine": machine_info(), "versions": versions()}
    workdir = Path(tempfile.mkdtemp(prefix="wsiengine-bench-"))
    try:
        if opts.generate:
            try:
                width, height = (int(v) for v in opts.generate.lower().split("x"))
            except ValueError:
                parser.error(f"--generate takes WxH, e.g. 32768x32768, got {opts.generate!r}")
            out_dir = Path(opts.keep) if opts.keep else workdir
            out_dir.mkdir(parents=True, exist_ok=True)
            slide_path = out_dir / f"synthetic-{width}x{height}-seed{opts.seed}.tiff"
            report["generate"] = run_phase("generate", {
                "path": str(slide_path), "width": width, "height": height, "mpp": opts.mpp, "pen": opts.pen, "seed": opts.seed,
            }, quiet=quiet)
            if "error" in report["generate"]:
                print(format_table({**report, "slide": str(slide_path), "settings": {}, "engine": {"error": "no slide"}}), file=sys.stderr)
                return 1
        else:
            slide_path = Path(opts.slide)
            if not slide_path.is_file():
                parser.error(f"slide {slide_path} does not exist")
        report["slide"] = str(slide_path)
        report["settings"] = {
            "target_mpp": opts.target_mpp, "tile_px": opts.tile_px, "batch_size": opts.batch_size, "workers": opts.workers,
            "min_tissue": opts.min_tissue, "backend": opts.backend,
        }
        if not opts.no_preread:
            report["preread_s"] = round(preread(slide_path), 2)
        common = {
            "slide": str(slide_path), "backend": opts.backend, "target_mpp": opts.target_mpp, "tile_px": opts.tile_px,
            "batch_size": opts.batch_size, "workers": opts.workers, "min_tissue": opts.min_tissue, "repeat": opts.repeat,
            "grid_pickle": str(workdir / "grid.pkl"), "grid_npz": str(workdir / "grid.npz"),
        }
        report["engine"] = run_phase("engine", common, quiet=quiet)
        if "error" not in report["engine"] and report["engine"]["tiles"] == 0:
            report["engine"]["error"] = "the grid has no tiles (no tissue found?): nothing to stream"
        if "error" not in report["engine"]:
            report["kernel"] = run_phase("kernel", common, quiet=quiet)
            # Alternate engine and baseline rounds so drifting machine load hits both alike.
            stream_runs, baseline_runs = [], []
            for _ in range(max(1, opts.rounds)):
                stream_runs.append(run_phase("stream", common, quiet=quiet))
                if not opts.skip_baseline:
                    baseline_runs.append(run_phase("baseline", common, quiet=quiet))
            report["stream"] = _aggregate(stream_runs)
            report["baseline"] = _aggregate(baseline_runs) if baseline_runs else {"error": "skipped"}
            st, bl = report["stream"], report["baseline"]
            if "error" not in st and "error" not in bl and bl.get("patches_per_s"):
                report["ratio"] = {
                    "throughput": round(st["patches_per_s"] / bl["patches_per_s"], 3),
                    "peak_rss": round(st["peak_rss_mb"] / bl["peak_rss_mb"], 3),
                    "cpu_per_patch": round(st["cpu_ms_per_patch"] / bl["cpu_ms_per_patch"], 3),
                }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    if opts.json:
        text = json.dumps(report, indent=2)
        if opts.json == "-":
            print(text)
        else:
            Path(opts.json).write_text(text + "\n")
    if opts.json != "-":
        print(format_table(report))
    return 0 if all("error" not in report.get(k, {}) for k in ("engine", "stream")) else 1


if __name__ == "__main__":
    sys.exit(main())
