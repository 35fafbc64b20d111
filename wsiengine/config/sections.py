"""The sections of a run's configuration: one frozen dataclass per stage, units in the names.

Each section validates its own values (``__post_init__``) and documents every field in its
``Parameters`` list; the command line takes its option help from there
(:func:`wsiengine.config.sources.field_help`). Field names are unique across the sections of a
:class:`~wsiengine.config.RunConfig`, so ``WSIENGINE_TARGET_MPP`` or ``target_mpp=`` name one
setting without its section.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import ConfigError

__all__ = ["TissueConfig", "TilingConfig", "StreamConfig", "EncoderConfig", "MILConfig", "OutputsConfig",
           "ReportConfig", "VLMConfig", "SlideConfig", "BatchConfig", "MILTrainConfig", "physical_cores",
           "DEFAULT_TARGET_MPP", "DEFAULT_TILE_PX", "HEATMAP_VALUES"]

#: The tiling used when neither the settings, the MIL head nor the encoder name one: 224 px at 0.5 µm/px ("20x").
DEFAULT_TARGET_MPP = 0.5
DEFAULT_TILE_PX = 224
#: Per-tile values that can be stored as heatmaps.
HEATMAP_VALUES = ("attention", "tile_scores", "tissue_fraction")


def physical_cores() -> int:
    """Physical CPU cores (logical cores where that is unknown): the default thread count for
    ONNX Runtime's intra-op pool."""
    try:
        import psutil

        return max(1, int(psutil.cpu_count(logical=False) or os.cpu_count() or 1))
    except Exception:  # noqa: BLE001 - psutil missing or unsupported platform
        return max(1, os.cpu_count() or 1)


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


def _non_negative(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"{name} must be a number >= 0, got {value!r}")


def _fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"{name} is a fraction in [0, 1], got {value!r}")


@functools.lru_cache(maxsize=None)
def _choices(cls: type) -> dict[str, tuple[Any, ...]]:
    """``{field: allowed values}`` of the ``Literal``-typed fields of a section."""
    hints = typing.get_type_hints(cls)
    return {f.name: typing.get_args(hints[f.name]) for f in dataclasses.fields(cls)
            if typing.get_origin(hints[f.name]) is typing.Literal}


class _Section:
    """Mixin of the section dataclasses: ``replace`` and ``to_dict``."""

    @classmethod
    def given(cls, config: Any = None, **explicit: Any) -> Any:
        """``config`` (or the defaults) with the non-None ``explicit`` arguments applied: how a
        stage merges its config and keyword arguments. Reads no environment: a run's settings
        are resolved once, in :class:`~wsiengine.config.RunConfig`."""
        base = config if config is not None else cls()
        changes = {k: v for k, v in explicit.items() if v is not None}
        return base.replace(**changes) if changes else base

    def _check_choices(self) -> None:
        """Every ``Literal``-typed field holds one of its values."""
        for name, allowed in _choices(type(self)).items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (tuples become lists)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True)
class TissueConfig(_Section):
    """Tissue detection on a thumbnail.

    Parameters
    ----------
    mask_mpp : float
        Resolution of the tissue mask, µm/px; coarsened automatically when the mask would exceed max_mask_px.
    max_mask_px : int
        Largest tissue-mask raster, pixels.
    read_budget_px : int
        Largest image one backend call may return while building the thumbnail, pixels.
    min_object_um2 : float
        Tissue pieces smaller than this area (µm²) are dropped (dust, debris).
    max_hole_um2 : float
        Holes in tissue smaller than this (µm²) are filled; larger ones (lumens, tears) stay.
    closing_um : float
        Radius of the morphological closing of the mask, µm.
    opening_um : float
        Radius of the morphological opening of the mask, µm (specks and threads narrower than it are dropped).
    opening_by_reconstruction : bool
        Open by reconstruction: what survives the opening gets its full outline back (tissue edges and pale rims are kept).
    hysteresis_ratio : float
        Pale tissue connected to clearly stained tissue is kept down to this fraction of the Otsu saturation threshold (1 disables).
    reject_pen : bool
        Exclude green, blue and red pen ink from the tissue.
    pen_margin_um : float
        Margin around pen ink also excluded, µm (ink edges are blurred).
    min_pen_object_um2 : float
        Ink-coloured specks smaller than this (µm²) are not treated as pen marks.
    on_no_tissue : {"warn", "raise"}
        No tissue found: return an empty mask with a warning, or raise NoTissueError.
    """

    mask_mpp: float = 8.0
    max_mask_px: int = 8192 * 8192
    read_budget_px: int = 4096 * 4096
    min_object_um2: float = 50_000.0
    max_hole_um2: float = 20_000.0
    closing_um: float = 16.0
    opening_um: float = 16.0
    opening_by_reconstruction: bool = True
    hysteresis_ratio: float = 0.4
    reject_pen: bool = True
    pen_margin_um: float = 16.0
    min_pen_object_um2: float = 2_000.0
    on_no_tissue: Literal["warn", "raise"] = "warn"

    def __post_init__(self) -> None:
        for name in ("mask_mpp", "max_mask_px", "read_budget_px"):
            _positive(name, getattr(self, name))
        _non_negative(self, "min_object_um2", "max_hole_um2", "closing_um", "opening_um", "pen_margin_um",
                      "min_pen_object_um2")
        _fraction("hysteresis_ratio", self.hysteresis_ratio)
        self._check_choices()


