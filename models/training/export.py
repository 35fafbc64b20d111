"""Export an encoder to ONNX and verify it against torch.

``export_encoder_onnx(spec, "model.onnx", weights=PATH)`` builds the encoder
(:func:`wsiengine.models.training.build.build_encoder`), traces it with torch's TorchScript-based ONNX
exporter, and writes a graph that takes **normalised float32 NCHW** images named ``"pixels"``
(dynamic batch axis, fixed ``spec.input_px`` sides) and returns ``"embeddings"``
``(batch, spec.embed_dim)`` float32. Beside it goes ``model.onnx.json`` with the spec (what
:class:`wsiengine.encode.Encoder` reads). Models over 2 GB (ONNX's protobuf limit) keep their
weights in one external file, ``model.onnx.data``, next to the graph.

Verification runs the same random batch through torch and ONNX Runtime's CPU provider (and
the first image alone, which exercises the dynamic batch axis) and requires every embedding's
cosine similarity to be at least ``0.999``; otherwise :class:`ExportVerificationError` is raised
and the files are left for inspection.

``fp16=True`` also writes ``model.fp16.onnx``: the same graph with float16 weights and compute
and float32 inputs/outputs (ONNX Runtime's float16 converter with ``keep_io_types``), the file
:class:`~wsiengine.encode.Encoder` uses on CUDA. Its agreement is measured when the CPU provider
can run it (it has few float16 kernels, so usually it is only checked on a GPU).
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

import numpy as np
import torch
from torch import nn

from ...errors import ModelError
from ...hashing import sha256_files
from ..registry import get_encoder_spec
from ..specs import EncoderSpec
from .build import build_encoder

__all__ = ["ExportReport", "ExportVerificationError", "export_encoder_onnx", "MIN_COSINE"]

logger = logging.getLogger("wsiengine")

#: The agreement an export must reach: the smallest per-image cosine similarity, torch vs ONNX.
MIN_COSINE = 0.999
INPUT_NAME = "pixels"
OUTPUT_NAME = "embeddings"
#: Above this many bytes of weights the graph keeps them in an external ``.onnx.data`` file.
_EXTERNAL_DATA_BYTES = 1_800_000_000


class ExportVerificationError(ModelError, RuntimeError):
    """The exported ONNX graph does not reproduce the torch model's embeddings."""


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote and how well it agrees with torch.

    Attributes
    ----------
    path : Path
        The ``.onnx`` file.
    sha256 : str
        SHA-256 of the ``.onnx`` file followed by its external data file, if any.
    n_params : int
        Parameters of the torch model.
    max_abs_diff : float
        Largest absolute difference between torch and ONNX Runtime embeddings (NaN if not verified).
    min_cosine : float
        Smallest per-image cosine similarity, torch vs ONNX Runtime (NaN if not verified).
    seconds : float
        Wall time of the export and its verification.
    external_data : Path or None
        The weights file beside a graph over 2 GB.
    spec_path : Path or None
        The ``.onnx.json`` spec written beside the graph.
    fp16_path : Path or None
        The float16 variant, with ``fp16=True``.
    fp16_min_cosine : float or None
        Its agreement with torch float32, when the CPU provider could run it.
    """

    path: Path
    sha256: str
    n_params: int
    max_abs_diff: float
    min_cosine: float
    seconds: float
    external_data: Path | None = None
    spec_path: Path | None = None
    fp16_path: Path | None = None
    fp16_min_cosine: float | None = None

    def summary(self) -> str:
        """One line for logs and the command line."""
        text = (f"{self.path.name}: {self.n_params / 1e6:.1f} M parameters, min cosine {self.min_cosine:.6f}, "
                f"max |diff| {self.max_abs_diff:.2e}, {self.seconds:.1f} s, sha256 {self.sha256[:16]}")
        if self.fp16_path is not None:
            text += f"; fp16 {self.fp16_path.name}" + (
                f" (min cosine {self.fp16_min_cosine:.5f})" if self.fp16_min_cosine is not None else " (not verified on CPU)")
        return text


class _Contract(nn.Module):
    """Fixes the graph's contract: float32 in, float32 ``(B, D)`` out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixels)
        return out.float().reshape(out.shape[0], -1)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = den == 0
    cos = np.where(both_zero, 1.0, num / np.where(both_zero, 1.0, den))
    return cos


