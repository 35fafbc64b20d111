"""A generated gigapixel slide streams with bounded memory (a loose check; figures come from
``benchmarks/bench_tiling.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from wsiengine.testing import make_pyramidal_slide

from .conftest import require_tissue_source

STREAM_AND_MEASURE = textwrap.dedent(
    """
    import json, sys, threading, time
    import psutil
    import wsiengine as we

    process = psutil.Process()
    slide = we.open_slide(sys.argv[1])
    mask = we.detect_tissue(slide)
    grid = we.plan_tiles(slide, mask, target_mpp=0.5, tile_px=224)
    before = process.memory_info().rss
    peak, done = before, False

    def sample():
        global peak
        while not done:
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    n = 0
    for batch in we.stream_patches(slide, grid, batch_size=64, num_workers=2, max_in_flight=2):
        n += len(batch)
    done = True
    sampler.join()
    print(json.dumps({"pixels": slide.dimensions[0] * slide.dimensions[1], "tiles": len(grid), "streamed": n,
                      "rss_before": before, "rss_peak": peak}))
    """
)


@pytest.mark.slow
def test_gigapixel_slide_streams_with_bounded_memory(tmp_path):  # real tissue textures
    require_tissue_source()
    synthetic = make_pyramidal_slide(tmp_path / "giga.tiff", width=32768, height=32768, mpp=0.25, levels=(1, 4, 16), seed=7)
    result = subprocess.run([sys.executable, "-c", STREAM_AND_MEASURE, str(synthetic.path)],
                            capture_output=True, text=True, check=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["pixels"] >= 1_000_000_000
    assert figures["streamed"] == figures["tiles"] > 500
    # Bound from the stream's design: (workers + in_flight + 1) batches of 64 x 224² x 3 bytes
    # (about 48 MB), plus decoded-tile caches and read buffers; the slide itself is ~3 GB of RGB.
    growth_mb = (figures["rss_peak"] - figures["rss_before"]) / 2**20
    assert growth_mb < 400, figures
    assert figures["rss_peak"] / 2**20 < 1500, figures
    print(f"gigapixel stream: {figures}")
