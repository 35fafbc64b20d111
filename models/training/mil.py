"""Attention-MIL heads in torch (train time): gated-attention ABMIL and CLAM-SB.

Both modules take one bag of tile embeddings ``(N, D)`` float32 and return the tuple
``(logit, attention, tile_scores)``:

``logit`` (1,)
    The slide's positive-class logit; ``sigmoid(logit)`` is its probability.
``attention`` (N,)
    Softmax over the bag's tiles (sums to 1).
``tile_scores`` (N,)
    A per-tile positive (tumour) probability in [0, 1].

Nothing in ``forward`` depends on N except through tensor shapes, so both export to ONNX with
a dynamic bag axis (:func:`wsiengine.models.training.mil_export.export_mil_onnx`), and no ``(N, N)``
tensor is ever formed (memory is linear in N).

References: Ilse, Tomczak & Welling, *Attention-based Deep Multiple Instance Learning*,
ICML 2018 (gated attention); Lu et al., *Data-efficient and weakly supervised computational
pathology on whole-slide images*, Nature BME 2021 (CLAM, single-branch variant).

This module imports torch; it is not imported by ``wsiengine.models.__init__``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GatedAttention", "ABMIL", "CLAMSB", "MILWithTileClassifier", "MILEnsemble", "smooth_top1_svm_loss", "build_mil", "MIL_MODELS"]


class GatedAttention(nn.Module):
    """Gated attention scores ``a_i = w^T (tanh(V h_i) * sigmoid(U h_i))`` (Ilse et al. 2018, eq. 9).

    Returns raw scores ``(N,)``; the caller applies the softmax over tiles.
    """

    def __init__(self, in_dim: int, attn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.V = nn.Linear(in_dim, attn_dim)
        self.U = nn.Linear(in_dim, attn_dim)
        self.w = nn.Linear(attn_dim, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gated = torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))
        return self.w(self.dropout(gated)).squeeze(-1)


def _embed(in_dim: int, hidden_dim: int, dropout: float, layers: int = 1) -> nn.Sequential:
    if layers < 1:
        raise ValueError(f"embed_layers must be at least 1, got {layers}")
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(in_dim if i == 0 else hidden_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*mods)


class ABMIL(nn.Module):
    """Gated-attention MIL (Ilse et al. 2018) with an optional per-tile tumour-score head.

    ``h = Dropout(ReLU(Linear(D -> H)(x)))``; ``attention = softmax(GatedAttention(h))`` over
    tiles; ``z = attention @ h``; ``logit = Linear(H -> 1)(z)``. With ``tile_head=True`` the tile
    score is ``sigmoid(Linear(H -> 1)(h))``, trained by :meth:`loss` with MIL pseudo-labels
    (negative bags' tiles negative, a positive bag's most attended tile positive); without it the tile score
    is the attention rescaled to [0, 1] by its maximum, a relative, not calibrated, value.

    Parameters
    ----------
    in_dim : int
        D, the tile embedding size.
    hidden_dim, attn_dim : int
        H and the attention network's width.
    dropout : float
        Dropout after the embedding layer and inside the attention network (training only).
    tile_head : bool
        Add the per-tile score head.
    embed_layers : int
        Linear+ReLU+Dropout layers before the attention (1 in the paper's embedding-based model).
    """

    name = "abmil"

    def __init__(self, in_dim: int, hidden_dim: int = 128, attn_dim: int = 128, dropout: float = 0.25,
                 tile_head: bool = True, embed_layers: int = 1) -> None:
        super().__init__()
        self.in_dim = int(in_dim)
        self.embed = _embed(in_dim, hidden_dim, dropout, embed_layers)
        self.attention = GatedAttention(hidden_dim, attn_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, 1)
        self.tile_head = nn.Linear(hidden_dim, 1) if tile_head else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(N, D)`` -> ``(logit (1,), attention (N,), tile_scores (N,))``."""
        h = self.embed(x)
        attention = torch.softmax(self.attention(h), dim=0)
        z = attention @ h
        logit = self.classifier(z).reshape(1)
        if self.tile_head is not None:
            tiles = torch.sigmoid(self.tile_head(h).squeeze(-1))
        else:
            tiles = attention / attention.max()
        return logit, attention, tiles

    def loss(self, x: torch.Tensor, label: torch.Tensor | int | float, *, tile_weight: float = 0.5
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Training loss for one bag and its 0/1 label: bag BCE plus ``tile_weight`` x a tile loss
        (when the tile head exists). The tile loss follows the MIL assumptions: every tile of a
        negative bag is negative (mean BCE against 0); in a positive bag the most attended tile
        (attention detached) is taken as positive (BCE against 1).

        Returns ``(loss, outputs)`` with ``outputs`` as from :meth:`forward`.
        """
        out = self(x)
        y = torch.as_tensor(label, dtype=out[0].dtype).reshape(1)
        loss = F.binary_cross_entropy_with_logits(out[0], y)
        if self.tile_head is not None and tile_weight > 0:
            scores = out[2].clamp(1e-6, 1 - 1e-6)
            if float(y) > 0.5:
                top = scores[torch.argmax(out[1].detach())].reshape(1)
                tile = F.binary_cross_entropy(top, torch.ones_like(top))
            else:
                tile = F.binary_cross_entropy(scores, torch.zeros_like(scores))
            loss = loss + tile_weight * tile
        return loss, out


def smooth_top1_svm_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, tau: float = 1.0
                         ) -> torch.Tensor:
    """Smooth top-1 multiclass SVM loss (Berrada et al. 2018), the instance loss CLAM uses.

    ``tau * logsumexp((s + alpha * [j != y]) / tau) - s_y``, averaged over rows. ``logits`` is
    ``(K, C)``, ``target`` ``(K,)`` integer classes.
    """
    margin = alpha * (1.0 - F.one_hot(target, logits.shape[1]).to(logits.dtype))
    return (tau * torch.logsumexp((logits + margin) / tau, dim=1) - logits.gather(1, target[:, None]).squeeze(1)).mean()


class CLAMSB(nn.Module):
    """CLAM single-branch (Lu et al. 2021) for a binary slide label.

    One gated attention branch pools ``h = Dropout(ReLU(Linear(D -> H)(x)))`` into a slide vector
    classified into 2 classes; ``logit`` is ``s_1 - s_0`` so ``sigmoid(logit)`` equals the
    2-class softmax probability of class 1. Each class c has an instance classifier
    ``Linear(H -> 2)``; during training (:meth:`loss`) the ``k_sample`` most attended tiles of a
    bag are pseudo-labelled positive and the ``k_sample`` least attended negative for the bag's
    class ("in the class"), and with ``subtyping=True`` the most attended tiles are also labelled
    negative for the other class ("out of the class"). The instance loss is the smooth top-1 SVM
    (``instance_loss="svm"``, CLAM's default) or cross-entropy (``"ce"``). The tile score is the
    positive-class instance classifier's probability that a tile is positive.

    Parameters are those of :class:`ABMIL` (without ``tile_head``) plus ``k_sample``,
    ``instance_loss``, ``subtyping`` and ``bag_weight`` as described above.
    """

    name = "clam_sb"

    def __init__(self, in_dim: int, hidden_dim: int = 128, attn_dim: int = 128, dropout: float = 0.25,
                 k_sample: int = 8, instance_loss: str = "svm", subtyping: bool = False,
                 bag_weight: float = 0.7, embed_layers: int = 1) -> None:
        super().__init__()
        if instance_loss not in ("svm", "ce"):
            raise ValueError(f"instance_loss must be 'svm' or 'ce', got {instance_loss!r}")
        self.in_dim = int(in_dim)
        self.k_sample = int(k_sample)
        self.instance_loss_name = instance_loss
        self.subtyping = bool(subtyping)
        self.bag_weight = float(bag_weight)
        self.embed = _embed(in_dim, hidden_dim, dropout, embed_layers)
        self.attention = GatedAttention(hidden_dim, attn_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, 2)
        self.instance_classifiers = nn.ModuleList([nn.Linear(hidden_dim, 2) for _ in range(2)])

    def _forward(self, x: torch.Tensor):
        h = self.embed(x)
        attention = torch.softmax(self.attention(h), dim=0)
        scores = self.classifier(attention @ h)
        logit = (scores[1] - scores[0]).reshape(1)
        tiles = torch.softmax(self.instance_classifiers[1](h), dim=-1)[:, 1]
        return (logit, attention, tiles), h, scores

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(N, D)`` -> ``(logit (1,), attention (N,), tile_scores (N,))``."""
        return self._forward(x)[0]

    def _instance_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.instance_loss_name == "svm":
            return smooth_top1_svm_loss(logits, target)
        return F.cross_entropy(logits, target)

    def instance_loss(self, h: torch.Tensor, attention: torch.Tensor, label: int) -> torch.Tensor:
        """CLAM's instance-clustering loss for one bag (``h`` ``(N, H)``, ``attention`` ``(N,)``)."""
        k = min(self.k_sample, h.shape[0] // 2)
        if k < 1:
            return h.new_zeros(())
        top = torch.topk(attention, k).indices
        bottom = torch.topk(-attention, k).indices
        losses = []
        for c, clf in enumerate(self.instance_classifiers):
            if c == label:  # in the class: top-k positive, bottom-k negative
                inputs = torch.cat([h[top], h[bottom]])
                target = torch.cat([torch.ones(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)])
            elif self.subtyping:  # out of the class: top-k negative
                inputs, target = h[top], torch.zeros(k, dtype=torch.long)
            else:
                continue
            losses.append(self._instance_loss(clf(inputs), target.to(h.device)))
        return torch.stack(losses).mean()

    def loss(self, x: torch.Tensor, label: torch.Tensor | int | float
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``bag_weight`` x bag cross-entropy + ``(1 - bag_weight)`` x instance loss, for one bag
        and its 0/1 label. Returns ``(loss, outputs)`` with ``outputs`` as from :meth:`forward`."""
        label = int(label)
        out, h, scores = self._forward(x)
        bag = F.cross_entropy(scores[None], torch.tensor([label], device=x.device))
        inst = self.instance_loss(h, out[1], label)
        return self.bag_weight * bag + (1.0 - self.bag_weight) * inst, out


MIL_MODELS = {"abmil": ABMIL, "clam_sb": CLAMSB}


def build_mil(name: str, in_dim: int, **kwargs) -> nn.Module:
    """Build a MIL head by name (``"abmil"`` or ``"clam_sb"``) for ``in_dim``-sized embeddings."""
    try:
        cls = MIL_MODELS[name.lower().replace("-", "_")]
    except KeyError:
        raise ValueError(f"unknown MIL model {name!r}; choose one of {sorted(MIL_MODELS)}") from None
    return cls(in_dim, **kwargs)


class MILWithTileClassifier(nn.Module):
    """A MIL head whose tile scores come from a separately trained, supervised tile classifier.

    The slide logit and attention are the MIL head's; the tile score is
    ``sigmoid(tile_classifier(x))`` on the raw tile embeddings ``x`` ``(N, D)``, e.g. a logistic
    regression fitted on tiles with known labels, so heatmaps show a calibrated tumour
    probability rather than relative attention.
    """

    def __init__(self, mil: nn.Module, tile_classifier: nn.Linear) -> None:
        super().__init__()
        if tile_classifier.out_features != 1 or tile_classifier.in_features != getattr(mil, "in_dim", tile_classifier.in_features):
            raise ValueError(f"the tile classifier must map D={getattr(mil, 'in_dim', '?')} -> 1, got "
                             f"{tile_classifier.in_features} -> {tile_classifier.out_features}")
        self.mil = mil
        self.tile_classifier = tile_classifier
        self.in_dim = int(tile_classifier.in_features)
        self.name = f"{getattr(mil, 'name', type(mil).__name__)}+tile"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(N, D)`` -> ``(logit (1,), attention (N,), tile_scores (N,))``."""
        logit, attention, _ = self.mil(x)
        return logit, attention, torch.sigmoid(self.tile_classifier(x).squeeze(-1))


class MILEnsemble(nn.Module):
    """The mean of several MIL heads trained on the same task (e.g. different seeds).

    The slide probability is the members' mean probability (returned as its logit), the
    attention their mean attention (still summing to 1) and the tile score their mean tile score.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        dims = {int(getattr(m, "in_dim", -1)) for m in members}
        if len(dims) != 1:
            raise ValueError(f"ensemble members take different embedding sizes {sorted(dims)}")
        self.members = nn.ModuleList(members)
        self.in_dim = dims.pop()
        self.name = f"{getattr(members[0], 'name', type(members[0]).__name__)}-ensemble{len(members)}"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(N, D)`` -> ``(logit (1,), attention (N,), tile_scores (N,))``."""
        outs = [m(x) for m in self.members]
        prob = torch.stack([torch.sigmoid(o[0]) for o in outs]).mean(0).clamp(1e-7, 1 - 1e-7)
        attention = torch.stack([o[1] for o in outs]).mean(0)
        tiles = torch.stack([o[2] for o in outs]).mean(0)
        return torch.log(prob) - torch.log1p(-prob), attention, tiles
