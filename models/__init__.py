"""wsiengine.models: encoder specs and registry (no torch), and, with the ``[train]`` extra,
the torch architectures, weight loading and ONNX export used to make runtime models."""

from .registry import ENCODERS, get_encoder_spec, list_encoders, register_encoder
from .specs import EncoderSpec

__all__ = ["EncoderSpec", "ENCODERS", "get_encoder_spec", "list_encoders", "register_encoder"]