@dataclass(frozen=True)
class TilingConfig(_Section):
    """The tile grid.

    ``target_mpp`` and ``tile_px`` may be left unset (None): the run's resolver then takes them
    from the MIL head's training tiling, else the encoder's spec, else 224 px at 0.5 µm/px
    (:meth:`wsiengine.config.RunConfig.resolve_tiling`). A stage given a config with them unset uses
    those defaults.

    Parameters
    ----------
    target_mpp : float, optional
        Resolution of the tiles, µm/px (0.5 µm/px is "20x"); default: the MIL head's, else the encoder's, else 0.5.
    tile_px : int, optional
        Tile side, pixels at target_mpp; default: the MIL head's, else the encoder's, else 224.
    overlap_px : int
        Overlap between neighbouring tiles, pixels at target_mpp (stride = tile_px - overlap_px).
    min_tissue : float
        Keep tiles whose tissue fraction (0..1, from the tissue mask) is at least this.
    allow_upsample : bool
        Allow a target_mpp finer than the slide's level 0 (interpolated; adds no detail).
    on_no_tiles : {"warn", "raise"}
        No tile passes min_tissue: return an empty grid with a warning, or raise NoTissueError.
    """

    target_mpp: float | None = None
    tile_px: int | None = None
    overlap_px: int = 0
    min_tissue: float = 0.25
    allow_upsample: bool = False
    on_no_tiles: Literal["warn", "raise"] = "warn"

    def __post_init__(self) -> None:
        if self.target_mpp is not None:
            _positive("target_mpp", self.target_mpp)
        if self.tile_px is not None:
            _positive("tile_px", self.tile_px)
        if isinstance(self.overlap_px, bool) or not isinstance(self.overlap_px, int) or not 0 <= self.overlap_px < (
                self.tile_px or DEFAULT_TILE_PX):
            raise ConfigError(f"overlap_px must be an integer in [0, tile_px={self.tile_px or DEFAULT_TILE_PX}), "
                              f"got {self.overlap_px!r}")
        _fraction("min_tissue", self.min_tissue)
        self._check_choices()

    @property
    def resolved(self) -> bool:
        """Whether ``target_mpp`` and ``tile_px`` are both set."""
        return self.target_mpp is not None and self.tile_px is not None

    def with_defaults(self) -> "TilingConfig":
        """This tiling with unset ``target_mpp``/``tile_px`` taken from the defaults (0.5 µm/px, 224 px)."""
        if self.resolved:
            return self
        return self.replace(target_mpp=self.target_mpp or DEFAULT_TARGET_MPP, tile_px=self.tile_px or DEFAULT_TILE_PX)

    @property
    def stride_px(self) -> int:
        """Step between tile origins, pixels at ``target_mpp``."""
        return (self.tile_px or DEFAULT_TILE_PX) - self.overlap_px


@dataclass(frozen=True)
class StreamConfig(_Section):
    """Parallel patch reading.

    Parameters
    ----------
    batch_size : int
        Patches per batch; one Dask task reads one batch (a chunk of the grid).
    num_workers : int
        Patch-reader threads; 0 means one per CPU core.
    max_in_flight : int
        Most finished batches waiting for the encoder: memory is bounded by (num_workers + max_in_flight + 1) x batch_size x tile bytes, whatever the slide size.
    ordered : bool
        Yield batches in grid order instead of as soon as they are read.
    """

    batch_size: int = 64
    num_workers: int = 0
    max_in_flight: int = 4
    ordered: bool = False

    def __post_init__(self) -> None:
        _positive("batch_size", self.batch_size)
        _positive("max_in_flight", self.max_in_flight)
        _non_negative(self, "num_workers")

    @property
    def workers(self) -> int:
        """Reader threads: ``num_workers`` or one per CPU core."""
        return self.num_workers or (os.cpu_count() or 1)


