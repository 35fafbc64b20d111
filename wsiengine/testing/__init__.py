"""Helpers shipped with wsiengine for tests and benchmarks, in the spirit of ``numpy.testing``.

>>> from wsiengine.testing import make_pyramidal_slide
>>> slide = make_pyramidal_slide(tmp_path / "s.tiff", width=4096, height=3072)
>>> slide.tissue_polygons_level0.area / (slide.width * slide.height)   # about 0.2-0.3

PCam-mosaic slides (real PatchCamelyon patches on a 96-px lattice, with lesion ground truth):

>>> from wsiengine.testing import PatchPool, make_mosaic_dataset
>>> pool = PatchPool.from_pcam("../shared/data/pcam", "train")
>>> slides = make_mosaic_dataset(tmp_path / "train", pool, 100, seed=0)

Nothing here imports the engine's Numba kernels, so it works while they are being built.
"""

from __future__ import annotations

from .synthetic import (
    DEFAULT_SOURCES,
    Ellipse,
    SyntheticSlide,
    load_default_source,
    make_pyramidal_slide,
    truncated_copy,
)
from .mosaic import (
    PATCH_PX,
    PCAM_MPP,
    MosaicSlide,
    PatchPool,
    load_mosaic_dataset,
    make_mosaic_dataset,
    make_mosaic_slide,
)

__all__ = [
    "make_pyramidal_slide",
    "SyntheticSlide",
    "Ellipse",
    "load_default_source",
    "DEFAULT_SOURCES",
    "truncated_copy",
    "PatchPool",
    "MosaicSlide",
    "make_mosaic_slide",
    "make_mosaic_dataset",
    "load_mosaic_dataset",
    "PCAM_MPP",
    "PATCH_PX",
]
