"""Patch preprocessing: uint8 HWC RGB -> normalised float32 CHW, in one pass."""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["normalise_to_nchw"]


@numba.njit(cache=True, nogil=True)
def _normalise_to_nchw(images, scale, offset, out):
    n, h, w, _ = images.shape
    for b in range(n):
        for y in range(h):
            for x in range(w):
                for c in range(3):
                    out[b, c, y, x] = images[b, y, x, c] * scale[c] - offset[c]
    return out


def normalise_to_nchw(images: np.ndarray, mean: tuple[float, float, float], std: tuple[float, float, float]) -> np.ndarray:
    """``(B, H, W, 3)`` uint8 RGB -> ``(B, 3, H, W)`` float32 ``(x / 255 - mean) / std``.

    One fused pass (no intermediate float copy of the batch); ``mean`` and ``std`` are per
    channel, for RGB scaled to [0, 1].
    """
    images = np.ascontiguousarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] < 3:
        raise ValueError(f"expected (B, H, W, 3) uint8 RGB, got {images.dtype} {images.shape}")
    std_arr = np.asarray(std, dtype=np.float64)
    scale = (1.0 / (255.0 * std_arr)).astype(np.float32)
    offset = (np.asarray(mean, dtype=np.float64) / std_arr).astype(np.float32)
    n, h, w = images.shape[:3]
    out = np.empty((n, 3, h, w), dtype=np.float32)
    return _normalise_to_nchw(images, scale, offset, out)
