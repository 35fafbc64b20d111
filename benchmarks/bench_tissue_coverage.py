#!/usr/bin/env python
"""How much of the tissue gets a tile: tissue detection scored cell by cell on a gigapixel PCam mosaic.

    python benchmarks/bench_tissue_coverage.py [--gigapixels 0.94] [--split test] [--seed 0]
        [--keep DIR] [--json [FILE]] [--pcam DIR]

The slide is a lattice of 96-px cells at 0.972 µm/px (PCam's resolution), written as a
generic pyramidal TIFF (JPEG 256-px tiles, levels 1, 4, 16) by the writer of
:mod:`wsiengine.testing.mosaic`. Its layout is this file's own, built from the generator's
parts (``make_mosaic_slide`` draws each patch once per slide, so one slide holds at most a
split's 1,500 to 10,000 patches; a gigapixel needs ~50,000 tissue cells):

- **lymph nodes**: blobs laid out by the generator's own ``_layout`` (irregular, rough-edged,
  1-3 pieces each, a lesion of tumour patches on about 60 % of them), packed on shelves over
  the slide with glass between; each cell holds a real PCam patch (``min_stained=0``: pale and
  near-empty patches land inside tissue as in a real node), drawn without repetition within a
  node and turned by a random multiple of 90° and flip (nodes reuse patches);
- **pale regions**: on about half the nodes, a band of cells along part of the outline (the
  subcapsular rim), two cells deep, and a small cluster inside, are bleached
  (``255 - (255 - v) * a``, a in 0.4-0.65; tumour cells are left as they are): pale, faintly stained but cellular;
- **fat-only** pieces: separate blobs of adipose texture (white cells outlined by thin pink
  septa), which must get no tile;
- **pen strokes**: marker lines (green, blue, black; 0.3-0.6 mm wide, blurred edges) drawn
  on the glass around some nodes and across a few of them.

It then runs ``detect_tissue`` and ``plan_tiles(slide, mask, target_mpp=slide.mpp[0],
tile_px=96, min_tissue=0.5)`` (each tile is exactly one cell) and prints, per category, the
fraction of cells that get a tile:

- *cellular*: cells with a patch whose mean grey (after bleaching) is below 200, no pen;
- *edge*: cellular cells 4-adjacent to a cell with no tissue (glass, fat or ink on glass);
- *pale*: bleached cells; *lesion*: tumour cells (no pen);
- and the fraction of **kept** tiles that lie on glass cells, on fat-only cells, on pen ink.

The figures of the previous algorithm (plain closing and opening, no hysteresis, no
reconstruction: :data:`OLD_OVERRIDES` on ``TissueConfig``) are printed beside the new ones,
from the same thumbnail. ``detect_tissue`` is timed warm, and its parts separately: the
thumbnail read (``Slide.thumbnail``), the kernel and the outline polygons. The kernel is also
timed on a 2048 x 2048 thumbnail (goal <= 100 ms), old and new settings.

Choose settings on ``--split train`` or ``valid``; report on ``--split test``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if (REPO / "wsiengine" / "__init__.py").is_file() and str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

import wsiengine as we  # noqa: E402
from wsiengine.testing import mosaic as mz  # noqa: E402

#: settings that reproduce the algorithm before issue 14 (plain opening, Otsu-only candidates)
OLD_OVERRIDES = dict(hysteresis_ratio=1.0, opening_by_reconstruction=False)

P = mz.PATCH_PX
GLASS, TISSUE, FAT = 0, 1, 2
INK = {"green": (30, 130, 70), "blue": (35, 55, 150), "black": (5, 5, 10)}


@dataclass
class Truth:
    grid: tuple[int, int]
    kind: np.ndarray  # (rows, cols) GLASS / TISSUE / FAT
    tumour: np.ndarray  # bool
    pale: np.ndarray  # bool
    grey: np.ndarray  # float, mean grey of the cell as painted
    ink: np.ndarray  # float, fraction of the cell under pen ink


def _patches(split_dir: Path, label: str, limit: int, rng: np.random.Generator) -> np.ndarray:
    paths = sorted((split_dir / label).glob("*.jpg"))
    if not paths:
        raise SystemExit(f"no PCam patches in {split_dir / label}")
    pick = rng.permutation(len(paths))[:limit]
    return np.stack([mz._read_patch(paths[i]) for i in sorted(pick)])


def _fat_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Adipose tissue: white cells 40-100 µm across outlined by thin pink septa (Voronoi edges)."""
    n = max(4, int(h * w / (70.0**2)))
    pts = rng.uniform(0, 1, (n, 2)) * (h, w)
    yy, xx = np.mgrid[0:h, 0:w]
    from scipy.spatial import cKDTree

    d, _ = cKDTree(pts).query(np.stack([yy.ravel(), xx.ravel()], 1), k=2)
    edge = (d[:, 1] - d[:, 0]).reshape(h, w) < 2.5
    img = np.empty((h, w, 3), np.float32)
    img[:] = (243, 239, 241)
    img[edge] = (225, 170, 200)
    img += rng.normal(0, 2.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _rim_band(region: np.ndarray, rng: np.random.Generator, depth: int = 2) -> np.ndarray:
    """Cells of ``region`` within ``depth`` cells of its outline, on an arc of 90-180° around its centre."""
    from scipy import ndimage as ndi

    inner = ndi.binary_erosion(region, iterations=depth, border_value=0)
    band = region & ~inner
    rr, cc = np.nonzero(region)
    cy, cx = rr.mean(), cc.mean()
    yy, xx = np.mgrid[0 : region.shape[0], 0 : region.shape[1]]
    angle = np.arctan2(yy - cy, xx - cx)
    start, span = rng.uniform(-math.pi, math.pi), rng.uniform(math.pi / 2, math.pi)
    return band & (np.mod(angle - start, 2 * math.pi) < span)


def build_slide(path: Path, split_dir: Path, gigapixels: float, seed: int) -> Truth:
    """Write the benchmark slide at ``path``; return the cell-level truth."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    side_cells = int(math.ceil(math.sqrt(gigapixels * 1e9) / P))
    rows = cols = side_cells
    normal = _patches(split_dir, "0", 6000, rng)
    tumour = _patches(split_dir, "1", 3000, rng)
    kind = np.zeros((rows, cols), np.int8)
    tumour_cell = np.zeros((rows, cols), bool)
    pale = np.zeros((rows, cols), bool)
    canvas = mz._glass(rng, rows, cols)

    # shelf packing of nodes (and a few fat-only pieces) over the lattice
    r0, c0, shelf = 1, 1, 0
    n_nodes = 0
    while True:
        is_fat = rng.random() < 0.1
        layout = mz._layout(
            rng, label=0 if is_fat else int(rng.random() < 0.6),
            n_tissue_cells=(60, 150) if is_fat else (300, 1400), lesion_cells=(4, 113), regions=(1, 3),
            n_lesions=(1, 2), margin_cells=3, roughness=0.04,
        )
        h, w = layout.grid
        if c0 + w > cols - 1:
            r0, c0, shelf = r0 + shelf, 1, 0
        if r0 + h > rows - 1:
            break
        cells = layout.cells + (r0, c0)
        if is_fat:
            kind[cells[:, 0], cells[:, 1]] = FAT
            for r, c in cells:
                canvas[r * P : (r + 1) * P, c * P : (c + 1) * P] = _fat_texture(rng, P, P)
        else:
            n_nodes += 1
            kind[cells[:, 0], cells[:, 1]] = TISSUE
            tumour_cell[cells[:, 0], cells[:, 1]] = layout.tumour
            region = np.zeros(layout.grid, bool)
            region[layout.cells[:, 0], layout.cells[:, 1]] = True
            bleach = np.zeros(layout.grid, bool)
            if rng.random() < 0.5:
                bleach |= _rim_band(region, rng)
                k = int(rng.integers(len(layout.cells)))
                cy, cx = layout.cells[k]
                yy, xx = np.mgrid[0 : h, 0 : w]
                bleach |= region & ((yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(1.5, 3.0) ** 2)
            n_t = int(layout.tumour.sum())
            ni = rng.permutation(len(normal))[: len(cells) - n_t]
            ti = rng.permutation(len(tumour))[:n_t]
            it_n, it_t = iter(ni), iter(ti)
            for (lr, lc), (r, c), t in zip(layout.cells, cells, layout.tumour):
                patch = tumour[next(it_t)] if t else normal[next(it_n)]
                patch = np.rot90(patch, int(rng.integers(4)))
                if rng.random() < 0.5:
                    patch = patch[:, ::-1]
                if bleach[lr, lc] and not t:
                    a = rng.uniform(0.4, 0.65)
                    patch = (255.0 - (255.0 - patch) * a + 0.5).astype(np.uint8)
                    pale[r, c] = True
                canvas[r * P : (r + 1) * P, c * P : (c + 1) * P] = patch
        c0 += w
        shelf = max(shelf, h)

    # pen strokes: curves around and across some nodes, drawn per bounding box
    ink = np.zeros((rows, cols), np.float64)
    for _ in range(max(2, n_nodes // 4)):
        colour = np.array(INK[str(rng.choice(list(INK)))], np.float32)
        width = int(rng.uniform(300, 600) / mz.PCAM_MPP)
        cy, cx = rng.uniform(0.1, 0.9, 2) * (rows * P, cols * P)
        radius = rng.uniform(800, 3000)
        t0 = rng.uniform(0, 2 * math.pi)
        ts = t0 + np.linspace(0, rng.uniform(0.5, 1.5) * math.pi, 40)
        pts = np.stack([cx + radius * np.cos(ts), cy + radius * 0.7 * np.sin(ts)], 1)
        x0, y0 = (np.maximum(pts.min(0) - width, 0) // P * P).astype(int)
        x1, y1 = (np.minimum(-(-(pts.max(0) + width) // P) * P, (cols * P, rows * P))).astype(int)
        if x1 <= x0 or y1 <= y0:
            continue
        # the stroke at 1/4 scale, blurred, then upsampled: soft edges, cheap
        s = 4
        small = Image.new("L", ((x1 - x0) // s + 1, (y1 - y0) // s + 1), 0)
        ImageDraw.Draw(small).line([((x - x0) / s, (y - y0) / s) for x, y in pts], fill=255, width=max(1, width // s),
                                   joint="curve")
        small = small.filter(ImageFilter.GaussianBlur(3))
        alpha = np.asarray(small.resize(((x1 - x0), (y1 - y0)), Image.BILINEAR), np.float32) / 255.0 * 0.95
        box = canvas[y0:y1, x0:x1].astype(np.float32)
        # ink is translucent: it multiplies the colour below
        mixed = box * (1 - alpha[..., None]) + (box * colour / 255.0) * alpha[..., None]
        canvas[y0:y1, x0:x1] = np.clip(mixed + 0.5, 0, 255).astype(np.uint8)
        covered = (alpha > 0.3).reshape((y1 - y0) // P, P, (x1 - x0) // P, P).mean(axis=(1, 3))
        ink[y0 // P : y1 // P, x0 // P : x1 // P] = np.maximum(ink[y0 // P : y1 // P, x0 // P : x1 // P], covered)

    grey = canvas.reshape(rows, P, cols, P, 3).mean(axis=(1, 3, 4))
    mz._write_tiff(path, canvas, mpp=mz.PCAM_MPP, downsamples=(1, 4, 16), tile=256, jpeg_quality=90)
    del canvas
    return Truth(grid=(rows, cols), kind=kind, tumour=tumour_cell, pale=pale, grey=grey, ink=ink)


def score(truth: Truth, kept: np.ndarray) -> dict[str, float]:
    """Fractions per category; ``kept`` is the (rows, cols) bool of cells with a tile."""
    kind, ink = truth.kind, truth.ink
    tissue = kind == TISSUE
    clean = ink < 0.05
    empty = kind != TISSUE
    pad = np.pad(empty, 1, constant_values=True)
    touches_empty = pad[:-2, 1:-1] | pad[2:, 1:-1] | pad[1:-1, :-2] | pad[1:-1, 2:]
    cellular = tissue & clean & (truth.grey < 200)
    edge = cellular & touches_empty
    pale = tissue & clean & truth.pale
    lesion = tissue & clean & truth.tumour
    glass = (kind == GLASS) & clean
    n_kept = max(int(kept.sum()), 1)
    out = {}
    for name, sel in (("cellular", cellular), ("edge", edge), ("pale", pale), ("lesion", lesion)):
        out[f"{name}_tiled"] = float(kept[sel].mean()) if sel.any() else float("nan")
        out[f"{name}_cells"] = int(sel.sum())
    out["kept_on_glass"] = float((kept & glass).sum() / n_kept)
    out["kept_on_fat"] = float((kept & (kind == FAT)).sum() / n_kept)
    out["kept_on_ink"] = float((kept & (ink > 0.5)).sum() / n_kept)
    out["fat_cells_tiled"] = float(kept[kind == FAT].mean()) if (kind == FAT).any() else float("nan")
    out["tiles_kept"] = int(kept.sum())
    return out


def kept_cells(slide, mask, grid_shape) -> np.ndarray:
    grid = we.plan_tiles(slide, mask, target_mpp=slide.mpp[0], tile_px=96, min_tissue=0.5)
    kept = np.zeros(grid_shape, bool)
    c = np.asarray(grid.coords) // P
    kept[c[:, 1], c[:, 0]] = True
    return kept


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gigapixels", type=float, default=0.94)
    ap.add_argument("--split", default="test", choices=("train", "valid", "test"))
    ap.add_argument("--pcam", default=str(REPO.parent / "shared" / "data" / "pcam"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", default=None, help="write the slide and its truth in DIR (reused when there)")
    ap.add_argument("--json", nargs="?", const="-", default=None)
    args = ap.parse_args(argv)
    import dataclasses

    from wsiengine.kernels import segment_tissue
    from wsiengine.tissue import MAX_THUMBNAIL_READS, mask_to_polygons, segment_params

    pcam = Path(args.pcam)
    if not (pcam / args.split).is_dir():
        raise SystemExit(f"no PCam split folder {pcam / args.split}; pass --pcam DIR (the folder holding train, valid, test)")
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-tissue-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"coverage-{args.split}-{args.seed}-{args.gigapixels:g}.tiff"
    truth_path = path.with_suffix(".truth.npz")
    t = time.perf_counter()
    if path.is_file() and truth_path.is_file():
        z = np.load(truth_path)
        truth = Truth(grid=tuple(z["grid"]), kind=z["kind"], tumour=z["tumour"], pale=z["pale"], grey=z["grey"], ink=z["ink"])
        made = "reused"
    else:
        truth = build_slide(path, pcam / args.split, args.gigapixels, args.seed)
        np.savez(truth_path, grid=np.array(truth.grid), kind=truth.kind, tumour=truth.tumour, pale=truth.pale,
                 grey=truth.grey, ink=truth.ink)
        made = f"generated in {time.perf_counter() - t:.0f} s"
    slide = we.open_slide(path)
    config = we.TissueConfig()
    old_config = dataclasses.replace(config, **OLD_OVERRIDES)
    detect = []
    for _ in range(2):  # the first call may compile or load the Numba cache
        t = time.perf_counter()
        mask = we.detect_tissue(slide, config=config, keep_thumbnail=True)
        detect.append(time.perf_counter() - t)
    thumb = mask.thumbnail
    t = time.perf_counter()
    slide.thumbnail(config.mask_mpp, read_budget_px=config.read_budget_px, max_reads=MAX_THUMBNAIL_READS)
    read_s = time.perf_counter() - t
    t = time.perf_counter()
    mask_to_polygons(mask.raster, mask.level0_per_mask_px)
    polygons_s = time.perf_counter() - t
    params = segment_params(config, mask.mask_mpp)
    old_params = segment_params(old_config, mask.mask_mpp)
    kernel = []
    for _ in range(3):
        t = time.perf_counter()
        segment_tissue(thumb, params)
        kernel.append(time.perf_counter() - t)
    old_raster = segment_tissue(thumb, old_params)
    old_mask = dataclasses.replace(mask, raster=old_raster)
    result = {
        "slide": str(path), "split": args.split, "seed": args.seed, "made": made,
        "dimensions": list(slide.dimensions), "gigapixels": slide.dimensions[0] * slide.dimensions[1] / 1e9,
        "thumbnail": list(thumb.shape[:2]), "mask_mpp": mask.mask_mpp[0],
        "new": score(truth, kept_cells(slide, mask, truth.grid)),
        "old": score(truth, kept_cells(slide, old_mask, truth.grid)),
        "detect_tissue_s": min(detect[1:]), "detect_tissue_first_s": detect[0],
        "thumbnail_read_s": read_s, "kernel_s": min(kernel), "polygons_s": polygons_s,
    }
    # the kernel on a 2048 x 2048 crop of the thumbnail (tiled when smaller)
    crop = np.ascontiguousarray(np.tile(thumb, (max(1, -(-2048 // thumb.shape[0])), max(1, -(-2048 // thumb.shape[1])), 1))[:2048, :2048])
    for key, cfg in (("kernel_2048_ms", config), ("kernel_2048_old_ms", old_config)):
        p2048 = segment_params(cfg, (8.0, 8.0))
        segment_tissue(crop, p2048)
        k2048 = []
        for _ in range(7):
            t = time.perf_counter()
            segment_tissue(crop, p2048)
            k2048.append(time.perf_counter() - t)
        result[key] = 1000 * min(k2048)
    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
            return 0
        Path(args.json).write_text(text)
    print(f"slide {path.name}: {slide.dimensions[0]} x {slide.dimensions[1]} px = {result['gigapixels']:.3f} Gpx "
          f"({made}); PCam {args.split}; thumbnail {thumb.shape[1]} x {thumb.shape[0]} at {mask.mask_mpp[0]:.2f} µm/px")
    print(f"{'category':<34}{'cells':>8}{'old':>9}{'new':>9}")
    for name, label in (("cellular", "cellular cells tiled (grey < 200)"), ("edge", "  of them on the tissue edge"),
                        ("pale", "pale-region cells tiled"), ("lesion", "lesion cells tiled")):
        o, n = result["old"], result["new"]
        print(f"{label:<34}{n[name + '_cells']:>8}{o[name + '_tiled']:>9.2%}{n[name + '_tiled']:>9.2%}")
    for name, label in (("kept_on_glass", "kept tiles on glass"), ("kept_on_fat", "kept tiles on fat-only"),
                        ("kept_on_ink", "kept tiles on pen ink (> 50 %)")):
        print(f"{label:<34}{'':>8}{result['old'][name]:>9.2%}{result['new'][name]:>9.2%}")
    print(f"{'tiles kept':<34}{'':>8}{result['old']['tiles_kept']:>9}{result['new']['tiles_kept']:>9}")
    print(f"detect_tissue (warm) {result['detect_tissue_s']:.2f} s: thumbnail read {read_s:.2f} s, "
          f"kernel {result['kernel_s'] * 1000:.0f} ms, polygons {polygons_s:.2f} s; first call {detect[0]:.2f} s")
    print(f"segment_tissue on 2048 x 2048 (warm, best of 7): {result['kernel_2048_ms']:.0f} ms "
          f"(old algorithm {result['kernel_2048_old_ms']:.0f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