@dataclass(frozen=True)
class EncoderConfig(_Section):
    """The tile encoder and how ONNX Runtime runs it.

    Parameters
    ----------
    encoder : str
        'default' (the shipped encoder), a registry name (with encoder_weights), or an .onnx path.
    encoder_weights : str, optional
        The exported .onnx file of a registry encoder.
    providers : str
        ONNX Runtime execution providers: auto, tensorrt, cuda or cpu, or a comma-separated list, best first.
    allow_fallback : bool
        Fall back to the CPU (logged) when a requested GPU provider is missing or fails.
    threads : int
        Encoder CPU threads (ONNX Runtime intra-op); 0 means the physical cores, shared out among local batch workers.
    precision : {"auto", "fp32", "fp16", "int8"}
        Encoder arithmetic: auto is float16 on a GPU and float32 on the CPU; int8 runs the encoder's calibrated int8 copy.
    device_id : int
        CUDA device the encoder runs on.
    trt_cache_dir : str, optional
        Folder where TensorRT keeps its built engines (default ~/.cache/wsiengine/trt).
    encoder_sha256 : str, optional
        Filled when the run is resolved: the sha256 of the encoder file (part of the resume key).
    encoder_spec_sha256 : str, optional
        Filled when the run is resolved: the sha256 of the encoder's spec (normalisation, input size; part of the resume key).
    """

    encoder: str = "default"
    encoder_weights: str | None = None
    providers: str = "auto"
    allow_fallback: bool = False
    threads: int = 0
    precision: Literal["auto", "fp32", "fp16", "int8"] = "auto"
    device_id: int = 0
    trt_cache_dir: str | None = None
    encoder_sha256: str | None = field(default=None, metadata={"resolved": True})
    encoder_spec_sha256: str | None = field(default=None, metadata={"resolved": True})

    def __post_init__(self) -> None:
        if not self.encoder:
            raise ConfigError("encoder must name 'default', a registry encoder or an .onnx file")
        _non_negative(self, "threads", "device_id")
        self._check_choices()

    @property
    def provider_list(self) -> str | list[str]:
        """``providers`` as :meth:`wsiengine.encode.Encoder.load` takes it."""
        names = [p.strip() for p in self.providers.split(",") if p.strip()]
        return names[0] if len(names) == 1 else names


@dataclass(frozen=True)
class MILConfig(_Section):
    """The attention-MIL slide head and how its tile scores become tumour deposits.

    The deposit rules (``tile_threshold`` ... ``single_tile_threshold``, see
    :mod:`wsiengine.deposits`) were chosen on validation nodes from PCam **valid** for the shipped
    head (``python -m wsiengine.models.training.fit_deposit_rules``), never on test data.

    Parameters
    ----------
    mil : str, optional
        'default' (the shipped lymph-node head), a head folder from train-mil, or none for embeddings only.
    tile_threshold : float
        Smoothed tile probability at or above which a tile may join a tumour deposit (GeoJSON regions, reports).
    seed_threshold : float
        A deposit must hold a tile whose smoothed probability is at least this (hysteresis seed).
    smoothing : float
        Weight of each edge neighbour when tile probabilities are smoothed on the tile lattice (corners half; 0 = none).
    min_focus_tiles : int
        Fewest tiles of a deposit, unless one of its tiles reaches single_tile_threshold.
    single_tile_threshold : float
        Raw tile probability at or above which one tile is a deposit on its own (1 = never).
    mil_sha256 : str, optional
        Filled when the run is resolved: the sha256 of the head's graph (part of the resume key).
    slide_threshold : float, optional
        Filled when the run is resolved: the head's slide-level decision threshold.
    tile_calibration : str, optional
        Filled when the run is resolved: the head's tile-probability calibration (part of the resume key).
    """

    mil: str | None = "default"
    tile_threshold: float = 0.5
    seed_threshold: float = 0.5
    smoothing: float = 0.0
    min_focus_tiles: int = 1
    single_tile_threshold: float = 1.0
    mil_sha256: str | None = field(default=None, metadata={"resolved": True})
    slide_threshold: float | None = field(default=None, metadata={"resolved": True})
    tile_calibration: str | None = field(default=None, metadata={"resolved": True})

    def __post_init__(self) -> None:
        for name in ("tile_threshold", "seed_threshold", "single_tile_threshold"):
            _fraction(name, getattr(self, name))
        _non_negative(self, "smoothing")
        if isinstance(self.min_focus_tiles, bool) or not isinstance(self.min_focus_tiles, int) or self.min_focus_tiles < 1:
            raise ConfigError(f"min_focus_tiles must be a whole number >= 1, got {self.min_focus_tiles!r}")
        if self.mil in ("", "none", "None"):
            object.__setattr__(self, "mil", None)


