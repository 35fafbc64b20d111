"""Where settings come from, in one order: defaults, a TOML file, ``WSIENGINE_*`` environment
variables, code (:func:`set_defaults`, then explicit arguments), command-line flags. Later
sources beat earlier ones, as in dask.

Names
    Every field has a *flat name* (its field name, unique across a run's sections:
    ``target_mpp``) and a *dotted name* (``tiling.target_mpp``). Either works in code and in a
    TOML file (``[tiling]`` tables or top-level flat keys); environment variables are
    ``WSIENGINE_TARGET_MPP`` or ``WSIENGINE_TILING__TARGET_MPP``.
Values
    Strings (environment, command line) are parsed by the field's type: booleans from
    ``1/true/yes/on`` and ``0/false/no/off``, ``none`` for an unset optional value, tuples as
    comma-separated lists. Values from TOML and code are type-checked, never guessed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

from ..errors import ConfigError

__all__ = ["ENV_PREFIX", "CONFIG_FILE_ENV", "FieldInfo", "fields_of", "parse_value", "check_value", "field_help",
           "set_defaults", "code_overrides", "read_toml", "build_section", "Layers"]

ENV_PREFIX = "WSIENGINE_"
#: The environment variable naming a TOML configuration file (read when no file is given).
CONFIG_FILE_ENV = "WSIENGINE_CONFIG"

_CODE: dict[str, Any] = {}


@dataclass(frozen=True)
class FieldInfo:
    """One setting: its section, field name, type and help text."""

    section: str
    name: str
    annotation: Any
    default: Any
    help: str
    resolved: bool  # filled by the resolver, not set by users
    flat_env: bool = True  # WSIENGINE_<NAME> as well as WSIENGINE_<SECTION>__<NAME>

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def env_names(self) -> tuple[str, ...]:
        """The environment variables of this setting, the one the docs name first."""
        dotted = f"{ENV_PREFIX}{self.section.upper()}__{self.name.upper()}"
        return (f"{ENV_PREFIX}{self.name.upper()}", dotted) if self.flat_env else (dotted,)

    @property
    def optional(self) -> bool:
        return type(None) in typing.get_args(self.annotation)

    @property
    def base(self) -> Any:
        """The annotation without ``None``."""
        args = [a for a in typing.get_args(self.annotation) if a is not type(None)]
        if typing.get_origin(self.annotation) in (typing.Union, types.UnionType) and args:
            return args[0]
        return self.annotation

    @property
    def choices(self) -> tuple[str, ...] | None:
        """The allowed values of a ``Literal``-typed setting."""
        base = self.base
        return tuple(typing.get_args(base)) if typing.get_origin(base) is typing.Literal else None


def field_help(cls: type) -> dict[str, tuple[str, str]]:
    """``{field: (type text, help text)}`` from the numpydoc ``Parameters`` list of ``cls``."""
    doc = cls.__doc__ or ""
    if "Parameters" not in doc:
        return {}
    body = doc.split("Parameters", 1)[1].split("\n", 2)[2]
    out: dict[str, tuple[str, str]] = {}
    current = None
    for line in body.splitlines():
        entry = re.match(r"^\s{4}(\w+) : (.+)$", line)
        if entry:
            current = entry.group(1)
            out[current] = (entry.group(2).strip(), "")
        elif current and line.strip():
            kind, text = out[current]
            out[current] = (kind, (text + " " + line.strip()).strip())
        elif not line.strip() and current and out[current][1]:
            current = None
    return out


def fields_of(sections: Mapping[str, type], *, flat_env: bool = True) -> dict[str, FieldInfo]:
    """Every field of ``sections`` (``{section name: dataclass}``) by flat name; the flat names
    must be unique. ``flat_env=False``: only ``WSIENGINE_<SECTION>__<NAME>`` variables set them."""
    return dict(_fields_of(tuple(sections.items()), flat_env))


@functools.lru_cache(maxsize=16)
def _fields_of(sections: tuple[tuple[str, type], ...], flat_env: bool) -> dict[str, FieldInfo]:
    out: dict[str, FieldInfo] = {}
    for section, cls in sections:
        hints = get_type_hints(cls)
        docs = field_help(cls)
        for f in dataclasses.fields(cls):
            _, text = docs.get(f.name, ("", ""))
            if f.name in out:
                raise ConfigError(f"setting name {f.name!r} is in both {out[f.name].section!r} and {section!r}")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out[f.name] = FieldInfo(section, f.name, hints[f.name], default, text, bool(f.metadata.get("resolved")),
                                    flat_env)
    return out


def _is(base: Any, kind: type) -> bool:
    return base is kind or typing.get_origin(base) is kind


def parse_value(info: FieldInfo, text: str) -> Any:
    """A string (environment variable, command-line flag) as ``info``'s type; ConfigError when it is not."""
    text = text.strip()
    if info.optional and text.lower() in ("", "none", "null"):
        return None
    base = info.base
    try:
        if base is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        if _is(base, tuple):
            parts = [p for p in re.split(r"[,\s]+", text) if p]
            args = typing.get_args(base)
            if args and args[0] is float:
                values = tuple(float(p) for p in parts)
                return values * 2 if len(values) == 1 else values
            return tuple(parts)
    except ValueError:
        raise ConfigError(f"{info.name}: {text!r} is not a valid {_type_name(info)}") from None
    return text


