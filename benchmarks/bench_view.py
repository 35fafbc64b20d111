#!/usr/bin/env python
"""Benchmark ``wsiengine view``: deep-zoom tile latency over HTTP and the first screen of a slide page.

    python benchmarks/bench_view.py --work /tmp/bench-view                  # builds slides and results, then measures
    python benchmarks/bench_view.py --work /tmp/bench-view --size 16384x12288 --tiles 400 --repeats 9
    python benchmarks/bench_view.py --work /tmp/bench-view --results RESULTS [--slides DIR] [--slide ID ...]
    python benchmarks/bench_view.py --work /tmp/bench-view-small --small     # plumbing check (tests), not figures

Budget (the viewer's issue): a deep-zoom tile (254 px + 1 px overlap, JPEG) is served in under
20 ms median from a warm reader; the first screen of a slide page is complete in under 2 s.

**Inputs.** By default ``--work`` gets ``slides/`` with the CC0 sample slide (CMU-1-Small-Region,
one level, 2220 x 2967 px; ``python examples/get_sample_slide.py`` fetches it) and a generated
pyramidal TIFF of its real tissue (``wsiengine.testing.make_pyramidal_slide``, ``--size``, default
32768 x 24576 px at 0.25 µm/px, levels 1/4/16, JPEG 256-px tiles), and ``results/`` from the default
pipeline (``wsiengine run``) on both. ``--results`` measures an existing results folder instead.
A rerun reuses the slides and resumes the run.

**Tiles.** A :class:`wsiengine.view.ViewServer` in this process (loopback, port 0). For each slide and
deep-zoom level (full resolution ``L``, ``L-1`` and ``L-3``) a seeded sample of up to ``--tiles``
distinct tiles whose centre lies in the tissue outline of the run's GeoJSON (all tiles when it has
none) is requested with ``http.client`` on one keep-alive connection, timed from sending the request
to the last byte of the JPEG. Each measurement starts from a fresh server, so its reader is cold:
the first request (one tile at full resolution, not in the sample) is the **cold first tile** (opens
the slide; the process's own first use, imports and all, is paid beforehand on a throw-away server
and reported apart); the sample is then served from that warm reader. Then the same sample again from another
fresh server over 6 connections at once (a browser's per-host limit): tiles/s and latency under load.

Baselines in the same run, each on its own freshly opened reader (warmed by the same first tile)
and the same tiles: the viewer's own tile code without HTTP (``DeepZoom.tile``: ``Slide.read_region``
plus an area resize where the level needs one, then ``encode_jpeg``), so the ratio shows what
HTTP and the server add; and OpenSlide's ``openslide.deepzoom.DeepZoomGenerator.get_tile`` (254 px,
overlap 1) plus a PIL JPEG encode at the same quality, as a reference reader. The slide files are
read through once first, so every measurement starts from the same (warm) page cache.

**First screen.** Headless Chromium (Playwright; ``--chromium``, default ``chromium`` on the PATH,
else Playwright's own) opens ``/slide/ID`` in a fresh browser context (empty cache) at ``--viewport``
(1920x1080). Times are the page's own clock (``performance.now()``, from navigation start): when
``body[data-ready=true]`` is set (slide.js: every tile of the first view drawn) and when the heatmap
overlay is added (``window.wsiview.heatmap``); the first screen is complete at the later of the two.
``--repeats`` runs with a fresh server each time (cold reader, nothing rendered yet; "cold server") and
as many on one server already warm (a second visit). The index page (``/``) is timed to its
``data-ready`` the same way. Without Playwright or Chromium this part is printed as skipped.

Beside them, what a QuPath user does today with the same results, described, not measured.
Figures go to ``--work/bench_view.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import io
import json
import os
import platform
import queue
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # _harness, also when loaded by importlib
from _harness import cpu_model, package_versions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "wsiengine" / "__init__.py").is_file() and str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))  # benchmark the checkout this script belongs to

TILE_BUDGET_MS = 20.0
SCREEN_BUDGET_MS = 2000.0
PARALLEL_CONNECTIONS = 6
QUPATH_STEPS = (
    "Start QuPath (a desktop Java application) and create or open a project.",
    "Open the slide file (File > Open, or add it to the project and confirm the image type).",
    "Drag `ID.geojson` onto the viewer to import the tissue outline and tumour deposits as annotations "
    "(measurements come along in the annotation properties).",
    "The heatmap is not a QuPath overlay: open `ID.heatmap.png` separately in an image viewer "
    "and compare it with the slide by eye.",
    "Read the report (`ID.report.md`) and evidence tiles (`ID.report/`) in a text editor and a file browser.",
    "Repeat for the next slide; there is no list of all slides with their calls to start from.",
)

# Records, in the page's own clock, when body[data-ready] is set and when wsiview.heatmap is first
# set to a tiled image (an accessor on the state object slide.js publishes; nothing else changes).
INIT_SCRIPT = """
(() => {
  const marks = {};
  window.__benchView = marks;
  new MutationObserver(() => {
    if (marks.ready === undefined && document.body && document.body.dataset.ready === "true") marks.ready = performance.now();
  }).observe(document, { subtree: true, attributes: true, attributeFilter: ["data-ready"] });
  let state;
  Object.defineProperty(window, "wsiview", { configurable: true, enumerable: true,
    get() { return state; },
    set(value) {
      state = value;
      if (value && typeof value === "object") {
        let heatmap = value.heatmap;
        Object.defineProperty(value, "heatmap", { configurable: true, enumerable: true,
          get() { return heatmap; },
          set(item) { heatmap = item; if (item && marks.heatmap === undefined) marks.heatmap = performance.now(); } });
      }
    } });
})();
"""


# -- small helpers -----------------------------------------------------------------------------------
@contextlib.contextmanager
def serving(results: Path, slides_dir: Path | None):
    """A ViewServer on a free loopback port, closed after a short pause: ViewServer.close closes the
    sockets while waitress's loop thread runs, and a request thread still finishing then writes to the
    closed trigger (a traceback, not a wrong figure); the pause lets in-flight requests end first."""
    from wsiengine.view import ViewServer

    server = ViewServer(results, slides_dir=slides_dir, port=0).start()
    try:
        yield server
    finally:
        time.sleep(0.2)
        server.close()


def _stats(values_ms: list[float]) -> dict[str, Any]:
    a = np.asarray(values_ms, dtype=float)
    if not len(a):
        return {"n": 0}
    return {"n": int(len(a)), "median_ms": round(float(np.median(a)), 2), "p90_ms": round(float(np.percentile(a, 90)), 2),
            "max_ms": round(float(a.max()), 2), "mean_ms": round(float(a.mean()), 2)}


def _median(values: list[float]) -> float | None:
    return round(float(np.median(values)), 1) if values else None


def _fmt(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _read_through(path: Path) -> None:
    """Read a file once so every measurement starts from the same (warm) page cache."""
    with open(path, "rb") as handle:
        while handle.read(1 << 24):
            pass


def _load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# -- inputs ---------------------------------------------------------------------------------------------
def build_results(work: Path, size: tuple[int, int], seed: int, sample: Path | None) -> tuple[Path, dict[str, Any]]:
    """``work/slides`` (the sample slide and a generated pyramidal one) and ``work/results`` from the
    default pipeline on them; reused when present."""
    from wsiengine.batch import run_batch
    from wsiengine.testing import make_pyramidal_slide
    from wsiengine.testing.synthetic import SAMPLE_SLIDE, find_data_file

    slides = work / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    sample = sample or find_data_file(SAMPLE_SLIDE)
    if sample is None or not Path(sample).is_file():
        raise SystemExit("the sample slide is missing: run `python examples/get_sample_slide.py` "
                         "(puts it in examples/data/), or pass --sample PATH")
    info: dict[str, Any] = {"sample": str(sample)}
    target = slides / Path(sample).name
    if not target.is_file():
        shutil.copyfile(sample, target)
    width, height = size
    generated = slides / f"synthetic-{width}x{height}-s{seed}.tiff"
    if not generated.is_file():
        partial = generated.with_suffix(".partial.tiff")
        start = time.perf_counter()
        make_pyramidal_slide(partial, width=width, height=height, mpp=0.25, levels=(1, 4, 16), tile=256, seed=seed)
        partial.replace(generated)
        info["generate_s"] = round(time.perf_counter() - start, 1)
    for stale in slides.glob("synthetic-*.tiff"):  # another --size of an earlier run: not this one's
        if stale != generated:
            stale.unlink()
    start = time.perf_counter()
    summary = run_batch(slides, work / "results")
    info["run_s"] = round(time.perf_counter() - start, 1)
    info["run"] = {row.slide_id: {"status": row.status, "tiles": row.n_tiles, "error": row.error} for row in summary.rows}
    failed = [row.slide_id for row in summary.rows if row.status == "failed"]
    if failed:
        raise SystemExit(f"wsiengine run failed on {', '.join(failed)}; see {work / 'results' / 'wsiengine.log'}")
    return work / "results", info


def tissue_geometry(geojson: Path | None):
    """The tissue outline of a run's GeoJSON (shapely), or None."""
    if geojson is None or not geojson.is_file():
        return None
    from shapely.geometry import Polygon
    from shapely.ops import unary_union

    from wsiengine.view.data import regions

    polygons = []
    for item in regions(json.loads(geojson.read_text()))["tissue"]:
        rings = item["rings"]
        if rings and len(rings[0]) >= 3:
            polygons.append(Polygon(rings[0], [r for r in rings[1:] if len(r) >= 3]).buffer(0))
    geometry = unary_union(polygons) if polygons else None
    return None if geometry is None or geometry.is_empty else geometry