@dataclass(frozen=True)
class OutputsConfig(_Section):
    """What a slide's run writes besides its Zarr store.

    Parameters
    ----------
    heatmaps : tuple of str
        Per-tile values stored as multiscale heatmaps, comma-separated: attention, tile_scores, tissue_fraction.
    geojson : bool
        Write SLIDE_ID.geojson (tissue and predicted tumour regions, QuPath-ready).
    overlay : bool
        Write SLIDE_ID.heatmap.png (the tile scores over the thumbnail).
    report : bool
        Write the slide report (SLIDE_ID.report.json, .report.md and images); needs a MIL head.
    anonymize_ids : bool
        Name each slide's outputs by a random id (slide-1a2b3c4d5e6f) and record no file name or path in any output (summary, stores, GeoJSON, reports, log); the ids and paths go to the private id_map file.
    id_map : str, optional
        The private CSV mapping anonymous ids to slide files (default OUTPUT/private/slide-ids.csv); keep it, ids stay the same on reruns.
    """

    heatmaps: tuple[str, ...] = ("attention", "tile_scores")
    geojson: bool = True
    overlay: bool = True
    report: bool = True
    anonymize_ids: bool = False
    id_map: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.heatmaps, str):
            object.__setattr__(self, "heatmaps", tuple(h.strip() for h in self.heatmaps.split(",") if h.strip()))
        object.__setattr__(self, "heatmaps", tuple(self.heatmaps))
        unknown = sorted(set(self.heatmaps) - set(HEATMAP_VALUES))
        if unknown:
            raise ConfigError(f"unknown heatmap value(s) {unknown}; choose from {', '.join(HEATMAP_VALUES)}")


@dataclass(frozen=True)
class ReportConfig(_Section):
    """What a slide report computes and shows (``wsiengine report``, ``wsiengine run``).

    Parameters
    ----------
    top_k : int
        Evidence tiles in a report: the top_k tiles of highest attention, saved as PNGs.
    indeterminate_margin : float
        Probabilities within this distance of the head's threshold are called indeterminate rather than yes/no (0 disables the band).
    min_tiles : int
        Fewer tissue tiles than this raises the few_tiles QC flag.
    scattered_tiles : int
        This many single-tile foci or more raise the scattered_tiles QC flag.
    min_tissue_mm2 : float
        Less tissue than this (mm²) raises the low_tissue QC flag.
    ood_quantile : float
        A tile is out of distribution when its distance to the head's training embeddings exceeds this quantile of the training tiles' own distances.
    ood_max_fraction : float
        More out-of-distribution tiles than this fraction raises the ood_embeddings QC flag.
    evidence_mpp : float, optional
        Resolution of the evidence PNGs, µm/px; default: the tiles' own target_mpp.
    evidence_px : int
        Smallest side of an evidence PNG, pixels (small tiles are enlarged, nearest neighbour).
    tile_bank : str, optional
        Labelled tiles (.npz, or a folder of class folders) for the few-shot second opinion in reports.
    """

    top_k: int = 8
    indeterminate_margin: float = 0.05
    min_tiles: int = 50
    scattered_tiles: int = 5
    min_tissue_mm2: float = 1.0
    ood_quantile: float = 0.99
    ood_max_fraction: float = 0.25
    evidence_mpp: float | None = None
    evidence_px: int = 192
    tile_bank: str | None = None

    def __post_init__(self) -> None:
        _positive("top_k", self.top_k)
        _positive("evidence_px", self.evidence_px)
        if not 0 <= self.indeterminate_margin < 0.5:
            raise ConfigError(f"indeterminate_margin must be in [0, 0.5), got {self.indeterminate_margin}")
        _non_negative(self, "min_tiles", "min_tissue_mm2")
        if self.scattered_tiles < 1:
            raise ConfigError(f"scattered_tiles must be >= 1, got {self.scattered_tiles}")
        if not 0.5 <= self.ood_quantile < 1:
            raise ConfigError(f"ood_quantile must be in [0.5, 1), got {self.ood_quantile}")
        _fraction("ood_max_fraction", self.ood_max_fraction)
        if self.evidence_mpp is not None:
            _positive("evidence_mpp", self.evidence_mpp)


