"""One configurable Vision Transformer whose state-dict keys are timm's.

It covers the ViT encoders in the registry: UNI (ViT-L/16), UNI2-h (ViT-H/14, 8 registers,
SwiGLU), Virchow2 (ViT-H/14, 4 registers, SwiGLU), H-optimus-0 (ViT-g/14, 4 registers,
SwiGLU), Prov-GigaPath (ViT-g/16, SwiGLU), Phikon-v2 (ViT-L/16, loaded from the Hugging Face
Dinov2 layout by :mod:`wsiengine.models.training.build`) and CONCH's trunk (ViT-B/16).

Key names follow ``timm.models.vision_transformer.VisionTransformer``: ``cls_token``,
``reg_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.{norm1, attn.qkv, attn.proj,
ls1.gamma, norm2, mlp.*, ls2.gamma}``, ``norm``. MLP variants and their keys:

``"mlp"``
    timm ``Mlp``: ``fc1`` (dim -> hidden), GELU, ``fc2``.
``"swiglu_packed"``
    timm ``SwiGLUPacked`` (a ``GluMlp`` with SiLU, gate first): ``fc1`` (dim -> hidden) whose
    output is split in two halves ``a, b``; ``silu(a) * b``; ``fc2`` (hidden / 2 -> dim). This is
    what DINOv2-style giant models use (``mlp_ratio`` 5.33334 gives hidden 8192 -> 4096).
``"swiglu"``
    timm ``SwiGLU``: ``fc1_g`` and ``fc1_x`` (dim -> hidden each), ``silu(g) * x``, ``fc2``.

``hidden = int(embed_dim * mlp_ratio)`` as in timm. Token order is ``[cls, registers...,
patches...]``; with ``no_embed_class`` the position embedding covers the patches only
(added before the prefix tokens are concatenated), otherwise it covers every token.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["VisionTransformer", "resample_abs_pos_embed", "POOLINGS", "MLP_KINDS"]


def _normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Normal init clipped to [-2, 2], which is what timm's ``trunc_normal_(std=0.02)`` (absolute
    bounds -2, 2) amounts to, at a fraction of its cost on giant models."""
    return tensor.normal_(0.0, std).clamp_(-2.0, 2.0)

MLP_KINDS = ("mlp", "swiglu_packed", "swiglu")
POOLINGS = ("cls", "cls+mean", "mean", "avg")


def _activation(name: str) -> nn.Module:
    name = name.lower()
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name in ("silu", "swish"):
        return nn.SiLU()
    raise ValueError(f"unknown activation {name!r}; use 'gelu', 'gelu_tanh' or 'silu'")


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, as a strided convolution (``patch_embed.proj``)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # (B, D, H / p, W / p)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm ``Attention``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    """Per-channel residual scale (``gamma``), as in timm and DINOv2."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """Two-layer MLP (``fc1``, activation, ``fc2``)."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = _activation(act)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUPacked(nn.Module):
    """Gated MLP with one packed input projection: ``fc2(act(a) * b)``, ``a, b = fc1(x).chunk(2)``."""

    def __init__(self, dim: int, hidden: int, act: str = "silu") -> None:
        super().__init__()
        if hidden % 2:
            raise ValueError(f"swiglu_packed needs an even hidden size, got {hidden}")
        self.fc1 = nn.Linear(dim, hidden)
        self.act = _activation(act)
        self.fc2 = nn.Linear(hidden // 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(self.act(a) * b)


class SwiGLU(nn.Module):
    """Gated MLP with separate gate and value projections: ``fc2(act(fc1_g(x)) * fc1_x(x))``."""

    def __init__(self, dim: int, hidden: int, act: str = "silu") -> None:
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden)
        self.fc1_x = nn.Linear(dim, hidden)
        self.act = _activation(act)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1_g(x)) * self.fc1_x(x))


