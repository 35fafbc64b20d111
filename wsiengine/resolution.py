"""Where a slide's resolution (micrometres per pixel, mpp) comes from.

The order is fixed:

1. **vendor metadata** — the scanner's own field as the backend reports it
   (``aperio.MPP``, DICOM ``PixelSpacing``, Hamamatsu, MIRAX, Philips, ... surfaced by
   OpenSlide as ``openslide.mpp-x/y``, or by tiffslide as ``tiffslide.mpp-x/y``);
2. **TIFF resolution tags** — ``XResolution``/``YResolution`` with ``ResolutionUnit`` inch or
   centimetre on the first page, read with tifffile;
3. **user override** — ``open_slide(path, mpp=...)`` or a ``slide,mpp`` CSV for batches
   (:func:`read_mpp_csv`);
4. otherwise :class:`~wsiengine.errors.MissingMppError`, naming the override.

A value counts only when it is plausible for microscopy: ``MPP_PLAUSIBLE_RANGE`` micrometres per
pixel. That rejects the 72 dpi placeholder many TIFF writers leave (352.8 µm/px).
With ``force=True`` the user override wins over metadata (for slides whose metadata is wrong).
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import ConfigError, MissingMppError

__all__ = [
    "MPP_PLAUSIBLE_RANGE",
    "MppResolution",
    "MppSource",
    "resolve_mpp",
    "mpp_from_tiff_tags",
    "read_mpp_csv",
    "lookup_mpp",
    "normalise_mpp",
]

logger = logging.getLogger("wsiengine")

#: (lowest, highest) micrometres per pixel accepted from metadata
MPP_PLAUSIBLE_RANGE: tuple[float, float] = (0.01, 64.0)

MppSource = Literal["vendor", "tiff-resolution", "user", "user-forced"]

_UNIT_TO_UM = {2: 25_400.0, 3: 10_000.0}  # TIFF ResolutionUnit: 2 = inch, 3 = centimetre
_VENDOR_KEYS = (
    ("openslide.mpp-x", "openslide.mpp-y"),
    ("tiffslide.mpp-x", "tiffslide.mpp-y"),
)
_GENERIC_VENDORS = {None, "", "generic-tiff", "generic_tiff", "tiff"}


@dataclass(frozen=True)
class MppResolution:
    """A resolved resolution: ``mpp`` (x, y) in µm per level-0 pixel, where it came from, and
    ``detail`` (which field, file or argument)."""

    mpp: tuple[float, float]
    source: MppSource
    detail: str


def normalise_mpp(value: float | tuple[float, float] | list[float] | None) -> tuple[float, float] | None:
    """Turn a scalar or (x, y) pair into a validated ``(x, y)`` tuple in µm/px, or None."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        pair = (float(value), float(value))
    else:
        items = [float(v) for v in value]
        if len(items) != 2:
            raise ConfigError(f"mpp must be a number or an (x, y) pair in µm/px, got {value!r}")
        pair = (items[0], items[1])
    for v in pair:
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(f"mpp must be positive micrometres per pixel, got {value!r}")
    return pair


def _plausible(v: float | None) -> bool:
    return v is not None and math.isfinite(v) and MPP_PLAUSIBLE_RANGE[0] <= v <= MPP_PLAUSIBLE_RANGE[1]