@dataclass(frozen=True)
class VLMConfig(_Section):
    """An OpenAI-compatible chat-completions endpoint that phrases reports (optional).

    Parameters
    ----------
    vlm_url : str, optional
        Base URL of an OpenAI-compatible API that phrases reports, e.g. http://127.0.0.1:8080/v1; none: template reports only.
    vlm_model : str, optional
        Model name sent in VLM requests.
    vlm_api_key_env : str
        Name of the environment variable holding the VLM API key (sent as a bearer token); the key is never written anywhere.
    allow_remote : bool
        Allow a VLM endpoint other than loopback: findings and evidence tiles then leave the machine.
    vlm_images : {"auto", "always", "never"}
        Send the evidence tiles to the VLM as images: auto falls back to text when the server rejects images.
    vlm_timeout_s : float
        Seconds allowed per VLM request.
    vlm_retries : int
        Further VLM attempts after a timeout, a connection error, HTTP 5xx or 429.
    vlm_max_tokens : int
        Longest VLM reply requested, tokens.
    vlm_response_format : {"none", "json_object", "json_schema"}
        Ask the VLM server to constrain its reply to the reply schema (json_object: llama-cpp-python, vLLM; json_schema: OpenAI structured outputs), or rely on the prompt (none).
    """

    vlm_url: str | None = None
    vlm_model: str | None = None
    vlm_api_key_env: str = "WSIENGINE_VLM_API_KEY"
    allow_remote: bool = False
    vlm_images: Literal["auto", "always", "never"] = "auto"
    vlm_timeout_s: float = 60.0
    vlm_retries: int = 2
    vlm_max_tokens: int = 400
    vlm_response_format: Literal["none", "json_object", "json_schema"] = "none"

    def __post_init__(self) -> None:
        _positive("vlm_timeout_s", self.vlm_timeout_s)
        _positive("vlm_max_tokens", self.vlm_max_tokens)
        _non_negative(self, "vlm_retries")
        self._check_choices()
        if self.vlm_url is not None and not self.vlm_url.startswith(("http://", "https://")):
            raise ConfigError(f"vlm_url must be an http(s) URL such as http://127.0.0.1:8080/v1, got {self.vlm_url!r}")
        if not self.vlm_api_key_env or not self.vlm_api_key_env.replace("_", "").isalnum():
            raise ConfigError(f"vlm_api_key_env must name an environment variable, got {self.vlm_api_key_env!r}")

    @property
    def enabled(self) -> bool:
        """True when a URL is configured."""
        return bool(self.vlm_url)


@dataclass(frozen=True)
class SlideConfig(_Section):
    """How slides are opened.

    Parameters
    ----------
    backend : {"auto", "tifffile", "openslide", "tiffslide"}
        Slide reader: auto tries the direct TIFF tile path, then OpenSlide, then tiffslide.
    mpp : tuple of float, optional
        Level-0 µm/px for slides without resolution metadata: 'X' or 'X,Y'.
    force_mpp : bool
        Use mpp (or the mpp CSV) even when the file has resolution metadata.
    mpp_csv : str, optional
        CSV with columns slide,mpp giving the level-0 µm/px of slides without resolution metadata; a slide's row beats mpp.
    """

    backend: Literal["auto", "tifffile", "openslide", "tiffslide"] = "auto"
    mpp: tuple[float, float] | None = None
    force_mpp: bool = False
    mpp_csv: str | None = None

    def __post_init__(self) -> None:
        self._check_choices()
        if self.mpp is not None:
            values = (self.mpp, self.mpp) if isinstance(self.mpp, (int, float)) else tuple(self.mpp)
            if len(values) == 1:
                values = (values[0], values[0])
            if len(values) != 2:
                raise ConfigError(f"mpp is 'X' or 'X,Y' µm/px, got {self.mpp!r}")
            for v in values:
                _positive("mpp", v)
            object.__setattr__(self, "mpp", (float(values[0]), float(values[1])))


