#!/usr/bin/env python
"""Benchmark tissue detection, tile planning and patch streaming against a plain OpenSlide loop.

    python benchmarks/bench_tiling.py SLIDE [--target-mpp 0.5] [--tile-px 224] [--batch-size 64] [--workers N]
    python benchmarks/bench_tiling.py --generate 32768x32768 [--keep DIR] [--pen] [--seed 0]
    python benchmarks/bench_tiling.py --cases all [--keep DIR] [--pcam ../shared/data/pcam]   # or --case pcam-96 ...
    ... [--json [FILE]]      machine-readable results ("-" or no value: stdout, instead of the table)

For wsiengine it measures ``we.detect_tissue`` (mask ms, median of ``--repeat`` calls, split into
the time in ``Slide.thumbnail`` (reading) and in the Numba kernel ``segment_tissue``, both timed
inside the real calls; the first, JIT-compiling call is reported separately as warm-up), ``we.plan_tiles`` (plan ms) and ``we.stream_patches``
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

The reading cases of issue 14 (``--case NAME``, ``--cases all``; :data:`CASES`) generate their
slides (into a temporary folder, or ``--keep DIR`` to keep and reuse them) and run each as above,
then print one summary row per case:

- ``pcam-96``: 96 px at level 0 of a 30,720 px square (0.94 gigapixel) mosaic of real PCam
  ``train`` patches at 0.972 µm/px, JPEG 256-px tiles, levels 1/4/16 (a synthetic slide when PCam
  is absent); written tile by tile (see :func:`phase_mosaic` for why not ``make_mosaic_slide``);
- ``40x-96``: 96 px at 0.972 µm/px from a 0.25 µm/px synthetic slide of real tissue texture
  (``wsiengine.testing.make_pyramidal_slide``, 32,768 px square, levels 1/4/16);
- ``40x-224``: 224 px at 0.5 µm/px from the same slide;
- ``ome-224``: as ``40x-224`` on an OME-TIFF copy of it (levels as SubIFDs, the stored tiles
  copied as they are). OpenSlide opens only its level 0, which is what this grid reads.

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


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


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

    import wsiengine.tissue as tissue_module

    rss_imports = _current_rss_mb()
    slide = we.open_slide(args["slide"], backend=args["backend"])
    # The split of detect_tissue: time spent in Slide.thumbnail (reading) and in the Numba kernel,
    # measured inside the real calls by wrapping them (whatever detect_tissue does around them).
    spent = {"thumbnail": 0.0, "kernel": 0.0}

    def timed(name, function):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                spent[name] += time.perf_counter() - start
        return wrapper

    slide.thumbnail = timed("thumbnail", slide.thumbnail)
    kernel_wrapped = hasattr(tissue_module, "segment_tissue")
    if kernel_wrapped:
        tissue_module.segment_tissue = timed("kernel", tissue_module.segment_tissue)
    start = time.perf_counter()
    we.detect_tissue(slide)  # includes Numba JIT compilation (or cache loading)
    warmup_ms = (time.perf_counter() - start) * 1e3
    times, thumb_times, kernel_times = [], [], []
    for _ in range(args["repeat"]):
        spent.update(thumbnail=0.0, kernel=0.0)
        start = time.perf_counter()
        mask = we.detect_tissue(slide)
        times.append((time.perf_counter() - start) * 1e3)
        thumb_times.append(spent["thumbnail"] * 1e3)
        kernel_times.append(spent["kernel"] * 1e3)
    mask_ms = _median(times)
    mask_times = times
    times = []
    for _ in range(args["repeat"]):
        start = time.perf_counter()
        grid = we.plan_tiles(slide, mask, target_mpp=args["target_mpp"], tile_px=args["tile_px"], min_tissue=args["min_tissue"])
        times.append((time.perf_counter() - start) * 1e3)
    plan_ms = _median(times)

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
        "mask_ms_runs": [round(t, 1) for t in mask_times],
        "thumbnail_ms": round(_median(thumb_times), 1),
        "kernel_ms": round(_median(kernel_times), 1) if kernel_wrapped else None,
        "mask_repeats": args["repeat"],
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


def phase_mosaic(args: dict[str, Any]) -> None:
    """A PCam-mosaic slide of ``size`` x ``size`` px at 0.972 µm/px, written tile by tile.

    :func:`wsiengine.testing.mosaic.make_mosaic_slide` holds level 0 in memory and never repeats a
    patch, so it cannot reach a gigapixel from PCam's 20,000 training patches in bounded memory.
    This lays real PCam ``train`` patches (``n_patches`` of them, reused) on the same 96-px
    lattice inside a few tissue ellipses on near-white glass, and encodes each 256-px JPEG tile
    (YCbCr 4:2:0, quality 90) of levels 1, 4 and 16 from the cells under it, so memory stays at the
    patch set plus a few tiles whatever the size.
    """
    from concurrent.futures import ThreadPoolExecutor

    import imagecodecs
    import numpy as np
    import tifffile
    from PIL import Image

    from wsiengine.testing.mosaic import PATCH_PX, PCAM_MPP, PatchPool

    start = time.perf_counter()
    rng = np.random.default_rng(args["seed"])
    pool = PatchPool.from_pcam(args["pcam"], "train")
    paths = list(pool.normal) + list(pool.tumour)
    chosen = rng.choice(len(paths), size=min(args["n_patches"], len(paths)), replace=False)
    patches = np.stack([np.asarray(Image.open(paths[i]).convert("RGB")) for i in chosen])
    size, cell, tile = args["size"], PATCH_PX, 256
    cells = -(-size // cell)
    # Tissue: a few ellipses (cell units); glass elsewhere (index -1).
    yy, xx = np.mgrid[0:cells, 0:cells]
    tissue = np.zeros((cells, cells), bool)
    for _ in range(3):
        cx, cy = rng.uniform(0.25, 0.75, 2) * cells
        ax, ay = rng.uniform(0.12, 0.22, 2) * cells
        tissue |= ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1
    index = np.where(tissue, rng.integers(0, len(patches), (cells, cells)), -1)
    glass = np.clip(np.array([240, 240, 238]) + rng.normal(0, 2, (8, cell, cell, 3)), 0, 255).astype(np.uint8)
    table = np.concatenate([patches, glass])  # glass variants after the patches
    index = np.where(index < 0, len(patches) + rng.integers(0, len(glass), index.shape), index)

    def level0(x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Level-0 pixels [x0, x0 + w) x [y0, y0 + h) (inside the slide)."""
        c0, c1 = x0 // cell, (x0 + w - 1) // cell + 1
        r0, r1 = y0 // cell, (y0 + h - 1) // cell + 1
        block = table[index[r0:r1, c0:c1]]  # (rows, cols, 96, 96, 3)
        block = block.transpose(0, 2, 1, 3, 4).reshape((r1 - r0) * cell, (c1 - c0) * cell, 3)
        return block[y0 - r0 * cell : y0 - r0 * cell + h, x0 - c0 * cell : x0 - c0 * cell + w]

    jpeg = dict(level=90, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2))

    def encoded(d: int, tx: int, ty: int) -> bytes:
        lw = -(-size // d)
        x0, y0 = tx * tile * d, ty * tile * d
        w, h = min(tile * d, size - x0), min(tile * d, size - y0)
        image = level0(x0, y0, w, h)
        if d > 1:
            image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).reduce(d))
        out = np.full((tile, tile, 3), 255, np.uint8)
        out[: image.shape[0], : image.shape[1]] = image
        del lw
        return imagecodecs.jpeg8_encode(out, **jpeg)

    mpp = PCAM_MPP
    with tifffile.TiffWriter(args["path"], bigtiff=True) as writer, ThreadPoolExecutor(os.cpu_count() or 1) as ex:
        for n, d in enumerate((1, 4, 16)):
            lw = -(-size // d)
            across = -(-lw // tile)

            def tiles(d=d, across=across):
                for ty in range(across):
                    yield from ex.map(lambda tx: encoded(d, tx, ty), range(across))

            writer.write(tiles(), shape=(lw, lw, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                         compression="jpeg", subfiletype=0 if n == 0 else 1,
                         resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)), resolutionunit="CENTIMETER",
                         description=f"PCam mosaic benchmark slide {size}x{size} mpp={mpp}" if n == 0 else None,
                         metadata=None, maxworkers=1)
    _emit({"seconds": round(time.perf_counter() - start, 2), "file_mb": round(Path(args["path"]).stat().st_size / 2**20, 1),
           "tissue_fraction": round(float(tissue.mean()), 4), "levels": [[-(-size // d)] * 2 for d in (1, 4, 16)],
           "patches": int(len(patches))})


def phase_ome(args: dict[str, Any]) -> None:
    """The generic pyramid ``source`` rewritten as an OME-TIFF (levels as SubIFDs of the first
    image, axes YXS), copying the stored JPEG tiles as they are (no re-encoding)."""
    import numpy as np
    import tifffile

    start = time.perf_counter()
    with tifffile.TiffFile(args["source"]) as src:
        pages = [level.keyframe for level in src.series[0].levels]
        mpp = args["mpp"]
        with open(args["source"], "rb") as handle, tifffile.TiffWriter(args["path"], bigtiff=True, ome=True) as writer:
            def raw(page):
                for offset, count in zip(page.dataoffsets, page.databytecounts):
                    handle.seek(offset)
                    yield handle.read(count)

            for n, page in enumerate(pages):
                if page.jpegtables is not None:
                    raise ValueError("source tiles use shared JPEG tables; raw copy not supported")
                d = pages[0].imagewidth / page.imagewidth
                options = dict(shape=page.shape, dtype=np.uint8, tile=(page.tilelength, page.tilewidth),
                               photometric=page.photometric, compression=page.compression,
                               resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)), resolutionunit="CENTIMETER")
                if int(page.photometric) == 6:  # YCbCr JPEG
                    options["subsampling"] = page.subsampling
                if n == 0:
                    writer.write(raw(page), subifds=len(pages) - 1,
                                 metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}, **options)
                else:
                    writer.write(raw(page), subfiletype=1, **options)
    _emit({"seconds": round(time.perf_counter() - start, 2), "file_mb": round(Path(args["path"]).stat().st_size / 2**20, 1),
           "tissue_fraction": None, "levels": [[int(p.imagewidth), int(p.imagelength)] for p in pages]})


PHASES = {
    "mosaic": phase_mosaic,
    "ome": phase_ome,
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
                + (f"tissue {gen['tissue_fraction']:.1%}, " if gen.get("tissue_fraction") is not None else "")
                + f"levels {gen['levels']}"
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
    split = f"thumbnail read {e['thumbnail_ms']:.1f} ms + kernel {e['kernel_ms']:.1f} ms; " if e.get("kernel_ms") is not None else ""
    rows.append(("mask (detect_tissue)", f"{e['mask_ms']:.1f} ms", f"{e['peak_rss_mb']:.0f}",
                 f"{split}median of {e.get('mask_repeats', '?')}; warm-up (JIT) {e['mask_warmup_ms']:.0f} ms"))
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


#: The reading cases of issue 14 (``--case NAME`` or ``--cases all``): a slide each is generated
#: into the work folder (``--keep DIR`` keeps it for reuse), then benchmarked as a SLIDE is.
CASES: dict[str, dict[str, Any]] = {
    "pcam-96": {
        "about": "96 px at level 0 of a 0.97 µm/px PCam mosaic (30,720 px square, 0.94 gigapixel)",
        "slide": "pcam-mosaic-30720.tiff", "make": "mosaic", "size": 30720, "mpp": 0.972,
        "target_mpp": 0.972, "tile_px": 96,
    },
    "40x-96": {
        "about": "96 px at 0.972 µm/px from a 0.25 µm/px slide (32,768 px square, 1.07 gigapixel)",
        "slide": "synthetic-40x-32768.tiff", "make": "synthetic", "size": 32768, "mpp": 0.25,
        "target_mpp": 0.972, "tile_px": 96,
    },
    "40x-224": {
        "about": "224 px at 0.5 µm/px from a 0.25 µm/px slide (the same slide)",
        "slide": "synthetic-40x-32768.tiff", "make": "synthetic", "size": 32768, "mpp": 0.25,
        "target_mpp": 0.5, "tile_px": 224,
    },
    "ome-224": {
        "about": "224 px at 0.5 µm/px from the 0.25 µm/px slide rewritten as OME-TIFF (levels as SubIFDs; "
                 "OpenSlide reads its level 0 only, which is what this grid reads)",
        "slide": "synthetic-40x-32768.ome.tiff", "make": "ome", "source": "40x-224", "size": 32768, "mpp": 0.25,
        "target_mpp": 0.5, "tile_px": 224,
    },
}


def make_case_slide(name: str, out_dir: Path, opts, quiet: bool) -> tuple[Path, dict[str, Any] | None]:
    """The case's slide in ``out_dir``, generated unless already there; and the generate phase's result."""
    case = CASES[name]
    path = out_dir / case["slide"]
    if path.is_file():
        return path, None
    if case["make"] == "ome":
        source, made = make_case_slide(case["source"], out_dir, opts, quiet)
        if made is not None and "error" in made:
            return path, made
        result = run_phase("ome", {"path": str(path), "source": str(source), "mpp": case["mpp"]}, quiet=quiet)
    elif case["make"] == "mosaic":
        pcam = Path(opts.pcam)
        if (pcam / "train" / "0").is_dir():
            result = run_phase("mosaic", {"path": str(path), "size": case["size"], "seed": opts.seed, "pcam": str(pcam),
                                          "n_patches": 4000}, quiet=quiet)
        else:  # no PCam: a synthetic slide of the same size and resolution
            print(f"  PCam not found at {pcam}: a synthetic slide instead", file=sys.stderr)
            result = run_phase("generate", {"path": str(path), "width": case["size"], "height": case["size"],
                                            "mpp": case["mpp"], "pen": False, "seed": opts.seed}, quiet=quiet)
    else:
        result = run_phase("generate", {"path": str(path), "width": case["size"], "height": case["size"],
                                        "mpp": case["mpp"], "pen": False, "seed": opts.seed}, quiet=quiet)
    return path, result


def benchmark_slide(slide_path: Path, settings: dict[str, Any], workdir: Path, opts, quiet: bool) -> dict[str, Any]:
    """Engine (mask, plan), kernel, and alternated stream / baseline rounds on one slide."""
    report: dict[str, Any] = {"slide": str(slide_path), "settings": settings}
    if not opts.no_preread:
        report["preread_s"] = round(preread(slide_path), 2)
    common = {
        "slide": str(slide_path), "backend": settings["backend"], "target_mpp": settings["target_mpp"],
        "tile_px": settings["tile_px"], "batch_size": settings["batch_size"], "workers": settings["workers"],
        "min_tissue": settings["min_tissue"], "repeat": opts.repeat,
        "grid_pickle": str(workdir / "grid.pkl"), "grid_npz": str(workdir / "grid.npz"),
    }
    report["engine"] = run_phase("engine", common, quiet=quiet)
    if "error" not in report["engine"] and report["engine"]["tiles"] == 0:
        report["engine"]["error"] = "the grid has no tiles (no tissue found?): nothing to stream"
    if "error" in report["engine"]:
        return report
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
    return report


def format_cases(reports: dict[str, dict[str, Any]]) -> str:
    """One row per case: patches/s of wsiengine and the OpenSlide loop, ratio, peak RSS, detect_tissue split."""
    rows = [("case", "patches", "wsiengine p/s", "openslide p/s", "ratio", "peak RSS MB (we / os)",
             "detect_tissue ms", "thumbnail ms", "kernel ms")]
    for name, r in reports.items():
        e, st, bl = r.get("engine", {}), r.get("stream", {}), r.get("baseline", {})
        if "error" in e or "error" in st:
            rows.append((name, "ERROR", (e.get("error") or st.get("error") or "")[:60], "", "", "", "", "", ""))
            continue
        ratio = r.get("ratio", {}).get("throughput")
        rows.append((
            name, str(st["patches"]), f"{st['patches_per_s']:.0f}",
            f"{bl['patches_per_s']:.0f}" if "patches_per_s" in bl else "n/a",
            f"{ratio:.2f}x" if ratio else "n/a",
            f"{st['peak_rss_mb']:.0f} / {bl['peak_rss_mb']:.0f}" if "peak_rss_mb" in bl else f"{st['peak_rss_mb']:.0f} / n/a",
            f"{e['mask_ms']:.0f}", f"{e.get('thumbnail_ms', float('nan')):.0f}",
            f"{e['kernel_ms']:.0f}" if e.get("kernel_ms") is not None else "n/a",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("(patches/s: medians of alternated rounds, each in a fresh interpreter; detect_tissue, thumbnail and "
                 "kernel: medians of --repeat warm calls, thumbnail and kernel timed inside detect_tissue)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("slide", nargs="?", help="slide to benchmark")
    parser.add_argument("--generate", metavar="WxH", help="benchmark a synthetic slide of this size (e.g. 32768x32768) instead")
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="generate and benchmark a reading case (repeatable)")
    parser.add_argument("--cases", choices=["all"], help="all the reading cases: " + ", ".join(CASES))
    parser.add_argument("--pcam", default=str(Path(os.environ.get("WSIENGINE_SHARED", REPO.parent / "shared")) / "data" / "pcam"),
                        help="PCam folder for the pcam-96 case (default ../shared/data/pcam)")
    parser.add_argument("--keep", metavar="DIR", help="with --generate / --case: write the slides into DIR and keep (and reuse) them")
    parser.add_argument("--mpp", type=float, default=0.25, help="with --generate: level-0 µm/px (default 0.25)")
    parser.add_argument("--seed", type=int, default=0, help="with --generate: seed (default 0)")
    parser.add_argument("--pen", action="store_true", help="with --generate: add pen strokes")
    parser.add_argument("--target-mpp", type=float, default=0.5)
    parser.add_argument("--tile-px", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="stream_patches reader threads (default: one per core)")
    parser.add_argument("--min-tissue", type=float, default=0.25)
    parser.add_argument("--backend", default="auto", choices=["auto", "tifffile", "openslide", "tiffslide"], help="wsiengine backend")
    parser.add_argument("--repeat", type=int, default=3, help="timed repeats of mask and plan (medians are reported)")
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
    cases = list(CASES) if opts.cases else list(dict.fromkeys(opts.case or []))
    if sum(map(bool, (opts.slide, opts.generate, cases))) != 1:
        parser.error("give a SLIDE, --generate WxH or --case NAME / --cases all (one of them)")
    quiet = opts.json == "-"

    report: dict[str, Any] = {"machine": machine_info(), "versions": versions()}
    workdir = Path(tempfile.mkdtemp(prefix="wsiengine-bench-"))
    out_dir = Path(opts.keep) if opts.keep else workdir
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"target_mpp": opts.target_mpp, "tile_px": opts.tile_px, "batch_size": opts.batch_size,
                "workers": opts.workers, "min_tissue": opts.min_tissue, "backend": opts.backend}
    try:
        if cases:
            report["cases"] = {}
            for name in cases:
                case = CASES[name]
                if not quiet:
                    print(f"case {name}: {case['about']}", file=sys.stderr, flush=True)
                path, made = make_case_slide(name, out_dir, opts, quiet)
                if made is not None and "error" in made:
                    report["cases"][name] = {"slide": str(path), "settings": {}, "generate": made, "engine": {"error": "no slide"}}
                    continue
                case_settings = {**settings, "target_mpp": case["target_mpp"], "tile_px": case["tile_px"]}
                result = benchmark_slide(path, case_settings, workdir, opts, quiet)
                if made is not None:
                    result["generate"] = made
                result["about"] = case["about"]
                report["cases"][name] = result
        else:
            if opts.generate:
                try:
                    width, height = (int(v) for v in opts.generate.lower().split("x"))
                except ValueError:
                    parser.error(f"--generate takes WxH, e.g. 32768x32768, got {opts.generate!r}")
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
            report.update(benchmark_slide(slide_path, settings, workdir, opts, quiet))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    if opts.json:
        text = json.dumps(report, indent=2)
        if opts.json == "-":
            print(text)
        else:
            Path(opts.json).write_text(text + "\n")
    if opts.json != "-":
        if cases:
            for name, result in report["cases"].items():
                print(f"\n== case {name}: {result.get('about', '')}")
                print(format_table({**report, **result}))
            print("\n== reading cases")
            print(format_cases(report["cases"]))
        else:
            print(format_table(report))
    if cases:
        return 0 if all("error" not in r.get(k, {}) for r in report["cases"].values() for k in ("engine", "stream")) else 1
    return 0 if all("error" not in report.get(k, {}) for k in ("engine", "stream")) else 1


if __name__ == "__main__":
    sys.exit(main())
