"""Every option in one place, as dataclasses with units in their names.

Defaults live here and nowhere else. Each can be overridden by an environment variable
``WSIENGINE_<FIELD>`` (e.g. ``WSIENGINE_TARGET_MPP=0.25``, ``WSIENGINE_BATCH_SIZE=128``), read
when a config is built with :meth:`from_env`, or in code with :func:`set_defaults` as a context
manager, in the manner of ``dask.config.set``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar, get_type_hints

from .errors import ConfigError

__all__ = ["TissueConfig", "TilingConfig", "StreamConfig", "MILTrainConfig", "ReportConfig", "VLMConfig", "set_defaults",
           "ENV_PREFIX", "physical_cores"]

ENV_PREFIX = "WSIENGINE_"
_OVERRIDES: dict[str, Any] = {}
C = TypeVar("C")


def _coerce(value: str, annotation: Any) -> Any:
    text = str(annotation)
    if "bool" in text:
        return value.strip().lower() in ("1", "true", "yes", "on")
    if "int" in text and "float" not in text:
        return int(value)
    if "float" in text:
        return float(value)
    return value


class _EnvConfig:
    """Mixin: ``from_env()`` and validation hooks."""

    @classmethod
    def from_env(cls: type[C], **explicit: Any) -> C:
        """Build from defaults, then ``set_defaults`` overrides, then ``WSIENGINE_*`` variables,
        then ``explicit`` keyword arguments (highest priority)."""
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name in _OVERRIDES:
                values[f.name] = _OVERRIDES[f.name]
            env = os.environ.get(ENV_PREFIX + f.name.upper())
            if env is not None:
                try:
                    values[f.name] = _coerce(env, hints[f.name])
                except ValueError:
                    raise ConfigError(f"{ENV_PREFIX}{f.name.upper()}={env!r} is not a valid {hints[f.name]}") from None
        values.update({k: v for k, v in explicit.items() if v is not None})
        return cls(**values)

    @classmethod
    def resolve(cls: type[C], config: C | None = None, **explicit: Any) -> C:
        """``config`` (or the defaults and environment when None) with the non-None ``explicit``
        keyword arguments applied on top: how API functions merge a config and their arguments."""
        base = config.to_dict() if config is not None else {}  # type: ignore[attr-defined]
        return cls.from_env(**{**base, **{k: v for k, v in explicit.items() if v is not None}})  # type: ignore[attr-defined]

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@contextlib.contextmanager
def set_defaults(**values: Any) -> Iterator[None]:
    """Temporarily override defaults for configs built with ``from_env`` (any config class)."""
    known = {f.name for cls in (TissueConfig, TilingConfig, StreamConfig, MILTrainConfig, ReportConfig, VLMConfig) for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
    previous = dict(_OVERRIDES)
    _OVERRIDES.update(values)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(previous)


def physical_cores() -> int:
    """Physical CPU cores (logical cores where that is unknown): the default thread count for
    ONNX Runtime's intra-op pool."""
    try:
        import psutil

        return max(1, int(psutil.cpu_count(logical=False) or os.cpu_count() or 1))
    except Exception:  # noqa: BLE001 - psutil missing or unsupported platform
        return max(1, os.cpu_count() or 1)


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be positive, got {value!r}")


