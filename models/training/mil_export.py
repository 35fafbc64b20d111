"""Export a trained MIL head (:mod:`wsiengine.models.training.mil`) to ONNX and write a head directory.

``export_mil_onnx(model, "model.onnx", in_dim=1280)`` wraps the model in the runtime contract
and exports it with torch's TorchScript-based ONNX exporter:

input ``features``
    float32 ``(N, D)``, N dynamic (``"tiles"``).
outputs ``probability`` (1,), ``attention`` (N,), ``tile_scores`` (N,)
    float32; ``probability = sigmoid(logit)``, attention sums to 1.

Verification runs bags of 1, 7 and 1000 random tiles through torch and ONNX Runtime's CPU
provider and requires every output to agree within :data:`MAX_ABS_DIFF`; otherwise
:class:`MILExportVerificationError` is raised and the file is left for inspection.

``save_mil_head(model, out_dir, in_dim, threshold, name)`` writes the directory
:meth:`wsiengine.aggregate.MILHead.load` reads (layout documented in :mod:`wsiengine.aggregate`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...aggregate import CONFIG_NAME, HEAD_FORMAT, HEAD_FORMAT_VERSION, INPUT_NAME, MODEL_NAME, OUTPUT_NAMES
from ...errors import ConfigError, ModelError
from ...hashing import sha256_file

__all__ = ["MILExportReport", "MILExportVerificationError", "export_mil_onnx", "save_mil_head", "MAX_ABS_DIFF",
           "VERIFY_BAG_SIZES"]

logger = logging.getLogger("wsiengine")

#: Largest allowed |torch - ONNX Runtime| over every output of the verification bags.
MAX_ABS_DIFF = 1e-4
#: Bag sizes the verification runs (1 exercises the degenerate softmax, 1000 the dynamic axis).
VERIFY_BAG_SIZES = (1, 7, 1000)


class MILExportVerificationError(ModelError, RuntimeError):
    """The exported ONNX head does not reproduce the torch model's outputs."""


@dataclass(frozen=True)
class MILExportReport:
    """What an export wrote and how well it agrees with torch.

    Attributes
    ----------
    path : Path
        The ``.onnx`` file.
    sha256 : str
        SHA-256 of the file.
    n_params : int
        Parameters of the torch model.
    max_abs_diff : float
        Largest |torch - ONNX Runtime| over all outputs and verification bags (NaN if not verified).
    bag_sizes : tuple[int, ...]
        The verification bag sizes.
    seconds : float
        Wall time of export and verification.
    """

    path: Path
    sha256: str
    n_params: int
    max_abs_diff: float
    bag_sizes: tuple[int, ...]
    seconds: float

    def summary(self) -> str:
        """One line for logs."""
        return (f"{self.path.name}: {self.n_params / 1e3:.1f} k parameters, max |diff| {self.max_abs_diff:.2e} "
                f"on bags {list(self.bag_sizes)}, {self.seconds:.1f} s, sha256 {self.sha256[:16]}")