def plan_tiles(deepzoom, geometry, levels: list[int], n: int,
               seed: int) -> tuple[dict[int, list[tuple[int, int]]], tuple[int, int, int]]:
    """Per level, up to ``n`` distinct tiles (col, row) over tissue, seeded; and one warm-up tile at
    full resolution outside every sample."""
    import shapely

    from wsiengine.view.tiles import TILE_PX

    rng = np.random.default_rng(seed)
    plan: dict[int, list[tuple[int, int]]] = {}
    warm: tuple[int, int, int] | None = None
    for level in levels:
        cols, rows = deepzoom.tile_count(level)
        cc, rr = np.meshgrid(np.arange(cols), np.arange(rows))
        cc, rr = cc.ravel(), rr.ravel()
        if geometry is not None:
            scale = 2 ** (deepzoom.max_level - level)
            x = (cc + 0.5) * TILE_PX * scale
            y = (rr + 0.5) * TILE_PX * scale
            inside = shapely.contains_xy(geometry, x, y)
            if inside.sum() >= min(n, 8) or inside.sum() >= 0.5 * len(cc):
                cc, rr = cc[inside], rr[inside]
        order = rng.permutation(len(cc))
        if level == deepzoom.max_level and len(order) > 1:
            warm = (level, int(cc[order[0]]), int(rr[order[0]]))
            order = order[1:]
        plan[level] = [(int(cc[k]), int(rr[k])) for k in order[:n]]
    if warm is None:
        warm = (deepzoom.max_level, 0, 0)
    return plan, warm