@dataclass(frozen=True)
class TissueConfig(_EnvConfig):
    """Tissue detection on a thumbnail.

    Parameters
    ----------
    mask_mpp : float
        Resolution of the mask raster, µm/px (8 µm/px: a 100k px slide at 0.25 µm/px gives a
        3,125 px mask). Coarsened automatically when the mask would exceed ``max_mask_px``.
    max_mask_px : int
        Largest mask raster, in pixels.
    read_budget_px : int
        Largest image one backend call may return while building the thumbnail, in pixels.
    min_object_um2 : float
        Tissue pieces smaller than this area (µm²) are dropped (dust, debris). 0.05 mm².
    max_hole_um2 : float
        Holes in tissue smaller than this (µm²) are filled; larger ones (lumens, tears) stay.
    closing_um, opening_um : float
        Radii of the morphological closing and opening, µm.
    reject_pen : bool
        Exclude green, blue and red ink.
    pen_margin_um : float
        Margin around ink also excluded, µm (ink edges are blurred).
    min_pen_object_um2 : float
        Ink-coloured specks smaller than this (µm²) are not treated as pen marks.
    on_empty : {"warn", "raise"}
        No tissue: return an empty mask and log a warning, or raise NoTissueError.
    """

    mask_mpp: float = 8.0
    max_mask_px: int = 8192 * 8192
    read_budget_px: int = 4096 * 4096
    min_object_um2: float = 50_000.0
    max_hole_um2: float = 20_000.0
    closing_um: float = 16.0
    opening_um: float = 16.0
    reject_pen: bool = True
    pen_margin_um: float = 16.0
    min_pen_object_um2: float = 2_000.0
    on_empty: Literal["warn", "raise"] = "warn"

    def __post_init__(self) -> None:
        for name in ("mask_mpp", "max_mask_px", "read_budget_px"):
            _positive(name, getattr(self, name))
        for name in ("min_object_um2", "max_hole_um2", "closing_um", "opening_um", "pen_margin_um", "min_pen_object_um2"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.on_empty not in ("warn", "raise"):
            raise ConfigError(f"on_empty must be 'warn' or 'raise', got {self.on_empty!r}")


@dataclass(frozen=True)
class TilingConfig(_EnvConfig):
    """The tile grid.

    Parameters
    ----------
    target_mpp : float
        Resolution of the patches, µm/px (0.5 µm/px is "20x").
    tile_px : int
        Patch side in pixels at ``target_mpp``.
    overlap_px : int
        Overlap between neighbouring patches, pixels at ``target_mpp`` (stride = tile_px - overlap_px).
    min_tissue : float
        Keep tiles whose tissue fraction (0..1, from the mask) is at least this.
    allow_upsample : bool
        Allow a target finer than level 0 (interpolated; adds no detail).
    on_empty : {"warn", "raise"}
        No tile passes: return an empty grid with a warning, or raise NoTissueError.
    """

    target_mpp: float = 0.5
    tile_px: int = 224
    overlap_px: int = 0
    min_tissue: float = 0.25
    allow_upsample: bool = False
    on_empty: Literal["warn", "raise"] = "warn"

    def __post_init__(self) -> None:
        _positive("target_mpp", self.target_mpp)
        _positive("tile_px", self.tile_px)
        if not 0 <= self.overlap_px < self.tile_px:
            raise ConfigError(f"overlap_px must be in [0, tile_px={self.tile_px}), got {self.overlap_px}")
        if not 0 <= self.min_tissue <= 1:
            raise ConfigError(f"min_tissue is a fraction in [0, 1], got {self.min_tissue}")
        if self.on_empty not in ("warn", "raise"):
            raise ConfigError(f"on_empty must be 'warn' or 'raise', got {self.on_empty!r}")

    @property
    def stride_px(self) -> int:
        """Step between tile origins, pixels at ``target_mpp``."""
        return self.tile_px - self.overlap_px


@dataclass(frozen=True)
class StreamConfig(_EnvConfig):
    """Parallel patch reading.

    Parameters
    ----------
    batch_size : int
        Patches per batch; a Dask task reads one batch (one chunk of the grid).
    num_workers : int
        Reader threads (threaded scheduler); 0 means one per CPU core.
    max_in_flight : int
        Most batches alive at once beyond those being read: memory is bounded by
        ``(num_workers + max_in_flight + 1) x batch_size x tile bytes`` whatever the slide size.
    ordered : bool
        Yield batches in grid order (True) or as soon as they are read (False, default).
    """

    batch_size: int = 64
    num_workers: int = 0
    max_in_flight: int = 4
    ordered: bool = False

    def __post_init__(self) -> None:
        _positive("batch_size", self.batch_size)
        _positive("max_in_flight", self.max_in_flight)
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0 (0 = one per core), got {self.num_workers}")

    @property
    def workers(self) -> int:
        return self.num_workers or (os.cpu_count() or 1)


@dataclass(frozen=True)
class MILTrainConfig(_EnvConfig):
    """Training of a slide-level attention-MIL head (``wsiengine train-mil``).

    Parameters
    ----------
    model : {"abmil", "clam_sb"}
        Gated-attention ABMIL (Ilse et al. 2018) or CLAM-SB (Lu et al. 2021).
    folds : int
        Stratified k-fold cross-validation: fold i is the test set of split i, and a stratified
        ``val_fraction`` of the remaining slides its validation set. ``folds=1`` makes one
        train/validation split with no test set. Ignored when split files are given.
    val_fraction : float
        Fraction of the non-test slides held out for validation (early stopping, threshold).
    seed : int
        Seeds splits, initialisation, sampling and dropout: same seed, same data, same result.
    max_epochs, min_epochs, patience : int
        Passes over the training slides; training stops once ``min_epochs`` have run and the
        validation AUC (ties broken by validation loss) has not improved for ``patience`` epochs.
        The epoch with the best validation AUC is kept.
    lr, weight_decay : float
        Adam learning rate and L2 weight decay.
    accumulate : int
        Bags whose gradients are averaged per optimiser step (the model sees one bag at a time).
    hidden_dim, attn_dim : int
        Width of the embedding layer and of the attention network.
    dropout : float
        Dropout during training.
    embed_layers : int
        Linear+ReLU+Dropout layers before the attention.
    tile_weight : float
        ABMIL: weight of the tile-score loss (MIL pseudo-labels); 0 trains no tile head.
    k_sample, bag_weight : int, float
        CLAM-SB: tiles per pseudo-label class in the instance loss, and the bag loss weight.
    max_tiles : int
        Training only: a bag larger than this is randomly subsampled to this many tiles each
        time it is drawn (0 = never). Validation and test use every tile.
    balanced : bool
        Draw training slides with probability inversely proportional to their class's size
        (with replacement), so each epoch sees both classes equally often.
    threshold_rule : {"youden", "balanced_accuracy", "f1", "fixed"}
        How the decision threshold is chosen on the validation slides (``fixed`` uses 0.5).
    device : {"cpu", "cuda", "auto"}
        Where torch trains.
    threads : int
        torch CPU threads (0 = physical cores, at most 8). Results are reproducible for a given
        thread count.
    cache_gb : float
        Memory for caching slide features between epochs, GiB; beyond it bags are re-read from
        their Zarr stores.
    """

    model: str = "abmil"
    folds: int = 5
    val_fraction: float = 0.2
    seed: int = 0
    max_epochs: int = 100
    min_epochs: int = 10
    patience: int = 15
    lr: float = 2e-4
    weight_decay: float = 1e-4
    accumulate: int = 1
    hidden_dim: int = 128
    attn_dim: int = 128
    dropout: float = 0.25
    embed_layers: int = 1
    tile_weight: float = 0.5
    k_sample: int = 8
    bag_weight: float = 0.7
    max_tiles: int = 8192
    balanced: bool = True
    threshold_rule: str = "youden"
    device: str = "cpu"
    threads: int = 0
    cache_gb: float = 4.0

    def __post_init__(self) -> None:
        if self.model.lower().replace("-", "_") not in ("abmil", "clam_sb"):
            raise ConfigError(f"model must be 'abmil' or 'clam_sb', got {self.model!r}")
        if self.folds < 1:
            raise ConfigError(f"folds must be >= 1, got {self.folds}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("max_epochs", "accumulate", "hidden_dim", "attn_dim", "embed_layers", "lr"):
            _positive(name, getattr(self, name))
        for name in ("min_epochs", "patience", "max_tiles", "threads", "k_sample", "weight_decay", "tile_weight",
                     "cache_gb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.bag_weight <= 1:
            raise ConfigError(f"bag_weight must be in [0, 1], got {self.bag_weight}")
        if self.threshold_rule not in ("youden", "balanced_accuracy", "f1", "fixed"):
            raise ConfigError(f"threshold_rule must be youden, balanced_accuracy, f1 or fixed, got {self.threshold_rule!r}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"device must be 'cpu', 'cuda' or 'auto', got {self.device!r}")


@dataclass(frozen=True)
class ReportConfig(_EnvConfig):
    """What a slide report computes and shows (``wsiengine report``, ``wsiengine run``).

    Parameters
    ----------
    top_k : int
        Evidence tiles: the ``top_k`` tiles of highest attention, saved as PNGs.
    indeterminate_margin : float
        Probabilities within this distance of the head's threshold are called
        ``indeterminate`` rather than ``yes``/``no`` (0 disables the band).
    tile_threshold : float, optional
        Tile score at or above which tiles form tumour deposits (foci); default: the
        ``tumour_threshold`` the store's pipeline used (0.5).
    min_tiles : int
        Fewer tissue tiles than this raises the ``few_tiles`` QC flag.
    scattered_tiles : int
        This many single-tile foci or more raise the ``scattered_tiles`` QC flag (isolated
        positive tiles are often tile-classifier false positives).
    min_tissue_mm2 : float
        Less tissue than this (mm²) raises the ``low_tissue`` QC flag.
    ood_quantile : float
        A tile is out of distribution when its distance to the head's training embeddings
        exceeds this quantile of the training tiles' own distances.
    ood_max_fraction : float
        More out-of-distribution tiles than this fraction raises the ``ood_embeddings`` flag.
    evidence_mpp : float, optional
        Resolution of the evidence PNGs, µm/px; default: the tiles' own ``target_mpp``.
    evidence_px : int
        Smallest side of an evidence PNG, pixels (small tiles are enlarged, nearest neighbour).
    """

    top_k: int = 8
    indeterminate_margin: float = 0.05
    tile_threshold: float | None = None
    min_tiles: int = 50
    scattered_tiles: int = 5
    min_tissue_mm2: float = 1.0
    ood_quantile: float = 0.99
    ood_max_fraction: float = 0.25
    evidence_mpp: float | None = None
    evidence_px: int = 192

    def __post_init__(self) -> None:
        _positive("top_k", self.top_k)
        _positive("evidence_px", self.evidence_px)
        if not 0 <= self.indeterminate_margin < 0.5:
            raise ConfigError(f"indeterminate_margin must be in [0, 0.5), got {self.indeterminate_margin}")
        if self.tile_threshold is not None and not 0 <= self.tile_threshold <= 1:
            raise ConfigError(f"tile_threshold is a score in [0, 1], got {self.tile_threshold}")
        if self.min_tiles < 0 or self.min_tissue_mm2 < 0 or self.scattered_tiles < 1:
            raise ConfigError("min_tiles and min_tissue_mm2 must be >= 0, scattered_tiles >= 1")
        if not 0.5 <= self.ood_quantile < 1:
            raise ConfigError(f"ood_quantile must be in [0.5, 1), got {self.ood_quantile}")
        if not 0 <= self.ood_max_fraction <= 1:
            raise ConfigError(f"ood_max_fraction is a fraction in [0, 1], got {self.ood_max_fraction}")
        if self.evidence_mpp is not None:
            _positive("evidence_mpp", self.evidence_mpp)


@dataclass(frozen=True)
class VLMConfig(_EnvConfig):
    """An OpenAI-compatible chat-completions endpoint that phrases reports (optional).

    Parameters
    ----------
    vlm_url : str, optional
        Base URL of the API, e.g. ``http://127.0.0.1:8080/v1`` (``/chat/completions`` is
        appended). None: no VLM, the template report only. ``WSIENGINE_VLM_URL``.
    vlm_model : str, optional
        Model name sent in requests. ``WSIENGINE_VLM_MODEL``.
    vlm_api_key_env : str
        Name of the environment variable holding the API key (sent as a bearer token when
        set). The key itself is never read from a file nor written anywhere.
    allow_remote : bool
        Endpoints other than loopback (127.0.0.0/8, ::1, localhost) are refused unless True:
        findings and evidence tiles would leave the machine.
    vlm_images : {"auto", "always", "never"}
        Send the evidence tiles as images: ``auto`` tries and falls back to text when the
        server rejects image input; ``never`` for text-only models.
    vlm_timeout_s : float
        Seconds allowed per request.
    vlm_retries : int
        Further attempts after a timeout, a connection error or an HTTP 5xx (429 too).
    vlm_max_tokens : int
        Longest reply requested, tokens.
    vlm_response_format : {"none", "json_object", "json_schema"}
        Ask the server to constrain its reply to the reply schema: ``json_object`` (with the
        schema, as llama-cpp-python and vLLM take it) or ``json_schema`` (OpenAI structured
        outputs: vLLM, Ollama, LM Studio). ``none`` relies on the prompt (any server).
    """

    vlm_url: str | None = None
    vlm_model: str | None = None
    vlm_api_key_env: str = "WSIENGINE_VLM_API_KEY"
    allow_remote: bool = False
    vlm_images: str = "auto"
    vlm_timeout_s: float = 60.0
    vlm_retries: int = 2
    vlm_max_tokens: int = 400
    vlm_response_format: str = "none"

    def __post_init__(self) -> None:
        _positive("vlm_timeout_s", self.vlm_timeout_s)
        _positive("vlm_max_tokens", self.vlm_max_tokens)
        if self.vlm_retries < 0:
            raise ConfigError(f"vlm_retries must be >= 0, got {self.vlm_retries}")
        if self.vlm_images not in ("auto", "always", "never"):
            raise ConfigError(f"vlm_images must be 'auto', 'always' or 'never', got {self.vlm_images!r}")
        if self.vlm_response_format not in ("none", "json_object", "json_schema"):
            raise ConfigError(f"vlm_response_format must be 'none', 'json_object' or 'json_schema', got "
                              f"{self.vlm_response_format!r}")
        if self.vlm_url is not None and not self.vlm_url.startswith(("http://", "https://")):
            raise ConfigError(f"vlm_url must be an http(s) URL such as http://127.0.0.1:8080/v1, got {self.vlm_url!r}")
        if not self.vlm_api_key_env or not self.vlm_api_key_env.replace("_", "").isalnum():
            raise ConfigError(f"vlm_api_key_env must name an environment variable, got {self.vlm_api_key_env!r}")

    @property
    def enabled(self) -> bool:
        """True when a URL is configured."""
        return bool(self.vlm_url)
