"""wsiengine.models: what the runtime loads, without torch: encoder specs and their registry
(:mod:`.specs`, :mod:`.registry`), the shipped ONNX weights (``weights/``) and their model cards
(``cards/``). Training and export code (torch, the ``[train]`` extra) lives in
:mod:`wsiengine.models.training`, which nothing here imports."""

from .registry import ENCODERS, get_encoder_spec, list_encoders, register_encoder
from .specs import EncoderSpec

__all__ = ["EncoderSpec", "ENCODERS", "get_encoder_spec", "list_encoders", "register_encoder"]
