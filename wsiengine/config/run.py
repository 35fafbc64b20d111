"""RunConfig: every setting of a run, nested by stage, frozen, built once.

>>> config = RunConfig.load()                                  # defaults, TOML file, environment
>>> config = RunConfig.load("run.toml", target_mpp=0.5, tile_px=224)   # + explicit arguments
>>> config.tiling.target_mpp, config.source("tiling.target_mpp")      # (0.5, 'code')
>>> config.key()                                               # the resume key

The order is fixed (:mod:`wsiengine.config.sources`): defaults, a TOML file (``file=`` or
``$WSIENGINE_CONFIG``), ``WSIENGINE_*`` variables, :func:`set_defaults`, explicit arguments,
command-line flags. ``target_mpp``/``tile_px`` left unset are filled once by
:meth:`RunConfig.resolve_tiling` from the MIL head, else the encoder, else the defaults; the
models' hashes are filled by :meth:`RunConfig.with_models`. Stages receive the sections'
plain values and never read the environment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import ConfigError, ModelError
from .sections import (
    DEFAULT_TARGET_MPP,
    DEFAULT_TILE_PX,
    BatchConfig,
    EncoderConfig,
    MILConfig,
    OutputsConfig,
    ReportConfig,
    SlideConfig,
    StreamConfig,
    TilingConfig,
    TissueConfig,
    VLMConfig,
)
from .sources import CONFIG_FILE_ENV, FieldInfo, Layers, code_overrides, fields_of, read_toml
from .tiling import ModelTiling, tiling_mismatch_message

__all__ = ["RunConfig", "DEFAULT_SOURCE"]

logger = logging.getLogger("wsiengine")

DEFAULT_SOURCE = "default"
#: Sections that change a slide's results (the resume key); the others change speed or bookkeeping.
_RESULT_SECTIONS = ("tissue", "tiling", "encoder", "mil", "outputs")
#: Settings that may name a file or folder.
_PATH_SETTINGS = ("encoder.encoder", "encoder.encoder_weights", "encoder.trt_cache_dir", "mil.mil", "slide.mpp_csv",
                  "report.tile_bank", "outputs.id_map")
#: Settings filled from the models by the resolver.
_RESOLVED = ("encoder.encoder_sha256", "encoder.encoder_spec_sha256", "mil.mil_sha256", "mil.slide_threshold",
             "mil.tile_calibration")
#: Keys of a head's ``deposit_rules`` and the ``mil`` settings they fill.
_HEAD_RULES = {"grow_threshold": "tile_threshold", "seed_threshold": "seed_threshold", "smoothing": "smoothing",
               "min_tiles": "min_focus_tiles", "single_tile_threshold": "single_tile_threshold"}
#: Sources that name a model (the labels of :class:`ModelTiling`).
_MODEL_SOURCES = ("MIL head", "encoder ")
#: Fields of those sections that do not change results.
_NOT_RESULTS = frozenset({"providers", "allow_fallback", "threads", "device_id", "trt_cache_dir", "report",
                          "encoder", "encoder_weights", "mil", "id_map"})


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run (see the module docstring). Hashable and picklable; ``sources``
    (where each value came from) is carried along but takes no part in equality."""

    slide: SlideConfig = field(default_factory=SlideConfig)
    tissue: TissueConfig = field(default_factory=TissueConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    mil: MILConfig = field(default_factory=MILConfig)
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    vlm: VLMConfig = field(default_factory=VLMConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    sources: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)

    SECTIONS: ClassVar[dict[str, type]] = {
        "slide": SlideConfig, "tissue": TissueConfig, "tiling": TilingConfig, "stream": StreamConfig,
        "encoder": EncoderConfig, "mil": MILConfig, "outputs": OutputsConfig, "report": ReportConfig,
        "vlm": VLMConfig, "batch": BatchConfig,
    }

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def fields(cls) -> dict[str, FieldInfo]:
        """Every setting by flat name (``target_mpp`` -> section ``tiling``, type, help)."""
        return fields_of(cls.SECTIONS)

    @classmethod
    def load(cls, file: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None,
             cli: Mapping[str, Any] | None = None, cli_text: bool = False, **code: Any) -> "RunConfig":
        """Build from every source in order: defaults, the TOML ``file`` (else ``$WSIENGINE_CONFIG``),
        ``env`` (default ``os.environ``), :func:`set_defaults`, the ``code`` keyword arguments
        (flat or dotted names, or whole sections as dataclasses or mappings; None means not
        given), then ``cli`` (``{name: value}``, labelled ``command line``; strings parsed by
        type when ``cli_text``)."""
        env = os.environ if env is None else env
        layers = Layers(cls.SECTIONS)
        path = file if file is not None else env.get(CONFIG_FILE_ENV)
        if path:
            layers.apply_mapping(_file_settings(path), f"file {Path(path).expanduser()}")
        layers.apply_env(env)
        layers.apply_mapping(code_overrides(), "code (set_defaults)")
        layers.apply_mapping({k: v for k, v in code.items() if v is not None}, "code")
        for name, value in (cli or {}).items():
            layers.set(name, value, f"command line --{name.split('.')[-1].replace('_', '-')}", text=cli_text)
        return cls(**layers.build(), sources=tuple(sorted(layers.sources.items())))

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with settings changed in code (flat or dotted names, or whole sections). When
        the encoder or head changes, what was taken from the old models (their hashes, and a
        tiling that came from them) is unset again, to be resolved anew."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if not changes:
            return self
        layers = Layers(self.SECTIONS)
        for section in self.SECTIONS:
            layers.values[section] = dataclasses.asdict(getattr(self, section))
        layers.sources.update(self.sources)
        layers.apply_mapping(changes, "code")
        config = RunConfig(**layers.build(), sources=tuple(sorted(layers.sources.items())))
        return config._forget_models() if config._models() != self._models() else config

    def set(self, dotted: str, value: Any, source: str = "code") -> "RunConfig":
        """A copy with one setting (dotted name) set to ``value``, None included (``mil.mil``
        None: no head), recorded as coming from ``source``."""
        section, _, name = dotted.partition(".")
        info = self.fields().get(name)
        if info is None or info.section != section:
            raise ConfigError(f"unknown setting {dotted!r}")
        config = self._with(section, {name: value}, {dotted: source})
        return config._forget_models() if config._models() != self._models() else config

    def _models(self) -> tuple[Any, ...]:
        return self.encoder.encoder, self.encoder.encoder_weights, self.mil.mil

    def _forget_models(self) -> "RunConfig":
        """Unset what was resolved from the models (hashes, threshold, a tiling or deposit rules they gave)."""
        sources = dict(self.sources)
        model_given = [n for n in ("target_mpp", "tile_px") if sources.get(f"tiling.{n}", "").startswith(_MODEL_SOURCES)]
        rules_given = [n for n in _HEAD_RULES.values() if sources.get(f"mil.{n}", "").startswith(_MODEL_SOURCES)]
        for name in [*(f"tiling.{n}" for n in model_given), *(f"mil.{n}" for n in rules_given), *_RESOLVED]:
            sources.pop(name, None)
        defaults = MILConfig()
        return dataclasses.replace(
            self, tiling=self.tiling.replace(**{n: None for n in model_given}),
            encoder=self.encoder.replace(encoder_sha256=None, encoder_spec_sha256=None),
            mil=self.mil.replace(mil_sha256=None, slide_threshold=None, tile_calibration=None,
                                 **{n: getattr(defaults, n) for n in rules_given}),
            sources=tuple(sorted(sources.items())))

    def _with(self, section: str, changes: dict[str, Any], sources: dict[str, str]) -> "RunConfig":
        merged = dict(self.sources)
        merged.update(sources)
        return dataclasses.replace(self, **{section: getattr(self, section).replace(**changes)},
                                   sources=tuple(sorted(merged.items())))

    # -- resolution --------------------------------------------------------------------------
    def resolve_deposit_rules(self, head_rules: Mapping[str, Any] | None, label: str = "MIL head deposit_rules"
                              ) -> "RunConfig":
        """The deposit rules a MIL head recorded (``config.json`` ``deposit_rules``, chosen on its
        validation data) for each rule setting still at its default; settings given by a file,
        the environment, code or the command line win. Idempotent."""
        if not isinstance(head_rules, Mapping):
            return self
        changes, sources = {}, {}
        for key, name in _HEAD_RULES.items():
            if key in head_rules and self.source(f"mil.{name}") == DEFAULT_SOURCE:
                changes[name], sources[f"mil.{name}"] = head_rules[key], label
        if not changes:
            return self
        try:
            return self._with("mil", changes, sources)
        except ConfigError as exc:
            raise ModelError(f"the MIL head's deposit_rules are invalid: {exc}") from None

    def resolve_tiling(self, head: ModelTiling | None = None, encoder: ModelTiling | None = None) -> "RunConfig":
        """``target_mpp`` and ``tile_px`` filled where unset: from the MIL ``head``'s training
        tiling, else the ``encoder``'s spec, else 0.5 µm/px and 224 px. Logs the one mismatch
        warning when the result differs from the head's tiling. Idempotent."""
        changes, sources = {}, {}
        for name, default in (("target_mpp", DEFAULT_TARGET_MPP), ("tile_px", DEFAULT_TILE_PX)):
            if getattr(self.tiling, name) is not None:
                continue
            for model in (head, encoder):
                if model is not None and getattr(model, name):
                    changes[name], sources[f"tiling.{name}"] = getattr(model, name), model.label
                    break
            else:
                changes[name], sources[f"tiling.{name}"] = default, DEFAULT_SOURCE
        resolved = self._with("tiling", changes, sources) if changes else self
        if head is not None:
            warning = tiling_mismatch_message(head, resolved.tiling.target_mpp, resolved.tiling.tile_px)
            if warning:
                logger.warning(warning)
        return resolved

    def with_models(self, *, encoder_sha256: str | None, mil_sha256: str | None,
                    slide_threshold: float | None, encoder_spec_sha256: str | None = None,
                    tile_calibration: str | None = None) -> "RunConfig":
        """The models' identities filled in (part of :meth:`key`)."""
        config = self._with("encoder", {"encoder_sha256": encoder_sha256, "encoder_spec_sha256": encoder_spec_sha256},
                            {"encoder.encoder_sha256": "encoder file", "encoder.encoder_spec_sha256": "encoder spec"})
        return config._with("mil", {"mil_sha256": mil_sha256, "slide_threshold": slide_threshold,
                                    "tile_calibration": tile_calibration},
                            {"mil.mil_sha256": "MIL head files", "mil.slide_threshold": "MIL head files",
                             "mil.tile_calibration": "MIL head files"})

    def with_absolute_paths(self) -> "RunConfig":
        """Settings that name existing files or folders (encoder, weights, head, mpp CSV, tile
        bank, TensorRT cache) made absolute, so worker processes and stored provenance do not
        depend on the working directory. Names such as ``default`` stay as they are."""
        config = self
        for dotted in _PATH_SETTINGS:
            section, name = dotted.split(".")
            value = getattr(getattr(config, section), name)
            if not _names_a_file(dotted, value) or not os.path.exists(os.path.expanduser(value)):
                continue
            absolute = os.path.abspath(os.path.expanduser(value))
            if absolute != value:
                config = config._with(section, {name: absolute}, {dotted: config.source(dotted)})
        return config

    # -- reading -----------------------------------------------------------------------------
    def source(self, dotted: str) -> str:
        """Where the value of ``dotted`` (``tiling.target_mpp``) came from: ``default``, ``file
        PATH``, ``env VAR``, ``code``, ``command line --flag``, or the model it was taken from."""
        return dict(self.sources).get(dotted, DEFAULT_SOURCE)

    def explain(self) -> list[tuple[str, Any, str]]:
        """``(dotted name, value, source)`` for every setting, section by section."""
        rows = []
        for section in self.SECTIONS:
            for name, value in getattr(self, section).to_dict().items():
                rows.append((f"{section}.{name}", value, self.source(f"{section}.{name}")))
        return rows

    def to_toml(self) -> str:
        """The settings as a TOML file :meth:`load` reads back (unset and resolved values are
        comments), each value followed by where it came from."""
        lines = []
        for section in self.SECTIONS:
            lines.append(f"[{section}]")
            for info in (i for i in self.fields().values() if i.section == section):
                value = getattr(getattr(self, section), info.name)
                source = self.source(info.dotted)
                text = f"{info.name} = {_toml_value(value)}" if value is not None else f"# {info.name} = (unset)"
                if info.resolved and value is not None:
                    text = "# " + text
                lines.append(f"{text:<44} # {source}" if not text.startswith("#") else f"{text}  ({source})")
            lines.append("")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{section: {field: value}}``, JSON-ready: what a result store records verbatim."""
        return {section: getattr(self, section).to_dict() for section in self.SECTIONS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
        """The configuration a store recorded (:meth:`to_dict`); unknown keys are refused."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a run configuration is a mapping of sections, got {type(data).__name__}")
        layers = Layers(cls.SECTIONS)
        layers.apply_mapping({k: v for k, v in data.items()}, "stored configuration")
        return cls(**layers.build())

    def key(self) -> str:
        """The resume key: a hash of every setting that changes a slide's results (tissue,
        resolved tiling, encoder and head files, tile threshold, outputs), not of speed settings
        (stream, batch, providers, threads) nor of the report's (see ``report_key``)."""
        payload = {}
        for section in _RESULT_SECTIONS:
            payload[section] = {k: v for k, v in getattr(self, section).to_dict().items() if k not in _NOT_RESULTS}
        payload["slide"] = {"backend": self.slide.backend, "force_mpp": self.slide.force_mpp}  # mpp: per slide
        payload["encoder"]["model"] = self.encoder.encoder_sha256 or self.encoder.encoder
        payload["encoder"]["spec"] = self.encoder.encoder_spec_sha256 or self.encoder.encoder
        payload["mil"]["model"] = self.mil.mil_sha256 or self.mil.mil
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def _names_a_file(dotted: str, value: Any) -> bool:
    """Whether a path setting's value names a file rather than a model: the encoder is a file
    when it ends with ``.onnx`` (else a registry name), the head when it is not ``default``."""
    if not isinstance(value, str) or not value:
        return False
    if dotted == "encoder.encoder":
        return value.endswith(".onnx")
    if dotted == "mil.mil":
        return value != "default"
    return True


def _file_settings(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A TOML file's settings for a run: its ``[train]`` table (for ``train-mil``) left out, and
    relative file paths taken relative to the file's folder, not the working directory."""
    data = dict(read_toml(path))
    data.pop("train", None)
    folder = Path(path).expanduser().resolve().parent
    tables = {k: dict(v) for k, v in data.items() if isinstance(v, dict)}
    data.update(tables)
    for dotted in _PATH_SETTINGS:
        section, name = dotted.split(".")
        # a setting may be written in its [section] table, by its flat name or by its dotted name
        for holder, key in ((tables.get(section, {}), name), (data, name), (data, dotted)):
            value = holder.get(key)
            if isinstance(value, str) and _names_a_file(dotted, value) and not os.path.isabs(os.path.expanduser(value)):
                holder[key] = str(folder / value)
    return data


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))
