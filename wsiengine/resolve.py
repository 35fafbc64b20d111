"""The run configuration resolved against the models it names.

:class:`~wsiengine.config.RunConfig` knows the rule (explicit tiling, else the MIL head's, else
the encoder's, else the defaults); this module reads what the models say: the head's
``config.json`` and the encoder's spec, without starting ONNX Runtime sessions when the models
are not loaded (``wsiengine doctor`` and ``tiles``), or from the loaded models (``Pipeline``),
adding their hashes. Every command plans its grid from the same resolved configuration.
"""

from __future__ import annotations

from .aggregate import MILHead, head_tiling, read_head_config
from .config import ModelTiling, RunConfig
from .encode import Encoder, spec_tiling

__all__ = ["model_tilings", "resolve_config"]


def model_tilings(config: RunConfig, *, encoder: Encoder | None = None, mil: MILHead | None = None
                  ) -> tuple[ModelTiling | None, ModelTiling]:
    """The tilings of the MIL head (None without one) and the encoder that ``config`` names, or
    of the loaded ``encoder`` / ``mil`` when given. Reads only small metadata files."""
    if mil is not None:
        head = mil.tiling
    elif config.mil.mil is not None:
        _, head_config = read_head_config(config.mil.mil)
        head = head_tiling(head_config.get("name") or config.mil.mil, head_config)
    else:
        head = None
    if encoder is not None:
        enc = encoder.tiling
    else:
        spec, _ = Encoder.locate(config.encoder.encoder, config.encoder.encoder_weights)
        enc = spec_tiling(spec)
    return head, enc


def resolve_config(config: RunConfig, *, encoder: Encoder | None = None, mil: MILHead | None = None) -> RunConfig:
    """``config`` with its paths made absolute (:meth:`RunConfig.with_absolute_paths`), its tiling
    resolved (:meth:`RunConfig.resolve_tiling`) and, when the models are loaded, their identities
    (:meth:`RunConfig.with_models`): the configuration a run uses, records in its stores and
    resumes by."""
    config = config.with_absolute_paths()
    head, enc = model_tilings(config, encoder=encoder, mil=mil)
    resolved = config.resolve_tiling(head, enc)
    if encoder is not None:
        resolved = resolved.with_models(
            encoder_sha256=encoder.describe()["sha256"],
            mil_sha256=mil.config.get("sha256") if mil is not None else None,
            slide_threshold=mil.threshold if mil is not None else None)
    return resolved