def _ort_session(path: Path, disabled_optimizers: list[str] | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = max(1, min(os.cpu_count() or 1, 8))
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled_optimizers or [])


def _match_mode(path: Path, like: Path) -> None:
    try:
        os.chmod(path, like.stat().st_mode & 0o777)
    except OSError:  # pragma: no cover - e.g. a file system without permissions
        pass


def _write_onnx(traced_path: Path, out_path: Path, spec: EncoderSpec, external: bool) -> Path | None:
    """Re-save the exporter's output as ``out_path`` (one external data file when ``external``),
    with the spec in the graph's metadata."""
    import onnx

    model = onnx.load(str(traced_path), load_external_data=True)
    meta = {"wsiengine.encoder": spec.name, "wsiengine.embed_dim": str(spec.embed_dim),
            "wsiengine.input_px": str(spec.input_px), "wsiengine.mean": json.dumps(list(spec.mean)),
            "wsiengine.std": json.dumps(list(spec.std)), "wsiengine.layout": "float32 NCHW, normalised"}
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "wsiengine"
    return _save_onnx(model, out_path, external)


def _save_onnx(model, out_path: Path, external: bool) -> Path | None:
    """Save ``model`` to ``out_path``, its weights in ``<name>.data`` when ``external``; returns that file or None."""
    import onnx

    data_path = out_path.with_name(out_path.name + ".data")
    if data_path.exists():
        data_path.unlink()
    if external:
        onnx.save_model(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_path.name, size_threshold=1024)
        _match_mode(data_path, out_path)  # onnx creates the data file private (0600)
        return data_path
    onnx.save_model(model, str(out_path))
    return None


