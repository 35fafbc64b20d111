"""CTransPath: a Swin-T with a convolutional stem, with the state-dict keys of its checkpoint.

CTransPath (Wang et al. 2022, Medical Image Analysis) was trained with the authors' patched
timm 0.5.4, whose ``SwinTransformer`` takes an ``embed_layer``; they pass ``ConvStem`` (two 3x3
stride-2 convolutions with BatchNorm and ReLU, then a 1x1 convolution, then LayerNorm) instead of
the 4x4 patchify convolution, and replace the head with an identity. The published
``ctranspath.pth`` stores that model's ``state_dict()`` under ``"model"``. Key names here are
timm 0.5.4's:

``patch_embed.proj.{0,1,3,4,6}``, ``patch_embed.norm``,
``layers.S.blocks.B.{norm1, attn.relative_position_bias_table, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}``, ``layers.S.downsample.{norm, reduction}`` for stages 0-2 (patch merging at
the *end* of a stage, as timm < 0.9 laid it out), and ``norm``.

The checkpoint also holds the buffers ``attn.relative_position_index`` and ``attn_mask``; they are
deterministic functions of the window layout, so this module computes them (non-persistent) and
:mod:`wsiengine.models.training.build` checks the checkpoint's copies against them before dropping them.
The embedding is the final-norm tokens averaged: 768 features for Swin-T.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SwinTransformerCTransPath", "ConvStem"]


def _normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Normal init clipped to [-2, 2], which is what timm's ``trunc_normal_(std=0.02)`` (absolute
    bounds -2, 2) amounts to, at a fraction of its cost on giant models."""
    return tensor.normal_(0.0, std).clamp_(-2.0, 2.0)


class ConvStem(nn.Module):
    """CTransPath's stem: ``(B, 3, H, W)`` -> ``(B, H/4 * W/4, embed_dim)`` tokens."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 96, patch_size: int = 4) -> None:
        super().__init__()
        if patch_size != 4 or embed_dim % 8:
            raise ValueError("ConvStem needs patch_size 4 and an embed_dim divisible by 8")
        stem: list[nn.Module] = []
        cin, cout = in_chans, embed_dim // 8
        for _ in range(2):
            stem += [nn.Conv2d(cin, cout, kernel_size=3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                     nn.ReLU(inplace=True)]
            cin, cout = cout, cout * 2
        stem.append(nn.Conv2d(cin, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*stem)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B * nW, ws * ws, C)`` non-overlapping windows."""
    _, h, w, c = x.shape
    x = x.reshape(-1, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """``(B * nW, ws * ws, C)`` -> ``(B, H, W, C)``."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def relative_position_index(ws: int) -> torch.Tensor:
    """Index into the ``(2ws-1)^2`` relative-position bias table for each pair of window cells."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[:, :, 0] * (2 * ws - 1) + rel[:, :, 1]


def shifted_window_mask(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """``(nW, ws*ws, ws*ws)`` additive mask (0 or -100) keeping shifted windows from mixing regions."""
    img = torch.zeros(1, h, w, 1)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    windows = window_partition(img, ws).squeeze(-1)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class WindowAttention(nn.Module):
    """Windowed multi-head self-attention with a learned relative-position bias."""

    def __init__(self, dim: int, ws: int, num_heads: int) -> None:
        super().__init__()
        self.ws = ws
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(ws), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        attn = attn + bias.reshape(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.reshape(-1, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.reshape(-1, self.num_heads, n, n)
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """(Shifted-)window attention block on a fixed ``resolution`` token grid."""

    def __init__(self, dim: int, resolution: tuple[int, int], num_heads: int, ws: int, shift: int,
                 mlp_ratio: float) -> None:
        super().__init__()
        if min(resolution) <= ws:  # the window covers the whole grid: no shifting (as timm does)
            ws, shift = min(resolution), 0
        self.resolution = resolution
        self.ws = ws
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, ws, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        mask = shifted_window_mask(*resolution, ws, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.resolution
        c = x.shape[-1]
        y = self.norm1(x).reshape(-1, h, w, c)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(y, self.ws), self.attn_mask)
        y = window_reverse(y, self.ws, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(-1, h * w, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens concatenated (4C), normalised, projected to 2C."""

    def __init__(self, dim: int, resolution: tuple[int, int]) -> None:
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.resolution
        c = x.shape[-1]
        x = x.reshape(-1, h, w, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(-1, (h // 2) * (w // 2), 4 * c)))


class SwinStage(nn.Module):
    def __init__(self, dim: int, resolution: tuple[int, int], depth: int, num_heads: int, ws: int,
                 mlp_ratio: float, downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinBlock(dim, resolution, num_heads, ws, 0 if i % 2 == 0 else ws // 2, mlp_ratio) for i in range(depth)
        ])
        self.downsample = PatchMerging(dim, resolution) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class SwinTransformerCTransPath(nn.Module):
    """Swin Transformer with CTransPath's conv stem: ``(B, 3, img, img)`` -> ``(B, 8 * embed_dim)``.

    Parameters
    ----------
    img_size : int
        Input side in pixels; fixed (the window masks are laid out for it). 224 for CTransPath.
    patch_size, embed_dim, depths, num_heads, window_size, mlp_ratio : Swin shape (timm's names).
    """

    def __init__(self, *, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96,
                 depths: tuple[int, ...] = (2, 2, 6, 2), num_heads: tuple[int, ...] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError("depths and num_heads must have one entry per stage")
        grid = img_size // patch_size
        if img_size % patch_size or grid % (2 ** (len(depths) - 1)):
            raise ValueError(f"img_size {img_size} does not divide into {len(depths)} Swin stages of patch {patch_size}")
        self.img_size = img_size
        self.patch_embed = ConvStem(in_chans, embed_dim, patch_size)
        stages = []
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            res = (grid // 2 ** i, grid // 2 ** i)
            stages.append(SwinStage(embed_dim * 2 ** i, res, depth, heads, window_size, mlp_ratio,
                                    downsample=i < len(depths) - 1))
        self.layers = nn.Sequential(*stages)
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's initialisation: truncated normal (std 0.02) for linear layers and bias tables."""
        for name, param in self.named_parameters():
            if name.endswith("relative_position_bias_table"):
                _normal_(param, 0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                _normal_(module.weight, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final-norm tokens ``(B, (img/32)^2, num_features)``."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"CTransPath takes {self.img_size}x{self.img_size} inputs, got {tuple(x.shape[-2:])}")
        return self.norm(self.layers(self.patch_embed(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> average-pooled final tokens ``(B, num_features)``."""
        return self.forward_features(x).mean(dim=1)

