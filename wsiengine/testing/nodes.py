"""CAMELYON17-style patients of PCam-mosaic lymph nodes, with the truth of every node.

>>> from wsiengine.testing import PatchPool
>>> from wsiengine.testing.nodes import make_nodes, plan_patients
>>> nodes = plan_patients(10, seed=0)                      # 50 nodes, stages pN0 ... pN2
>>> make_nodes(nodes, PatchPool.from_pcam(pcam, "valid"), tmp_path / "slides")
>>> nodes[0].true_category, nodes[0].true_mm

Each patient has five nodes; the target stages cycle through pN0, pN0(i+), pN1mi, pN1 and pN2
and the node categories give that stage. A node is a PCam-mosaic slide
(:func:`~wsiengine.testing.mosaic.make_mosaic_slide`): two or three tissue pieces (one or two for
a macrometastasis node, which must hold it) and, for a positive node, one lesion of real tumour
patches sized for its category: ITC (one patch, about 0.09-0.13 mm), micrometastasis (target
0.3-1.5 mm) or macrometastasis (2.4-3.5 mm). The truth is measured on the lesion polygon itself:
its greatest dimension (Feret diameter, mm) gives the node's true category (AJCC/CAP: <= 0.2 mm
ITC, <= 2 mm micro), so a lesion that grew smaller than planned is scored as what it is. Each
slide's lesions are written beside it as ``SLIDE_ID.lesions.geojson``.

Used by ``benchmarks/bench_staging.py`` (PCam **test** nodes) and by
``python -m wsiengine.models.training.fit_deposit_rules`` (PCam **valid** nodes).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .mosaic import PATCH_PX, PCAM_MPP, PatchPool, make_mosaic_slide

__all__ = ["STAGES", "STAGE_NODES", "TARGET_MM", "CELL_MM", "Node", "cells_for", "category_of", "plan_patients",
           "make_nodes"]

STAGES = ("pN0", "pN0(i+)", "pN1mi", "pN1", "pN2")
#: Node categories per target stage (five nodes; the rest negative).
STAGE_NODES = {
    "pN0": [],
    "pN0(i+)": ["itc"],
    "pN1mi": ["micrometastasis"],
    "pN1": ["macrometastasis", "micrometastasis"],
    "pN2": ["macrometastasis", "micrometastasis", "micrometastasis", "macrometastasis"],
}
#: One PCam patch, mm.
CELL_MM = PATCH_PX * PCAM_MPP / 1000
#: Lesion diameter ranges per category, mm.
TARGET_MM = {"micrometastasis": (0.3, 1.5), "macrometastasis": (2.4, 3.5)}


@dataclass
class Node:
    """One lymph node of a patient: what was planned and what the slide truly holds."""

    patient_id: str
    slide_id: str
    planned: str
    seed: int
    true_category: str = "negative"
    true_mm: float | None = None


def cells_for(diameter_mm: float) -> int:
    """Patches of a compact lesion of that greatest dimension (a disc)."""
    return max(2, round(math.pi / 4 * (diameter_mm / CELL_MM) ** 2))


def category_of(mm: float | None) -> str:
    """The AJCC/CAP category of a node whose largest deposit measures ``mm`` (None: negative)."""
    if mm is None:
        return "negative"
    return "itc" if mm <= 0.2 else "micrometastasis" if mm <= 2.0 else "macrometastasis"


def plan_patients(n: int, seed: int) -> list[Node]:
    """``n`` patients of five nodes each (seeded), stages cycling through :data:`STAGES`."""
    rng = np.random.default_rng(seed)
    nodes = []
    for p in range(n):
        stage = STAGES[p % len(STAGES)]
        categories = STAGE_NODES[stage] + ["negative"] * (5 - len(STAGE_NODES[stage]))
        rng.shuffle(categories)
        for k, category in enumerate(categories):
            nodes.append(Node(f"patient_{p:03d}", f"patient_{p:03d}_node_{k}", category, int(rng.integers(2**31))))
    return nodes


def make_nodes(nodes: list[Node], pool: PatchPool, folder: Path, *, small: bool = False) -> None:
    """Write every node slide into ``folder`` (``SLIDE_ID.tiff`` and ``SLIDE_ID.lesions.geojson``)
    and measure its true lesion (sets ``true_mm`` and ``true_category``). ``small``: tiny nodes and
    lesions, a plumbing check."""
    from ..geojson import max_diameter

    folder.mkdir(parents=True, exist_ok=True)
    for node in nodes:
        rng = np.random.default_rng(node.seed)
        if node.planned in ("negative", "itc"):
            lesion = (1, 1)
        else:
            lo, hi = TARGET_MM[node.planned]
            cells = cells_for(rng.uniform(lo, hi) / (4 if small else 1))
            lesion = (cells, cells)
        # PCam test has 1,500 normal patches (about 1,065 stained enough) and a slide never repeats
        # one: normal tissue stays under about 1,000 cells, plus the lesion's tumour cells
        normal = (150, 250) if small else (600, 900)
        tissue = (normal[0] + lesion[0] - 1, normal[1] + lesion[0] - 1)
        slide = make_mosaic_slide(folder / f"{node.slide_id}.tiff", pool, label=int(node.planned != "negative"),
                                  seed=node.seed, n_tissue_cells=tissue, lesion_cells=lesion,
                                  regions=(1, 2) if node.planned == "macrometastasis" else (2, 3))
        if not slide.lesions.is_empty:
            largest = max(getattr(slide.lesions, "geoms", [slide.lesions]), key=lambda g: g.area)
            node.true_mm = max_diameter(largest, (PCAM_MPP, PCAM_MPP)) / 1000
        node.true_category = category_of(node.true_mm)
        (folder / f"{node.slide_id}.lesions.geojson").write_text(json.dumps(slide.lesion_geojson()))
