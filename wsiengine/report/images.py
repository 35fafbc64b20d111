"""The report's images: evidence tiles read from the slide's pyramid, the thumbnail with the
evidence tiles numbered, and the heatmap overlay. Label and macro images are never read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import ReportConfig

if TYPE_CHECKING:  # pragma: no cover
    from ..slide import Slide
    from ..store import ResultStore

__all__ = ["open_slide_for_evidence", "evidence_images", "thumbnail_image", "heatmap_image", "save_png"]

#: Shortest display side of the thumbnail and heatmap PNGs, pixels (small slides are enlarged).
DISPLAY_MIN_PX = 512


def recorded_slide_paths(store: "ResultStore") -> list[Path]:
    """Where the store's slide may be: its recorded absolute path, then its path relative to the
    results folder (for a results tree moved together with its slides), then, for stores of
    older versions, the recorded path relative to the working directory."""
    info = store.slide or {}
    paths = []
    if info.get("path"):
        paths.append(Path(info["path"]))
    if info.get("path_from_results"):
        paths.append(Path(str(store.path)).parent / info["path_from_results"])
    return paths


def open_slide_for_evidence(store: "ResultStore", slide: "Slide | str | os.PathLike[str] | None"
                            ) -> tuple["Slide | None", bool, str | None]:
    """The slide to read evidence tiles from: ``(slide, opened here, reason it is unavailable)``.

    A path (given, or recorded in the store) is used only when the file has the store's
    fingerprint, so tiles never come from another slide.
    """
    from ..slide import Slide, open_slide
    from ..store import slide_fingerprint

    if isinstance(slide, Slide):
        return slide, False, None
    info = store.slide
    candidates = [Path(slide)] if slide is not None else recorded_slide_paths(store)
    if not candidates:
        return None, False, "the store records no slide path"
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        return None, False, (f"slide '{candidates[0].name}' is not at its recorded path; pass slide= (--slide) to make "
                             "tiles")
    expected = info.get("fingerprint")
    if expected and slide_fingerprint(path) != expected:
        return None, False, f"'{path.name}' is not the file the store was made from (its content differs)"
    try:
        return open_slide(path, mpp=tuple(info["mpp"]) if info.get("mpp") else None), True, None
    except Exception as exc:  # noqa: BLE001 - any open failure only costs the evidence images
        return None, False, f"cannot open '{path.name}': {exc}"


def _upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Enlarge by a whole ``factor`` (nearest neighbour: pixels stay the slide's)."""
    return image if factor <= 1 else np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(image)).save(path, format="PNG")


def evidence_images(slide: "Slide", store: "ResultStore", evidence: list[dict[str, Any]], folder: Path,
                    config: ReportConfig) -> list[Path]:
    """Read each evidence tile at its grid's resolution (or ``config.evidence_mpp``), enlarge it
    to at least ``config.evidence_px`` and save it as ``folder/evidence-NN.png``."""
    grid = store.grid
    mpp = float(config.evidence_mpp or grid["target_mpp"])
    size_px = max(1, int(round(int(grid["tile_px"]) * float(grid["target_mpp"]) / mpp)))
    paths = []
    for e in evidence:
        tile = slide.read_at_mpp((e["x"], e["y"]), (size_px, size_px), mpp, allow_upsample=True)
        path = folder / f"evidence-{e['rank']:02d}.png"
        save_png(path, _upscale(tile, int(np.ceil(config.evidence_px / max(1, min(tile.shape[:2]))))))
        paths.append(path)
    return paths


def _display_thumbnail(store: "ResultStore") -> tuple[np.ndarray, tuple[float, float]] | None:
    """The stored thumbnail enlarged to at least :data:`DISPLAY_MIN_PX` on its long side, and its
    level-0 pixels per display pixel (x, y); None without a thumbnail."""
    thumb = store.thumbnail
    if thumb is None:
        return None
    factor = max(1, int(np.ceil(DISPLAY_MIN_PX / max(1, max(thumb.shape[:2])))))
    scale = store.array_attrs("thumbnail").get("level0_per_px", [1.0, 1.0])
    return _upscale(thumb, factor), (float(scale[0]) / factor, float(scale[1]) / factor)


def thumbnail_image(store: "ResultStore", evidence: list[dict[str, Any]]) -> np.ndarray | None:
    """The thumbnail (made from the pyramid) with the evidence tiles outlined and numbered."""
    from PIL import Image, ImageDraw

    from ..heatmap import _font

    shown = _display_thumbnail(store)
    if shown is None:
        return None
    thumb, (sx, sy) = shown
    image = Image.fromarray(thumb)
    draw = ImageDraw.Draw(image)
    font = _font(14)
    for e in evidence:
        x0, y0 = e["x"] / sx, e["y"] / sy
        x1, y1 = (e["x"] + e["width"]) / sx, (e["y"] + e["height"]) / sy
        draw.rectangle([x0, y0, max(x0 + 2, x1), max(y0 + 2, y1)], outline=(0, 90, 255), width=2)
        box = draw.textbbox((x1 + 2, y0), str(e["rank"]), font=font)
        draw.rectangle([box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1], fill=(255, 255, 255))
        draw.text((x1 + 2, y0), str(e["rank"]), fill=(0, 40, 160), font=font)
    return np.asarray(image)


def heatmap_image(store: "ResultStore") -> np.ndarray | None:
    """The stored tumour-score (else attention) heatmap over the display thumbnail, with a colour bar."""
    from ..heatmap import read_heatmap, render_overlay

    names = store.heatmap_names()
    name = "tile_scores" if "tile_scores" in names else ("attention" if "attention" in names else None)
    shown = _display_thumbnail(store)
    if name is None or shown is None:
        return None
    thumb, downsample = shown
    return render_overlay(thumb, downsample, read_heatmap(store.group, name),
                          label="tumour probability" if name == "tile_scores" else "attention (relative)")
