"""Build an encoder in torch from its spec, optionally loading a local checkpoint.

``build_encoder(spec, weights=None)`` returns an eval-mode ``torch.nn.Module`` whose forward takes
normalised float images ``(B, 3, H, W)`` (``H = W = spec.input_px``) and returns
``(B, spec.embed_dim)`` embeddings. It is used to export ONNX models
(:mod:`wsiengine.models.training.export`) and in tests; inference runs the exported graph and needs no
torch.

Checkpoints are always local files: ``.pth``/``.bin``/``.pt`` (read with
``torch.load(weights_only=True)``, so no pickled code runs) or ``.safetensors`` (with the
``safetensors`` package). Wrappers are unwrapped (``{"model": ...}``, ``{"state_dict": ...}``),
common prefixes stripped (``module.``, ``model.``, ``trunk.`` ...), and each architecture adapts
its own published layout (CONCH's ``visual.`` tower, Hugging Face Dinov2 names for Phikon-v2,
torchvision's ``layer4``/``fc`` for the truncated ResNet, CTransPath's stored index buffers).
Loading is strict by default: any missing, unexpected or mis-shaped key raises a
:class:`CheckpointError` that names them.

With ``weights=None`` the weights are random but reproducible (seed 0), for tests.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import ModelError
from ..registry import get_encoder_spec
from ..specs import EncoderSpec

__all__ = [
    "BUILDERS",
    "CHECKPOINT_ADAPTERS",
    "CheckpointError",
    "WeightsNotFoundError",
    "build_encoder",
    "load_encoder_weights",
    "read_checkpoint",
    "hf_dinov2_to_timm",
]

logger = logging.getLogger("wsiengine")

StateDict = dict[str, torch.Tensor]


class CheckpointError(ModelError, ValueError):
    """A checkpoint cannot be read or does not match the architecture (the message lists the keys)."""


class WeightsNotFoundError(ModelError, FileNotFoundError):
    """The weights path does not exist or is not a file."""


# --------------------------------------------------------------------------------------------
# builders: spec -> randomly initialised module
# --------------------------------------------------------------------------------------------

#: builder_kwargs that steer loading, not the architecture.
_LOAD_OPTIONS = ("checkpoint_layout",)


def _arch_kwargs(spec: EncoderSpec) -> dict[str, Any]:
    return {k: v for k, v in spec.builder_kwargs.items() if k not in _LOAD_OPTIONS}


def _build_vit(spec: EncoderSpec) -> nn.Module:
    from .architectures.vit import VisionTransformer

    kwargs = _arch_kwargs(spec)
    kwargs.setdefault("img_size", spec.input_px)
    kwargs.setdefault("pooling", spec.pooling)
    return VisionTransformer(**kwargs)


def _build_resnet50_trunc(spec: EncoderSpec) -> nn.Module:
    from .architectures.resnet import ResNet50Trunc

    return ResNet50Trunc(**_arch_kwargs(spec))


def _build_swin_ctranspath(spec: EncoderSpec) -> nn.Module:
    from .architectures.swin import SwinTransformerCTransPath

    kwargs = _arch_kwargs(spec)
    kwargs.setdefault("img_size", spec.input_px)
    return SwinTransformerCTransPath(**kwargs)


def _build_conch_vision(spec: EncoderSpec) -> nn.Module:
    from .architectures.conch import ConchVisionTower

    kwargs = _arch_kwargs(spec)
    kwargs.setdefault("img_size", spec.input_px)
    return ConchVisionTower(**kwargs)


def _build_efficientnet_lite0(spec: EncoderSpec) -> nn.Module:
    from .architectures.efficientnet_lite import EfficientNetLite0  # written separately; imported on use

    kwargs = _arch_kwargs(spec)
    kwargs.setdefault("image_px", spec.input_px)
    return EfficientNetLite0(**kwargs)


#: architecture key (``EncoderSpec.architecture``) -> builder (spec -> randomly initialised module).
BUILDERS: dict[str, Callable[[EncoderSpec], nn.Module]] = {
    "vit": _build_vit,
    "resnet50_trunc": _build_resnet50_trunc,
    "swin_ctranspath": _build_swin_ctranspath,
    "conch_vision": _build_conch_vision,
    "efficientnet_lite0": _build_efficientnet_lite0,
}


# --------------------------------------------------------------------------------------------
# reading checkpoints
# --------------------------------------------------------------------------------------------

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "teacher", "student")
_STRIP_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "trunk.", "encoder_model.")


def read_checkpoint(path: str | os.PathLike[str]) -> StateDict:
    """The tensors of a local checkpoint file, unwrapped to a flat ``{name: tensor}`` dict.

    ``.safetensors`` files need the ``safetensors`` package; everything else goes through
    ``torch.load(..., weights_only=True)`` on the CPU.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsNotFoundError(f"weights file '{path}' does not exist; pass the path of a local checkpoint "
                                   "(.pth, .bin or .safetensors) you have downloaded under the model's licence")
    if not path.is_file():
        raise WeightsNotFoundError(f"weights path '{path}' is not a file; pass the checkpoint file itself")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(f"'{path.name}' is a safetensors file: pip install safetensors to read it") from None
        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - report any reader failure the same way
            raise CheckpointError(f"cannot read '{path}' as safetensors: {exc}") from exc
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(
                f"cannot read '{path}' as a torch checkpoint with weights_only=True ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); it must be a state dict of tensors "
                "(convert other formats, or a pickled full model, to a state dict first)"
            ) from exc
    return _unwrap(obj, path)