def check_value(info: FieldInfo, value: Any) -> Any:
    """A value from TOML or code, checked against ``info``'s type (ints are taken for floats,
    lists for tuples, path-likes for strings); ConfigError when it does not fit."""
    if value is None:
        if info.optional:
            return None
        raise ConfigError(f"{info.name} cannot be unset (None)")
    base = info.base
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif _is(base, tuple):
        if isinstance(value, str):
            return parse_value(info, value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = (value,)
        ok = isinstance(value, (list, tuple))
        if ok:
            numbers = bool(typing.get_args(base)) and typing.get_args(base)[0] is float
            kind = (int, float) if numbers else str
            ok = all(isinstance(v, kind) and not isinstance(v, bool) for v in value)
        if ok:
            value = tuple(float(v) for v in value) * (2 if len(value) == 1 else 1) if numbers else tuple(value)
    else:  # str and Literal
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{info.name} must be {_type_name(info)}, got {value!r}")
    return value


def _type_name(info: FieldInfo) -> str:
    base = info.base
    if base is bool:
        return "boolean (true/false)"
    if base is int:
        return "integer"
    if base is float:
        return "number"
    if _is(base, tuple):
        return "comma-separated list"
    return "string"


@contextlib.contextmanager
def set_defaults(**values: Any) -> Iterator[None]:
    """Set options in code for the duration of a ``with`` block, like ``dask.config.set``:
    ``with set_defaults(target_mpp=0.25): ...``. Names are flat (``target_mpp``) or dotted
    (``tiling.target_mpp``); training settings by their dotted name (``train.seed``, read by
    :meth:`MILTrainConfig.from_env`). They beat the TOML file and the environment; explicit
    arguments and command-line flags beat them."""
    from .run import RunConfig
    from .sections import MILTrainConfig

    run_fields = fields_of(RunConfig.SECTIONS)
    train_fields = fields_of({"train": MILTrainConfig})
    for name in values:
        section, _, short = name.rpartition(".")
        known = (short in train_fields) if section == "train" else (short in run_fields and (
            not section or run_fields[short].section == section))
        if not known:
            raise ConfigError(f"unknown option {name!r}; known: {sorted(run_fields)} and train.<name> for "
                              f"{sorted(train_fields)}")
    previous = dict(_CODE)
    _CODE.update(values)
    try:
        yield
    finally:
        _CODE.clear()
        _CODE.update(previous)


def code_overrides(section: str | None = None) -> dict[str, Any]:
    """The options set by :func:`set_defaults` now: those of a run (``section=None``: names
    without a ``train.`` prefix) or of one section given by its dotted names (``"train"``)."""
    if section is None:
        return {k: v for k, v in _CODE.items() if not k.startswith("train.")}
    return {k.split(".", 1)[1]: v for k, v in _CODE.items() if k.startswith(section + ".")}


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A TOML configuration file as a mapping (``[section]`` tables and/or flat keys)."""
    import tomllib

    p = Path(path).expanduser()
    try:
        with open(p, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"configuration file '{p}' does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read configuration file '{p}': {exc}") from None
    return data


class Layers:
    """Values of a set of sections gathered layer by layer, each remembered with its source."""

    def __init__(self, sections: Mapping[str, type], *, flat_env: bool = True) -> None:
        self.sections = dict(sections)
        self.fields = fields_of(sections, flat_env=flat_env)
        self.values: dict[str, dict[str, Any]] = {s: {} for s in sections}
        self.sources: dict[str, str] = {}

    def info(self, name: str, where: str) -> FieldInfo:
        section, _, short = name.rpartition(".")
        info = self.fields.get(short)
        if info is None or (section and section != info.section):
            raise ConfigError(f"unknown setting {name!r} in {where}; known settings: "
                              f"{', '.join(sorted(i.dotted for i in self.fields.values() if not i.resolved))}")
        return info

    def set(self, name: str, value: Any, source: str, *, text: bool = False) -> None:
        info = self.info(name, source)
        value = parse_value(info, value) if text and isinstance(value, str) else check_value(info, value)
        self.values[info.section][info.name] = value
        self.sources[info.dotted] = source

    def apply_mapping(self, mapping: Mapping[str, Any], source: str) -> None:
        """Flat or dotted names, or ``{section: {field: value}}`` tables."""
        for key, value in mapping.items():
            if key in self.sections and isinstance(value, Mapping):
                for name, inner in value.items():
                    self.set(f"{key}.{name}", inner, source)
            elif key in self.sections and dataclasses.is_dataclass(value):
                if not isinstance(value, self.sections[key]):
                    raise ConfigError(f"{key} must be a {self.sections[key].__name__}, got {type(value).__name__}")
                for f in dataclasses.fields(value):
                    self.set(f"{key}.{f.name}", getattr(value, f.name), source)
            else:
                self.set(key, value, source)

    def apply_env(self, env: Mapping[str, str]) -> None:
        for info in self.fields.values():
            if info.resolved:
                continue
            for var in info.env_names:  # the dotted form (last) beats the flat one
                if var in env:
                    self.set(info.dotted, env[var], f"env {var}", text=True)

    def build(self) -> dict[str, Any]:
        """``{section: dataclass instance}``; a bad value's error names where it came from."""
        out = {}
        for section, cls in self.sections.items():
            try:
                out[section] = cls(**self.values[section])
            except ConfigError as exc:
                given = {k: v for k, v in self.sources.items() if k.startswith(section + ".")}
                where = "; ".join(f"{k} from {v}" for k, v in given.items())
                raise ConfigError(f"{exc}" + (f" ({where})" if where else "")) from None
        return out


def build_section(cls: type, section: str, explicit: Mapping[str, Any],
                  file: str | os.PathLike[str] | None = None) -> Any:
    """One section alone (``MILTrainConfig``, section ``train``), in the run's order: defaults,
    the ``[section]`` table of the TOML ``file`` (else ``$WSIENGINE_CONFIG``),
    ``WSIENGINE_<SECTION>__<NAME>`` variables, :func:`set_defaults` (``section.name``), then the
    non-None ``explicit`` values."""
    layers = Layers({section: cls}, flat_env=False)
    path = file if file is not None else os.environ.get(CONFIG_FILE_ENV)
    if path:
        table = read_toml(path).get(section, {})
        if not isinstance(table, Mapping):
            raise ConfigError(f"'{path}': [{section}] must be a table of settings")
        layers.apply_mapping(table, f"file {Path(path).expanduser()}")
    layers.apply_env(os.environ)
    layers.apply_mapping(code_overrides(section), "code (set_defaults)")
    layers.apply_mapping({k: v for k, v in explicit.items() if v is not None}, "code")
    return layers.build()[section]
