"""Command-line flags generated from configuration fields: one flag per setting, named after it
(``target_mpp`` -> ``--target-mpp``), with the field's help, default and environment variable.

Flags default to "not given" (``argparse.SUPPRESS``), so only what the user typed reaches the
command-line layer of :meth:`wsiengine.config.RunConfig.load`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .sources import FieldInfo, parse_value

__all__ = ["PREFIX", "flag", "add_flags", "given_flags", "default_text"]

#: Where generated flags land in the argparse namespace (``config__target_mpp``).
PREFIX = "config__"


def flag(name: str) -> str:
    """The flag of a setting: ``target_mpp`` -> ``--target-mpp``."""
    return "--" + name.replace("_", "-")


def default_text(info: FieldInfo) -> str:
    """A setting's default as help and docs show it."""
    if isinstance(info.default, tuple):
        return ",".join(map(str, info.default))
    return "unset" if info.default is None else str(info.default)


def _metavar(info: FieldInfo) -> str:
    if info.choices:
        return "{" + ",".join(info.choices) + "}"
    base = info.base
    if base is int:
        return "N"
    if base is float:
        return "X"
    if info.name == "mpp":
        return "X[,Y]"
    if getattr(base, "__origin__", None) is tuple:
        return "A,B,..."
    return "PATH" if any(w in info.name for w in ("csv", "dir", "bank", "weights")) else "TEXT"


def add_flags(parser: argparse.ArgumentParser, infos: Iterable[FieldInfo], *, titles: Mapping[str, str] | None = None,
              aliases: Mapping[str, Sequence[str]] | None = None) -> None:
    """Add a flag for each setting in ``infos``, grouped by section (``titles``: section -> group
    description). Booleans get ``--name`` and ``--no-name``; choices are checked by argparse."""
    groups: dict[str, Any] = {}
    for info in infos:
        group = groups.get(info.section)
        if group is None:
            group = groups[info.section] = parser.add_argument_group(f"{info.section} settings",
                                                                     (titles or {}).get(info.section))
        help_text = f"{info.help} (default: {default_text(info)}; env {info.env_names[0]})".replace("%", "%%")
        names = [flag(info.name), *(aliases or {}).get(info.name, ())]
        if info.base is bool:
            group.add_argument(*names, dest=PREFIX + info.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(*names, dest=PREFIX + info.name, default=argparse.SUPPRESS, metavar=_metavar(info),
                               choices=info.choices, help=help_text)


def given_flags(args: argparse.Namespace, infos: Mapping[str, FieldInfo] | None = None) -> dict[str, Any]:
    """The generated flags the user gave, ``{name: value}``; parsed by type when ``infos`` is given."""
    given = {k[len(PREFIX):]: v for k, v in vars(args).items() if k.startswith(PREFIX)}
    if infos is None:
        return given
    return {k: parse_value(infos[k], v) if isinstance(v, str) else v for k, v in given.items()}
