"""Input checks shared by the kernel wrappers (plain Python, no Numba)."""

from __future__ import annotations

import numpy as np


def as_rgb(rgb: np.ndarray, name: str = "rgb") -> np.ndarray:
    """Return ``rgb`` as a C-contiguous ``(H, W, 3)`` uint8 array.

    A fourth (alpha) channel is dropped. Non-contiguous views are copied, contiguous uint8
    RGB is returned as is (no copy).
    """
    a = np.asarray(rgb)
    if a.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8, got {a.dtype}; convert with skimage.util.img_as_ubyte or np.uint8")
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"{name} must have shape (H, W, 3) or (H, W, 4), got {a.shape}")
    if a.shape[2] == 4:
        a = a[:, :, :3]
    return np.ascontiguousarray(a)


def as_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    """Return ``mask`` as a C-contiguous 2-D bool array (non-zero is True)."""
    a = np.asarray(mask)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (H, W), got shape {a.shape}")
    if a.dtype != np.bool_:
        a = a != 0
    return np.ascontiguousarray(a)


def check_radius(radius_px: int, name: str = "radius_px") -> int:
    """Validate a structuring-element radius in pixels."""
    r = int(radius_px)
    if r != radius_px or r < 0:
        raise ValueError(f"{name} must be a non-negative integer number of pixels, got {radius_px!r}")
    return r


def check_connectivity(connectivity: int) -> int:
    """Validate a 2-D connectivity (1: 4-neighbours, 2: 8-neighbours)."""
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 (4-neighbours) or 2 (8-neighbours), got {connectivity!r}")
    return int(connectivity)
