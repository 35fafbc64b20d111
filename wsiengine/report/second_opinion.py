"""Few-shot second opinion: a small labelled tile bank labels the evidence tiles.

A :class:`TileBank` holds embeddings of labelled tiles (a few per class, made with the same
encoder as the slide). The :class:`~wsiengine.fewshot.FewShotClassifier` built from it labels the
report's evidence tiles, and the agreement with the MIL head's tile scores is reported. It is an
independent look at the same tiles, not a vote on the slide call.

>>> bank = TileBank.from_folder("bank/", Encoder.load("default"))   # bank/tumor/*.png, bank/normal/*.png
>>> bank.save("bank.npz"); bank = TileBank.load("bank.npz")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, ReportError

if TYPE_CHECKING:  # pragma: no cover
    from ..encode import Encoder

__all__ = ["TileBank", "second_opinion", "POSITIVE_NAMES"]

#: Class names read as the positive (tumour) class of a bank.
POSITIVE_NAMES = frozenset({"tumour", "tumor", "metastasis", "metastatic", "positive", "cancer", "carcinoma",
                            "lesion", "1", "true"})
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_FORMAT = "wsiengine.tile_bank"


@dataclass(frozen=True, eq=False)
class TileBank:
    """Labelled tile embeddings.

    Attributes
    ----------
    embeddings : (M, D) float32
    labels : (M,) str
    source : str
        Where the bank came from (a path), shown in reports.
    encoder_sha256 : str or None
        The encoder that made the embeddings; a report refuses a bank from another encoder.
    """

    embeddings: np.ndarray
    labels: np.ndarray
    source: str = ""
    encoder_sha256: str | None = None

    def __post_init__(self) -> None:
        e = np.asarray(self.embeddings)
        if e.ndim != 2 or len(e) != len(self.labels) or len(e) == 0:
            raise ConfigError(f"a tile bank needs (M, D) embeddings and M labels, got {e.shape} and {len(self.labels)}")

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str], encoder: "Encoder", *, batch_size: int = 64) -> "TileBank":
        """Embed a folder of class subfolders of tile images (``folder/tumor/*.png``,
        ``folder/normal/*.png``) with ``encoder``, which resizes them to its input as it does slide
        tiles. The images should show tissue at the slide tiles' resolution (µm/px)."""
        from PIL import Image

        root = Path(folder)
        classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")) if root.is_dir() else []
        files = [(f, d.name) for d in classes for f in sorted(d.iterdir()) if f.suffix.lower() in _IMAGE_SUFFIXES]
        if len({label for _, label in files}) < 2:
            raise ConfigError(f"tile bank folder '{root}' needs at least two class subfolders with images "
                              f"({', '.join(_IMAGE_SUFFIXES)}), e.g. tumor/ and normal/")
        chunks = []
        for start in range(0, len(files), batch_size):
            batch = []
            for f, _ in files[start:start + batch_size]:
                with Image.open(f) as im:
                    batch.append(np.asarray(im.convert("RGB")))
            if len({b.shape for b in batch}) == 1:
                chunks.append(encoder.embed(np.stack(batch)))
            else:  # mixed sizes: the encoder resizes each as it resizes slide tiles
                chunks += [encoder.embed(b[None]) for b in batch]
        return cls(np.concatenate(chunks).astype(np.float32), np.array([label for _, label in files]),
                   source=str(root), encoder_sha256=encoder.describe().get("sha256"))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the bank as ``.npz`` (atomically)."""
        from ..atomic import atomic_write

        final = Path(path)
        with atomic_write(final) as fh:
            np.savez(fh, format=_FORMAT, embeddings=self.embeddings.astype(np.float32),
                     labels=self.labels.astype(str), source=self.source, encoder_sha256=self.encoder_sha256 or "")
        return final

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "TileBank":
        """Read a bank written by :meth:`save` (or any ``.npz`` with ``embeddings`` and ``labels``)."""
        p = Path(path)
        try:
            with np.load(p, allow_pickle=False) as data:
                embeddings, labels = data["embeddings"], data["labels"].astype(str)
                sha = str(data["encoder_sha256"]) if "encoder_sha256" in data else ""
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"cannot read tile bank '{p}': {exc}. It must be an .npz with 'embeddings' (M, D) and "
                              "'labels' (M,)") from exc
        return cls(embeddings.astype(np.float32), labels, source=str(p), encoder_sha256=sha or None)

    @classmethod
    def open(cls, path: str | os.PathLike[str], encoder: "Encoder | None" = None) -> "TileBank":
        """A bank from an ``.npz`` file, or from a folder of images (needs ``encoder``)."""
        p = Path(path)
        if p.is_dir():
            if encoder is None:
                raise ConfigError(f"tile bank folder '{p}' has images; an encoder is needed to embed them")
            return cls.from_folder(p, encoder)
        if not p.exists():
            raise ConfigError(f"tile bank '{p}' does not exist; give an .npz file or a folder of class subfolders")
        return cls.load(p)

    def positive_label(self, extra_names: Sequence[str] = ()) -> str:
        """The bank's tumour class: the one label named like ``tumor``/``metastasis``/``1``
        (or one of ``extra_names``)."""
        names = POSITIVE_NAMES | {n.lower() for n in extra_names}
        found = sorted({str(lbl) for lbl in self.labels if str(lbl).lower() in names})
        if len(found) != 1:
            raise ConfigError(f"tile bank classes {sorted(set(self.labels.tolist()))}: cannot tell which one is tumour "
                              f"(found {found or 'none'}); name it e.g. 'tumor' or 'metastasis'")
        return found[0]


def second_opinion(bank: TileBank, features: np.ndarray, tile_scores: np.ndarray | None, *,
                   tile_threshold: float, ranks: Sequence[int], encoder_sha256: str | None = None,
                   positive_names: Sequence[str] = (), method: str = "knn") -> dict[str, Any]:
    """Label evidence tiles with a few-shot classifier on ``bank`` and compare with the MIL tiles.

    Parameters
    ----------
    bank : TileBank
    features : (K, D) array
        The evidence tiles' embeddings.
    tile_scores : (K,) array or None
        Their MIL tile scores; a tile is MIL-tumour when its score >= ``tile_threshold``.
    ranks : sequence of int
        The evidence ranks (1-based) of the K tiles.
    encoder_sha256 : str, optional
        The slide's encoder; a bank made by another encoder is refused.

    Returns
    -------
    dict
        ``method``, ``bank``, ``n_bank``, ``classes``, ``tiles`` (rank, few-shot label and
        tumour probability, MIL label, agree), ``n_agree``, ``agreement`` (fraction, null with
        no MIL scores).
    """
    from ..fewshot import FewShotClassifier

    if bank.encoder_sha256 and encoder_sha256 and bank.encoder_sha256 != encoder_sha256:
        raise ReportError(f"tile bank '{bank.source}' was embedded by another encoder (sha256 "
                          f"{bank.encoder_sha256[:12]}...) than this slide ({encoder_sha256[:12]}...); rebuild it")
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or features.shape[1] != bank.dim:
        raise ReportError(f"tile bank '{bank.source}' has D={bank.dim} embeddings but the slide's are "
                          f"{features.shape[1:]}; build the bank with the slide's encoder")
    positive = bank.positive_label(positive_names)
    clf = FewShotClassifier(bank.embeddings, bank.labels, method=method)
    proba = clf.predict_proba(features) if len(features) else np.zeros((0, clf.n_classes))
    col = int(np.flatnonzero(clf.classes_.astype(str) == positive)[0])
    tiles, n_agree = [], 0
    for i, rank in enumerate(ranks):
        p = float(proba[i, col])
        few = "tumour" if p >= 0.5 else "normal"
        mil = None if tile_scores is None else ("tumour" if tile_scores[i] >= tile_threshold else "normal")
        agree = mil is not None and mil == few
        n_agree += int(agree)
        tiles.append({"rank": int(rank), "fewshot_label": few, "fewshot_probability": round(p, 4),
                      "mil_label": mil, "agree": bool(agree)})
    return {"method": method, "bank": Path(bank.source).name if bank.source else "", "n_bank": int(len(bank.labels)),
            "classes": [str(c) for c in clf.classes_], "positive_class": positive, "tiles": tiles,
            "n_agree": n_agree,
            "agreement": round(n_agree / len(tiles), 4) if tiles and tile_scores is not None else None}
