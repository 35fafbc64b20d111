"""Exceptions users can catch.

Every message says what is wrong and what to do about it. All exceptions derive from
:class:`WsiEngineError`, so ``except wsiengine.errors.WsiEngineError`` catches them all.
"""

from __future__ import annotations

__all__ = [
    "WsiEngineError",
    "SlideOpenError",
    "SlideNotFoundError",
    "CorruptSlideError",
    "UnsupportedFormatError",
    "SlideReadError",
    "MissingMppError",
    "ResolutionError",
    "NoTissueError",
    "SlideTimeoutError",
    "ConfigError",
    "InputError",
    "AnnotationError",
    "ModelError",
    "ProviderError",
    "TrainingDataError",
    "MissingFeaturesError",
    "StoreError",
    "OutputError",
    "OutputLockedError",
    "ReportError",
    "RemoteEndpointError",
    "VLMError",
]


class WsiEngineError(Exception):
    """Base class of every error wsiengine raises on purpose."""


class ConfigError(WsiEngineError, ValueError):
    """An option has an invalid value (the message names the option and the valid range)."""


class InputError(WsiEngineError, ValueError):
    """An argument does not fit the call: a per-tile array whose length differs from the tile
    grid's, an array of the wrong shape, a value out of range, or an argument missing that another
    one needs (the message names the argument and what it must be)."""


class AnnotationError(WsiEngineError, ValueError):
    """An annotation file or object cannot be read: not JSON, not GeoJSON, or not the expected
    layout (QuPath GeoJSON, CAMELYON16 NCRF JSON or ASAP XML); the message names the file."""


class SlideOpenError(WsiEngineError):
    """A slide cannot be opened.

    Attributes
    ----------
    path : str
        The file that failed.
    reasons : dict[str, str]
        Per backend (``"openslide"``, ``"tiffslide"``), why it refused the file.
    """

    def __init__(self, message: str, *, path: str = "", reasons: dict[str, str] | None = None):
        super().__init__(message)
        self.path = path
        self.reasons = dict(reasons or {})


class SlideNotFoundError(SlideOpenError, FileNotFoundError):
    """The slide path does not exist or is not a file."""


class CorruptSlideError(SlideOpenError):
    """The file looks like a slide format but is truncated or damaged."""


class UnsupportedFormatError(SlideOpenError):
    """No backend recognises the file's format."""


class SlideReadError(WsiEngineError):
    """Reading pixels from an opened slide failed (damaged tile, truncated file, I/O error)."""


class MissingMppError(WsiEngineError):
    """The slide has no usable resolution (micrometres per pixel) and none was given."""


class ResolutionError(WsiEngineError, ValueError):
    """A requested resolution cannot be served, e.g. finer than the slide's level 0."""


class NoTissueError(WsiEngineError):
    """Tissue detection found no tissue, or tiling found no tile with enough tissue.

    Raised only when asked for (``on_no_tissue="raise"`` / ``on_no_tiles="raise"``); by default an empty
    :class:`~wsiengine.tissue.TissueMask` or :class:`~wsiengine.tiling.TileGrid` is returned
    and a warning is logged.
    """


class ModelError(WsiEngineError):
    """A model file is missing, unreadable, or does not match its spec (input size, embedding size)."""


class UnknownEncoderError(ModelError, KeyError):
    """An encoder name that is not in the registry (also a ``KeyError``)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ProviderError(WsiEngineError):
    """A requested ONNX Runtime execution provider (CUDA, TensorRT) is not available here."""


class StoreError(WsiEngineError):
    """A result store cannot be written or read (full disk, newer schema, incomplete store)."""


class OutputError(WsiEngineError):
    """The output folder cannot be used: the path is a file, it is not writable, or a file of the
    run (``summary.csv``, a slide's results) cannot be written there (full disk, read-only)."""


class OutputLockedError(OutputError):
    """Another run is writing to the same output folder (it holds ``OUT/.wsiengine.lock``).

    Attributes
    ----------
    holder : dict
        What the lock file says about its holder: ``pid``, ``host``, ``started``.
    """

    def __init__(self, message: str, holder: dict | None = None) -> None:
        super().__init__(message)
        self.holder = dict(holder or {})


class TrainingDataError(WsiEngineError, ValueError):
    """Training inputs disagree: a labels CSV, split file or feature stores that do not match."""


class MissingFeaturesError(TrainingDataError):
    """Slides named in a labels CSV (or split file) have no feature store.

    Attributes
    ----------
    slide_ids : list[str]
        The slides without features.
    """

    def __init__(self, message: str, slide_ids: list[str]) -> None:
        super().__init__(message)
        self.slide_ids = list(slide_ids)


class ReportError(WsiEngineError):
    """A slide report cannot be made: the store lacks what the report needs, or its files cannot be written."""


class RemoteEndpointError(ConfigError):
    """A VLM endpoint outside this machine was configured without ``allow_remote`` (``--allow-remote``)."""


class VLMError(WsiEngineError):
    """A VLM request failed: timeout, connection refused, HTTP error or an unusable reply.

    Reports never fail on it: they fall back to the template and record the failure as a flag.
    """


class SlideTimeoutError(WsiEngineError):
    """A slide took longer than the run's per-slide time budget (``slide_timeout_s``)."""


def log_safe(text: object) -> str:
    """``text`` for a log line: control and other non-printable characters escaped (``\\n``,
    ``\\x1b``), so a slide named with a newline cannot forge log lines; printable text is unchanged."""
    text = str(text)
    return text if text.isprintable() else "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
