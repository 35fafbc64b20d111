"""The run configuration resolved against the models it names.

:class:`~wsiengine.config.RunConfig` knows the rule (explicit tiling, else the MIL head's, else
the encoder's, else the defaults); this module reads what the models say: the head's
``config.json`` and the encoder's spec and file, from the loaded models (``Pipeline``) or,
without starting ONNX Runtime sessions, from their files (``wsiengine doctor``, ``tiles``,
``config show``). Either way the result, and so the resume key, is the same.
"""

from __future__ import annotations

import hashlib
import json

from .aggregate import MILHead, TileCalibration, head_tiling, read_head_config
from .config import RunConfig
from .encode import Encoder, spec_tiling
from .hashing import sha256_file
from .models import EncoderSpec

__all__ = ["resolve_config", "spec_sha256"]


def spec_sha256(spec: EncoderSpec) -> str:
    """A hash of an encoder spec (input size, normalisation, embedding size, ...)."""
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


def resolve_config(config: RunConfig, *, encoder: Encoder | None = None, mil: MILHead | None = None) -> RunConfig:
    """``config`` with its paths made absolute (:meth:`RunConfig.with_absolute_paths`), its tiling
    resolved (:meth:`RunConfig.resolve_tiling`), the head's deposit rules taken where no setting
    gives them (:meth:`RunConfig.resolve_deposit_rules`) and the models' identities filled in
    (:meth:`RunConfig.with_models`): the configuration a run uses, records in its stores and
    resumes by. The loaded ``encoder`` / ``mil`` are used when given, else the files ``config`` names."""
    config = config.with_absolute_paths()
    if encoder is not None:
        spec, encoder_sha = encoder.spec, encoder.describe()["sha256"]
    else:
        spec, path = Encoder.locate(config.encoder.encoder, config.encoder.encoder_weights,
                                    precision=config.encoder.precision)
        encoder_sha = sha256_file(path)
    if mil is not None:
        head, head_config = mil.tiling, mil.config
    elif config.mil.mil is not None:
        _, head_config = read_head_config(config.mil.mil)
        head = head_tiling(head_config.get("name") or config.mil.mil, head_config)
    else:
        head, head_config = None, None
    resolved = config.resolve_tiling(head, spec_tiling(spec)).resolve_deposit_rules(
        head_config.get("deposit_rules") if head_config is not None else None)
    return resolved.with_models(
        encoder_sha256=encoder_sha, encoder_spec_sha256=spec_sha256(spec),
        mil_sha256=head_config.get("sha256") if head_config is not None else None,
        slide_threshold=float(head_config["threshold"]) if head_config is not None else None,
        tile_calibration=_calibration_text(head_config))


def _calibration_text(head_config: dict | None) -> str | None:
    """The head's tile calibration as the run configuration records it (None without one)."""
    if head_config is None:
        return None
    calibration = TileCalibration.parse(head_config.get("tile_calibration"))
    return calibration.describe() if calibration is not None else None
