"""CONCH's vision tower (CoCa style), with the key names of CONCH's ``visual`` module.

CONCH (Lu et al. 2024, Nature Medicine) is a CoCa model. Its image side is
``conch.open_clip_custom.vision_tower.VisualModel``:

``trunk``
    a timm ``VisionTransformer`` ViT-B/16 at 448 px (no LayerScale, GELU MLP, class token) run
    up to its final norm (``forward_features``): 1 + 28 x 28 tokens of 768;
``attn_pool_contrast``
    an attentional pooler: one learned ``query`` (512) attends over the layer-normed tokens
    (``ln_k`` on 768, ``ln_q`` on 512) through ``nn.MultiheadAttention(512, 8, kdim=768,
    vdim=768)`` (keys ``attn.q_proj_weight``, ``attn.k_proj_weight``, ``attn.v_proj_weight``,
    ``attn.in_proj_bias``, ``attn.out_proj.*``);
``ln_contrast``
    LayerNorm on the pooled 512-vector;
``proj_contrast``
    a 512 x 512 matrix into the joint image-text space (``encode_image(proj_contrast=True)``).

CONCH's checkpoint stores these under ``visual.`` beside the text tower; the caption pooler
(``attn_pool_caption``, ``ln_caption``) is not needed for embeddings and is dropped on load.
With ``proj_contrast=False`` the tower returns the pooled, normed vector before the projection,
which is what CONCH's README recommends for linear probes and MIL
(``encode_image(..., proj_contrast=False, normalize=False)``); both are 512-d.
"""

from __future__ import annotations

import torch
from torch import nn

from .vit import VisionTransformer

__all__ = ["ConchVisionTower", "AttentionalPooler"]


class AttentionalPooler(nn.Module):
    """Learned queries cross-attending to the trunk's tokens (open_clip's ``AttentionalPooler``)."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, context_dim)`` tokens -> ``(B, n_queries, d_model)``."""
        x = self.ln_k(x).permute(1, 0, 2)  # (N, B, C): the module is sequence-first
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, x.shape[1], -1)
        out = self.attn(q, x, x, need_weights=False)[0]
        return out.permute(1, 0, 2)


class ConchVisionTower(nn.Module):
    """CONCH's image encoder: ``(B, 3, 448, 448)`` -> ``(B, proj_dim)``.

    Parameters
    ----------
    img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio :
        The trunk ViT (CONCH: 448, 16, 768, 12, 12, 4).
    proj_dim : int
        Size of the contrastive embedding (CONCH: 512).
    attn_pooler_heads : int
        Heads of the attentional pooler (CONCH: 8).
    proj_contrast : bool
        Apply ``proj_contrast`` (the joint image-text space) or stop after ``ln_contrast``.
    """

    def __init__(self, *, img_size: int = 448, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, proj_dim: int = 512, attn_pooler_heads: int = 8,
                 proj_contrast: bool = True) -> None:
        super().__init__()
        self.trunk = VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                       num_heads=num_heads, mlp_ratio=mlp_ratio, pooling="cls")
        self.attn_pool_contrast = AttentionalPooler(proj_dim, embed_dim, n_head=attn_pooler_heads, n_queries=1)
        self.ln_contrast = nn.LayerNorm(proj_dim)
        self.proj_contrast = nn.Parameter(embed_dim ** -0.5 * torch.randn(proj_dim, proj_dim))
        self.apply_proj_contrast = proj_contrast
        self.num_features = proj_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> CONCH image embeddings (not L2-normalised)."""
        tokens = self.trunk.forward_features(x)
        pooled = self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])
        return pooled @ self.proj_contrast if self.apply_proj_contrast else pooled