def _unwrap(obj: Any, path: Path) -> StateDict:
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:  # a state dict with a few non-tensor extras (e.g. an "epoch" counter)
                return tensors
            break
        obj = inner
    raise CheckpointError(f"'{path}' holds no state dict of tensors (top-level type {type(obj).__name__}"
                          + (f", keys {list(obj)[:8]}" if isinstance(obj, Mapping) else "") + ")")


def _strip_common_prefixes(state: StateDict, expected: Iterable[str]) -> StateDict:
    """Remove wrapper prefixes that every key carries (``module.``, ``model.``, ``trunk.`` ...),
    unless the model's own keys carry them too."""
    expected = set(expected)
    changed = True
    while changed and state:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in state) and not all(k.startswith(prefix) for k in expected):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


# --------------------------------------------------------------------------------------------
# per-architecture checkpoint adapters: published layout -> this package's keys
# --------------------------------------------------------------------------------------------

def hf_dinov2_to_timm(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Map a Hugging Face ``Dinov2Model`` state dict onto timm ``VisionTransformer`` names.

    ``embeddings.*`` -> ``cls_token``, ``pos_embed``, ``patch_embed.proj.*``; per layer the
    separate ``query``/``key``/``value`` projections are stacked into ``attn.qkv`` (q, k, v order,
    as timm splits it), ``attention.output.dense`` -> ``attn.proj``, ``layer_scale{1,2}.lambda1``
    -> ``ls{1,2}.gamma``, ``mlp.fc{1,2}`` (or the SwiGLU ``mlp.weights_in/out``) -> ``mlp.fc{1,2}``;
    the final ``layernorm`` -> ``norm``. ``mask_token`` (used only in training) and any
    classifier head are dropped.
    """
    src = dict(state)
    if any(k.startswith("dinov2.") for k in src):
        src = {k[len("dinov2."):]: v for k, v in src.items() if k.startswith("dinov2.")}
    out: StateDict = {}
    simple = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.register_tokens": "reg_token",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    layer_rules = [
        (r"norm1\.(weight|bias)", r"norm1.\1"),
        (r"norm2\.(weight|bias)", r"norm2.\1"),
        (r"attention\.output\.dense\.(weight|bias)", r"attn.proj.\1"),
        (r"layer_scale1\.lambda1", "ls1.gamma"),
        (r"layer_scale2\.lambda1", "ls2.gamma"),
        (r"mlp\.fc1\.(weight|bias)", r"mlp.fc1.\1"),
        (r"mlp\.fc2\.(weight|bias)", r"mlp.fc2.\1"),
        (r"mlp\.weights_in\.(weight|bias)", r"mlp.fc1.\1"),
        (r"mlp\.weights_out\.(weight|bias)", r"mlp.fc2.\1"),
    ]
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in src.items():
        if key in simple:
            out[simple[key]] = value
            continue
        if key == "embeddings.mask_token" or key.startswith(("classifier.", "pooler.")):
            continue
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", key)
        if m is None:
            out[key] = value  # left as is: reported as unexpected if the model has no such key
            continue
        idx, rest = m.groups()
        a = re.fullmatch(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)
        if a is not None:
            qkv.setdefault((idx, a.group(2)), {})[a.group(1)] = value
            continue
        for pattern, replacement in layer_rules:
            if re.fullmatch(pattern, rest):
                out[f"blocks.{idx}.{re.sub(pattern, replacement, rest)}"] = value
                break
        else:
            out[f"blocks.{idx}.{rest}"] = value
    for (idx, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise CheckpointError(f"layer {idx} of the Dinov2 checkpoint lacks attention {kind} parts: has {sorted(parts)}")
        out[f"blocks.{idx}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def _resample_vit_pos_embed(state: StateDict, vit: nn.Module, key: str = "pos_embed") -> StateDict:
    from .architectures.vit import resample_abs_pos_embed

    if key not in state or not hasattr(vit, "pos_embed"):
        return state
    have, want = state[key], vit.pos_embed
    if have.shape == want.shape or have.ndim != 3 or have.shape[-1] != want.shape[-1]:
        return state
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    n = have.shape[1] - prefix
    side = int(round(n ** 0.5))
    if side * side != n:
        return state  # not a square grid: leave it for the shape check to report
    logger.warning("resampling the checkpoint's position embedding from %dx%d to %dx%d patches (bicubic)",
                   side, side, *vit.grid_size)
    state = dict(state)
    state[key] = resample_abs_pos_embed(have, vit.grid_size, (side, side), prefix)
    return state


def _drop(state: StateDict, prefixes: tuple[str, ...], why: str) -> StateDict:
    dropped = [k for k in state if k.startswith(prefixes)]
    if dropped:
        logger.info("ignoring %d checkpoint entries (%s): %s", len(dropped), why, ", ".join(dropped[:4]))
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}


def _adapt_vit(state: StateDict, spec: EncoderSpec, model: nn.Module) -> StateDict:
    layout = spec.builder_kwargs.get("checkpoint_layout")
    if layout == "hf_dinov2" or "embeddings.patch_embeddings.projection.weight" in state \
            or "dinov2.embeddings.patch_embeddings.projection.weight" in state:
        state = hf_dinov2_to_timm(state)
    state = _drop(state, ("head.", "fc_norm.", "head_drop."), "classifier head; the encoder returns features")
    return _resample_vit_pos_embed(state, model)


def _adapt_conch(state: StateDict, spec: EncoderSpec, model: nn.Module) -> StateDict:
    if any(k.startswith("visual.") for k in state):  # the whole CoCa model: keep the image tower
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    state = _drop(state, ("attn_pool_caption.", "ln_caption.", "trunk.head.", "trunk.fc_norm."),
                  "captioning pooler and unused heads")
    return _resample_vit_pos_embed(state, model.trunk, "trunk.pos_embed") if "trunk.pos_embed" in state else state


def _adapt_resnet50_trunc(state: StateDict, spec: EncoderSpec, model: nn.Module) -> StateDict:
    return _drop(state, ("layer4.", "fc."), "layer 4 and the classifier are not part of the truncated ResNet")


def _adapt_swin(state: StateDict, spec: EncoderSpec, model: nn.Module) -> StateDict:
    state = _drop(state, ("head.",), "classifier head")
    buffers = dict(model.named_buffers())
    out: StateDict = {}
    for key, value in state.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            mine = buffers.get(key)
            if mine is None or mine.shape != value.shape or not torch.allclose(mine.to(value.dtype), value):
                raise CheckpointError(
                    f"checkpoint buffer {key} {tuple(value.shape)} does not match the window layout this model computes "
                    f"({None if mine is None else tuple(mine.shape)}); check input_px and window_size in the spec")
            continue  # identical to the computed buffer
        out[key] = value
    return out


#: architecture key -> adapter(state, spec, model) mapping a published checkpoint onto the module's keys.
CHECKPOINT_ADAPTERS: dict[str, Callable[[StateDict, EncoderSpec, nn.Module], StateDict]] = {
    "vit": _adapt_vit,
    "conch_vision": _adapt_conch,
    "resnet50_trunc": _adapt_resnet50_trunc,
    "swin_ctranspath": _adapt_swin,
}


def _load_efficientnet_lite0(model: nn.Module, path: Path, strict: bool) -> bool:
    """Own state dicts load directly; efficientnet_pytorch-layout ones through the module's mapper."""
    state = read_checkpoint(path)
    if set(_strip_common_prefixes(state, model.state_dict())) == set(model.state_dict()):
        return False  # this package's own layout: the generic path loads it
    from .architectures.efficientnet_lite import load_efficientnet_lite0_weights

    try:
        load_efficientnet_lite0_weights(model, path)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    return True


#: architecture key -> loader(model, path, strict) that loads the file itself and returns True,
#: or returns False to let the generic path (read, strip, adapt, check, load) handle it.
CUSTOM_LOADERS: dict[str, Callable[[nn.Module, Path, bool], bool]] = {
    "efficientnet_lite0": _load_efficientnet_lite0,
}


# --------------------------------------------------------------------------------------------
# loading and the public entry point
# --------------------------------------------------------------------------------------------

def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_encoder_weights(model: nn.Module, spec: EncoderSpec, weights: str | os.PathLike[str], *,
                         strict: bool = True) -> nn.Module:
    """Load the checkpoint at ``weights`` into ``model`` (built from ``spec``); returns ``model``.

    Raises :class:`WeightsNotFoundError` (a ``FileNotFoundError``) for a bad path and
    :class:`CheckpointError` (a ``ValueError``) when keys are missing or unexpected
    (``strict=True``) or any shape differs (always), listing them.
    """
    path = Path(weights).expanduser()
    custom = CUSTOM_LOADERS.get(spec.architecture)
    if custom is not None:
        if not path.is_file():
            read_checkpoint(path)  # raises the not-found error
        if custom(model, path, strict):
            return model
    target = model.state_dict()
    state = _strip_common_prefixes(read_checkpoint(path), target)
    adapter = CHECKPOINT_ADAPTERS.get(spec.architecture)
    if adapter is not None:
        state = adapter(state, spec, model)
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    mismatched = [f"{k} checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
                  for k, v in state.items() if k in target and tuple(v.shape) != tuple(target[k].shape)]
    problems = []
    if mismatched:
        problems.append(f"  shape mismatches ({len(mismatched)}): {_listing(mismatched, 6)}")
    if strict and missing:
        problems.append(f"  missing from the checkpoint ({len(missing)}): {_listing(missing)}")
    if strict and unexpected:
        problems.append(f"  unexpected in the checkpoint ({len(unexpected)}): {_listing(unexpected)}")
    if problems:
        hint = ("is it a checkpoint of this encoder, with the spec's builder_kwargs?"
                + ("" if mismatched or not strict else " Pass strict=False to load only the keys that match."))
        raise CheckpointError(f"'{path}' does not fit encoder {spec.name!r} ({spec.architecture}):\n"
                              + "\n".join(problems) + f"\n  {hint}")
    if missing or unexpected:
        logger.warning("loading '%s' into %s non-strictly: %d missing (%s), %d unexpected (%s)", path.name, spec.name,
                       len(missing), _listing(missing, 4), len(unexpected), _listing(unexpected, 4))
        state = {k: v for k, v in state.items() if k in target}
    model.load_state_dict(state, strict=strict)
    return model


def build_encoder(spec: EncoderSpec | str, weights: str | os.PathLike[str] | None = None, *, strict: bool = True,
                  device: str | torch.device | None = None) -> nn.Module:
    """Build the torch encoder described by ``spec`` (or a registry name), in eval mode.

    Parameters
    ----------
    spec : EncoderSpec or str
        The encoder (its ``architecture`` picks the builder in :data:`BUILDERS`).
    weights : path, optional
        A local checkpoint to load (see :func:`load_encoder_weights`). ``None`` gives random
        weights drawn with seed 0 (the global RNG state is left untouched).
    strict : bool
        Require the checkpoint's keys to match the model's exactly.
    device : str or torch.device, optional
        Where to build. ``"meta"`` builds shapes only (no memory), for inspecting giant models;
        weights cannot be loaded there.

    Returns
    -------
    torch.nn.Module
        ``forward(images)``: normalised float ``(B, 3, input_px, input_px)`` ->
        ``(B, spec.embed_dim)`` float embeddings.
    """
    if isinstance(spec, str):
        spec = get_encoder_spec(spec)
    builder = BUILDERS.get(spec.architecture)
    if builder is None:
        raise ModelError(f"encoder {spec.name!r} has architecture {spec.architecture!r}, which has no builder; "
                         f"known: {', '.join(sorted(BUILDERS))}")
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "meta" and weights is not None:
        raise ModelError("weights cannot be loaded into a model built on the meta device; leave device unset")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if device is not None:
            with device:
                model = builder(spec)
        else:
            model = builder(spec)
    width = getattr(model, "num_features", None)
    if width is not None and width != spec.embed_dim:
        raise ModelError(f"encoder {spec.name!r}: the architecture returns {width} features but the spec says "
                         f"embed_dim={spec.embed_dim}; fix the spec's builder_kwargs or embed_dim")
    if weights is not None:
        load_encoder_weights(model, spec, weights, strict=strict)
    return model.eval()