@dataclass(frozen=True)
class BatchConfig(_Section):
    """How a folder of slides is run (speed and bookkeeping; never the results).

    Parameters
    ----------
    workers : int, optional
        Local worker processes (default: one per two physical cores, 1 below 4 cores); ignored with a scheduler.
    scheduler : str, optional
        Address of a running dask.distributed scheduler, e.g. tcp://host:8786.
    parallel : {"auto", "slides", "chunks"}
        One slide per worker, or each slide's tiles split across the workers (auto: chunks when fewer slides than workers).
    chunk_tiles : int
        Tiles per worker task when a slide's tiles are split across workers.
    retry_failed : bool
        Rerun slides that failed in an earlier run even when nothing about them changed.
    slide_timeout_s : float, optional
        Seconds one slide may take; past it the slide fails with SlideTimeoutError and the batch goes on (none: no limit).
    """

    workers: int | None = None
    scheduler: str | None = None
    parallel: Literal["auto", "slides", "chunks"] = "auto"
    chunk_tiles: int = 1024
    retry_failed: bool = False
    slide_timeout_s: float | None = 7200.0

    def __post_init__(self) -> None:
        if self.slide_timeout_s is not None:
            _positive("slide_timeout_s", self.slide_timeout_s)
        if self.workers is not None:
            _positive("workers", self.workers)
        _positive("chunk_tiles", self.chunk_tiles)
        self._check_choices()


@dataclass(frozen=True)
class MILTrainConfig(_Section):
    """Training of a slide-level attention-MIL head (``wsiengine train-mil``).

    Parameters
    ----------
    model : {"abmil", "clam_sb"}
        Gated-attention ABMIL (Ilse et al. 2018) or CLAM-SB (Lu et al. 2021).
    folds : int
        Stratified k-fold cross-validation: fold i is the test set of split i, and a stratified val_fraction of the remaining slides its validation set; 1 makes one train/validation split with no test set.
    val_fraction : float
        Fraction of the non-test slides held out for validation (early stopping, threshold).
    seed : int
        Seeds splits, initialisation, sampling and dropout: same seed, same data, same result.
    max_epochs : int
        Most passes over the training slides.
    min_epochs : int
        Passes before early stopping may stop training.
    patience : int
        Epochs without a better validation AUC (ties broken by validation loss) before stopping; the best epoch is kept.
    lr : float
        Adam learning rate.
    weight_decay : float
        L2 weight decay.
    accumulate : int
        Bags whose gradients are averaged per optimiser step.
    hidden_dim : int
        Width of the embedding layer.
    attn_dim : int
        Width of the attention network.
    dropout : float
        Dropout during training.
    embed_layers : int
        Linear+ReLU+Dropout layers before the attention.
    tile_weight : float
        ABMIL: weight of the tile-score loss (MIL pseudo-labels); 0 trains no tile head.
    k_sample : int
        CLAM-SB: tiles per pseudo-label class in the instance loss.
    bag_weight : float
        CLAM-SB: weight of the bag loss.
    max_tiles : int
        Training only: a bag larger than this is randomly subsampled to this many tiles each time it is drawn (0 = never).
    balanced : bool
        Draw training slides with probability inversely proportional to their class's size.
    threshold_rule : {"youden", "balanced_accuracy", "f1", "fixed"}
        How the decision threshold is chosen on the validation slides (fixed uses 0.5).
    device : {"cpu", "cuda", "auto"}
        Where torch trains.
    threads : int
        torch CPU threads (0 = physical cores, at most 8); results are reproducible for a given thread count.
    cache_gb : float
        Memory for caching slide features between epochs, GiB.
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
    threshold_rule: Literal["youden", "balanced_accuracy", "f1", "fixed"] = "youden"
    device: Literal["cpu", "cuda", "auto"] = "cpu"
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
        _non_negative(self, "min_epochs", "patience", "max_tiles", "threads", "k_sample", "weight_decay",
                      "tile_weight", "cache_gb")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        _fraction("bag_weight", self.bag_weight)
        self._check_choices()

    @classmethod
    def from_env(cls, file: str | os.PathLike[str] | None = None, **explicit: Any) -> "MILTrainConfig":
        """Defaults, then the ``[train]`` table of the TOML ``file`` (else ``$WSIENGINE_CONFIG``),
        then ``WSIENGINE_TRAIN__<NAME>`` variables (dotted only: ``seed`` or ``threads`` alone would
        be ambiguous), then :func:`~wsiengine.config.set_defaults` (``train.seed=...``), then the
        non-None ``explicit`` arguments."""
        from .sources import build_section

        return build_section(cls, "train", explicit, file)