def export_encoder_onnx(spec: EncoderSpec | str, out_path: str | os.PathLike[str], *,
                        weights: str | os.PathLike[str] | None = None, model: nn.Module | None = None,
                        opset: int = 17, batch_size_example: int = 2, verify: bool = True,
                        fp16: bool = False) -> ExportReport:
    """Export ``spec``'s encoder to ONNX at ``out_path`` and check it against torch.

    Parameters
    ----------
    spec : EncoderSpec or str
        The encoder (or its registry name).
    out_path : path
        The ``.onnx`` file to write; its folder is created. ``out_path + ".json"`` receives the spec.
    weights : path, optional
        Local checkpoint loaded strictly by :func:`~wsiengine.models.training.build.build_encoder`;
        ``None`` exports random (seed 0) weights.
    model : torch.nn.Module, optional
        An already built torch model to export instead (``weights`` is then ignored).
    opset : int
        ONNX opset (17 covers LayerNormalization; ONNX Runtime >= 1.14 runs it).
    batch_size_example : int
        Batch of the random tracing and verification input.
    verify : bool
        Compare torch and ONNX Runtime on the same batch; raise :class:`ExportVerificationError`
        if the smallest cosine similarity is below :data:`MIN_COSINE`.
    fp16 : bool
        Also write the float16 variant ``<name>.fp16.onnx``.

    Returns
    -------
    ExportReport
    """
    start = time.perf_counter()
    if isinstance(spec, str):
        spec = get_encoder_spec(spec)
    out_path = Path(out_path).expanduser()
    if out_path.suffix != ".onnx":
        raise ModelError(f"the output path '{out_path}' must end in .onnx")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = build_encoder(spec, weights)
    model = model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    n_bytes = sum(p.numel() * 4 for p in model.parameters()) + sum(b.numel() * 4 for b in model.buffers())
    external = n_bytes > _EXTERNAL_DATA_BYTES

    generator = torch.Generator().manual_seed(1234)
    example = torch.randn(max(1, int(batch_size_example)), 3, spec.input_px, spec.input_px, generator=generator)
    wrapped = _Contract(model).eval()
    with torch.no_grad():
        reference = wrapped(example)
    if reference.shape != (example.shape[0], spec.embed_dim):
        raise ModelError(f"encoder {spec.name!r} returns {tuple(reference.shape)}, expected "
                         f"({example.shape[0]}, {spec.embed_dim}); fix the spec or the model")

    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".export-") as tmp:
        traced = Path(tmp) / "traced.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about python ints on fixed sizes
            torch.onnx.export(
                wrapped, (example,), str(traced), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=opset,
                do_constant_folding=True, dynamo=False,
            )
        data_path = _write_onnx(traced, out_path, spec, external)

    max_abs_diff = min_cosine = float("nan")
    if verify:
        session = _ort_session(out_path)
        got = session.run([OUTPUT_NAME], {INPUT_NAME: example.numpy()})[0]
        single = session.run([OUTPUT_NAME], {INPUT_NAME: example[:1].numpy()})[0]
        del session
        want = reference.numpy()
        if got.shape != want.shape or single.shape != (1, spec.embed_dim):
            raise ExportVerificationError(f"ONNX output shapes {got.shape} (batch {len(want)}) and {single.shape} "
                                          f"(batch 1) do not match torch's {want.shape}")
        cos = np.concatenate([_cosines(got, want), _cosines(single, want[:1])])
        max_abs_diff = float(max(np.abs(got - want).max(), np.abs(single - want[:1]).max()))
        min_cosine = float(cos.min())
        if not np.isfinite(min_cosine) or min_cosine < MIN_COSINE:
            raise ExportVerificationError(
                f"ONNX export of {spec.name!r} disagrees with torch: min cosine {min_cosine:.6f} < {MIN_COSINE} "
                f"(max |diff| {max_abs_diff:.3e}); the graph is left at '{out_path}' for inspection")

    fp16_path = fp16_cos = None
    if fp16:
        fp16_path, fp16_cos = _write_fp16(out_path, example, reference.numpy(), external)

    spec_path = out_path.with_name(out_path.name + ".json")
    files = [out_path] + ([data_path] if data_path is not None else [])
    sha = sha256_files(files)
    spec_path.write_text(json.dumps({"spec": spec.to_dict(), "weights": os.fspath(weights) if weights else None,
                                     "sha256": sha, "opset": opset}, indent=2))
    report = ExportReport(path=out_path, sha256=sha, n_params=n_params, max_abs_diff=max_abs_diff,
                          min_cosine=min_cosine, seconds=time.perf_counter() - start, external_data=data_path,
                          spec_path=spec_path, fp16_path=fp16_path, fp16_min_cosine=fp16_cos)
    logger.info("exported %s", report.summary())
    return report


def _write_fp16(out_path: Path, example: torch.Tensor, want: np.ndarray, external: bool) -> tuple[Path, float | None]:
    from ...encode import float16_model

    target = out_path.with_name(out_path.stem + ".fp16.onnx")
    half = float16_model(out_path)
    _save_onnx(half, target, external)
    try:
        # ONNX Runtime 1.32's CPU NCHWc layout pass crashes (segfault, at session creation) on some
        # float16 ViT graphs (CONCH); the CPU check runs without it. GPU providers do not use it.
        got = _ort_session(target, ["NchwcTransformer"]).run([OUTPUT_NAME], {INPUT_NAME: example.numpy()})[0]
    except Exception as exc:  # noqa: BLE001 - the CPU provider lacks many float16 kernels
        logger.info("float16 variant %s not verified on the CPU provider (%s); check it on a GPU", target.name,
                    str(exc).splitlines()[0][:160])
        return target, None
    return target, float(_cosines(got, want).min())
