"""Slide: one interface over OpenSlide and tiffslide, with resolution-aware reads.

>>> slide = open_slide("x.svs")                      # backend="auto"
>>> slide.mpp, slide.mpp_source                       # ((0.499, 0.499), 'vendor')
>>> patch = slide.read_at_mpp((x, y), (224, 224), target_mpp=0.5)

Reads at a target resolution come from the lowest-resolution level that still resolves the
target (level mpp <= target x (1 + ``MPP_TOLERANCE``)), and are then downsampled once with
area averaging (PIL's box filter). When the chosen level is within ``MPP_TOLERANCE`` of the
target the pixels are returned as read, without any resampling.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .backends import AUTO_ORDER, BACKENDS, SlideBackend
from .errors import (
    ConfigError,
    CorruptSlideError,
    MissingMppError,
    ResolutionError,
    SlideNotFoundError,
    SlideOpenError,
    SlideReadError,
    UnsupportedFormatError,
)
from .resolution import MppResolution, resolve_mpp

__all__ = [
    "Slide", "open_slide", "slide_id_for", "MPP_TOLERANCE", "MAX_READ_BYTES", "LevelRead", "resize_area",
    "THUMBNAIL_WORKERS", "THUMBNAIL_CHUNK_PX",
]

logger = logging.getLogger("wsiengine")

#: relative tolerance when comparing resolutions: 0.499 µm/px serves a 0.5 µm/px request
#: as is (0.2 % off), and a level within 2 % of the target is read without resampling.
MPP_TOLERANCE = 0.02

#: the largest image, in pixels, one backend call may return (about 48 MB of RGB);
#: larger requests are split into pieces of at most this many pixels.
READ_BUDGET_PX = 4096 * 4096

#: the most bytes one :meth:`Slide.read_region` may return (1 GiB of RGB, about 18,900 px square);
#: larger requests are refused with SlideReadError before any backend allocates them.
MAX_READ_BYTES = 1024**3

#: a tiled TIFF image with at least this many tiles ...
SPARSE_MIN_TILES = 1024
#: ... of which fewer than this fraction hold data is refused at open (CorruptSlideError): its
#: declared size is not backed by the file (e.g. 10^6 x 10^6 px in a 960 KB file), and reading it
#: would only produce white at great cost.
SPARSE_MIN_STORED_FRACTION = 0.01


def _usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


#: threads one :meth:`Slide.thumbnail` reads and shrinks with: min(4, usable cores)
THUMBNAIL_WORKERS = min(4, _usable_cores())

#: level pixels of one thumbnail read (about 1024 x 1024 px, 3 MiB of RGB; rounded to whole
#: stored tiles and to the shrink factor)
THUMBNAIL_CHUNK_PX = 1024 * 1024


@dataclass(frozen=True)
class LevelRead:
    """How to serve a region at ``target_mpp``: read ``read_size`` pixels at ``level`` and
    resample to ``out_size`` pixels (no resampling when they are equal)."""

    level: int
    read_size: tuple[int, int]  # (width, height) in pixels of `level`
    out_size: tuple[int, int]  # (width, height) in pixels at target_mpp
    level0_size: tuple[float, float]  # (width, height) in level-0 pixels

    @property
    def resamples(self) -> bool:
        return self.read_size != self.out_size


def resize_area(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``(H, W, 3)`` uint8 to ``size`` = (width, height) by area averaging.

    An exact integer shrink (the usual 0.25 -> 0.5 µm/px case) averages k x k blocks with PIL's
    ``reduce``; any other ratio uses PIL's box filter, which weights partial pixels by area.
    """
    w_in, h_in = image.shape[1], image.shape[0]
    w_out, h_out = int(size[0]), int(size[1])
    if (w_in, h_in) == (w_out, h_out):
        return image
    pil = Image.fromarray(image)
    if w_in % w_out == 0 and h_in % h_out == 0 and w_in // w_out == h_in // h_out:
        return np.asarray(pil.reduce(w_in // w_out))
    return np.asarray(pil.resize((w_out, h_out), Image.Resampling.BOX))


def _looks_like_slide_file(path: Path) -> str | None:
    """A format family by magic bytes ("tiff", "dicom") or None."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return None
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[128:132] == b"DICM":
        return "dicom"
    return None


def _walk_tiff_ifds(path: Path, size: int) -> str | None:
    """Follow the TIFF/BigTIFF IFD chain; a message if an IFD lies beyond the end of the file."""
    import struct

    with open(path, "rb") as handle:
        head = handle.read(16)
        order = "<" if head[:2] == b"II" else ">"
        big = struct.unpack(order + "H", head[2:4])[0] == 43
        offset = struct.unpack(order + ("Q" if big else "I"), head[8:16] if big else head[4:8])[0]
        count_fmt, entry_size, next_fmt = ("Q", 20, "Q") if big else ("H", 12, "I")
        seen: set[int] = set()
        while offset and offset not in seen and len(seen) < 100_000:
            seen.add(offset)
            if offset + struct.calcsize(count_fmt) > size:
                return f"image directory {len(seen) - 1} starts at byte {offset:,} but the file has {size:,}: the file is truncated"
            handle.seek(offset)
            (count,) = struct.unpack(order + count_fmt, handle.read(struct.calcsize(count_fmt)))
            end = offset + struct.calcsize(count_fmt) + count * entry_size + struct.calcsize(next_fmt)
            if end > size:
                return f"image directory {len(seen) - 1} ends at byte {end:,} but the file has {size:,}: the file is truncated"
            handle.seek(end - struct.calcsize(next_fmt))
            (offset,) = struct.unpack(order + next_fmt, handle.read(struct.calcsize(next_fmt)))
    return None


def _tiff_truncation(path: Path) -> str | None:
    """For TIFF files, a message if an image directory or any strip/tile lies beyond the end of the file."""
    import tifffile

    size = path.stat().st_size
    try:
        message = _walk_tiff_ifds(path, size)
    except Exception as exc:  # noqa: BLE001
        return f"its TIFF header cannot be parsed ({type(exc).__name__}: {exc})"
    if message is not None:
        return message
    try:
        with _quiet_tifffile(), tifffile.TiffFile(str(path)) as tif:
            for index, page in enumerate(tif.pages):
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                if offsets.size and int((offsets + counts).max()) > size:
                    end = int((offsets + counts).max())
                    return f"image {index} needs {end:,} bytes but the file has {size:,}: the file is truncated"
                if page.is_tiled and counts.size >= SPARSE_MIN_TILES:
                    stored = int(np.count_nonzero(counts))
                    if stored < SPARSE_MIN_STORED_FRACTION * counts.size:
                        return (
                            f"image {index} declares {page.imagewidth:,} x {page.imagelength:,} px in {counts.size:,} tiles "
                            f"but only {stored:,} of them hold data (the file has {size:,} bytes): its size is not backed "
                            "by the file, so it is damaged or not a real slide"
                        )
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corruption sign
        return f"tifffile cannot parse it ({type(exc).__name__}: {exc})"
    return None


@contextlib.contextmanager
def _quiet_tifffile():
    """Silence tifffile's own warnings while probing a file: our error message says it better."""
    tiff_logger = logging.getLogger("tifffile")
    level = tiff_logger.level
    tiff_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        tiff_logger.setLevel(level)


_UNSUPPORTED_HINTS = ("unsupported", "not a tiff", "image flavor", "not a supported", "missing image file")


class Slide:
    """An open whole-slide image.

    Attributes
    ----------
    path : Path
    backend_name : str
        Which reader opened it (``"tifffile"``, ``"openslide"`` or ``"tiffslide"``).
    level_dimensions : tuple[tuple[int, int], ...]
        (width, height) per level in pixels of that level.
    level_downsamples : tuple[float, ...]
        Level-0 pixels per pixel of each level.
    mpp_source : str or None
        ``"vendor"``, ``"tiff-resolution"``, ``"user"``, ``"user-forced"``; None if unknown.
    open_attempts : dict[str, str]
        Backends tried before the one that succeeded, with their reasons.
    """

    def __init__(
        self,
        path: Path,
        backend: SlideBackend,
        resolution: MppResolution | None,
        *,
        open_attempts: dict[str, str] | None = None,
        open_options: dict[str, Any] | None = None,
    ) -> None:
        self.path = path
        self._backend = backend
        self._resolution = resolution
        self.open_attempts = dict(open_attempts or {})
        self._open_options = dict(open_options or {})

    # -- identity and metadata ------------------------------------------------------------
    @property
    def backend_name(self) -> str:
        return self._backend.name

    @property
    def backend(self) -> SlideBackend:
        return self._backend

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._backend.properties)

    @property
    def vendor(self) -> str | None:
        return self._backend.vendor

    @property
    def format(self) -> str:
        """The file format family: the vendor name when known, else ``"tiff"`` / ``"dicom"``."""
        magic = _looks_like_slide_file(self.path)
        if self.vendor and self.vendor not in ("generic-tiff",):
            return self.vendor
        return self.vendor or magic or self.path.suffix.lstrip(".").lower() or "unknown"

    @property
    def level_count(self) -> int:
        return len(self._backend.level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._backend.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._backend.level_downsamples

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0 in pixels."""
        return self._backend.level_dimensions[0]

    @property
    def has_mpp(self) -> bool:
        return self._resolution is not None

    @property
    def mpp(self) -> tuple[float, float]:
        """Level-0 resolution (x, y) in µm/px. Raises MissingMppError when unknown."""
        if self._resolution is None:
            raise MissingMppError(
                f"'{self.path.name}' has no resolution metadata. Give it explicitly: "
                "open_slide(path, mpp=0.25), or --mpp / --mpp-csv on the command line."
            )
        return self._resolution.mpp

    @property
    def mpp_source(self) -> str | None:
        return self._resolution.source if self._resolution else None

    @property
    def mpp_detail(self) -> str | None:
        return self._resolution.detail if self._resolution else None

    def level_mpp(self, level: int) -> tuple[float, float]:
        """(x, y) µm/px of a level (level-0 mpp times the level's downsample)."""
        mx, my = self.mpp
        d = self.level_downsamples[level]
        return (mx * d, my * d)

    # -- resolution logic --------------------------------------------------------------
    def check_target_mpp(self, target_mpp: float, *, allow_upsample: bool = False) -> None:
        """Raise ResolutionError if ``target_mpp`` is finer than level 0 beyond ``MPP_TOLERANCE``."""
        if not (math.isfinite(target_mpp) and target_mpp > 0):
            raise ConfigError(f"target_mpp must be a positive number of µm/px, got {target_mpp!r}")
        finest = min(self.mpp)
        if target_mpp < finest * (1 - MPP_TOLERANCE) and not allow_upsample:
            raise ResolutionError(
                f"target_mpp={target_mpp:g} µm/px is finer than level 0 of '{self.path.name}' "
                f"({finest:g} µm/px, source: {self.mpp_source}). Use target_mpp >= {finest:g}, or "
                "allow_upsample=True to interpolate (no real detail is added)."
            )

    def best_level_for_mpp(self, target_mpp: float) -> int:
        """The lowest-resolution level whose mpp still resolves ``target_mpp`` (within tolerance)."""
        best = 0
        for level in range(self.level_count):
            if max(self.level_mpp(level)) <= target_mpp * (1 + MPP_TOLERANCE):
                best = level
        return best

    def plan_read(self, size_px: tuple[int, int], target_mpp: float, *, allow_upsample: bool = False) -> LevelRead:
        """Where and how much to read to get ``size_px`` = (width, height) pixels at ``target_mpp``."""
        self.check_target_mpp(target_mpp, allow_upsample=allow_upsample)
        level = self.best_level_for_mpp(target_mpp)
        lx, ly = self.level_mpp(level)
        w, h = int(size_px[0]), int(size_px[1])
        scale_x, scale_y = target_mpp / lx, target_mpp / ly
        if abs(scale_x - 1) <= MPP_TOLERANCE and abs(scale_y - 1) <= MPP_TOLERANCE:
            read = (w, h)  # close enough: serve the level's pixels as they are
        else:
            read = (max(1, round(w * scale_x)), max(1, round(h * scale_y)))
        d = self.level_downsamples[level]
        return LevelRead(level, read, (w, h), (read[0] * d, read[1] * d))

    # -- pixels -----------------------------------------------------------------------------
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB ``(height, width, 3)`` uint8; ``location`` in level-0 px, ``size`` in px of ``level``."""
        if not 0 <= level < self.level_count:
            raise ConfigError(f"level {level} does not exist; '{self.path.name}' has levels 0..{self.level_count - 1}")
        if int(size[0]) * int(size[1]) * 3 > MAX_READ_BYTES:
            raise SlideReadError(
                f"reading {size[0]}x{size[1]} px at level {level} of '{self.path.name}' would need "
                f"{int(size[0]) * int(size[1]) * 3 / 2**20:,.0f} MiB, over the {MAX_READ_BYTES / 2**20:,.0f} MiB limit "
                "of one read: read it in pieces (Slide.thumbnail does) or from a coarser level"
            )
        try:
            return self._backend.read_region(int(location[0]), int(location[1]), level, int(size[0]), int(size[1]))
        except Exception as exc:
            raise SlideReadError(
                f"reading {size[0]}x{size[1]} px at level {level}, level-0 ({location[0]}, {location[1]}) "
                f"of '{self.path}' failed with {self.backend_name}: {type(exc).__name__}: {exc}. The file may be "
                "damaged or truncated; check it opens in QuPath, or try backend='tiffslide'/'openslide'."
            ) from exc

    def read_at_mpp(
        self,
        location: tuple[int, int],
        size_px: tuple[int, int],
        target_mpp: float,
        *,
        allow_upsample: bool = False,
    ) -> np.ndarray:
        """Read ``size_px`` = (width, height) pixels at ``target_mpp`` µm/px with top-left ``location``
        in level-0 px; one area-averaging resample at most."""
        plan = self.plan_read(size_px, target_mpp, allow_upsample=allow_upsample)
        image = self.read_region(location, plan.level, plan.read_size)
        return resize_area(image, plan.out_size)

    def thumbnail(
        self,
        mpp: float,
        *,
        read_budget_px: int = READ_BUDGET_PX,
        max_reads: int | None = None,
        workers: int | None = None,
    ) -> tuple[np.ndarray, tuple[float, float]]:
        """The whole slide at about ``mpp`` µm/px: one integer area-averaging shrink of one level.

        The source is the coarsest level that resolves ``mpp`` (:meth:`best_level_for_mpp`);
        it is shrunk by the integer factors ``f = floor(mpp / level mpp)`` (x and y; within
        ``MPP_TOLERANCE``, so 7.9 µm/px of a 4 µm/px level is a factor 2), each output pixel the
        mean of an ``f x f`` block of level pixels, the blocks at the right and bottom edges
        averaging the level pixels they hold. The output is ``ceil(level size / f)`` pixels and
        the returned (x, y) µm/px is exact: level mpp x ``f`` (so at most ``f - 1`` level pixels
        less than the request when ``mpp`` is not a multiple of the level's).

        The level is read in chunks whose origins are multiples of ``f``, and, when the backend
        reports its stored tile grid (:meth:`SlideBackend.tile_grid`), of whole stored tiles, so
        each tile is decoded once; chunks are read and shrunk by ``workers`` threads (default
        :data:`THUMBNAIL_WORKERS`: the decoders release the GIL). Memory: the output image plus
        one chunk (at most ``THUMBNAIL_CHUNK_PX`` level pixels) per thread; no backend read
        returns more than ``read_budget_px`` pixels (``f`` is capped at ``sqrt(read_budget_px)``).
        With ``max_reads``, a thumbnail that would need more than that many reads of
        ``read_budget_px`` (a huge slide without a coarse enough pyramid level) raises
        :class:`~wsiengine.errors.SlideReadError` before reading anything; a damaged stored tile
        raises it too.
        """
        started = time.perf_counter()
        level = self.best_level_for_mpp(mpp) if mpp >= min(self.mpp) else 0
        lw, lh = self.level_dimensions[level]
        lmx, lmy = self.level_mpp(level)
        side = max(1, math.isqrt(max(1, int(read_budget_px))))
        fx = min(side, max(1, math.floor(mpp / lmx * (1 + MPP_TOLERANCE))))
        fy = min(side, max(1, math.floor(mpp / lmy * (1 + MPP_TOLERANCE))))
        out_w, out_h = -(-lw // fx), -(-lh // fy)
        # Reads of read_budget_px each (f-aligned), the measure max_reads bounds.
        budget_w, budget_h = side // fx * fx, side // fy * fy
        reads = math.ceil(lh / budget_h) * math.ceil(lw / budget_w)
        if max_reads is not None and reads > max_reads:
            raise SlideReadError(
                f"a thumbnail of '{self.path.name}' at {mpp:.3g} µm/px would need {reads:,} reads of level {level} "
                f"({lw:,} x {lh:,} px, the coarsest level that resolves it), over the limit of {max_reads:,}: the slide "
                "is implausibly large for its pyramid. Check the file, or give it a pyramid (e.g. vips tiffsave --pyramid)."
            )
        chunk_w, chunk_h, tiled = self._thumbnail_chunk(level, fx, fy, side, read_budget_px)
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        d = self.level_downsamples[level]

        def read_chunk(origin: tuple[int, int]) -> None:
            x0, y0 = origin
            w, h = min(chunk_w, lw - x0), min(chunk_h, lh - y0)
            piece = self.read_region((round(x0 * d), round(y0 * d)), level, (w, h))
            if (fx, fy) != (1, 1):
                piece = np.asarray(Image.fromarray(piece).reduce((fx, fy)))
            out[y0 // fy : y0 // fy + piece.shape[0], x0 // fx : x0 // fx + piece.shape[1]] = piece

        origins = [(x0, y0) for y0 in range(0, lh, chunk_h) for x0 in range(0, lw, chunk_w)]
        n_workers = min(len(origins), workers or THUMBNAIL_WORKERS)
        if n_workers <= 1:
            for origin in origins:
                read_chunk(origin)
        else:
            pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="wsiengine-thumbnail")
            try:
                for future in [pool.submit(read_chunk, origin) for origin in origins]:
                    future.result()  # the first failure (e.g. a damaged tile) is raised here
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        logger.debug(
            "%s: thumbnail %dx%d px at %.4g µm/px from level %d (%dx%d px, factor %dx%d) in %d reads of %dx%d px%s, "
            "%d threads, %.3f s", self.path.name, out_w, out_h, lmx * fx, level, lw, lh, fx, fy, len(origins), chunk_w,
            chunk_h, " (whole stored tiles)" if tiled else "", max(1, n_workers), time.perf_counter() - started,
        )
        return out, (lmx * fx, lmy * fy)

    def _thumbnail_chunk(self, level: int, fx: int, fy: int, side: int, read_budget_px: int) -> tuple[int, int, bool]:
        """(width, height) in level px of one thumbnail read, multiples of the factors (and of the
        stored tile size when the backend reports it and the two align within the budget), and
        whether it is tile-aligned."""
        target = max(1, min(side, math.isqrt(THUMBNAIL_CHUNK_PX)))
        grid = self._backend.tile_grid(level)
        if grid is not None:
            ux, uy = math.lcm(int(grid[0]), fx), math.lcm(int(grid[1]), fy)
            if ux <= side and uy <= side and ux * uy <= read_budget_px:
                return ux * max(1, target // ux), uy * max(1, target // uy), True
        return fx * max(1, target // fx), fy * max(1, target // fy), False

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self):
        # Pickled as "how to reopen it", so a Dask worker opens its own file handle.
        return (_reopen, (str(self.path), self._open_options))

    def __repr__(self) -> str:
        mpp = f"{self.mpp[0]:.4g} µm/px ({self.mpp_source})" if self.has_mpp else "mpp unknown"
        w, h = self.dimensions
        return f"<Slide '{self.path.name}' {w}x{h} px, {self.level_count} levels, {mpp}, backend={self.backend_name}>"


_REOPEN_CACHE: dict[tuple, Slide] = {}


def _reopen(path: str, options: dict[str, Any]) -> Slide:
    """Unpickle a Slide: reopen once per process and reuse the handle (backends are thread-safe)."""
    key = (path, tuple(sorted((k, repr(v)) for k, v in options.items())), os.getpid())
    slide = _REOPEN_CACHE.get(key)
    if slide is None:
        slide = open_slide(path, **options)
        _REOPEN_CACHE[key] = slide
    return slide


def slide_id_for(path: str | os.PathLike[str]) -> str:
    """The id a slide's outputs are named by: its file name without slide suffixes (``x.ome.tiff`` -> ``x``)."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem if Path(name).suffix else name


def open_slide(
    path: str | os.PathLike[str],
    backend: str = "auto",
    mpp: float | tuple[float, float] | None = None,
    *,
    force_mpp: bool = False,
    require_mpp: bool = True,
) -> Slide:
    """Open a whole-slide image.

    Parameters
    ----------
    path : path-like
    backend : {"auto", "tifffile", "openslide", "tiffslide"}
        ``auto`` tries them in :data:`wsiengine.backends.AUTO_ORDER` (the direct tile path for
        SVS/OME/generic tiled TIFF, then OpenSlide, then tiffslide) and records which opened
        the file (``slide.backend_name``) and why the others refused it (``slide.open_attempts``).
    mpp : float or (float, float), optional
        Level-0 µm/px to use when the file has no resolution metadata.
    force_mpp : bool
        Use ``mpp`` even when the file has metadata (e.g. wrong scanner calibration).
    require_mpp : bool
        Raise MissingMppError at open when no resolution can be found (default). With False
        the slide opens, and ``slide.mpp`` raises on use.

    Raises
    ------
    SlideNotFoundError, UnsupportedFormatError, CorruptSlideError, MissingMppError, ConfigError
    """
    p = Path(os.fspath(path)).expanduser()
    options = {"backend": backend, "mpp": mpp, "force_mpp": force_mpp, "require_mpp": require_mpp}
    if not p.exists():
        raise SlideNotFoundError(f"slide '{p}' does not exist; check the path", path=str(p))
    if not p.is_file():
        raise SlideNotFoundError(f"slide '{p}' is not a file (a directory?); pass the slide file itself", path=str(p))
    if backend == "auto":
        order = AUTO_ORDER
    elif backend in BACKENDS:
        order = (backend,)
    else:
        raise ConfigError(f"unknown backend {backend!r}; choose 'auto' or one of {sorted(BACKENDS)}")

    reasons: dict[str, str] = {}
    opened: SlideBackend | None = None
    for name in order:
        try:
            with _quiet_tifffile():
                opened = BACKENDS[name].open(p)
            if not opened.level_dimensions or min(opened.level_dimensions[0]) <= 0:
                opened.close()
                raise ValueError("no pyramid levels with pixels")
            break
        except Exception as exc:  # noqa: BLE001 - every backend failure is collected for the message
            reasons[name] = f"{type(exc).__name__}: {exc}".strip()
            opened = None
    if opened is None:
        raise _open_error(p, reasons)

    truncated = _tiff_truncation(p) if _looks_like_slide_file(p) == "tiff" else None
    if truncated is not None:
        opened.close()
        raise CorruptSlideError(
            f"cannot read '{p.name}': {truncated}. Copy the file again from its source.",
            path=str(p), reasons={opened.name: truncated, **reasons},
        )
    if reasons:
        logger.info("%s: opened with %s after %s", p.name, opened.name, "; ".join(f"{k}: {v}" for k, v in reasons.items()))
    resolution = resolve_mpp(p, opened.properties, opened.vendor, mpp, force=force_mpp, require=False)
    if resolution is None and require_mpp:
        opened.close()
        resolve_mpp(p, opened.properties, opened.vendor, None, require=True)  # raises MissingMppError
    return Slide(p, opened, resolution, open_attempts=reasons, open_options=options)


def _open_error(path: Path, reasons: dict[str, str]) -> SlideOpenError:
    detail = "; ".join(f"{name}: {why}" for name, why in reasons.items())
    family = _looks_like_slide_file(path)
    if path.stat().st_size == 0:
        return CorruptSlideError(f"cannot read '{path.name}': the file is empty ({detail})", path=str(path), reasons=reasons)
    unsupported = all(any(h in why.lower() for h in _UNSUPPORTED_HINTS) for why in reasons.values())
    if family == "tiff":
        truncated = _tiff_truncation(path)
        if truncated is not None or not unsupported:
            why = truncated or "it is a TIFF file but no reader could decode it"
            return CorruptSlideError(
                f"cannot read '{path.name}': {why} ({detail}). The file may be damaged or truncated; copy it again.",
                path=str(path), reasons=reasons,
            )
    if family is None or unsupported:
        kind = f"a {family.upper()} file, but not a whole-slide image layout the readers support" if family else "not a supported slide format"
        return UnsupportedFormatError(
            f"cannot read '{path.name}': {kind} ({detail}). Supported: Aperio SVS, Hamamatsu NDPI/VMS, "
            "MIRAX, Philips TIFF, Leica SCN, Ventana BIF, DICOM WSI, generic tiled TIFF, OME-TIFF, plain TIFF.",
            path=str(path), reasons=reasons,
        )
    return CorruptSlideError(
        f"cannot read '{path.name}': it looks like {family.upper()} but no reader could open it ({detail}). "
        "The file may be damaged or truncated; copy it again.",
        path=str(path), reasons=reasons,
    )
