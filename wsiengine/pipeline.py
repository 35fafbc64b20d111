"""One slide end to end, composed from the stages."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from .encode import Encoder
from .slide import Slide
from .store import FeatureWriter
from .tiling import TileGrid

__all__ = ["embed_slide"]

logger = logging.getLogger("wsiengine")


def embed_slide(
    slide: Slide,
    grid: TileGrid,
    encoder: Encoder,
    out: str | os.PathLike[str],
    *,
    batch_size: int = 64,
    chunk_rows: int = 512,
    progress: bool = False,
    **stream_options: Any,
) -> Path:
    """Embed every tile of ``grid`` into the Zarr store ``out`` (``features``, ``tiles/coords``),
    streaming batches to disk as they are produced; returns the committed store's path.

    Memory holds the in-flight patch batches and the feature chunks being filled, never the
    slide's features. If anything fails, no store appears under ``out``. ``progress`` shows
    a tile progress bar on stderr.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    attrs = {
        "slide": {"path": str(slide.path), "dimensions": list(slide.dimensions), "mpp": list(slide.mpp),
                  "mpp_source": slide.mpp_source, "backend": slide.backend_name},
        "encoder": encoder.describe(),
    }
    with FeatureWriter(out, grid, encoder.embed_dim, attrs=attrs, chunk_rows=chunk_rows) as writer, \
            tqdm(total=len(grid), unit="tile", desc=slide.path.name, disable=not progress, leave=False) as bar:
        for index, features in encoder.stream(slide, grid, batch_size, **stream_options):
            writer.write(index, features)
            bar.update(len(index))
        path = writer.commit(timings={"embed_s": round(time.perf_counter() - started, 3)})
    logger.info("%s: %d tiles embedded into %s in %.1f s", slide.path.name, len(grid), path, time.perf_counter() - started)
    return path
