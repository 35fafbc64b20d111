"""Heatmap storage: a :class:`~wsiengine.heatmap.raster.HeatmapRaster` as a multiscale Zarr v3
pyramid with OME-NGFF ``multiscales`` metadata (pixel-centre transforms to level-0 pixels), and
back.

See :mod:`wsiengine.heatmap` for the coordinate conventions. Needs numpy and zarr (v3).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from ..errors import ConfigError, StoreError
from .raster import HeatmapRaster, downsample_nanmean

__all__ = ["write_heatmap", "read_heatmap", "list_heatmaps", "NGFF_VERSION"]

#: NGFF version written in each ``multiscales`` entry
NGFF_VERSION = "0.4"
_RESERVED_ATTRS = ("multiscales", "ome", "wsiengine")


# -- Zarr storage with OME-NGFF metadata --------------------------------------------------


def _open(group: Any, mode: str):
    """An open zarr Group, or one opened from a path."""
    if isinstance(group, (str, os.PathLike)):
        import zarr

        try:
            return zarr.open_group(str(group), mode=mode)
        except (FileNotFoundError, OSError) as exc:
            raise StoreError(f"cannot open the result store '{group}': {exc}") from exc
        except Exception as exc:  # zarr raises its own errors for a missing group
            raise StoreError(f"cannot open '{group}' as a Zarr group: {exc}") from exc
    return group


def _ngff_transforms(raster: HeatmapRaster, level: int) -> list[dict[str, Any]]:
    """NGFF scale + translation (pixel-centre convention, axes y, x) of pyramid level ``level``."""
    f = 2**level
    sx, sy = raster.cell_size_level0[0] * f, raster.cell_size_level0[1] * f
    tx = raster.origin_level0[0] + sx / 2 - 0.5
    ty = raster.origin_level0[1] + sy / 2 - 0.5
    return [{"type": "scale", "scale": [sy, sx]}, {"type": "translation", "translation": [ty, tx]}]


def _json_float(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def write_heatmap(
    group: Any,
    name: str,
    raster: HeatmapRaster,
    *,
    min_size: int = 64,
    chunks: int = 512,
    attrs: dict[str, Any] | None = None,
) -> None:
    """Write ``raster`` as a multiscale pyramid at ``group["heatmaps"][name]``.

    Level ``k`` (array ``"k"``) is ``raster`` downsampled ``2**k`` times by
    :func:`downsample_nanmean` (each level from the one before), until both sides are at most
    ``min_size``. Arrays are float32 with fill value NaN, dimension names ``y, x``. The group's
    attrs carry OME-NGFF ``multiscales`` (version 0.4; the same entry under ``attrs["ome"]``
    as NGFF 0.5 places it for Zarr v3) mapping array indices to level-0 pixel centres, and
    ``attrs["wsiengine"]``: unit, ``slide_mpp`` (µm/px), ``transform_level0`` (the level-0
    raster's pixel-corner affine), ``value`` (the name), ``range`` ([nanmin, nanmax], None when
    all NaN) and the conventions. An existing heatmap of that name is replaced.

    Parameters
    ----------
    group : zarr.Group or path
        A writable Zarr v3 group (e.g. a result store being written).
    name : str
        Heatmap name, e.g. ``"attention"`` or ``"tile_scores"``.
    raster : HeatmapRaster
    min_size : int
        Stop once both sides of a level are <= this many pixels (>= 1).
    chunks : int
        Chunk side, pixels (>= 1).
    attrs : dict, optional
        Extra JSON-serialisable attributes for the heatmap group (not ``multiscales``,
        ``ome`` or ``wsiengine``).
    """
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ConfigError(f"heatmap name must be a non-empty string without '/', got {name!r}")
    if not isinstance(raster, HeatmapRaster):
        raise ConfigError(f"raster must be a HeatmapRaster (see tile_raster), got {type(raster).__name__}")
    if int(min_size) < 1:
        raise ConfigError(f"min_size must be >= 1 pixel, got {min_size}")
    if int(chunks) < 1:
        raise ConfigError(f"chunks must be >= 1 pixel, got {chunks}")
    extra = dict(attrs or {})
    clash = [k for k in extra if k in _RESERVED_ATTRS]
    if clash:
        raise ConfigError(f"attrs may not set {clash}: write_heatmap writes those itself")

    levels = [raster.values]
    while max(levels[-1].shape) > int(min_size) and max(levels[-1].shape) > 1:
        levels.append(downsample_nanmean(levels[-1]))

    finite = raster.values[np.isfinite(raster.values)]
    value_range = [_json_float(finite.min()), _json_float(finite.max())] if finite.size else [None, None]
    multiscale = {
        "name": name,
        "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
        "datasets": [{"path": str(k), "coordinateTransformations": _ngff_transforms(raster, k)} for k in range(len(levels))],
        "type": "mean",
        "metadata": {
            "method": "wsiengine.heatmap.downsample_nanmean",
            "description": "2x2 mean of the non-NaN children of the level above; NaN where all are NaN",
        },
    }
    meta = {
        "unit": "level-0 pixel",
        "slide_mpp": None if raster.slide_mpp is None else list(raster.slide_mpp),
        "transform_level0": raster.transform().tolist(),
        "cell_size_level0": list(raster.cell_size_level0),
        "origin_level0": list(raster.origin_level0),
        "value": name,
        "range": value_range,
        "levels": len(levels),
        "pixel_convention": {
            "transform_level0": "pixel corner: (col, row) -> level-0 (x, y) of the pixel's top-left corner",
            "ngff": "pixel centre: index i is the pixel centre; output is level-0 pixel centres (translation = origin + scale/2 - 0.5)",
        },
    }
    target = _open(group, "a")
    try:
        heatmaps = target.require_group("heatmaps")
        hm = heatmaps.create_group(name, overwrite=True)
        for k, data in enumerate(levels):
            shape = data.shape
            hm.create_array(
                str(k),
                shape=shape,
                dtype="float32",
                chunks=(max(1, min(int(chunks), shape[0])), max(1, min(int(chunks), shape[1]))),
                fill_value=np.nan,
                dimension_names=("y", "x"),
            )[...] = data
        hm.attrs.update({
            **extra,
            "multiscales": [{"version": NGFF_VERSION, **multiscale}],
            "ome": {"version": "0.5", "multiscales": [multiscale]},
            "wsiengine": meta,
        })
    except OSError as exc:
        raise StoreError(f"writing heatmap '{name}' failed: {exc}. Check the store is writable and the disk has space.") from exc


def list_heatmaps(group: Any) -> list[str]:
    """Sorted names of the heatmaps in ``group["heatmaps"]`` (empty when there are none)."""
    g = _open(group, "r")
    try:
        heatmaps = g["heatmaps"]
    except KeyError:
        return []
    return sorted(n for n, child in heatmaps.groups() if "multiscales" in child.attrs or "ome" in child.attrs)


def read_heatmap(group: Any, name: str, level: int = 0) -> HeatmapRaster:
    """Read level ``level`` of heatmap ``name`` back as a :class:`HeatmapRaster`.

    Cell size and origin (level-0 pixels) come from the level's NGFF scale and translation
    (pixel-centre convention, inverted as ``origin = translation - scale/2 + 0.5``).

    Raises
    ------
    StoreError
        No heatmap of that name, or its metadata is missing or malformed.
    ConfigError
        ``level`` is not one of the stored levels.
    """
    g = _open(group, "r")
    available = list_heatmaps(g)
    if name not in available:
        raise StoreError(f"no heatmap named {name!r} in the store; available: {available or 'none'}")
    hm = g["heatmaps"][name]
    attrs = dict(hm.attrs)
    ms = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
    try:
        datasets = ms[0]["datasets"]
        axes = [a["name"] for a in ms[0]["axes"]]
    except (TypeError, KeyError, IndexError) as exc:
        raise StoreError(f"heatmap {name!r} has no valid OME-NGFF multiscales metadata") from exc
    if axes != ["y", "x"]:
        raise StoreError(f"heatmap {name!r} has axes {axes}; expected ['y', 'x']")
    if not isinstance(level, (int, np.integer)) or not 0 <= int(level) < len(datasets):
        raise ConfigError(f"heatmap {name!r} has levels 0..{len(datasets) - 1}, got level {level!r}")
    ds = datasets[int(level)]
    transforms = {t["type"]: t for t in ds.get("coordinateTransformations", [])}
    try:
        sy, sx = (float(s) for s in transforms["scale"]["scale"])
        ty, tx = (float(t) for t in transforms.get("translation", {"translation": [sy / 2 - 0.5, sx / 2 - 0.5]})["translation"])
    except (KeyError, ValueError, TypeError) as exc:
        raise StoreError(f"heatmap {name!r} level {level}: malformed coordinateTransformations {ds.get('coordinateTransformations')}") from exc
    meta = attrs.get("wsiengine") or {}
    mpp = meta.get("slide_mpp")
    return HeatmapRaster(
        values=np.asarray(hm[ds["path"]][...], dtype=np.float32),
        cell_size_level0=(sx, sy),
        origin_level0=(tx - sx / 2 + 0.5, ty - sy / 2 + 0.5),
        slide_mpp=None if mpp is None else (float(mpp[0]), float(mpp[1])),
    )
