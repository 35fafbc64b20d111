"""One slide end to end with the shipped defaults: tissue, tiles, embeddings, the default MIL
head, then a result store with heatmaps, a QuPath GeoJSON and a heatmap overlay PNG.

    python examples/run_pipeline.py examples/data/cmu-1-small-region.svs results/

Offline: the encoder (EfficientNet-Lite0) and the MIL head ship with wsiengine. The default
head is trained for H&E lymph node at ~10x; on other tissue its probability means little, but
every output is produced the same way.
"""

from __future__ import annotations

import sys

import wsiengine as we


def main(path: str, out: str) -> None:
    pipe = we.Pipeline(encoder="default", mil="default")
    res = pipe.run(path, out=out)
    head = pipe.mil
    print(f"{res.slide_id}: {head.class_names[res.label]} (p = {res.probability:.3f}, threshold {head.threshold:.3f}) "
          f"from {res.n_tiles} tiles of {pipe.tiling.tile_px} px at {pipe.tiling.target_mpp} µm/px")
    print("timings (s):", ", ".join(f"{k} {v:.2f}" for k, v in res.timings.items()))
    store = we.open_result(res.store)
    print(f"store:   {res.store} ({store.n_tiles} x {store.features.shape[1]} features; heatmaps {store.heatmap_names()})")
    print(f"GeoJSON: {res.geojson} (drag onto the slide in QuPath)")
    print(f"overlay: {res.overlay}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