def _float(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _mpp_from_vendor(properties: Mapping[str, str], vendor: str | None) -> MppResolution | None:
    if vendor in _GENERIC_VENDORS:
        # For generic TIFF the backends derive "mpp" from the resolution tags themselves:
        # that belongs to step 2, where it is checked for plausibility.
        return None
    for key_x, key_y in _VENDOR_KEYS:
        x, y = _float(properties.get(key_x)), _float(properties.get(key_y))
        if y is None:
            y = x
        if _plausible(x) and _plausible(y):
            return MppResolution((x, y), "vendor", f"{vendor}: {key_x}")  # type: ignore[arg-type]
    aperio = _float(properties.get("aperio.MPP"))
    if _plausible(aperio):
        return MppResolution((aperio, aperio), "vendor", "aperio.MPP")  # type: ignore[arg-type]
    return None


def mpp_from_tiff_tags(path: str | Path) -> tuple[float, float] | None:
    """µm/px from the first page's ``XResolution``/``YResolution``/``ResolutionUnit``, or None.

    Only inch and centimetre units count; implausible values (see ``MPP_PLAUSIBLE_RANGE``) are
    ignored. Non-TIFF files return None.
    """
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tif:
            tags = tif.pages.first.tags
            unit = tags.get("ResolutionUnit")
            xres, yres = tags.get("XResolution"), tags.get("YResolution")
            if unit is None or xres is None:
                return None
            factor = _UNIT_TO_UM.get(int(unit.value))
            if factor is None:
                return None

            def per_pixel(tag) -> float | None:
                num, den = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
                return factor * den / num if num else None

            x = per_pixel(xres)
            y = per_pixel(yres) if yres is not None else x
    except Exception:  # not a TIFF, or unreadable tags: no TIFF resolution
        return None
    if _plausible(x) and _plausible(y):
        return (x, y)  # type: ignore[return-value]
    return None


def resolve_mpp(
    path: str | Path,
    properties: Mapping[str, str],
    vendor: str | None,
    override: float | tuple[float, float] | None = None,
    *,
    force: bool = False,
    require: bool = True,
) -> MppResolution | None:
    """Resolve a slide's level-0 resolution in the documented order (see module docstring).

    Raises :class:`~wsiengine.errors.MissingMppError` when nothing applies and ``require``;
    returns None instead when ``require`` is False.
    """
    user = normalise_mpp(override)
    if user is not None and force:
        return MppResolution(user, "user-forced", "mpp argument (force_mpp=True)")
    found = _mpp_from_vendor(properties, vendor)
    if found is None:
        tags = mpp_from_tiff_tags(path)
        if tags is not None:
            found = MppResolution(tags, "tiff-resolution", "TIFF XResolution/YResolution")
    if found is not None:
        if user is not None and any(abs(u / m - 1) > 0.01 for u, m in zip(user, found.mpp)):
            logger.warning(
                "%s: metadata says %.4g µm/px (%s); the given mpp %.4g is ignored. "
                "Use force_mpp=True (--force-mpp) to override metadata.",
                Path(path).name, found.mpp[0], found.detail, user[0],
            )
        return found
    if user is not None:
        return MppResolution(user, "user", "mpp argument")
    if not require:
        return None
    raise MissingMppError(
        f"'{Path(path).name}' has no resolution metadata (no vendor mpp, no plausible TIFF "
        "resolution tags). Give it explicitly: open_slide(path, mpp=0.25) in Python, or "
        "--mpp 0.25 / --mpp-csv FILE (columns slide,mpp) on the command line."
    )


def read_mpp_csv(path: str | Path) -> dict[str, tuple[float, float]]:
    """Read a ``slide,mpp`` CSV (optional ``mpp_y`` column) into ``{slide: (x, y)}``.

    ``slide`` may be a file name, a stem, a relative or an absolute path; :func:`lookup_mpp`
    matches all of them.
    """
    table: dict[str, tuple[float, float]] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = {f.strip().lower() for f in (reader.fieldnames or [])}
        if not {"slide", "mpp"} <= fields:
            raise ConfigError(f"{path}: an mpp CSV needs the header 'slide,mpp' (optionally mpp_y)")
        for row_number, row in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            try:
                x = float(row["mpp"])
                y = float(row["mpp_y"]) if row.get("mpp_y") else x
            except ValueError:
                raise ConfigError(f"{path}, line {row_number}: mpp {row['mpp']!r} is not a number") from None
            table[row["slide"]] = normalise_mpp((x, y))  # type: ignore[assignment]
    return table


def lookup_mpp(table: Mapping[str, tuple[float, float]], slide_path: str | Path) -> tuple[float, float] | None:
    """Find a slide in a :func:`read_mpp_csv` table by absolute path, name or stem."""
    p = Path(slide_path)
    for key in (str(p), str(p.resolve()), p.name, p.stem):
        if key in table:
            return table[key]
    for key, value in table.items():
        if Path(key).name == p.name:
            return value
    return None
