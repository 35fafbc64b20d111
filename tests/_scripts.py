"""Helpers for the tests of the scripts in benchmarks/: loading a script as a module, running its
``main`` with its output captured, and stand-in slides for the CAMELYON reproduction scripts
(H&E-like textures on a tissue blob, drawn with NumPy and written as pyramidal TIFFs; no
../shared needed)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
import time
from pathlib import Path

import numpy as np

from wsiengine.testing import Ellipse, make_pyramidal_slide


def load_script(path: Path):
    """A benchmark script as a module (benchmarks/ is not a package), imported once."""
    name = path.stem
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def run_main(script, argv: list[str]) -> tuple[int, str, str, float]:
    """``script.main(argv)`` with stdout and stderr captured: (status, out, err, seconds)."""
    out, err = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = script.main(argv)
    return rc, out.getvalue(), err.getvalue(), time.perf_counter() - started


def he_texture(seed: int, tumour: bool, size: int = 384) -> np.ndarray:
    """An (H, W, 3) uint8 H&E-like texture: pink stroma with sparse small nuclei (normal) or
    dense large ones (tumour)."""
    rng = np.random.default_rng(seed)
    stroma = np.array([200, 120, 190]) if tumour else np.array([225, 135, 185])
    image = stroma + rng.normal(0, 8, (size, size, 3))
    seeds = rng.random((size, size)) < (0.02 if tumour else 0.004)
    radius = 3 if tumour else 1
    nuclei = np.zeros_like(seeds)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx <= radius * radius:
                nuclei |= np.roll(seeds, (dy, dx), axis=(0, 1))
    image[nuclei] = np.array([95, 55, 150]) + rng.normal(0, 10, (int(nuclei.sum()), 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def make_standin_slide(path: Path, seed: int, tumour: bool, *, side: int, jitter: float,
                       radii: tuple[float, float]) -> None:
    """A ``side`` x ``side`` px slide at 0.5 µm/px: one wobbly elliptic tissue blob (centre moved
    by up to ``jitter`` px, semi-axes drawn from ``radii``) filled with :func:`he_texture`."""
    rng = np.random.default_rng(seed)
    centre = side / 2
    blob = Ellipse(centre + rng.uniform(-jitter, jitter), centre + rng.uniform(-jitter, jitter), rng.uniform(*radii),
                   rng.uniform(*radii), angle=rng.uniform(0, np.pi), wobble=((3, 0.05, rng.uniform(0, 6)),))
    make_pyramidal_slide(path, width=side, height=side, mpp=0.5, levels=(1, 4), tile=256,
                         source=he_texture(seed, tumour), tissue=[blob], seed=seed, workers=1)
