"""Helpers the benchmark scripts share: machine description, package versions, machine-wide CPU use."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU model name (from /proc/cpuinfo where it exists)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model


def package_versions(dists: tuple[str, ...]) -> dict[str, str]:
    """``{distribution: version or "absent"}``."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in dists:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "absent"
    return out


def busy_cpu_s() -> float | None:
    """CPU seconds the whole machine has spent busy (all processes), from /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
