"""A 30-second tour: open a slide, find tissue, plan 224 px tiles at 0.5 µm/px, stream them.

    python examples/tile_slide.py examples/data/cmu-1-small-region.svs
"""

from __future__ import annotations

import sys
import time

import numpy as np

import wsiengine as we


def main(path: str) -> None:
    slide = we.open_slide(path)
    print(slide)
    t0 = time.perf_counter()
    mask = we.detect_tissue(slide)
    print(f"tissue: {mask.tissue_fraction:.1%} of the slide, {mask.area_mm2:.2f} mm² in "
          f"{len(mask.polygons.geoms)} pieces ({1e3 * (time.perf_counter() - t0):.0f} ms, mask {mask.raster.shape[1]}x{mask.raster.shape[0]} px)")
    grid = we.plan_tiles(slide, mask, target_mpp=0.5, tile_px=224, overlap_px=0, min_tissue=0.25)
    print(f"grid: {len(grid)} tiles of {grid.tile_px} px at {grid.target_mpp} µm/px, read from level {grid.read_level}")
    t0, seen, mean_rgb = time.perf_counter(), 0, np.zeros(3)
    for batch in we.stream_patches(slide, grid, batch_size=64):
        seen += len(batch)
        mean_rgb += batch.images.reshape(-1, 3).mean(axis=0) * len(batch)
    seconds = time.perf_counter() - t0
    print(f"streamed {seen} patches in {seconds:.2f} s ({seen / seconds:.0f} patches/s); mean RGB {np.round(mean_rgb / max(seen, 1)).astype(int).tolist()}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "examples/data/cmu-1-small-region.svs")
