"""MIL inference in ONNX Runtime: tile embeddings of one slide -> :class:`SlidePrediction`.

>>> head = MILHead.load("mil_model/")        # a head directory, no torch needed
>>> pred = head.predict(features)             # features: (N, D) float32 embeddings of one slide
>>> pred.probability, pred.label, pred.attention.shape, pred.tile_scores.shape

A **head directory** holds two files, and optionally a third:

``model.onnx``
    The graph (written by :func:`wsiengine.models.training.mil_export.export_mil_onnx`): input
    ``features`` float32 ``(N, D)`` with N dynamic; outputs ``probability`` float32 ``(1,)``
    (the positive class), ``attention`` float32 ``(N,)`` (softmax over tiles, sums to 1) and
    ``tile_scores`` float32 ``(N,)`` (per-tile positive probability in [0, 1]).
``config.json``
    ``{"format": "wsiengine.mil_head", "format_version": 1, "name": str, "model": "abmil" |
    "clam_sb" | ..., "in_dim": int, "threshold": float in [0, 1], "class_names": [negative,
    positive], "encoder": str or null, "onnx": "model.onnx", "sha256": str, ...}``. Required:
    ``in_dim`` and ``threshold``; other keys are optional and extra keys (metrics, training
    provenance) are kept in :attr:`MILHead.config`.
``reference.npz`` (optional)
    An :class:`~wsiengine.ood.EmbeddingReference` of the tile embeddings the head was trained on
    (written by ``train-mil``), for the out-of-distribution QC check: :attr:`MILHead.reference`.

The graph must match its config: ``sha256`` is checked against the file at every load (and by
:func:`read_head_config`, which the run's resume key is built from), and ``onnx`` must name a
plain file inside the head directory; see :class:`MILHead`.

:func:`wsiengine.models.training.mil_export.save_mil_head` writes such a directory from a trained torch
model. The graph's activations are linear in N (no ``(N, N)`` tensor), so a 100,000-tile bag
needs little beyond its own features.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .config import ModelTiling, physical_cores, tiling_differences, tiling_mismatch_message
from .errors import ConfigError, ModelError
from .hashing import sha256_file
from .ood import EmbeddingReference

__all__ = ["SlidePrediction", "MILHead", "TileCalibration", "HEAD_FORMAT", "HEAD_FORMAT_VERSION", "MODEL_NAME", "CONFIG_NAME",
           "REFERENCE_NAME", "DEFAULT_HEAD", "default_head_path", "read_head_config", "head_file", "head_tiling",
           "tiling_differences"]

logger = logging.getLogger("wsiengine")

HEAD_FORMAT = "wsiengine.mil_head"
HEAD_FORMAT_VERSION = 1
MODEL_NAME = "model.onnx"
CONFIG_NAME = "config.json"
#: The optional embedding reference in a head directory (:class:`~wsiengine.ood.EmbeddingReference`).
REFERENCE_NAME = "reference.npz"
INPUT_NAME = "features"
OUTPUT_NAMES = ("probability", "attention", "tile_scores")
#: The shipped head (``MILHead.load("default")``), relative to the ``wsiengine.models`` package.
DEFAULT_HEAD = "weights/mil-default"
#: Rows checked for NaN/inf at a time, so the check needs no (N, D) boolean copy.
_FINITE_CHUNK_ROWS = 8192


def default_head_path() -> Path:
    """Folder of the shipped default head (ABMIL + tile tumour classifier on the default encoder;
    see ``models/cards/mil-default.md``)."""
    from importlib import resources

    return Path(str(resources.files("wsiengine.models").joinpath(DEFAULT_HEAD)))


def head_file(root: Path, name: Any, what: str) -> Path:
    """``root / name`` when ``name`` is a plain file name (no folder, no ``..``, not absolute) whose
    file, following symbolic links, lies inside the head directory ``root``; else a ModelError.
    ``what`` names the entry in messages (e.g. ``"config.json 'onnx'"``)."""
    from pathlib import PurePosixPath, PureWindowsPath

    if (not isinstance(name, str) or name in ("", ".", "..") or "\0" in name
            or PurePosixPath(name).name != name or PureWindowsPath(name).name != name):
        raise ModelError(f"MIL head directory '{root}': {what} must be a plain file name inside the head directory "
                         f"(no folders, '..' or absolute paths), got {name!r}; fix config.json or re-export the head "
                         "with wsiengine train-mil")
    path = root / name
    if os.path.lexists(path):
        real_root, real = root.resolve(), path.resolve()
        if real != real_root and real_root not in real.parents:
            raise ModelError(f"MIL head directory '{root}': {name} is a link to '{real}', outside the head directory; "
                             "copy the file into the head directory instead of linking to it")
    return path


def _check_head_graph(model_path: Path, config: dict[str, Any], actual: str) -> None:
    """Check the graph's SHA-256 ``actual`` against the ``sha256`` recorded in ``config``; fill it in
    (with a warning) when the config records none."""
    recorded = config.get("sha256")
    if recorded is None:
        logger.warning("MIL head '%s' records no sha256 of its graph; loading it unverified as sha256 %s "
                       "(re-export the head with wsiengine train-mil to record one)", model_path.parent, actual)
        config["sha256"] = actual
        config["sha256_recorded"] = False
        return
    if not isinstance(recorded, str) or recorded.strip().lower() != actual:
        raise ModelError(f"cannot load MIL head '{model_path.parent}': {model_path.name} has sha256 {actual} but config.json "
                         f"records sha256 {recorded}; the graph was replaced or damaged after export. Restore the "
                         f"original {model_path.name}, or re-export the head (wsiengine train-mil / save_mil_head) "
                         "so that config.json and the graph belong together")


def _read_head(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any], Path]:
    """The folder, checked ``config.json`` and graph path of a head, the graph not yet hashed."""
    if os.fspath(path) == "default":
        root = default_head_path()
        if not (root / CONFIG_NAME).is_file():
            raise ModelError(f"the shipped default MIL head is missing from the installation ('{root}'); "
                             "reinstall wsiengine")
    else:
        root = Path(path).expanduser()
    if not root.is_dir():
        hint = " (pass the directory that holds it, not the file)" if root.is_file() else ""
        raise ModelError(f"MIL head directory '{root}' does not exist{hint}; a head is a directory with "
                         f"{MODEL_NAME} and {CONFIG_NAME}, written by wsiengine train-mil")
    cfg_path = root / CONFIG_NAME
    if not cfg_path.is_file():
        raise ModelError(f"MIL head directory '{root}' has no {CONFIG_NAME}; re-export the head with wsiengine train-mil")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read '{cfg_path}': {exc}") from exc
    if not isinstance(config, dict):
        raise ModelError(f"'{cfg_path}' must hold a JSON object, got {type(config).__name__}")
    MILHead._check_config(config, cfg_path)
    model_path = head_file(root, config.get("onnx") or MODEL_NAME, "config.json 'onnx'")
    if not model_path.is_file():
        raise ModelError(f"MIL head directory '{root}' has no {model_path.name}; re-export the head with "
                         "wsiengine.models.training.mil_export.save_mil_head")
    head_file(root, REFERENCE_NAME, REFERENCE_NAME)
    return root, config, model_path


def read_head_config(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """The folder and checked ``config.json`` of a head (``"default"`` or a folder), without
    loading its graph: what the run resolver reads for the head's training tiling and identity.

    The graph file is hashed and checked against the config's ``sha256`` as in
    :meth:`MILHead.load` (a config without one gets the computed hash, with a warning), so the
    ``sha256`` returned always names the graph on disk.

    Raises
    ------
    ModelError
        As :meth:`MILHead.load`, short of ONNX Runtime's checks of the graph.
    """
    root, config, model_path = _read_head(path)
    _check_head_graph(model_path, config, sha256_file(model_path))
    return root, config


def head_tiling(name: str, config: dict[str, Any]) -> ModelTiling:
    """The tiling a head was trained on (from its ``config.json``), labelled for messages."""
    return ModelTiling(float(config["target_mpp"]) if config.get("target_mpp") else None,
                       int(config["tile_px"]) if config.get("tile_px") else None, f"MIL head {name!r}")



@dataclass(frozen=True, eq=False)
class SlidePrediction:
    """One slide's MIL prediction.

    Attributes
    ----------
    probability : float
        Probability of the positive class, in [0, 1].
    label : int
        1 if ``probability >= threshold`` else 0 (an index into the head's ``class_names``).
    threshold : float
        The decision threshold used.
    attention : np.ndarray
        ``(N,)`` float32 attention over the slide's tiles, summing to 1.
    tile_scores : np.ndarray
        ``(N,)`` float32 per-tile positive (tumour) score in [0, 1]; a calibrated probability
        when the head carries a :class:`TileCalibration`.
    """

    probability: float
    label: int
    threshold: float
    attention: np.ndarray = field(repr=False)
    tile_scores: np.ndarray = field(repr=False)

    @property
    def n_tiles(self) -> int:
        """N, the number of tiles."""
        return int(self.attention.shape[0])


@dataclass(frozen=True)
class TileCalibration:
    """Platt scaling of a head's tile scores into calibrated tumour probabilities:
    ``sigmoid(slope * logit(score) + intercept)``, fitted on validation tiles (``config.json``
    ``"tile_calibration": {"method": "platt", "slope": a, "intercept": b}``). Monotone, so it
    never reorders tiles."""

    slope: float
    intercept: float

    #: Scores are clipped to [eps, 1 - eps] before the logit, float32-safe.
    EPS: ClassVar[float] = 1e-6

    @classmethod
    def parse(cls, value: Any, where: str = "config.json 'tile_calibration'") -> "TileCalibration | None":
        """From a head's JSON (None when absent); a malformed entry is a :class:`ModelError`."""
        if value is None:
            return None
        if not isinstance(value, dict) or value.get("method") != "platt":
            raise ModelError(f"{where} must be {{'method': 'platt', 'slope': a, 'intercept': b}}, got {str(value)[:80]!r}")
        try:
            slope, intercept = float(value["slope"]), float(value["intercept"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where} needs numeric 'slope' and 'intercept': {exc}") from exc
        if not (np.isfinite(slope) and np.isfinite(intercept)) or not 0 < slope <= 100 or abs(intercept) > 100:
            raise ModelError(f"{where}: slope must lie in (0, 100] and |intercept| <= 100, got {slope!r}, {intercept!r}")
        return cls(slope, intercept)

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of ``scores`` (float32, same shape)."""
        s = np.clip(np.asarray(scores, np.float64), self.EPS, 1 - self.EPS)
        z = self.slope * np.log(s / (1 - s)) + self.intercept
        return (0.5 * (1.0 + np.tanh(z / 2))).astype(np.float32)  # the logistic, without overflow

    def describe(self) -> str:
        """A short stable text (the run configuration's ``mil.tile_calibration``)."""
        return f"platt:{self.slope:.6g}:{self.intercept:.6g}"

    def to_dict(self) -> dict[str, Any]:
        return {"method": "platt", "slope": self.slope, "intercept": self.intercept}


class MILHead:
    """A slide-level MIL head running in ONNX Runtime (CPU).

    Loading checks that the graph belongs to its config: the SHA-256 of the graph file must equal
    the config's ``sha256`` (written by ``save_mil_head``), else :class:`~wsiengine.errors.ModelError`
    names both hashes; the graph is read once, hashed and handed to ONNX Runtime from memory, so
    the file that ran is the file that was checked. ``onnx`` must be a plain file name inside the
    head directory and ``model.onnx`` / ``reference.npz`` may not be links to files outside it.
    A config **without** ``sha256`` (a hand-made or pre-0.1 head) still loads, with a warning: the
    computed hash is put in :attr:`config` (``"sha256"``, with ``"sha256_recorded": False``), so
    result stores and the resume key record the graph that actually ran.

    Attributes
    ----------
    path : Path
        The head directory.
    config : dict
        The parsed ``config.json``.
    in_dim : int
        D, the embedding size the head takes.
    threshold : float
        Decision threshold on the probability.
    name, model, encoder : str or None
        From the config.
    class_names : list[str]
        ``[negative, positive]``.
    target_mpp, tile_px : float, int or None
        The tiling the head was trained on (µm/px, pixels at that resolution), when recorded.
    reference : EmbeddingReference or None
        A summary of the head's training tile embeddings, from ``reference.npz`` in the head
        directory (None when the head has none), for the out-of-distribution check:
        ``head.reference.outlier_fraction(features)``. Read on first access; a damaged file or
        one whose D differs from :attr:`in_dim` raises :class:`~wsiengine.errors.ModelError` then.
    session : onnxruntime.InferenceSession
    """

    def __init__(self, path: Path, config: dict[str, Any], session: Any) -> None:
        self.path = path
        self.config = config
        self.session = session
        self.in_dim = int(config["in_dim"])
        self.threshold = float(config["threshold"])
        self.name = config.get("name")
        self.model = config.get("model")
        self.encoder = config.get("encoder")
        self.class_names = list(config.get("class_names") or ["negative", "positive"])
        self.target_mpp = float(config["target_mpp"]) if config.get("target_mpp") else None
        self.tile_px = int(config["tile_px"]) if config.get("tile_px") else None
        self.tile_calibration = TileCalibration.parse(config.get("tile_calibration"))
        self._reference: EmbeddingReference | None = None
        self._reference_read = False

    @property
    def reference(self) -> EmbeddingReference | None:
        """The head's :class:`~wsiengine.ood.EmbeddingReference` (``reference.npz``), or None without one."""
        if not self._reference_read:
            self._reference = self._read_reference()
            self._reference_read = True
        return self._reference

    def _read_reference(self) -> EmbeddingReference | None:
        path = head_file(self.path, REFERENCE_NAME, REFERENCE_NAME)
        if not path.exists():
            return None
        reference = EmbeddingReference.load(path)
        if reference.dim != self.in_dim:
            raise ModelError(f"'{path}' summarises D={reference.dim} embeddings but the head takes "
                             f"in_dim={self.in_dim}; delete it or re-train the head so that {REFERENCE_NAME} matches")
        return reference

    def __repr__(self) -> str:
        return (f"MILHead(name={self.name!r}, model={self.model!r}, in_dim={self.in_dim}, "
                f"threshold={self.threshold:.4g}, encoder={self.encoder!r}, path='{self.path}')")

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, threads: int | None = None) -> "MILHead":
        """Open a head directory (``model.onnx`` + ``config.json``, see the module docstring).

        Parameters
        ----------
        path : path or "default"
            The head directory, or ``"default"`` for the shipped head (:func:`default_head_path`).
        threads : int, optional
            ONNX Runtime intra-op threads (default: physical cores, at most 8).

        Raises
        ------
        ModelError
            The directory or one of its files is missing or unreadable, the config is invalid, the
            graph's SHA-256 differs from the config's ``sha256``, or ``onnx`` / a file of the head
            lies outside the head directory.
        """
        import hashlib

        root, config, model_path = _read_head(path)
        cfg_path = root / CONFIG_NAME
        try:
            graph = model_path.read_bytes()
        except OSError as exc:
            raise ModelError(f"cannot read '{model_path}': {exc}") from exc
        _check_head_graph(model_path, config, hashlib.sha256(graph).hexdigest())
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = int(threads or min(physical_cores(), 8))  # a small head: more threads only add overhead
        options.inter_op_num_threads = 1
        # Bag sizes vary slide to slide: a memory pattern planned for one N is useless for the next.
        options.enable_mem_pattern = False
        # The graph is loaded from the checked bytes: any external data resolves (and must stay)
        # inside the head directory, as when loading from the file.
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(root.resolve()))
        try:
            session = ort.InferenceSession(graph, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelError(f"ONNX Runtime cannot load '{model_path}': {exc}") from exc
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        if INPUT_NAME not in inputs or not set(OUTPUT_NAMES) <= outputs:
            raise ModelError(f"'{model_path}' is not a MIL head graph: it needs input {INPUT_NAME!r} and outputs "
                             f"{list(OUTPUT_NAMES)}, it has inputs {sorted(inputs)} and outputs {sorted(outputs)}")
        graph_dim = inputs[INPUT_NAME].shape[1] if len(inputs[INPUT_NAME].shape) == 2 else None
        if isinstance(graph_dim, int) and graph_dim != int(config["in_dim"]):
            raise ModelError(f"'{cfg_path}' says in_dim={config['in_dim']} but '{model_path}' takes D={graph_dim}")
        head = cls(root, config, session)
        logger.info("loaded %r", head)
        return head

    @property
    def tiling(self) -> ModelTiling:
        """The tiling the head was trained on."""
        return head_tiling(self.name, self.config)

    def tiling_mismatch(self, target_mpp: float | None, tile_px: int | None) -> str | None:
        """The mismatch warning (:func:`wsiengine.config.tiling_mismatch_message`) when features
        tiled at ``target_mpp`` µm/px with ``tile_px`` pixels are unlike the head's training tiles."""
        return tiling_mismatch_message(self.tiling, target_mpp, tile_px)

    @staticmethod
    def _check_config(config: dict[str, Any], cfg_path: Path) -> None:
        for key in ("in_dim", "threshold"):
            if key not in config:
                raise ModelError(f"'{cfg_path}' lacks the required key {key!r}")
        if config.get("format", HEAD_FORMAT) != HEAD_FORMAT:
            raise ModelError(f"'{cfg_path}' has format {config.get('format')!r}, expected {HEAD_FORMAT!r}")
        version = config.get("format_version", HEAD_FORMAT_VERSION)
        if not isinstance(version, int) or version > HEAD_FORMAT_VERSION:
            raise ModelError(f"'{cfg_path}' has format_version {version!r}; this wsiengine reads up to "
                             f"{HEAD_FORMAT_VERSION}, upgrade wsiengine")
        in_dim, threshold = config["in_dim"], config["threshold"]
        if isinstance(in_dim, bool) or not isinstance(in_dim, int) or in_dim < 1:
            raise ModelError(f"'{cfg_path}': in_dim must be a positive integer, got {in_dim!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise ModelError(f"'{cfg_path}': threshold must be a number in [0, 1], got {threshold!r}")
        names = config.get("class_names")
        if names is not None and (not isinstance(names, list) or len(names) != 2):
            raise ModelError(f"'{cfg_path}': class_names must list 2 names (negative, positive), got {names!r}")

    def _check_features(self, features: Any) -> np.ndarray:
        if not hasattr(features, "shape") or not hasattr(features, "dtype"):
            features = np.asarray(features)
        if len(features.shape) != 2:
            raise ConfigError(f"features must be a (N, D) array of one slide's tile embeddings, got shape "
                              f"{tuple(features.shape)}")
        n, d = (int(s) for s in features.shape)
        if d != self.in_dim:
            source = f"from encoder {self.encoder!r}" if self.encoder else "from the encoder it was trained on"
            raise ConfigError(f"the head {self.name!r} expects D={self.in_dim} features {source}; got {d}. "
                              "Embed the slide with that encoder, or use a head trained on this encoder's features")
        if n == 0:
            raise ConfigError("empty bag: features has 0 tiles (N=0); a slide with no tissue tiles has no MIL "
                              "prediction, check tissue detection and tiling (min_tissue, target_mpp)")
        if np.dtype(features.dtype).kind not in "fiub":
            raise ConfigError(f"features must be numeric, got dtype {features.dtype}")
        array = np.ascontiguousarray(features, dtype=np.float32)
        for start in range(0, n, _FINITE_CHUNK_ROWS):
            chunk = array[start:start + _FINITE_CHUNK_ROWS]
            if not np.isfinite(chunk).all():
                rows = start + np.flatnonzero(~np.isfinite(chunk).all(axis=1))
                raise ConfigError(f"features hold NaN or infinite values in {len(rows)}+ tile(s), first rows "
                                  f"{rows[:5].tolist()}; re-run the encoder on those tiles or drop them")
        return array

    def predict(self, features: Any) -> SlidePrediction:
        """Predict one slide from its tile embeddings.

        Parameters
        ----------
        features : array-like, (N, D)
            The slide's tile embeddings (converted to float32 C-contiguous if needed; a float32
            C-contiguous array is used without a copy). N >= 1; D must equal :attr:`in_dim`.

        Returns
        -------
        SlidePrediction

        Raises
        ------
        ConfigError
            Wrong shape or D, an empty bag (N=0), or NaN/inf features.
        ModelError
            The graph's outputs are malformed or not finite.
        """
        array = self._check_features(features)
        n = array.shape[0]
        try:
            prob, attention, tiles = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: array})
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"ONNX Runtime failed to run the MIL head '{self.path}' on a bag of {n}: {exc}") from exc
        prob = np.asarray(prob, dtype=np.float32).reshape(-1)
        attention = np.asarray(attention, dtype=np.float32).reshape(-1)
        tiles = np.asarray(tiles, dtype=np.float32).reshape(-1)
        if prob.shape != (1,) or attention.shape != (n,) or tiles.shape != (n,):
            raise ModelError(f"the MIL head '{self.path}' returned shapes {prob.shape}, {attention.shape}, "
                             f"{tiles.shape} for a bag of {n}; expected (1,), ({n},), ({n},)")
        probability = float(prob[0])
        if not np.isfinite(probability) or not np.isfinite(attention).all():
            raise ModelError(f"the MIL head '{self.path}' produced non-finite outputs for finite features")
        if self.tile_calibration is not None:
            tiles = self.tile_calibration.apply(tiles)
        return SlidePrediction(probability=probability, label=int(probability >= self.threshold),
                               threshold=self.threshold, attention=attention, tile_scores=tiles)