# -- tile measurements ------------------------------------------------------------------------------
def _get(conn: http.client.HTTPConnection, path: str) -> tuple[int, bytes]:
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    return response.status, body


def http_tiles(results: Path, slides_dir: Path | None, slide_id: str, plan, warm) -> dict[str, Any]:
    """Cold first tile, then the sample over one keep-alive connection (fresh server)."""
    out: dict[str, Any] = {"levels": {}}
    with serving(results, slides_dir) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        level, col, row = warm
        start = time.perf_counter()
        status, body = _get(conn, f"/dzi/{slide_id}_files/{level}/{col}_{row}.jpeg")
        out["cold_first_tile_ms"] = round((time.perf_counter() - start) * 1e3, 1)
        if status != 200:
            raise RuntimeError(f"first tile of {slide_id}: HTTP {status}: {body[:200]!r}")
        start = time.perf_counter()
        status, body = _get(conn, f"/dzi/{slide_id}.dzi")
        out["dzi_ms"] = round((time.perf_counter() - start) * 1e3, 2)
        for level, tiles in plan.items():
            times, sizes = [], []
            for col, row in tiles:
                start = time.perf_counter()
                status, body = _get(conn, f"/dzi/{slide_id}_files/{level}/{col}_{row}.jpeg")
                times.append((time.perf_counter() - start) * 1e3)
                if status != 200 or body[:2] != b"\xff\xd8":
                    raise RuntimeError(f"tile {level}/{col}_{row} of {slide_id}: HTTP {status}")
                sizes.append(len(body))
            out["levels"][level] = {**_stats(times), "mean_kb": round(float(np.mean(sizes)) / 1024, 1) if sizes else None}
        conn.close()
    return out