_MLPS = {"mlp": Mlp, "swiglu_packed": SwiGLUPacked, "swiglu": SwiGLU}


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``."""

    def __init__(self, dim: int, num_heads: int, hidden: int, *, mlp: str, act: str, qkv_bias: bool,
                 init_values: float | None, norm_eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = _MLPS[mlp](dim, hidden, act)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def resample_abs_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int],
                           num_prefix_tokens: int = 0, *, mode: str = "bicubic", antialias: bool = True) -> torch.Tensor:
    """Resize a learned ``(1, prefix + H*W, D)`` position embedding to another patch grid.

    The prefix (class/register) entries are kept; the patch part is interpolated as an image
    (bicubic with antialiasing, as timm's ``resample_abs_pos_embed`` does by default).
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    dtype = grid.dtype
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode=mode, antialias=antialias, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(dtype)
    return torch.cat([prefix, grid], dim=1) if num_prefix_tokens else grid


class VisionTransformer(nn.Module):
    """A timm-compatible ViT that returns one embedding per image.

    Parameters
    ----------
    img_size : int
        Input side in pixels the position embedding is laid out for (``img_size // patch_size``
        patches per side).
    patch_size, embed_dim, depth, num_heads, mlp_ratio : ViT shape (timm's names).
    mlp : {"mlp", "swiglu_packed", "swiglu"}
        MLP variant (see the module docstring for their keys).
    act : str, optional
        MLP activation; GELU for ``"mlp"``, SiLU for the gated variants unless given.
    reg_tokens : int
        Number of register tokens (``reg_token``), placed after the class token.
    class_token : bool
        Whether there is a class token (``cls_token``).
    no_embed_class : bool
        Position embedding covers the patch tokens only (DeiT-3 / DINOv2-with-registers style).
    init_values : float or None
        LayerScale initial value; ``None`` or 0 means no LayerScale (no ``ls*.gamma`` keys).
    dynamic_img_size : bool
        Accept inputs of another size by resampling the position embedding (bicubic), as timm's
        ``dynamic_img_size=True``; otherwise the input must be ``img_size``.
    pooling : {"cls", "cls+mean", "mean", "avg"}
        What :meth:`forward` returns after the final norm: the class token; the class token
        concatenated with the mean patch token (registers excluded), ``2 * embed_dim``; or the
        mean patch token (``"mean"`` and ``"avg"`` are the same here).
    norm_eps : float
        LayerNorm epsilon (timm ViTs use 1e-6).
    """

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 mlp: Literal["mlp", "swiglu_packed", "swiglu"] = "mlp", act: str | None = None,
                 reg_tokens: int = 0, class_token: bool = True, no_embed_class: bool = False,
                 init_values: float | None = None, dynamic_img_size: bool = True,
                 pooling: Literal["cls", "cls+mean", "mean", "avg"] = "cls", norm_eps: float = 1e-6) -> None:
        super().__init__()
        if mlp not in _MLPS:
            raise ValueError(f"unknown mlp {mlp!r}; use one of {', '.join(MLP_KINDS)}")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
        if pooling in ("cls", "cls+mean") and not class_token:
            raise ValueError(f"pooling {pooling!r} needs a class token")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        act = act or ("gelu" if mlp == "mlp" else "silu")
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.pooling = pooling
        self.dynamic_img_size = dynamic_img_size
        self.no_embed_class = no_embed_class
        self.num_reg_tokens = reg_tokens
        self.has_class_token = class_token
        self.num_prefix_tokens = int(class_token) + reg_tokens
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_features = 2 * embed_dim if pooling == "cls+mean" else embed_dim

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        num_patches = self.grid_size[0] * self.grid_size[1]
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, embed_dim))
        hidden = int(embed_dim * mlp_ratio)
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, hidden, mlp=mlp, act=act, qkv_bias=qkv_bias, init_values=init_values,
                  norm_eps=norm_eps)
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's default initialisation: (truncated) normal, std 0.02, for linear layers and the
        position embedding, tiny normal for the class/register tokens."""
        _normal_(self.pos_embed, 0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                _normal_(module.weight, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        b, d, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        pos_embed = self.pos_embed
        if (gh, gw) != self.grid_size:
            if not self.dynamic_img_size:
                raise ValueError(f"input grid {gh}x{gw} patches does not match the model's {self.grid_size}; "
                                 f"feed {self.img_size}x{self.img_size} images or build with dynamic_img_size=True")
            prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            pos_embed = resample_abs_pos_embed(pos_embed, (gh, gw), self.grid_size, prefix)
        prefix_tokens = []
        if self.cls_token is not None:
            prefix_tokens.append(self.cls_token.expand(b, -1, -1))
        if self.reg_token is not None:
            prefix_tokens.append(self.reg_token.expand(b, -1, -1))
        if self.no_embed_class:
            x = x + pos_embed
            return torch.cat(prefix_tokens + [x], dim=1) if prefix_tokens else x
        if prefix_tokens:
            x = torch.cat(prefix_tokens + [x], dim=1)
        return x + pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm, ``(B, prefix + patches, embed_dim)``."""
        x = self._pos_embed(self.patch_embed(x))
        x = self.blocks(x)
        return self.norm(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Read the embedding off the tokens according to ``pooling``."""
        if self.pooling == "cls":
            return tokens[:, 0]
        patches = tokens[:, self.num_prefix_tokens:].mean(dim=1)
        if self.pooling == "cls+mean":
            return torch.cat([tokens[:, 0], patches], dim=-1)
        return patches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images ``(B, 3, H, W)`` -> embeddings ``(B, num_features)``."""
        return self.pool(self.forward_features(x))

