"""wsiengine.models.training: everything torch (the ``[train]`` extra, ``pip install 'wsiengine[train]'``).

Encoder architectures (:mod:`.architectures`), their checkpoint loading (:mod:`.build`) and
verified ONNX export (:mod:`.export`, :mod:`.make_default_onnx`); attention-MIL heads
(:mod:`.mil`), their data, metrics, training and export (:mod:`.mil_data`, :mod:`.mil_metrics`,
:mod:`.mil_train`, :mod:`.mil_export`) and the script that trains the shipped head
(:mod:`.train_default_mil`).

The runtime (``import wsiengine``, ``Encoder.load``, ``MILHead.load``, ``Pipeline``) never
imports this package: it runs the exported ONNX graphs. Only the ``train-mil`` and
``export-encoder`` commands (:mod:`wsiengine.train_cli`) import it, when they run. The import-linter
contracts in ``pyproject.toml`` check both.

The names below are what the command line uses; each is imported on first access, so
``import wsiengine.models.training.mil_data`` (no torch) works without torch installed, and
``from wsiengine.models.training import train_mil_from_stores`` raises ``ImportError`` naming
the missing package when the extra is absent.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["train_mil_from_stores", "export_encoder_onnx", "default_checkpoint_path"]

_WHERE = {
    "train_mil_from_stores": "mil_train",
    "export_encoder_onnx": "export",
    "default_checkpoint_path": "architectures.efficientnet_lite",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
