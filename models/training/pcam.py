"""PatchCamelyon splits as arrays, for training and evaluation scripts (CC0; 96-px patches at about 0.972 µm/px)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["pcam_split"]


def pcam_split(pcam: Path, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 96, 96, 3) uint8, labels (N,) int64)`` of ``pcam/split/{0,1}/*.jpg``, files
    sorted by label then name; ``limit`` keeps the first ``limit // 2`` of each label.
    SystemExit naming the folder when a label has no patch."""
    from PIL import Image

    images, labels = [], []
    for label in (0, 1):
        paths = sorted((pcam / split / str(label)).glob("*.jpg"))
        if not paths:
            raise SystemExit(f"no PCam {split} patches under {pcam / split / str(label)}")
        if limit:
            paths = paths[: limit // 2]
        for path in paths:
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB")))
        labels += [label] * len(paths)
    return np.stack(images), np.asarray(labels, np.int64)