def parallel_tiles(results: Path, slides_dir: Path | None, slide_id: str, plan, warm,
                   connections: int = PARALLEL_CONNECTIONS) -> dict[str, Any]:
    """The whole sample (every level) over ``connections`` keep-alive connections at once (fresh server)."""
    jobs: queue.Queue = queue.Queue()
    for level, tiles in plan.items():
        for col, row in tiles:
            jobs.put(f"/dzi/{slide_id}_files/{level}/{col}_{row}.jpeg")
    total = jobs.qsize()
    times: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    with serving(results, slides_dir) as server:
        level, col, row = warm
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        _get(conn, f"/dzi/{slide_id}_files/{level}/{col}_{row}.jpeg")
        conn.close()

        def worker() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            mine = []
            while True:
                try:
                    path = jobs.get_nowait()
                except queue.Empty:
                    break
                start = time.perf_counter()
                status, _ = _get(conn, path)
                mine.append((time.perf_counter() - start) * 1e3)
                if status != 200:
                    errors.append(f"{path}: HTTP {status}")
            conn.close()
            with lock:
                times.extend(mine)

        threads = [threading.Thread(target=worker) for _ in range(connections)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
    if errors:
        raise RuntimeError("parallel tiles failed: " + "; ".join(errors[:3]))
    return {"connections": connections, "tiles": total, "wall_s": round(wall, 3),
            "tiles_per_s": round(total / wall, 1) if wall > 0 else None, **_stats(times)}


def inprocess_tiles(slide_path: Path, plan, warm) -> dict[str, Any]:
    """The viewer's tile code without HTTP, on a freshly opened reader."""
    from wsiengine.slide import open_slide
    from wsiengine.view.tiles import DeepZoom, encode_jpeg

    slide = open_slide(slide_path, require_mpp=False)
    try:
        deepzoom = DeepZoom.of(slide)
        encode_jpeg(deepzoom.tile(slide, *warm))
        out: dict[str, Any] = {"backend": slide.backend_name, "levels": {}}
        for level, tiles in plan.items():
            times, read_ms = [], []
            for col, row in tiles:
                start = time.perf_counter()
                pixels = deepzoom.tile(slide, level, col, row)
                mid = time.perf_counter()
                encode_jpeg(pixels)
                times.append((time.perf_counter() - start) * 1e3)
                read_ms.append((mid - start) * 1e3)
            out["levels"][level] = {**_stats(times), "read_median_ms": round(float(np.median(read_ms)), 2) if read_ms else None,
                                    "read_plan": _describe_plan(deepzoom, level)}
    finally:
        slide.close()
    return out


def _describe_plan(deepzoom, level: int) -> str:
    """Which pyramid level a deep-zoom level reads and how much it shrinks it."""
    best, _, size, out = deepzoom.read_plan(level, 0, 0)
    scale = 2 ** (deepzoom.max_level - level)
    shrink = scale / deepzoom.level_downsamples[best]
    return f"pyramid level {best}" + ("" if abs(shrink - 1) < 1e-3 else f", shrunk {shrink:g}x")


def openslide_tiles(slide_path: Path, plan, warm, quality: int) -> dict[str, Any]:
    """OpenSlide's DeepZoomGenerator.get_tile plus a PIL JPEG encode, on a freshly opened slide."""
    try:
        import openslide
        from openslide.deepzoom import DeepZoomGenerator
    except ImportError as exc:
        return {"skipped": f"openslide-python not importable: {exc}"}
    try:
        slide = openslide.OpenSlide(str(slide_path))
    except Exception as exc:  # noqa: BLE001 - a file OpenSlide does not read
        return {"skipped": f"OpenSlide cannot open {slide_path.name}: {exc}"}
    try:
        generator = DeepZoomGenerator(slide, tile_size=254, overlap=1, limit_bounds=False)

        def one(level: int, col: int, row: int) -> None:
            buffer = io.BytesIO()
            generator.get_tile(level, (col, row)).save(buffer, "JPEG", quality=quality)

        one(*warm)
        out: dict[str, Any] = {"levels": {}}
        for level, tiles in plan.items():
            times = []
            for col, row in tiles:
                start = time.perf_counter()
                one(level, col, row)
                times.append((time.perf_counter() - start) * 1e3)
            out["levels"][level] = _stats(times)
    finally:
        slide.close()
    return out


# -- first screen ---------------------------------------------------------------------------------------
def _chromium_launcher(executable: str | None):
    """(playwright context manager, launch kwargs) or raises with the reason."""
    from playwright.sync_api import sync_playwright

    kwargs: dict[str, Any] = {"args": ["--no-sandbox", "--disable-gpu"]}
    if executable:
        kwargs["executable_path"] = executable
    return sync_playwright, kwargs


def _open_page(browser, url: str, viewport: tuple[int, int], want_heatmap: bool, timeout_ms: float) -> dict[str, Any]:
    context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
    try:
        context.add_init_script(INIT_SCRIPT)
        page = context.new_page()
        page_errors: list[str] = []
        page.on("pageerror", lambda exc: page_errors.append(str(exc)))
        page.goto(url, wait_until="commit", timeout=timeout_ms)
        page.wait_for_selector("body[data-ready=true]", state="attached", timeout=timeout_ms)
        # fallbacks should the marks not be set (slide.js published its state differently): the page's
        # clock when the wait returned, a little late
        seen_ready, seen_heatmap = page.evaluate("performance.now()"), None
        heatmap_missing = False
        if want_heatmap:
            from playwright.sync_api import TimeoutError as PlaywrightTimeout

            try:
                page.wait_for_function("window.wsiview && window.wsiview.heatmap", timeout=timeout_ms)
                seen_heatmap = page.evaluate("performance.now()")
            except PlaywrightTimeout:
                heatmap_missing = True  # reported, not a crash: the slide itself may still be shown
        marks = page.evaluate("""() => {
            const m = window.__benchView || {};
            const res = performance.getEntriesByType("resource");
            const tiles = res.filter((r) => r.name.includes("_files/"));
            const nav = performance.getEntriesByType("navigation")[0];
            return { ready: m.ready ?? null, heatmap: m.heatmap ?? null, tiles: tiles.length,
                     tile_kb: tiles.reduce((s, r) => s + (r.encodedBodySize || 0), 0) / 1024,
                     requests: res.length, dom_content_loaded: nav ? nav.domContentLoadedEventEnd : null };
        }""")
        if page_errors:
            raise RuntimeError(f"{url}: page error: {page_errors[0]}")
        ready = marks["ready"] if marks["ready"] is not None else seen_ready
        heatmap = marks["heatmap"] if marks["heatmap"] is not None else seen_heatmap
        complete = max(ready, heatmap) if heatmap is not None else ready
        loaded = marks["dom_content_loaded"]
        return {"ready_ms": round(ready, 1), "heatmap_ms": None if heatmap is None else round(heatmap, 1),
                "complete_ms": round(complete, 1), "tiles": marks["tiles"], "tile_kb": round(marks["tile_kb"], 1),
                "heatmap_missing": heatmap_missing, "requests": marks["requests"],
                "dom_content_loaded_ms": None if loaded is None else round(loaded, 1)}
    finally:
        context.close()


def first_screen(results: Path, slides_dir: Path | None, slide_ids: list[str], heatmap_ids: set[str], repeats: int,
                 viewport: tuple[int, int], chromium: str | None, timeout_s: float) -> dict[str, Any]:
    """Slide pages and the index page in headless Chromium; {"skipped": reason} without a browser."""
    try:
        sync_playwright, kwargs = _chromium_launcher(chromium)
    except ImportError as exc:
        return {"skipped": f"Playwright is not installed ({exc}); pip install playwright"}
    timeout_ms = timeout_s * 1e3
    out: dict[str, Any] = {"viewport": list(viewport), "repeats": repeats, "slides": {}}
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(**kwargs)
        except Exception as exc:  # noqa: BLE001 - no browser here: report, do not crash
            return {"skipped": f"Chromium did not start ({str(exc).splitlines()[0][:200]})"}
        try:
            out["browser"] = f"Chromium {browser.version}"
            for slide_id in slide_ids:
                cold, warm = [], []
                for _ in range(repeats):  # a fresh server each time: cold reader, nothing rendered yet
                    with serving(results, slides_dir) as server:
                        cold.append(_open_page(browser, f"{server.url}slide/{slide_id}", viewport, slide_id in heatmap_ids,
                                               timeout_ms))
                with serving(results, slides_dir) as server:
                    _open_page(browser, f"{server.url}slide/{slide_id}", viewport, slide_id in heatmap_ids, timeout_ms)
                    for _ in range(repeats):  # the same server again: a second visit (browser cache still empty)
                        warm.append(_open_page(browser, f"{server.url}slide/{slide_id}", viewport,
                                               slide_id in heatmap_ids, timeout_ms))
                out["slides"][slide_id] = {
                    "cold_server": _summarise_pages(cold), "warm_server": _summarise_pages(warm),
                    "runs_cold": cold, "runs_warm": warm,
                }
            index = []
            for _ in range(repeats):
                with serving(results, slides_dir) as server:
                    index.append(_open_page(browser, server.url, viewport, False, timeout_ms))
            out["index"] = {"ready_median_ms": _median([r["ready_ms"] for r in index]), "runs": index}
        finally:
            browser.close()
    return out


def _summarise_pages(runs: list[dict[str, Any]]) -> dict[str, Any]:
    heat = [r["heatmap_ms"] for r in runs if r["heatmap_ms"] is not None]
    return {"ready_median_ms": _median([r["ready_ms"] for r in runs]),
            "heatmap_median_ms": _median(heat),
            "complete_median_ms": _median([r["complete_ms"] for r in runs]),
            "complete_max_ms": round(max(r["complete_ms"] for r in runs), 1) if runs else None,
            "heatmap_missing": sum(bool(r.get("heatmap_missing")) for r in runs),
            "tiles": runs[0]["tiles"] if runs else None, "tile_kb": runs[0]["tile_kb"] if runs else None}


# -- main -------------------------------------------------------------------------------------------------
def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    if w < 512 or h < 512:
        raise argparse.ArgumentTypeError("the slide must be at least 512 x 512 px")
    return w, h


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for slides, results and bench_view.json (reused)")
    parser.add_argument("--results", type=Path, help="measure this existing results folder instead of building one")
    parser.add_argument("--slides", type=Path, help="where the slide files are, when not where the stores say")
    parser.add_argument("--slide", action="append", help="only this slide id (repeatable; default: every slide with its file)")
    parser.add_argument("--sample", type=Path, help="the sample slide (default: ../shared/data or examples/data)")
    parser.add_argument("--size", type=_size, default=(32768, 24576), help="generated slide, WxH px at 0.25 µm/px "
                        "(default 32768x24576)")
    parser.add_argument("--tiles", type=int, default=200, help="tiles per level and slide (default 200)")
    parser.add_argument("--repeats", type=int, default=5, help="page loads per slide and series (default 5)")
    parser.add_argument("--viewport", type=_size, default=(1920, 1080), help="browser window, WxH (default 1920x1080)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"),
                        help="Chromium executable (default: chromium on PATH, e.g. Debian's; else Playwright's own)")
    parser.add_argument("--no-browser", action="store_true", help="skip the first-screen measurement")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a page may take (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="a small slide, few tiles, one page load: a plumbing check")
    args = parser.parse_args(argv)
    if args.small:
        args.size, args.tiles, args.repeats = (4096, 3072), min(args.tiles, 12), 1

    from wsiengine.view.tiles import JPEG_QUALITY

    args.work.mkdir(parents=True, exist_ok=True)
    build: dict[str, Any] | None = None
    if args.results is None:
        results, build = build_results(args.work, args.size, args.seed, args.sample)
    else:
        results = args.results
    load_before = _load1()

    with serving(results, args.slides) as server:
        catalog = server.catalog
        ids = args.slide or [i for i, e in catalog.slides.items() if e.slide_path is not None and e.store is not None]
        missing = [i for i in ids if i not in catalog.slides or catalog.slides[i].slide_path is None]
        if missing:
            raise SystemExit(f"no slide file for {', '.join(missing)} in {results} (--slides DIR)")
        if not ids:
            raise SystemExit(f"no slide in {results} has both its store and its slide file (--slides DIR)")
        entries = {i: catalog.slides[i] for i in ids}
        heatmap_ids = set()
        for i, entry in entries.items():
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            status, body = _get(conn, f"/api/slides/{i}")
            conn.close()
            if status == 200 and json.loads(body).get("heatmaps"):
                heatmap_ids.add(i)

    from wsiengine.slide import open_slide
    from wsiengine.view.tiles import DeepZoom

    tiles: dict[str, Any] = {}
    plans: dict[str, Any] = {}
    for slide_id, entry in entries.items():
        path = entry.slide_path
        _read_through(path)
        slide = open_slide(path, require_mpp=False)
        try:
            deepzoom = DeepZoom.of(slide)
            info = {"file": path.name, "backend": slide.backend_name, "dimensions": list(slide.dimensions),
                    "pyramid_downsamples": [round(d, 2) for d in slide.level_downsamples],
                    "file_mb": round(path.stat().st_size / 2**20, 1), "max_level": deepzoom.max_level}
        finally:
            slide.close()
        top = deepzoom.max_level
        levels = [lv for lv in (top, top - 1, top - 3) if lv >= 0]
        plan, warm = plan_tiles(deepzoom, tissue_geometry(entry.geojson), levels, args.tiles, args.seed)
        info["tiles_per_level"] = {lv: len(t) for lv, t in plan.items()}
        tiles[slide_id], plans[slide_id] = info, (plan, warm)
    # The process's own first use (imports, the first JPEG encode) is not a slide's: one tile of each
    # slide from a throw-away server first, so each "cold first tile" below is opening the slide and
    # serving one tile in a viewer that has already served something, as when a user opens a slide.
    with serving(results, args.slides) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        for slide_id, (plan, (level, col, row)) in plans.items():
            start = time.perf_counter()
            _get(conn, f"/dzi/{slide_id}_files/{level}/{col}_{row}.jpeg")
            tiles[slide_id]["process_warmup_ms"] = round((time.perf_counter() - start) * 1e3, 1)
        conn.close()
    for slide_id, entry in entries.items():
        info, (plan, warm), path = tiles[slide_id], plans[slide_id], entry.slide_path
        info["http"] = http_tiles(results, args.slides, slide_id, plan, warm)
        info["inprocess"] = inprocess_tiles(path, plan, warm)
        info["openslide"] = openslide_tiles(path, plan, warm, JPEG_QUALITY)
        info["parallel"] = parallel_tiles(results, args.slides, slide_id, plan, warm)

    if args.no_browser:
        screen: dict[str, Any] = {"skipped": "--no-browser"}
    else:
        screen = first_screen(results, args.slides, ids, heatmap_ids, args.repeats, args.viewport, args.chromium,
                              args.timeout)

    report = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu_model": cpu_model(), "logical_cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "load1_before": load_before, "load1_after": _load1()},
        "versions": package_versions(("wsiengine", "waitress", "tifffile", "tiffslide", "openslide-python",
                                      "openslide-bin", "pillow", "playwright")),
        "settings": {"results": str(results), "tiles_per_level": args.tiles, "repeats": args.repeats,
                     "viewport": list(args.viewport), "seed": args.seed, "small": args.small,
                     "jpeg_quality": JPEG_QUALITY, "parallel_connections": PARALLEL_CONNECTIONS},
        "budget": {"tile_median_ms": TILE_BUDGET_MS, "first_screen_ms": SCREEN_BUDGET_MS},
        "build": build,
        "tiles": tiles,
        "first_screen": screen,
        "qupath_today": list(QUPATH_STEPS),
    }
    (args.work / "bench_view.json").write_text(json.dumps(report, indent=1, default=str))
    print_report(report)
    print(f"\nwrote {args.work / 'bench_view.json'}")
    return 0


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"# wsiengine view: tile latency and first screen ({report['date']})")
    print(f"machine: {m['cpu_model']}, {m['logical_cores']} logical cores, {m['platform']}, Python {m['python']}; "
          f"load average {m['load1_before']} before, {m['load1_after']} after")
    v = report["versions"]
    print("versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    if report["build"]:
        b = report["build"]
        print(f"results: {report['settings']['results']} (default pipeline on the sample slide and a generated one"
              + (f"; generated in {b['generate_s']} s" if "generate_s" in b else "") + f"; run {b['run_s']} s)")
    else:
        print(f"results: {report['settings']['results']}")

    print(f"\n## Deep-zoom tiles (254 px + 1 px overlap, JPEG q{report['settings']['jpeg_quality']}); budget: "
          f"median < {TILE_BUDGET_MS:g} ms from a warm reader")
    first = next(iter(report["tiles"].values()), None)
    if first is not None:
        print(f"\nthe process's first tile (imports, first JPEG encode; a throw-away server, not counted below): "
              f"{first['process_warmup_ms']} ms")
    for slide_id, info in report["tiles"].items():
        dims = "x".join(str(d) for d in info["dimensions"])
        print(f"\n**{slide_id}** ({dims} px, {info['file_mb']} MB, pyramid downsamples "
              f"{', '.join(f'{d:g}' for d in info['pyramid_downsamples'])}, read with {info['backend']}); "
              f"cold first tile {info['http']['cold_first_tile_ms']} ms (opens the slide)\n")
        print("| deep-zoom level (reads) | tiles | HTTP median / p90 / max ms | JPEG KB | in-process median ms "
              "(read) | HTTP / in-process | OpenSlide DeepZoomGenerator median ms | budget |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for level, h in info["http"]["levels"].items():
            level = int(level)
            ip = info["inprocess"]["levels"].get(level) or info["inprocess"]["levels"].get(str(level), {})
            osl = info["openslide"].get("levels", {})
            os_level = osl.get(level) or osl.get(str(level)) or {}
            if not h.get("n"):
                continue
            ratio = h["median_ms"] / ip["median_ms"] if ip.get("median_ms") else None
            budget = "met" if h["median_ms"] < TILE_BUDGET_MS else "**over**"
            print(f"| {level} of {info['max_level']} ({ip.get('read_plan', '-')}) | {h['n']} | {h['median_ms']:.1f} / "
                  f"{h['p90_ms']:.1f} / {h['max_ms']:.1f} | {h['mean_kb']} | {ip.get('median_ms', float('nan')):.1f} "
                  f"({ip.get('read_median_ms', float('nan')):.1f}) | {_fmt(ratio, 2)} | "
                  f"{_fmt(os_level.get('median_ms'))} | {budget} |")
        if "skipped" in info["openslide"]:
            print(f"\nOpenSlide reference skipped: {info['openslide']['skipped']}")
        par = info["parallel"]
        seq_ms = sum(h["mean_ms"] * h["n"] for h in info["http"]["levels"].values() if h.get("n"))
        seq_rate = par["tiles"] / (seq_ms / 1e3) if seq_ms else None
        print(f"\n{par['connections']} connections at once (all {par['tiles']} tiles, fresh server): "
              f"{par['tiles_per_s']} tiles/s (one connection: {_fmt(seq_rate)} tiles/s), latency median "
              f"{par['median_ms']} ms, p90 {par['p90_ms']} ms, max {par['max_ms']} ms")

    s = report["first_screen"]
    print(f"\n## First screen of a slide page; budget: complete < {SCREEN_BUDGET_MS / 1e3:g} s")
    if "skipped" in s:
        print(f"\nskipped: {s['skipped']}")
    else:
        print(f"\n{s['browser']} (headless, Playwright), {s['viewport'][0]}x{s['viewport'][1]} window, a fresh browser "
              f"context (empty cache) per load; median of {s['repeats']}; ms from navigation start (the page's clock)\n")
        print("| slide | server | tiles drawn (KB) | slide tiles ready | heatmap added | complete (median / max) | budget |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for slide_id, series in s["slides"].items():
            for name, label in (("cold_server", "fresh (slide not open)"), ("warm_server", "warm (second visit)")):
                r = series[name]
                budget = "met" if r["complete_median_ms"] < SCREEN_BUDGET_MS else "**over**"
                print(f"| {slide_id} | {label} | {r['tiles']} ({r['tile_kb']}) | {_fmt(r['ready_median_ms'], 0)} | "
                      f"{_fmt(r['heatmap_median_ms'], 0)} | {_fmt(r['complete_median_ms'], 0)} / "
                      f"{_fmt(r['complete_max_ms'], 0)} | {budget} |")
        missing = [f"{i} ({n})" for i, series in s["slides"].items() for n in ("cold_server", "warm_server")
                   if series[n]["heatmap_missing"]]
        if missing:
            print(f"\nthe heatmap overlay never appeared (within --timeout) in: {', '.join(missing)}")
        print(f"\nindex page (`/`, fresh server): ready in {_fmt(s['index']['ready_median_ms'], 0)} ms (median)")

    print("\n## What a QuPath user does today with the same results (described, not measured)\n")
    for k, step in enumerate(report["qupath_today"], 1):
        print(f"{k}. {step}")
    print("\nEach step is manual and per slide; the viewer above shows the slide, heatmap, regions and report "
          "together from one command (`wsiengine view RESULTS`).")


if __name__ == "__main__":
    sys.exit(main())
