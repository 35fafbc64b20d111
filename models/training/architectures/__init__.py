"""Encoder architectures in plain torch, with state-dict key names identical to the projects the
weights come from (timm's VisionTransformer and SwinTransformer, torchvision's ResNet, CONCH's
CoCa vision tower, efficientnet_pytorch's EfficientNet-Lite0), so published checkpoints load
with ``strict=True``.

Used at export time only (``wsiengine.models.training.build`` / ``wsiengine.models.training.export``); the engine
runs the exported ONNX graphs and never imports torch. Each architecture lives in its own module
and is imported on first use, so one missing or broken module never hides the others.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["VisionTransformer", "ResNet50Trunc", "SwinTransformerCTransPath", "ConchVisionTower", "EfficientNetLite0", "LymphNodeLite0"]

_WHERE = {
    "VisionTransformer": "vit",
    "ResNet50Trunc": "resnet",
    "SwinTransformerCTransPath": "swin",
    "ConchVisionTower": "conch",
    "EfficientNetLite0": "efficientnet_lite",
    "LymphNodeLite0": "efficientnet_lite",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
