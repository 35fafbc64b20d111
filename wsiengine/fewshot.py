"""Few-shot tile classification on encoder embeddings: kNN or class prototypes.

A :class:`FewShotClassifier` is built from a handful of labelled tile embeddings (k per class)
and labels new tiles by cosine similarity, the embedding-space version of the kNN in-context
example selection of the seed paper. It also hands back, per class, the labelled tiles most
similar to a query, ready to be shown to a VLM as in-context examples.

>>> clf = FewShotClassifier(support_feats, ["normal"] * 5 + ["tumour"] * 5, method="knn")
>>> clf.predict(tile_feats)                    # (N,) labels, the support labels' dtype
>>> clf.predict_proba(tile_feats)              # (N, C), columns in clf.classes_ order
>>> ex = clf.select_examples(tile_feats[0], k=3)
>>> ex["tumour"].indices, ex["tumour"].similarities     # (3,) rows of the support set, best first
>>> clf = FewShotClassifier.from_tiles(Encoder.load("default"), patches, labels)   # uint8 patches

Everything is numpy. Similarities are computed in chunks of query rows, so memory stays bounded
(about 50 MB at most beyond the inputs and the (N, C) outputs) whatever the number of queries.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .encode import Encoder

__all__ = ["FewShotClassifier", "Examples"]

logger = logging.getLogger("wsiengine")

METHODS = ("knn", "prototype")
VOTES = ("similarity", "uniform")
# Upper bound on the elements of one chunk's (rows, max(M, D)) work arrays: 1 Mi elements, i.e. 4 MB
# per float32 and 8 MB per float64 temporary; a kNN chunk peaks at about 50 MB.
_CHUNK_ELEMENTS = 1 << 20


class Examples(NamedTuple):
    """The labelled tiles of one class most similar to a query, best first.

    ``indices`` are rows of the support set as passed to :class:`FewShotClassifier` (``(k,)``
    for one query, ``(N, k)`` for N queries); ``similarities`` are the matching cosine
    similarities (float32, in [-1, 1]), non-increasing along the last axis.
    """

    indices: np.ndarray
    similarities: np.ndarray


class FewShotClassifier:
    """Few-shot tile classifier over L2-normalised embeddings, by kNN or nearest class prototype.

    Construct it from the support set (the labelled tiles); there is no separate ``fit`` step.

    Parameters
    ----------
    embeddings : array (M, D)
        Embeddings of the labelled tiles (any float dtype); each row is L2-normalised here.
    labels : array-like (M,)
        Their labels, ints or strings. ``classes_`` holds the distinct labels, sorted, unless
        ``classes`` gives the order.
    method : "knn" or "prototype"
        ``"knn"``: the ``k_neighbors`` most cosine-similar support tiles vote.
        ``"prototype"``: each class is the renormalised mean of its normalised embeddings, and a
        tile takes the class of the most similar prototype.
    k_neighbors : int, optional
        Neighbours that vote (kNN only). Default: the size of the smallest class, at most 5
        (so 1-NN with one example per class).
    vote : "similarity" or "uniform"
        kNN vote weights: ``exp(similarity / temperature)`` per neighbour, or one vote each.
    temperature : float
        Softmax temperature on cosine similarities (unitless, > 0). ``predict_proba`` for
        prototypes is ``softmax(similarity / temperature)`` over the classes; for kNN it scales
        the similarity-weighted votes. Default 0.05. It never changes prototype predictions.
    classes : sequence, optional
        The class list and column order of ``predict_proba``. Every class needs at least one
        example and every label must be listed.
    chunk_size : int, optional
        Query rows per similarity chunk (default: so that one chunk's work arrays hold at
        most ~1 M elements, ~50 MB of temporaries).

    Attributes
    ----------
    classes_ : ndarray (C,)
    support_ : ndarray (M, D) float32, the normalised support embeddings.
    support_labels_ : ndarray (M,) int, index into ``classes_`` per support row.
    prototypes_ : ndarray (C, D) float32, the normalised class means.
    counts_ : ndarray (C,) int, examples per class.

    Raises
    ------
    ConfigError
        Empty support set, embeddings that are not 2-D, finite and non-zero, labels of the wrong
        length, fewer than two classes, a listed class with no example, a label not listed, an
        unknown method or vote, ``k_neighbors`` outside 1..M, a temperature <= 0.
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        labels: Sequence[Any] | np.ndarray,
        *,
        method: str = "knn",
        k_neighbors: int | None = None,
        vote: str = "similarity",
        temperature: float = 0.05,
        classes: Sequence[Any] | None = None,
        chunk_size: int | None = None,
    ) -> None:
        if method not in METHODS:
            raise ConfigError(f"method={method!r} is not known; use one of {METHODS}")
        if vote not in VOTES:
            raise ConfigError(f"vote={vote!r} is not known; use one of {VOTES}")
        if not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"temperature={temperature!r} must be a finite number > 0 (e.g. 0.05)")
        if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
            raise ConfigError(f"chunk_size={chunk_size!r} must be a positive integer or None")

        emb = np.asarray(embeddings)
        if emb.ndim != 2:
            raise ConfigError(f"support embeddings must be (M, D), got shape {emb.shape}")
        if emb.shape[0] == 0:
            raise ConfigError("the support set is empty: give at least one labelled tile embedding per class")
        if emb.shape[1] == 0:
            raise ConfigError("support embeddings have dimension 0")
        if not np.issubdtype(emb.dtype, np.number) or np.issubdtype(emb.dtype, np.complexfloating):
            raise ConfigError(f"support embeddings must be real numbers, got dtype {emb.dtype}")
        emb = emb.astype(np.float32, copy=False)
        if not np.all(np.isfinite(emb)):
            bad = np.flatnonzero(~np.all(np.isfinite(emb), axis=1))
            raise ConfigError(f"support embeddings hold NaN or inf in rows {bad[:10].tolist()}; re-embed those tiles")
        norms = np.linalg.norm(emb, axis=1)
        if np.any(norms == 0):
            raise ConfigError(
                f"support embeddings rows {np.flatnonzero(norms == 0)[:10].tolist()} are all zeros and cannot be "
                "L2-normalised; drop those tiles"
            )

        lab = np.asarray(labels)
        if lab.ndim != 1 or lab.shape[0] != emb.shape[0]:
            raise ConfigError(f"labels must be 1-D with one label per embedding row ({emb.shape[0]}), got shape {lab.shape}")
        if classes is None:
            cls = np.unique(lab)
        else:
            cls = np.asarray(list(classes))
            if cls.ndim != 1 or len(cls) == 0:
                raise ConfigError(f"classes must be a non-empty list of labels, got {classes!r}")
            if len(np.unique(cls)) != len(cls):
                raise ConfigError(f"classes lists a label twice: {cls.tolist()}")
            unknown = sorted({str(x) for x in np.setdiff1d(lab, cls)})
            if unknown:
                raise ConfigError(f"labels {unknown} are not among classes {cls.tolist()}; add them or drop those tiles")
        codes = np.searchsorted(cls, lab) if classes is None else _codes(lab, cls)
        counts = np.bincount(codes, minlength=len(cls))
        empty = [cls[i].item() for i in np.flatnonzero(counts == 0)]
        if empty:
            raise ConfigError(f"classes {empty} have no labelled example; give at least one tile per class")
        if len(cls) < 2:
            raise ConfigError(f"need at least two classes to classify, got only {cls.tolist()}")

        m = emb.shape[0]
        if k_neighbors is None:
            k_neighbors = int(min(5, counts.min()))
        if isinstance(k_neighbors, bool) or int(k_neighbors) != k_neighbors or not 1 <= k_neighbors <= m:
            raise ConfigError(f"k_neighbors={k_neighbors!r} must be an integer in 1..{m} (the support set size)")

        self.method = method
        self.vote = vote
        self.k_neighbors = int(k_neighbors)
        self.temperature = float(temperature)
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.classes_ = cls
        self.support_ = np.ascontiguousarray(emb / norms[:, None], dtype=np.float32)
        self.support_labels_ = codes.astype(np.int64)
        self.counts_ = counts.astype(np.int64)
        self._onehot = np.eye(len(cls), dtype=np.float64)[self.support_labels_]  # (M, C) for kNN votes
        sums = np.zeros((len(cls), emb.shape[1]), np.float64)
        np.add.at(sums, self.support_labels_, self.support_)
        proto_norms = np.linalg.norm(sums, axis=1)
        # A class whose normalised examples cancel exactly has no direction; keep it at zero
        # (similarity 0 to everything) rather than dividing by zero.
        self.prototypes_ = np.where(proto_norms[:, None] > 0, sums / np.maximum(proto_norms, 1e-30)[:, None], 0.0).astype(np.float32)

    # -- construction from pixels -----------------------------------------------------------
    @classmethod
    def from_tiles(
        cls,
        encoder: "Encoder",
        images: np.ndarray | Sequence[np.ndarray],
        labels: Sequence[Any] | np.ndarray,
        *,
        batch_size: int = 64,
        **options: Any,
    ) -> "FewShotClassifier":
        """Embed ``(M, H, W, 3)`` uint8 RGB patches with ``encoder`` and build a classifier from them.

        Patches are embedded ``batch_size`` at a time with :meth:`Encoder.embed` (which resizes
        them to the encoder's input size); ``options`` go to the constructor (``method``,
        ``k_neighbors``, ...).
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be >= 1")
        if len(images) == 0:
            raise ConfigError("the support set is empty: give at least one labelled tile per class")
        feats = [
            encoder.embed(np.stack([np.asarray(im) for im in images[i : i + batch_size]]))
            for i in range(0, len(images), batch_size)
        ]
        return cls(np.concatenate(feats), labels, **options)

    # -- properties ---------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return int(self.support_.shape[1])

    @property
    def n_classes(self) -> int:
        return int(len(self.classes_))

    def __len__(self) -> int:
        return int(self.support_.shape[0])

    def __repr__(self) -> str:
        extra = f", k_neighbors={self.k_neighbors}, vote={self.vote!r}" if self.method == "knn" else ""
        return (
            f"<FewShotClassifier {self.method}{extra}: {len(self)} tiles of {self.dim}-d, "
            f"classes {dict(zip(self.classes_.tolist(), self.counts_.tolist()))}>"
        )

    # -- inference ----------------------------------------------------------------------------
    def predict_proba(self, query: np.ndarray) -> np.ndarray:
        """Class probabilities ``(N, C)`` float64 for ``(N, D)`` (or ``(D,)`` -> ``(C,)``) query embeddings.

        Columns follow ``classes_``. Prototypes: ``softmax(cos(query, prototype) / temperature)``.
        kNN: the vote fractions of the ``k_neighbors`` most similar support tiles (uniform votes,
        or weights ``exp(similarity / temperature)``). Rows sum to 1.
        """
        q, single = self._check_query(query)
        out = np.empty((q.shape[0], self.n_classes), np.float64)
        for start, stop, sims in self._chunks(q, self.prototypes_ if self.method == "prototype" else self.support_):
            out[start:stop] = self._proba_from_sims(sims)
        return out[0] if single else out

    def predict(self, query: np.ndarray) -> np.ndarray:
        """Labels for ``(N, D)`` query embeddings -> ``(N,)`` (or ``(D,)`` -> a 0-d array).

        The label is the most probable class of :meth:`predict_proba`; an exact tie goes to the
        class listed first in ``classes_``.
        """
        proba = self.predict_proba(query)
        return self.classes_[np.argmax(proba, axis=-1)]

    def similarities(self, query: np.ndarray) -> np.ndarray:
        """Cosine similarities ``(N, M)`` of queries to every support tile (float32).

        Builds the full matrix: for many queries prefer :meth:`predict` or :meth:`select_examples`,
        which work in chunks.
        """
        q, single = self._check_query(query)
        out = np.empty((q.shape[0], len(self)), np.float32)
        for start, stop, sims in self._chunks(q, self.support_):
            out[start:stop] = sims
        return out[0] if single else out

    def select_examples(self, query: np.ndarray, k: int) -> dict[Any, Examples]:
        """The ``k`` labelled tiles of each class most similar to each query (for VLM prompts).

        Parameters
        ----------
        query : array (D,) or (N, D)
            Query embedding(s); normalised here.
        k : int
            Examples per class, 1..(the smallest class's example count).

        Returns
        -------
        dict
            ``{class: Examples(indices, similarities)}`` in ``classes_`` order. ``indices`` index the
            support set as passed in (shape ``(k,)`` for one query, ``(N, k)`` for N); they are
            ordered by decreasing cosine similarity, ties by increasing index.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"k={k!r} must be a positive integer")
        short = {c.item(): int(n) for c, n in zip(self.classes_, self.counts_) if n < k}
        if short:
            raise ConfigError(
                f"k={k} examples per class were asked for but classes {short} have fewer labelled tiles; "
                f"use k <= {int(self.counts_.min())}"
            )
        q, single = self._check_query(query)
        n = q.shape[0]
        members = [np.flatnonzero(self.support_labels_ == c) for c in range(self.n_classes)]
        idx = [np.empty((n, k), np.int64) for _ in members]
        sim = [np.empty((n, k), np.float32) for _ in members]
        for start, stop, sims in self._chunks(q, self.support_):
            for c, rows in enumerate(members):
                s = sims[:, rows]
                # stable sort on -similarity: ties keep the lower support index first
                order = np.argsort(-s, axis=1, kind="stable")[:, :k]
                idx[c][start:stop] = rows[order]
                sim[c][start:stop] = np.take_along_axis(s, order, axis=1)
        result = {}
        for c, label in enumerate(self.classes_):
            i, s = (idx[c][0], sim[c][0]) if single else (idx[c], sim[c])
            result[label.item()] = Examples(i, s)
        return result

    # -- internals ----------------------------------------------------------------------------
    def _check_query(self, query: np.ndarray) -> tuple[np.ndarray, bool]:
        q = np.asarray(query)
        single = q.ndim == 1
        if single:
            q = q[None]
        if q.ndim != 2:
            raise ConfigError(f"query embeddings must be (D,) or (N, D), got shape {np.shape(query)}")
        if q.shape[1] != self.dim:
            raise ConfigError(
                f"query embeddings are {q.shape[1]}-d but the support set is {self.dim}-d; "
                "embed queries and labelled tiles with the same encoder"
            )
        if not np.issubdtype(q.dtype, np.number) or np.issubdtype(q.dtype, np.complexfloating):
            raise ConfigError(f"query embeddings must be real numbers, got dtype {q.dtype}")
        return q, single

    def _rows_per_chunk(self, width: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        return max(1, _CHUNK_ELEMENTS // max(width, self.dim, 1))

    def _chunks(self, q: np.ndarray, reference: np.ndarray):
        """Yield ``(start, stop, cos(q[start:stop], reference))`` over bounded row chunks."""
        rows = self._rows_per_chunk(reference.shape[0])
        for start in range(0, q.shape[0], rows):
            stop = min(start + rows, q.shape[0])
            block = q[start:stop].astype(np.float32)  # a copy, never the caller's array
            if not np.all(np.isfinite(block)):
                bad = start + np.flatnonzero(~np.all(np.isfinite(block), axis=1))
                raise ConfigError(f"query embeddings hold NaN or inf in rows {bad[:10].tolist()}")
            norms = np.linalg.norm(block, axis=1, keepdims=True)
            block /= np.maximum(norms, 1e-12)  # an all-zero query stays zero: similarity 0 to all
            yield start, stop, block @ reference.T

    def _proba_from_sims(self, sims: np.ndarray) -> np.ndarray:
        t = self.temperature
        if self.method == "prototype":
            z = sims.astype(np.float64) / t
            z -= z.max(axis=1, keepdims=True)
            e = np.exp(z)
            return e / e.sum(axis=1, keepdims=True)
        # kNN: exactly k_neighbors support tiles per query vote. Everything above the k-th
        # largest similarity is in; among tiles equal to it, the lowest support indices fill the
        # remaining places, so exact ties resolve deterministically. O(M) per query row.
        k, m = self.k_neighbors, sims.shape[1]
        if k < m:
            kth = np.partition(sims, m - k, axis=1)[:, m - k : m - k + 1]
            above = sims > kth
            equal = sims == kth
            need = k - above.sum(axis=1, keepdims=True)
            chosen = above | (equal & (np.cumsum(equal, axis=1, dtype=np.int32) <= need))
        else:
            chosen = np.ones(sims.shape, bool)
        if self.vote == "uniform":
            w = chosen.astype(np.float64)
        else:
            s = sims.astype(np.float64)
            w = np.where(chosen, np.exp((s - s.max(axis=1, keepdims=True)) / t), 0.0)
        votes = w @ self._onehot
        return votes / votes.sum(axis=1, keepdims=True)

def _codes(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Index of each label in ``classes`` (all labels known to be present)."""
    order = np.argsort(classes, kind="stable")
    pos = np.searchsorted(classes[order], labels)
    return order[pos]
