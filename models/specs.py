"""Encoder specs: one frozen dataclass per foundation encoder, in the manner of timm's
pretrained configs.

A spec says everything needed to use an encoder correctly, and nothing is documented only in
prose: the architecture builder, the input size and resize policy, the normalisation, the
embedding size and how it is pooled, the resolution (µm/px) and patch size the model was
trained at, the licence, and where weights come from. Weights are always local files: the
engine never downloads anything at run time.

This module imports no torch: the runtime (ONNX Runtime) reads specs too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["EncoderSpec", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ResizePolicy = Literal["resize", "center-crop"]
Pooling = Literal["avg", "cls", "cls+mean", "mean"]


@dataclass(frozen=True)
class EncoderSpec:
    """How to build, feed and read one patch encoder.

    Attributes
    ----------
    name : str
        Registry name (``"default"``, ``"uni"``, ...).
    architecture : str
        Builder key in :mod:`wsiengine.models.training.build` (torch, for export only).
    input_px : int
        Side of the square image the network takes, pixels.
    resize : {"resize", "center-crop"}
        How a patch of another size becomes ``input_px``: area/bilinear resize of the whole
        patch, or resize of the short side then centre crop (as many model cards do).
    mean, std : tuple of 3 floats
        Per-channel normalisation of RGB in [0, 1].
    embed_dim : int
        Length of the embedding vector.
    pooling : {"avg", "cls", "cls+mean", "mean"}
        How the embedding is read off the network (global average pool, class token, class
        token concatenated with the mean patch token, mean patch token).
    target_mpp : float
        Resolution the model was trained at, µm/px.
    patch_px : int
        Patch side the model was trained on, pixels at ``target_mpp``.
    licence : str
        Licence of the weights (SPDX id or the model's own terms).
    source : str
        Where the weights come from (a local path for shipped weights; otherwise where the
        user obtains them before passing ``weights=PATH``).
    onnx_file : str or None
        Shipped ONNX file, relative to the ``wsiengine.models`` package, if any.
    onnx_int8_file : str or None
        Shipped statically quantised (int8 QDQ) copy of ``onnx_file``, if any (``precision="int8"``).
    builder_kwargs : dict
        Architecture options passed to the builder.
    notes : str
        One line on what the encoder is and is not.
    """

    name: str
    architecture: str
    input_px: int
    embed_dim: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: ResizePolicy = "resize"
    pooling: Pooling = "avg"
    target_mpp: float = 0.5
    patch_px: int = 224
    licence: str = "unknown"
    source: str = ""
    onnx_file: str | None = None
    onnx_int8_file: str | None = None
    builder_kwargs: dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (for provenance in result stores)."""
        from dataclasses import asdict

        return asdict(self)