class _MILContract(nn.Module):
    """Fixes the graph's contract: ``(N, D)`` float32 -> probability (1,), attention (N,), tile_scores (N,)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor):
        logit, attention, tiles = self.model(features)
        return torch.sigmoid(logit.float()).reshape(1), attention.float().reshape(-1), tiles.float().reshape(-1)


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = max(1, min(os.cpu_count() or 1, 4))
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def export_mil_onnx(model: nn.Module, out_path: str | os.PathLike[str], in_dim: int, *, opset: int = 17,
                    verify: bool = True, bag_sizes: tuple[int, ...] = VERIFY_BAG_SIZES) -> MILExportReport:
    """Export a MIL head to ONNX at ``out_path`` with a dynamic bag axis and check it against torch.

    Parameters
    ----------
    model : torch.nn.Module
        A module whose ``forward((N, D))`` returns ``(logit (1,), attention (N,), tile_scores (N,))``
        (:class:`~wsiengine.models.training.mil.ABMIL`, :class:`~wsiengine.models.training.mil.CLAMSB`). It is left in
        eval mode (dropout off), float32, on the CPU.
    out_path : path
        The ``.onnx`` file to write; its folder is created.
    in_dim : int
        D, the embedding size the head takes.
    opset : int
        ONNX opset.
    verify : bool
        Run bags of ``bag_sizes`` random tiles through torch and ONNX Runtime and raise
        :class:`MILExportVerificationError` if any output differs by more than :data:`MAX_ABS_DIFF`
        or the ONNX attention does not sum to 1.
    bag_sizes : tuple of int
        The verification bags.

    Returns
    -------
    MILExportReport
    """
    start = time.perf_counter()
    out_path = Path(out_path).expanduser()
    if out_path.suffix != ".onnx":
        raise ModelError(f"the output path '{out_path}' must end in .onnx")
    in_dim = int(in_dim)
    if in_dim < 1:
        raise ConfigError(f"in_dim must be a positive embedding size, got {in_dim}")
    model_in = getattr(model, "in_dim", in_dim)
    if int(model_in) != in_dim:
        raise ModelError(f"the model takes D={model_in} features but in_dim={in_dim} was given")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = _MILContract(model.eval()).eval()
    n_params = sum(p.numel() for p in model.parameters())
    # The graph is float32 on CPU; note .to()/.float() move the caller's model in place.
    wrapped = wrapped.to("cpu").float()

    generator = torch.Generator().manual_seed(1234)
    example = torch.randn(7, in_dim, generator=generator)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".export-") as tmp:
        traced = Path(tmp) / "traced.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapped, (example,), str(traced), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_axes={INPUT_NAME: {0: "tiles"}, "attention": {0: "tiles"}, "tile_scores": {0: "tiles"}},
                opset_version=opset, do_constant_folding=True, dynamo=False,
            )
        import onnx

        graph = onnx.load(str(traced))
        del graph.metadata_props[:]
        for key, value in {"wsiengine.mil": getattr(model, "name", type(model).__name__),
                           "wsiengine.in_dim": str(in_dim)}.items():
            entry = graph.metadata_props.add()
            entry.key, entry.value = key, value
        graph.producer_name = "wsiengine"
        onnx.save_model(graph, str(out_path))

    max_abs_diff = float("nan")
    if verify:
        session = _session(out_path)
        diffs = []
        for n in bag_sizes:
            bag = torch.randn(int(n), in_dim, generator=generator)
            with torch.no_grad():
                want = [t.numpy() for t in wrapped(bag)]
            got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: bag.numpy()})
            for name, g, w in zip(OUTPUT_NAMES, got, want):
                if g.shape != w.shape:
                    raise MILExportVerificationError(
                        f"ONNX output {name!r} has shape {g.shape} for a bag of {n}, torch {w.shape}; "
                        f"the graph is left at '{out_path}' for inspection")
                diffs.append(float(np.abs(g.astype(np.float64) - w).max()))
            total = float(got[1].astype(np.float64).sum())
            if not abs(total - 1.0) <= 1e-4:
                raise MILExportVerificationError(f"ONNX attention sums to {total} for a bag of {n}, not 1")
        del session
        max_abs_diff = max(diffs)
        if not np.isfinite(max_abs_diff) or max_abs_diff > MAX_ABS_DIFF:
            raise MILExportVerificationError(
                f"ONNX export disagrees with torch: max |diff| {max_abs_diff:.3e} > {MAX_ABS_DIFF} on bags "
                f"{list(bag_sizes)}; the graph is left at '{out_path}' for inspection")

    report = MILExportReport(path=out_path, sha256=sha256_file(out_path), n_params=n_params, max_abs_diff=max_abs_diff,
                             bag_sizes=tuple(int(n) for n in bag_sizes), seconds=time.perf_counter() - start)
    logger.info("exported MIL head %s", report.summary())
    return report


def save_mil_head(model: nn.Module, out_dir: str | os.PathLike[str], in_dim: int, threshold: float, name: str,
                  extra_config: dict[str, Any] | None = None) -> MILExportReport:
    """Write a MIL head directory (``model.onnx`` + ``config.json``) that
    :meth:`wsiengine.aggregate.MILHead.load` opens.

    Parameters
    ----------
    model : torch.nn.Module
        The trained head (see :func:`export_mil_onnx`).
    out_dir : path
        The directory; created if needed. An existing ``model.onnx``/``config.json`` is replaced.
    in_dim : int
        D, the embedding size.
    threshold : float
        Decision threshold on the probability, in [0, 1], chosen on validation data.
    name : str
        The head's name (e.g. ``"abmil-pcam-mosaic"``).
    extra_config : dict, optional
        More JSON-serialisable keys for ``config.json``: ``encoder`` (the encoder whose
        embeddings the head takes), ``class_names`` (default ``["negative", "positive"]``),
        ``tile_score`` (what the tile score means), metrics, training provenance. They cannot
        override the keys this function sets.

    Returns
    -------
    MILExportReport
        The export's report (it has been verified against torch).
    """
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold must be a probability in [0, 1], got {threshold}")
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = dict(extra_config or {})
    config: dict[str, Any] = {"class_names": ["negative", "positive"], "encoder": None}
    config.update(extra)
    tmp_model = out_dir / (".tmp-" + MODEL_NAME)
    report = export_mil_onnx(model, tmp_model, in_dim, verify=True)
    os.replace(tmp_model, out_dir / MODEL_NAME)
    config.update({
        "format": HEAD_FORMAT,
        "format_version": HEAD_FORMAT_VERSION,
        "name": str(name),
        "model": getattr(model, "name", type(model).__name__),
        "in_dim": int(in_dim),
        "threshold": threshold,
        "onnx": MODEL_NAME,
        "sha256": report.sha256,
        "export_max_abs_diff": report.max_abs_diff,
    })
    if len(config["class_names"]) != 2:
        raise ConfigError(f"class_names must name 2 classes (negative, positive), got {config['class_names']}")
    tmp_cfg = out_dir / (".tmp-" + CONFIG_NAME)
    tmp_cfg.write_text(json.dumps(config, indent=2, default=_jsonable))
    os.replace(tmp_cfg, out_dir / CONFIG_NAME)
    return MILExportReport(path=out_dir / MODEL_NAME, sha256=report.sha256, n_params=report.n_params,
                           max_abs_diff=report.max_abs_diff, bag_sizes=report.bag_sizes, seconds=report.seconds)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return os.fspath(value)
    raise TypeError(f"config value {value!r} is not JSON serialisable")
