"""Out-of-distribution check for tile embeddings: how far a slide's tiles lie from a head's training tiles.

>>> ref = EmbeddingReference.fit(bags_iterable, encoder="default", source="96 training slides")
>>> ref.save("mil_model/reference.npz")                  # ~190 kB for D=1280, 32 components
>>> ref = MILHead.load("mil_model/").reference           # or EmbeddingReference.load(path)
>>> ref.distance(features)                               # (N,) float32, ~1 for a typical training tile
>>> ref.outlier_fraction(features, quantile=0.99)        # ~0.01 in distribution, -> 1 far from it

An :class:`EmbeddingReference` summarises the ``(N, D)`` tile embeddings a MIL head was trained
on as a probabilistic-PCA (Tipping & Bishop 1999) Gaussian over the embeddings' directions: each
embedding is first scaled to unit length (``u = x / ||x||``; ``normalise=False`` keeps ``u = x``),
then the model is the mean ``mu`` (D,), the top ``r`` principal directions ``V`` (r, D) with
their variances ``lambda`` (r,), and the mean variance ``sigma2`` left in the other ``D - r``
directions. The **distance** of a tile ``x`` is

    c = u - mu,   z = V c,   e2 = ||c||^2 - ||z||^2           (squared residual off the components)
    distance(x) = sqrt( (sum_i z_i^2 / lambda_i  +  e2 / sigma2) / D )

a Mahalanobis distance under that model, divided by ``sqrt(D)`` so it does not grow with the
embedding size: for data that really were that Gaussian its square averages 1, so a typical
training tile scores about 1 and a tile ``k`` model standard deviations away in every direction
about ``k``. Real embeddings are not Gaussian, so thresholds come from the reference tiles' own
distances: :attr:`EmbeddingReference.quantiles` holds their 0, 0.001, ..., 1 quantiles and
:meth:`~EmbeddingReference.threshold` interpolates them for any quantile.

Why unit length: what an image shows is in the pattern of an embedding, its length mostly says
how strongly the encoder responded. Featureless images (a solid colour, a blank or noisy patch)
give short embeddings that lie, in raw Euclidean terms, close to those of pale tissue; after
normalisation they stand apart. With the default head's reference (EfficientNet-Lite0, PCam
mosaics) normalisation took solid colours from 3 % to 100 % flagged at the 0.99 quantile while
held-out training-like tiles stayed at 2 % (the same observation as Sun et al. 2022, "OOD
detection with deep nearest neighbors": normalised features separate far better). The price:
an embedding and any positive multiple of it score the same.

No torch; numpy only. Memory stays bounded: fitting holds at most ``max_tiles`` tiles (a seeded
reservoir sample of the stream) plus a ``(D, D)`` float64 scatter matrix, and distances are
computed :data:`CHUNK_ROWS` tiles at a time.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write
from .errors import ConfigError, ModelError

__all__ = ["EmbeddingReference", "REFERENCE_FORMAT", "REFERENCE_FORMAT_VERSION", "N_QUANTILES", "CHUNK_ROWS"]

logger = logging.getLogger("wsiengine")

REFERENCE_FORMAT = "wsiengine.embedding_reference"
REFERENCE_FORMAT_VERSION = 1
#: Quantile levels stored: 0, 0.001, ..., 1.
N_QUANTILES = 1001
#: Tiles per step when computing moments and distances (float64 temporaries of CHUNK_ROWS x D).
CHUNK_ROWS = 4096
#: Variances are floored at this fraction of the mean per-dimension variance (constant directions).
_VARIANCE_FLOOR = 1e-6
_ARRAYS = ("mean", "components", "variances", "residual_variance", "quantile_levels", "quantiles")


class EmbeddingReference:
    """A compact summary of the tile embeddings a MIL head was trained on, for an OOD check.

    Build one with :meth:`fit`, read one with :meth:`load`; see the module docstring for the
    distance. All arrays are read-only in spirit: do not modify them.

    Attributes
    ----------
    mean : np.ndarray
        ``(D,)`` float32 mean embedding.
    components : np.ndarray
        ``(r, D)`` float32 principal directions (orthonormal rows), largest variance first.
    variances : np.ndarray
        ``(r,)`` float64 variance along each component (embedding units squared).
    residual_variance : float
        Mean variance per dimension in the ``D - r`` directions off the components.
    normalise : bool
        Embeddings are scaled to unit length before the model (see the module docstring).
    quantile_levels, quantiles : np.ndarray
        ``(Q,)`` float64: levels 0..1 and the reference tiles' distances at those levels.
        In-sample: computed on the tiles the components were fitted on, so slightly optimistic
        (held-out tiles of the same distribution score a little higher).
    n_tiles : int
        Tiles the fit used (at most ``max_tiles``).
    n_seen : int
        Tiles in the input (``n_tiles`` is a seeded uniform subsample when ``n_seen`` is larger).
    encoder : str or None
        The encoder whose embeddings these are.
    encoder_sha256 : str or None
        That encoder file's SHA-256, when known.
    source : str
        What the tiles were (free text, e.g. "the 96 training slides of split fold0").
    seed : int
        Seed of the subsample.
    created : str
        ISO date of the fit.
    """

    def __init__(self, mean: np.ndarray, components: np.ndarray, variances: np.ndarray, residual_variance: float,
                 quantile_levels: np.ndarray, quantiles: np.ndarray, *, normalise: bool = True, n_tiles: int,
                 n_seen: int | None = None, encoder: str | None = None, encoder_sha256: str | None = None,
                 source: str = "", seed: int = 0, created: str = "") -> None:
        self.mean = np.ascontiguousarray(mean, dtype=np.float32)
        self.components = np.ascontiguousarray(components, dtype=np.float32)
        self.variances = np.asarray(variances, dtype=np.float64)
        self.residual_variance = float(residual_variance)
        self.quantile_levels = np.asarray(quantile_levels, dtype=np.float64)
        self.quantiles = np.asarray(quantiles, dtype=np.float64)
        self.normalise = bool(normalise)
        self.n_tiles = int(n_tiles)
        self.n_seen = int(n_seen if n_seen is not None else n_tiles)
        self.encoder = encoder or None
        self.encoder_sha256 = encoder_sha256 or None
        self.source = str(source)
        self.seed = int(seed)
        self.created = str(created)
        self._check()

    # -- properties ---------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """D, the embedding size."""
        return int(self.mean.shape[0])

    @property
    def n_components(self) -> int:
        """r, the principal components kept."""
        return int(self.components.shape[0])

    def __repr__(self) -> str:
        sub = f" of {self.n_seen:,}" if self.n_seen != self.n_tiles else ""
        norm = "" if self.normalise else ", normalise=False"
        return (f"EmbeddingReference(D={self.dim}, components={self.n_components}, n_tiles={self.n_tiles:,}{sub}"
                f"{norm}, encoder={self.encoder!r}, source={self.source!r})")

    def _check(self) -> None:
        """Shapes and values agree (a damaged or hand-made reference fails here with ModelError)."""
        d = self.mean.shape[0] if self.mean.ndim == 1 else -1
        r = self.components.shape[0] if self.components.ndim == 2 else -1
        problems = []
        if d < 2:
            problems.append(f"mean must be (D,) with D >= 2, got {self.mean.shape}")
        elif self.components.shape != (r, d) or not 1 <= r < d:
            problems.append(f"components must be (r, D={d}) with 1 <= r < D, got {self.components.shape}")
        elif self.variances.shape != (r,):
            problems.append(f"variances must be ({r},), got {self.variances.shape}")
        q = self.quantiles.shape[0] if self.quantiles.ndim == 1 else -1
        if q < 2 or self.quantile_levels.shape != (q,):
            problems.append(f"quantile_levels and quantiles must be two (Q,) arrays with Q >= 2, got "
                            f"{self.quantile_levels.shape} and {self.quantiles.shape}")
        if not problems:
            finite = all(np.isfinite(a).all() for a in (self.mean, self.components, self.variances, self.quantiles,
                                                        self.quantile_levels))
            if not finite or not np.isfinite(self.residual_variance):
                problems.append("it holds NaN or infinite values")
            elif (self.variances <= 0).any() or self.residual_variance <= 0:
                problems.append("variances must be positive")
            elif np.any(np.diff(self.quantile_levels) <= 0) or np.any(np.diff(self.quantiles) < 0):
                problems.append("quantile levels and quantiles must increase")
            elif self.quantile_levels[0] != 0.0 or self.quantile_levels[-1] != 1.0:
                problems.append("quantile levels must run from 0 to 1")
        if self.n_tiles < 2 or self.n_seen < self.n_tiles:
            problems.append(f"n_tiles={self.n_tiles}, n_seen={self.n_seen}: need 2 <= n_tiles <= n_seen")
        if problems:
            raise ModelError("invalid embedding reference: " + "; ".join(problems))

    # -- fitting ------------------------------------------------------------------------------
    @classmethod
    def fit(cls, features: np.ndarray | Iterable[np.ndarray], *, n_components: int = 32, max_tiles: int = 200_000,
            seed: int = 0, normalise: bool = True, encoder: str | None = None, encoder_sha256: str | None = None,
            source: str = "") -> "EmbeddingReference":
        """Summarise training tile embeddings.

        Parameters
        ----------
        features : array (N, D) or iterable of arrays (n_k, D)
            The tiles, whole or streamed in chunks (e.g. one bag per slide, from a generator, so
            hundreds of slides need not be in memory at once). Any float dtype; array-likes with
            ``shape`` and slicing (Zarr arrays) are read in chunks.
        n_components : int
            r, the principal components kept (capped at ``min(D, n_tiles) - 1``).
        max_tiles : int
            At most this many tiles are used: when the input holds more, a uniform random
            subsample (reservoir sampling over the stream, seeded; the same whatever the
            chunking) is taken. They are held as float32: ``max_tiles x D x 4`` bytes at most
            (200,000 x 1280 -> 1 GB), besides a ``(D, D)`` float64 scatter matrix.
        seed : int
            Seed of the subsample.
        normalise : bool
            Scale embeddings to unit length first (the default; see the module docstring).
        encoder, encoder_sha256, source : str, optional
            Provenance kept with the reference (the encoder's name and file hash; what the tiles are).

        Returns
        -------
        EmbeddingReference
            Its distance quantiles are in-sample: computed on the same (subsampled) tiles.

        Raises
        ------
        ConfigError
            Fewer than 2 tiles, chunks of different D, non-2-D or non-finite input, an all-zero
            embedding with ``normalise``, bad options.
        """
        if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)) or n_components < 1:
            raise ConfigError(f"n_components must be a positive integer, got {n_components!r}")
        if isinstance(max_tiles, bool) or not isinstance(max_tiles, (int, np.integer)) or max_tiles < 2:
            raise ConfigError(f"max_tiles must be an integer >= 2, got {max_tiles!r}")
        chunks = _chunks(features)
        if normalise:
            chunks = (_unit_rows(block) for block in chunks)
        sample = _Reservoir(int(max_tiles), np.random.default_rng(seed))
        for block in chunks:
            sample.add(block)
        n, d = len(sample), sample.dim
        if n < 2:
            raise ConfigError(f"an embedding reference needs at least 2 tiles, got {n}")
        if d < 2:
            raise ConfigError(f"an embedding reference needs embeddings of D >= 2, got D={d}")
        mean, scatter = _moments(sample)
        components, variances, residual, explained = _ppca(scatter / (n - 1), min(n_components, n - 1))
        ref = cls(mean, components, variances, residual, np.linspace(0.0, 1.0, N_QUANTILES), np.zeros(N_QUANTILES),
                  normalise=normalise, n_tiles=n, n_seen=sample.seen, encoder=encoder, encoder_sha256=encoder_sha256,
                  source=source, seed=seed, created=dt.date.today().isoformat())
        # calibrate with the float32 parameters that are stored, so a saved reference reproduces it
        distances = np.concatenate([ref.distance(block) for block in sample.blocks()])
        ref.quantiles = np.quantile(distances.astype(np.float64), ref.quantile_levels)
        logger.info("fitted %r: %d components explain %.1f %% of the variance; distance median %.3f, 99th pct %.3f",
                    ref, ref.n_components, 100 * explained, ref.threshold(0.5), ref.threshold(0.99))
        return ref

    # -- scoring ------------------------------------------------------------------------------
    def distance(self, features: Any) -> np.ndarray:
        """Each tile's distance from the reference (see the module docstring).

        Parameters
        ----------
        features : array-like, (N, D)
            Tile embeddings of this reference's encoder (any float dtype; read CHUNK_ROWS rows at a time).

        Returns
        -------
        np.ndarray
            ``(N,)`` float32, >= 0 and dimensionless; about 1 for a typical reference tile.
            Tiles with NaN or infinite values (or all zeros, with :attr:`normalise`) get ``inf``.

        Raises
        ------
        ConfigError
            ``features`` is not 2-D or its D differs from :attr:`dim`.
        """
        n = self._check_features(features)
        out = np.empty(n, dtype=np.float32)
        mean = self.mean.astype(np.float64)
        components = self.components.astype(np.float64)
        inv_var = 1.0 / self.variances
        for start in range(0, n, CHUNK_ROWS):
            with np.errstate(invalid="ignore", over="ignore"):
                u = np.asarray(features[start:start + CHUNK_ROWS], dtype=np.float64)
                if self.normalise:
                    u = u / np.sqrt(np.einsum("ij,ij->i", u, u))[:, None]
                c = u - mean
                z2 = np.square(c @ components.T)
                e2 = np.maximum(np.einsum("ij,ij->i", c, c) - z2.sum(axis=1), 0.0)
                dist = np.sqrt((z2 @ inv_var + e2 / self.residual_variance) / self.dim)
            dist[~np.isfinite(dist)] = np.inf
            out[start:start + len(c)] = dist
        return out

    def threshold(self, quantile: float = 0.99) -> float:
        """The distance below which ``quantile`` of the reference tiles lie (linear interpolation
        between the stored quantiles); ``quantile`` in [0, 1]."""
        q = float(quantile)
        if not 0.0 <= q <= 1.0:
            raise ConfigError(f"quantile must be in [0, 1], got {quantile!r}")
        return float(np.interp(q, self.quantile_levels, self.quantiles))

    def outlier_fraction(self, features: Any, quantile: float = 0.99) -> float:
        """Fraction of tiles whose distance exceeds :meth:`threshold` ``(quantile)``, in [0, 1].

        About ``1 - quantile`` for tiles like the reference ones; near 1 when the slide's tiles
        are unlike anything the head was trained on (other stain, organ, scanner, magnification,
        encoder, or no tissue at all).

        Raises
        ------
        ConfigError
            Empty ``features`` (N=0), wrong shape or D, or ``quantile`` outside [0, 1].
        """
        limit = self.threshold(quantile)
        distances = self.distance(features)
        if len(distances) == 0:
            raise ConfigError("features has 0 tiles (N=0); an empty slide has no outlier fraction")
        return float(np.mean(distances > limit))

    def _check_features(self, features: Any) -> int:
        if not hasattr(features, "shape") or not hasattr(features, "__getitem__"):
            features = np.asarray(features)
        shape = tuple(int(s) for s in features.shape)
        if len(shape) != 2:
            raise ConfigError(f"features must be a (N, D) array of tile embeddings, got shape {shape}")
        if shape[1] != self.dim:
            source = f"of encoder {self.encoder!r}" if self.encoder else "of the encoder it was fitted on"
            raise ConfigError(f"this embedding reference was fitted on D={self.dim} embeddings {source}; got D="
                              f"{shape[1]}. Compare embeddings of the same encoder")
        return shape[0]

    # -- files --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the reference to ``path`` (an ``.npz``, no pickles), atomically; returns the path."""
        path = Path(path).expanduser()
        arrays = {
            "format": np.array(REFERENCE_FORMAT), "format_version": np.array(REFERENCE_FORMAT_VERSION),
            "dim": np.array(self.dim), "n_tiles": np.array(self.n_tiles), "n_seen": np.array(self.n_seen),
            "encoder": np.array(self.encoder or ""), "encoder_sha256": np.array(self.encoder_sha256 or ""),
            "source": np.array(self.source), "seed": np.array(self.seed), "created": np.array(self.created),
            "normalise": np.array(self.normalise), "mean": self.mean, "components": self.components,
            "variances": self.variances, "residual_variance": np.array(self.residual_variance),
            "quantile_levels": self.quantile_levels, "quantiles": self.quantiles,
        }
        with atomic_write(path) as fh:
            np.savez(fh, **arrays)
        logger.info("wrote %r to '%s'", self, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "EmbeddingReference":
        """Read a reference written by :meth:`save`.

        Raises
        ------
        ModelError
            The file is missing, not a readable ``.npz``, of another format or a newer version,
            or its arrays are inconsistent.
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise ModelError(f"embedding reference '{path}' does not exist; write one with EmbeddingReference.fit(...)"
                             ".save(path) (train-mil writes reference.npz into the head folder)")
        try:
            with np.load(path, allow_pickle=False) as npz:
                data = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            raise ModelError(f"cannot read embedding reference '{path}': the file is damaged or not an .npz "
                             f"({type(exc).__name__}: {exc}); re-create it with EmbeddingReference.fit") from exc
        try:
            return cls._from_arrays(data, path)
        except (TypeError, ValueError, KeyError) as exc:
            raise ModelError(f"embedding reference '{path}' holds values of the wrong type: {exc}") from exc

    @classmethod
    def _from_arrays(cls, data: dict[str, np.ndarray], path: Path) -> "EmbeddingReference":
        fmt = str(data["format"]) if "format" in data else None
        if fmt != REFERENCE_FORMAT:
            raise ModelError(f"'{path}' is not an embedding reference (format {fmt!r}, expected {REFERENCE_FORMAT!r})")
        version = int(data["format_version"]) if "format_version" in data else -1
        if not 1 <= version <= REFERENCE_FORMAT_VERSION:
            raise ModelError(f"'{path}' has embedding-reference format_version {version}; this wsiengine reads "
                             f"versions 1 to {REFERENCE_FORMAT_VERSION}, upgrade wsiengine")
        missing = [k for k in (*_ARRAYS, "n_tiles") if k not in data]
        if missing:
            raise ModelError(f"embedding reference '{path}' lacks {missing}; re-create it with EmbeddingReference.fit")
        text = {k: str(data[k]) if k in data else "" for k in ("encoder", "encoder_sha256", "source", "created")}
        try:
            ref = cls(data["mean"], data["components"], data["variances"], float(data["residual_variance"]),
                      data["quantile_levels"], data["quantiles"], normalise=bool(data.get("normalise", True)),
                      n_tiles=int(data["n_tiles"]), n_seen=int(data["n_seen"]) if "n_seen" in data else None,
                      seed=int(data.get("seed", 0)), **text)
        except ModelError as exc:
            raise ModelError(f"'{path}': {exc}") from exc
        if "dim" in data and int(data["dim"]) != ref.dim:
            raise ModelError(f"'{path}' says D={int(data['dim'])} but its mean has {ref.dim} values")
        return ref


def _chunks(features: Any) -> Iterator[np.ndarray]:
    """``(n, D)`` float32 blocks of at most CHUNK_ROWS rows from an array or an iterable of arrays."""
    if hasattr(features, "shape") and hasattr(features, "__getitem__"):
        parts: Iterable[Any] = [features]
    elif isinstance(features, (str, bytes)) or not isinstance(features, Iterable):
        raise ConfigError(f"features must be an (N, D) array or an iterable of them, got {type(features).__name__}")
    else:
        parts = features
    dim = None
    for part in parts:
        if not hasattr(part, "shape") or not hasattr(part, "__getitem__"):
            part = np.asarray(part)
        shape = tuple(int(s) for s in part.shape)
        if len(shape) != 2:
            raise ConfigError(f"features must be (N, D) arrays of tile embeddings, got a chunk of shape {shape}")
        if dim is None:
            dim = shape[1]
        elif shape[1] != dim:
            raise ConfigError(f"feature chunks differ in D: {dim} and {shape[1]}; fit one encoder's embeddings")
        for start in range(0, shape[0], CHUNK_ROWS):
            block = np.asarray(part[start:start + CHUNK_ROWS])
            if block.dtype.kind not in "fiu":
                raise ConfigError(f"features must be numeric, got dtype {block.dtype}")
            block = block.astype(np.float32, copy=False)
            if not np.isfinite(block).all():
                raise ConfigError("features hold NaN or infinite values; drop those tiles before fitting a reference")
            yield block
    if dim is None:
        raise ConfigError("features is empty: no chunks to fit an embedding reference on")


def _ppca(covariance: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Probabilistic PCA of a ``(D, D)`` covariance (Tipping & Bishop 1999: the residual variance is
    the mean of the discarded eigenvalues).

    Returns ``components`` (r, D), their ``variances`` (r,), the ``residual`` variance and the
    fraction of the total variance the components explain; r = min(n_components, D - 1), and
    variances are floored at 1e-6 of the mean per-dimension variance (constant directions).
    """
    d = covariance.shape[0]
    eigval, eigvec = np.linalg.eigh(covariance)  # ascending
    eigval = np.clip(eigval[::-1], 0.0, None)
    r = int(min(n_components, d - 1))
    total = float(eigval.sum())
    floor = max(_VARIANCE_FLOOR * total / d, np.finfo(np.float64).tiny)
    variances = np.maximum(eigval[:r], floor)
    residual = max(float(eigval[r:].sum()) / (d - r), floor)
    explained = float(eigval[:r].sum()) / total if total > 0 else float("nan")
    return eigvec[:, ::-1][:, :r].T, variances, residual, explained


def _unit_rows(block: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); an all-zero row has no direction and is refused."""
    norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
    if (norms == 0).any():
        raise ConfigError(f"{int((norms == 0).sum())} embedding(s) are all zeros and have no direction; drop them, "
                          "or fit with normalise=False")
    return (block / norms[:, None]).astype(np.float32)


class _Reservoir:
    """A seeded uniform random subsample of at most ``capacity`` rows of a stream.

    Each row gets a uniform random key, drawn in stream order (so the keys, and the subsample,
    do not depend on how the stream is chunked); the ``capacity`` rows with the smallest keys
    are kept. Rows live in fixed-size float32 pages, so the sample grows without copying and
    holds at most ``capacity x D x 4`` bytes plus one page.
    """

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self.capacity, self.rng = int(capacity), rng
        self.pages: list[np.ndarray] = []
        self.page_rows = 0
        self.keys = np.empty(0)
        self.pos = np.empty(0, np.int64)
        self.seen = 0

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def dim(self) -> int:
        return int(self.pages[0].shape[1]) if self.pages else 0

    def add(self, block: np.ndarray) -> None:
        """Offer the ``(n, D)`` float32 rows of the stream's next chunk."""
        k = self.rng.random(len(block))
        p = np.arange(self.seen, self.seen + len(block), dtype=np.int64)
        self.seen += len(block)
        fill = min(self.capacity - len(self), len(block))
        if fill > 0:
            self._put(np.arange(len(self), len(self) + fill), block[:fill])
            self.keys, self.pos = np.concatenate([self.keys, k[:fill]]), np.concatenate([self.pos, p[:fill]])
            block, k, p = block[fill:], k[fill:], p[fill:]
        if not len(block):
            return
        take = k < self.keys.max()  # full: only smaller keys get in
        if not take.any():
            return
        block, k, p = block[take], k[take], p[take]
        keep = np.argpartition(np.concatenate([self.keys, k]), self.capacity - 1)[:self.capacity]
        free = np.setdiff1d(np.arange(self.capacity), keep[keep < self.capacity], assume_unique=True)
        incoming = keep[keep >= self.capacity] - self.capacity
        self._put(free, block[incoming])
        self.keys[free], self.pos[free] = k[incoming], p[incoming]

    def blocks(self) -> Iterator[np.ndarray]:
        """The sample's rows in stream order, CHUNK_ROWS at a time (float32 copies)."""
        order = np.argsort(self.pos, kind="stable")
        for start in range(0, len(order), CHUNK_ROWS):
            yield self._take(order[start:start + CHUNK_ROWS])

    def _put(self, slots: np.ndarray, rows: np.ndarray) -> None:
        if not self.pages:
            self.page_rows = max(256, (16 << 20) // (4 * rows.shape[1]))  # 16 MB pages
        page_of, row_of = np.divmod(slots, self.page_rows)
        for page in np.unique(page_of):
            while len(self.pages) <= page:
                self.pages.append(np.empty((self.page_rows, rows.shape[1]), np.float32))
            here = page_of == page
            self.pages[page][row_of[here]] = rows[here]

    def _take(self, slots: np.ndarray) -> np.ndarray:
        page_of, row_of = np.divmod(slots, self.page_rows)
        out = np.empty((len(slots), self.dim), np.float32)
        for page in np.unique(page_of):
            here = page_of == page
            out[here] = self.pages[page][row_of[here]]
        return out


def _moments(sample: _Reservoir) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and centred scatter ``(D, D)`` in float64 of the sample's rows, taken in
    stream order (so the rounding does not depend on the chunking), CHUNK_ROWS at a time."""
    total = np.zeros(sample.dim, dtype=np.float64)
    for block in sample.blocks():
        total += block.sum(axis=0, dtype=np.float64)
    mean = total / len(sample)
    scatter = np.zeros((sample.dim, sample.dim), dtype=np.float64)
    for block in sample.blocks():
        c = block.astype(np.float64) - mean
        scatter += c.T @ c
    return mean, scatter
