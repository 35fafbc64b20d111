"""Digits-bags: the MNIST-bags MIL protocol of Ilse et al. (2018) on scikit-learn's bundled 8x8
handwritten digits. A bag is positive iff it holds at least one 9; a tile's features are its 64
pixel values scaled to [0, 1]. Train and test bags draw from disjoint pools of the digits (``train_fraction`` of them for training)."""

from __future__ import annotations

import numpy as np

POSITIVE_DIGIT = 9


def make_digits_bags(n_train: int = 200, n_test: int = 100, bag_min: int = 5, bag_max: int = 15, seed: int = 0,
                     train_fraction: float = 0.7):
    """Return ``(train, test)``, each a list of ``(features (N, 64) float32, bag label, tile labels (N,))``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    half = int(round(len(x) * train_fraction))
    pools = order[:half], order[half:]

    def bags(pool: np.ndarray, count: int) -> list:
        out = []
        for _ in range(count):
            n = int(rng.integers(bag_min, bag_max + 1))
            idx = rng.choice(pool, size=n, replace=False)
            tiles = (y[idx] == POSITIVE_DIGIT).astype(np.int64)
            out.append((x[idx], int(tiles.any()), tiles))
        return out

    return bags(pools[0], n_train), bags(pools[1], n_test)
