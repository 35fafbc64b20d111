"""benchmarks/bench_view.py end to end on a small run: slides and results built, tiles served and timed
over HTTP beside the in-process and OpenSlide baselines, and the first screen in headless Chromium
(reported as skipped without it). Speed is never asserted here; the figures only have to exist."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


from ._scripts import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_view.py"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def test_a_small_run_times_tiles_and_the_first_screen(tmp_path, cmu_small, capsys):
    bench = load_script(SCRIPT)
    assert bench.main(["--work", str(tmp_path), "--small", "--sample", str(cmu_small)]) == 0
    figures = json.loads((tmp_path / "bench_view.json").read_text())

    assert set(figures["tiles"]) == {"cmu-1-small-region", "synthetic-4096x3072-s0"}
    for slide_id, info in figures["tiles"].items():
        assert _positive(info["http"]["cold_first_tile_ms"]) and _positive(info["process_warmup_ms"])
        levels = info["http"]["levels"]
        assert len(levels) == 3, slide_id
        for level, stats in levels.items():
            assert stats["n"] >= 1 and stats["n"] == info["tiles_per_level"][level]
            assert all(_positive(stats[k]) for k in ("median_ms", "p90_ms", "max_ms", "mean_kb"))
            assert stats["median_ms"] <= stats["p90_ms"] <= stats["max_ms"]
            assert _positive(info["inprocess"]["levels"][level]["median_ms"])
            if "skipped" not in info["openslide"]:
                assert _positive(info["openslide"]["levels"][level]["median_ms"])
        parallel = info["parallel"]
        assert parallel["tiles"] == sum(info["tiles_per_level"].values()) and _positive(parallel["tiles_per_s"])
    # the generated slide is a real pyramid: its mid level reads a coarser pyramid level, not level 0
    synthetic = figures["tiles"]["synthetic-4096x3072-s0"]
    assert synthetic["pyramid_downsamples"] == [1, 4, 16]
    assert "pyramid level 1" in synthetic["inprocess"]["levels"][str(synthetic["max_level"] - 3)]["read_plan"]

    screen = figures["first_screen"]
    if CHROMIUM is None:
        assert "skipped" in screen
    else:
        assert "skipped" not in screen, screen.get("skipped")
        for slide_id in figures["tiles"]:
            for series in ("cold_server", "warm_server"):
                result = screen["slides"][slide_id][series]
                assert _positive(result["ready_median_ms"]) and _positive(result["complete_median_ms"])
                assert _positive(result["heatmap_median_ms"]) and result["tiles"] >= 1
        assert _positive(screen["index"]["ready_median_ms"])

    out = capsys.readouterr().out
    assert "## Deep-zoom tiles" in out and "## First screen" in out and "QuPath" in out


def test_the_browser_part_is_skipped_cleanly_without_chromium(tmp_path):
    bench = load_script(SCRIPT)
    results = tmp_path / "results"
    screen = bench.first_screen(results, None, [], set(), 1, (800, 600), str(tmp_path / "no-such-chromium"), 5)
    assert "Chromium did not start" in screen["skipped"] or "Playwright is not installed" in screen["skipped"]
