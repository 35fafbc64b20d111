"""Encoder: an ONNX Runtime session with provider choice, preprocessing and batching.

>>> enc = Encoder.load("default")          # the shipped lymphnode-lite0, no torch needed
>>> enc.providers                           # ['CPUExecutionProvider']
>>> feats = enc.embed(batch.images)         # (B, 1280) float32 from (B, H, W, 3) uint8
>>> feats, tumour = enc.embed_with_scores(batch.images)   # and its tile classifier, one pass
>>> Encoder.load("default", precision="int8")              # the calibrated int8 copy
>>> for index, feats in enc.stream(slide, grid, batch_size=64): ...

Providers, best first when ``providers="auto"``: TensorRT (fp16, engine cache), CUDA (fp16
model variant and IO binding), CPU (intra-op threads = cores). ``precision`` picks the numbers:
``"auto"`` (float16 on a GPU, float32 on the CPU), ``"fp32"``, ``"fp16"`` or ``"int8"`` (the
statically quantised QDQ copy an encoder ships, or ``<stem>.int8.onnx`` beside a model file). An explicit list overrides
the order; a GPU provider that is not available raises :class:`~wsiengine.errors.ProviderError`
unless ``allow_fallback=True``, in which case the fallback is logged. The active providers
are always logged.

The ONNX graph contract (what ``wsiengine export-encoder`` writes): input ``pixels`` float32
``(batch, 3, input_px, input_px)`` normalised with the spec's mean/std, output ``embeddings``
float32 ``(batch, embed_dim)``, optionally followed by ``tumour_probability`` float32 ``(batch,)``
(an encoder with its own tile classifier); batch is dynamic. A JSON sidecar ``<model>.onnx.json`` holds the
:class:`~wsiengine.models.EncoderSpec`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .config import ModelTiling, physical_cores, tiling_mismatch_message
from .errors import ConfigError, ModelError, ProviderError
from .hashing import sha256_file, sha256_files
from .kernels import normalise_to_nchw
from .models import EncoderSpec, get_encoder_spec
from .slide import Slide, resize_area
from .stream import stream_patches
from .tiling import TileGrid

__all__ = ["Encoder", "resolve_providers", "PROVIDER_ALIASES", "PRECISIONS", "preprocess", "float16_model",
           "float16_variant", "int8_path"]

logger = logging.getLogger("wsiengine")

PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_AUTO_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_GPU = {"TensorrtExecutionProvider", "CUDAExecutionProvider"}
#: Numeric precisions an encoder runs at (``auto``: float16 on a GPU provider, float32 on the CPU).
PRECISIONS = ("auto", "fp32", "fp16", "int8")
#: Name of the second, optional output: the encoder's own tile tumour probability.
SCORE_OUTPUT = "tumour_probability"


def resolve_providers(
    requested: str | Sequence[str] | None = "auto",
    available: Sequence[str] | None = None,
    *,
    allow_fallback: bool = False,
) -> list[str]:
    """Turn a provider request into the ordered list of ONNX Runtime provider names to use.

    ``"auto"`` (or None): every available one of TensorRT, CUDA, CPU, in that order. A name or
    a list (``"cuda"``, ``["tensorrt", "cuda", "cpu"]``, or ONNX Runtime's own names) is used
    as given; CPU is always appended last as the safety net ONNX Runtime needs. A requested GPU
    provider that is not available raises ProviderError, or with ``allow_fallback`` is dropped
    with a warning.
    """
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    available = list(available)
    if requested is None or requested == "auto":
        return [p for p in _AUTO_ORDER if p in available] or ["CPUExecutionProvider"]
    names = [requested] if isinstance(requested, str) else list(requested)
    wanted = []
    for name in names:
        full = PROVIDER_ALIASES.get(name.lower(), name) if isinstance(name, str) else name
        if full not in _AUTO_ORDER and full not in available:
            raise ConfigError(f"unknown execution provider {name!r}; use 'auto', 'tensorrt', 'cuda', 'cpu' or one of {available}")
        wanted.append(full)
    chosen = []
    for full in wanted:
        if full in available:
            chosen.append(full)
            continue
        message = (
            f"{full} was requested but this onnxruntime has only {available}. "
            "Install the GPU build (pip install 'wsiengine[gpu]', which brings onnxruntime-gpu, "
            "with CUDA 12 and cuDNN 9; TensorRT 10 for TensorrtExecutionProvider), or pass "
            "providers='cpu', or allow_fallback=True to fall back with a warning."
        )
        if not allow_fallback:
            raise ProviderError(message)
        logger.warning("%s Falling back.", message)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def preprocess(images: np.ndarray, spec: EncoderSpec) -> np.ndarray:
    """``(B, H, W, 3)`` uint8 patches -> the spec's network input, ``(B, 3, S, S)`` float32.

    Patches already ``input_px`` square go straight to one fused normalise + HWC->CHW pass
    (:func:`wsiengine.kernels.normalise_to_nchw`). Others are resized once: area averaging when
    shrinking, bicubic when enlarging; ``center-crop`` specs resize the short side then crop.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ConfigError(f"embed() takes (B, H, W, 3) uint8 RGB patches, got {images.dtype} {images.shape}")
    size = spec.input_px
    if images.shape[1:3] != (size, size):
        images = np.stack([_resize_patch(img, size, spec.resize) for img in images])
    return normalise_to_nchw(images, spec.mean, spec.std)


def _resize_patch(image: np.ndarray, size: int, policy: str) -> np.ndarray:
    h, w = image.shape[:2]
    if policy == "center-crop" and h != w:
        scale = size / min(h, w)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = _resize(image, nw, nh)
        x0, y0 = (nw - size) // 2, (nh - size) // 2
        return np.ascontiguousarray(image[y0 : y0 + size, x0 : x0 + size])
    return _resize(image, size, size)


def _resize(image: np.ndarray, w: int, h: int) -> np.ndarray:
    if w <= image.shape[1] and h <= image.shape[0]:
        return resize_area(image, (w, h))
    return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BICUBIC))


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _packaged(relative: str) -> Path:
    return Path(str(resources.files("wsiengine.models").joinpath(relative)))



def spec_tiling(spec: EncoderSpec) -> ModelTiling:
    """The tiling an encoder spec expects (``target_mpp`` µm/px, ``patch_px`` pixels), labelled for messages."""
    return ModelTiling(float(spec.target_mpp), int(spec.patch_px), f"encoder {spec.name!r}")

class Encoder:
    """A patch encoder running in ONNX Runtime.

    Attributes
    ----------
    spec : EncoderSpec
    path : Path
        The ONNX file in use.
    session : onnxruntime.InferenceSession
    providers : list[str]
        Active execution providers, in priority order.
    precision : str
        What the session computes in: ``"fp32"``, ``"fp16"`` or ``"int8"``.
    """

    def __init__(self, spec: EncoderSpec, path: Path, session: Any, *, io_binding: bool = False,
                 precision: str = "fp32") -> None:
        self.spec = spec
        self.path = path
        self.session = session
        self.providers: list[str] = list(session.get_providers())
        self._input = session.get_inputs()[0].name
        outputs = [o.name for o in session.get_outputs()]
        self._output = outputs[0]
        self._score_output = SCORE_OUTPUT if SCORE_OUTPUT in outputs[1:] else None
        self._io_binding = io_binding
        self.precision = precision

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str] = "default",
        *,
        weights: str | os.PathLike[str] | None = None,
        spec: EncoderSpec | str | None = None,
        providers: str | Sequence[str] | None = "auto",
        allow_fallback: bool = False,
        threads: int | None = None,
        precision: str = "auto",
        device_id: int = 0,
        trt_cache_dir: str | os.PathLike[str] | None = None,
        max_batch_size: int = 256,
    ) -> "Encoder":
        """Open an encoder.

        Parameters
        ----------
        model : str or path
            ``"default"`` (the shipped ``lymphnode-lite0``), a registry name (shipped weights, or
            ``weights=``), or
            ``weights=`` an exported ``.onnx``, or a path to an ``.onnx`` file (its spec from
            ``spec=`` or its ``.onnx.json`` sidecar).
        weights : path, optional
            The ONNX file for a registry name. A torch checkpoint here is refused with the
            command that exports it (runtime inference needs no torch).
        spec : EncoderSpec or registry name, optional
            The spec of an ``.onnx`` given by path, when it has no sidecar.
        providers : "auto", a name, or a list
            See :func:`resolve_providers`.
        allow_fallback : bool
            Fall back to CPU (logged) when a requested GPU provider is missing or fails.
        threads : int, optional
            CPU intra-op threads (default: physical cores).
        precision : {"auto", "fp32", "fp16", "int8"}
            ``"auto"``: float16 on a GPU (TensorRT fp16 engines; on CUDA a float16 copy of the
            model, made once next to the model or in ``trt_cache_dir``, with float32 inputs and
            outputs), float32 on the CPU. ``"fp16"`` forces the float16 copy on any provider.
            ``"int8"`` runs the statically quantised QDQ copy (:func:`int8_path`): ModelError
            when the encoder has none.
        device_id : int
            CUDA device.
        trt_cache_dir : path, optional
            Where TensorRT keeps built engines (default ``~/.cache/wsiengine/trt``).
        max_batch_size : int
            Largest batch a TensorRT engine profile covers.
        """
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        spec_obj, path = cls.locate(model, weights, spec, precision)
        import onnxruntime as ort

        chosen = resolve_providers(providers, ort.get_available_providers(), allow_fallback=allow_fallback)
        on_gpu = any(p in _GPU for p in chosen)
        fp16 = precision == "fp16" or (precision == "auto" and on_gpu)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = int(threads or physical_cores())
        options.inter_op_num_threads = 1
        provider_args: list[tuple[str, dict[str, Any]]] = []
        model_path = path
        for name in chosen:
            if name == "TensorrtExecutionProvider":
                cache = Path(trt_cache_dir or Path.home() / ".cache" / "wsiengine" / "trt").expanduser()
                cache.mkdir(parents=True, exist_ok=True)
                s = spec_obj.input_px
                provider_args.append((name, {
                    "device_id": device_id,
                    "trt_fp16_enable": bool(fp16),
                    "trt_int8_enable": precision == "int8",  # explicit QDQ scales: no calibration table
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(cache),
                    "trt_timing_cache_enable": True,
                    "trt_timing_cache_path": str(cache),
                    "trt_max_workspace_size": 4 * 2**30,
                    "trt_profile_min_shapes": f"{_input_name(path)}:1x3x{s}x{s}",
                    "trt_profile_opt_shapes": f"{_input_name(path)}:64x3x{s}x{s}",
                    "trt_profile_max_shapes": f"{_input_name(path)}:{max_batch_size}x3x{s}x{s}",
                }))
            elif name == "CUDAExecutionProvider":
                provider_args.append((name, {"device_id": device_id, "cudnn_conv_algo_search": "HEURISTIC"}))
                if fp16 and "TensorrtExecutionProvider" not in chosen:
                    model_path = float16_variant(path, trt_cache_dir)
            else:
                provider_args.append((name, {}))
                if precision == "fp16" and not on_gpu:
                    model_path = float16_variant(path, trt_cache_dir)
        try:
            session = ort.InferenceSession(str(model_path), sess_options=options, providers=provider_args)
        except Exception as exc:  # noqa: BLE001
            if allow_fallback and chosen != ["CPUExecutionProvider"]:
                logger.warning("ONNX Runtime could not start %s (%s); falling back to CPU", chosen, exc)
                session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
                model_path = path
            else:
                raise ModelError(f"ONNX Runtime cannot load '{model_path}' with {chosen}: {exc}") from exc
        active = session.get_providers()
        missing = [p for p in chosen if p not in active and p != "CPUExecutionProvider"]
        if missing:
            message = f"ONNX Runtime did not start {missing} (active: {active}); check CUDA/cuDNN/TensorRT libraries"
            if not allow_fallback:
                raise ProviderError(message + ", or pass allow_fallback=True")
            logger.warning(message)
        used = "int8" if precision == "int8" else ("fp16" if Path(model_path) != path or
                                                   (fp16 and "TensorrtExecutionProvider" in active) else "fp32")
        encoder = cls(spec_obj, Path(model_path), session, io_binding="CUDAExecutionProvider" in active, precision=used)
        encoder._check_contract()
        logger.info("encoder %s (%s, %s) on %s, %d CPU threads", spec_obj.name, Path(model_path).name, used,
                    ", ".join(active), options.intra_op_num_threads)
        return encoder

    @property
    def tiling(self) -> ModelTiling:
        """The tiling the encoder was trained on (its spec's ``target_mpp`` and ``patch_px``)."""
        return spec_tiling(self.spec)

    @classmethod
    def locate(cls, model: str | os.PathLike[str] = "default", weights: str | os.PathLike[str] | None = None,
               spec: EncoderSpec | str | None = None, precision: str = "auto") -> tuple[EncoderSpec, Path]:
        """The spec and ONNX file :meth:`load` would open (the int8 copy for ``precision="int8"``),
        without starting a session."""
        spec_obj, path = cls._locate_fp32(model, weights, spec)
        if precision == "int8":
            path = int8_path(spec_obj, path)
        return spec_obj, path

    @staticmethod
    def _locate_fp32(model, weights, spec) -> tuple[EncoderSpec, Path]:
        spec_obj = get_encoder_spec(spec) if isinstance(spec, str) else spec
        text = os.fspath(model)
        if text.endswith(".onnx") or Path(text).suffix == ".onnx":
            path = Path(text).expanduser()
            if not path.is_file():
                raise ModelError(f"encoder model '{path}' does not exist; check the path")
            if spec_obj is None:
                sidecar = _sidecar(path)
                if not sidecar.is_file():
                    raise ModelError(
                        f"'{path.name}' has no spec: pass spec='<registry name>' or an EncoderSpec, or export it with "
                        "'wsiengine export-encoder', which writes the spec beside it as .onnx.json"
                    )
                spec_obj = _spec_from_json(sidecar)
            return spec_obj, path
        try:
            registered = get_encoder_spec(text)
        except KeyError as exc:
            raise ModelError(f"{exc.args[0]}; or give a path to an .onnx file") from None
        spec_obj = spec_obj or registered
        if weights is None:
            if registered.onnx_file is None:
                raise ModelError(
                    f"encoder {text!r} ships no weights ({registered.licence}; source: {registered.source}). "
                    f"Export your checkpoint once with 'wsiengine export-encoder {text} --weights CHECKPOINT -o {text}.onnx' "
                    f"(needs torch), then Encoder.load('{text}', weights='{text}.onnx')."
                )
            path = _packaged(registered.onnx_file)
            if not path.is_file():
                raise ModelError(f"the shipped model {registered.onnx_file} is missing from the installation; reinstall wsiengine")
            return spec_obj, path
        path = Path(os.fspath(weights)).expanduser()
        if not path.is_file():
            raise ModelError(f"weights '{path}' do not exist; check the path")
        if path.suffix != ".onnx":
            raise ModelError(
                f"'{path.name}' is not an ONNX file. Runtime inference needs no torch: export it once with "
                f"'wsiengine export-encoder {text} --weights {path} -o {text}.onnx' and load that."
            )
        return spec_obj, path

    def _check_contract(self) -> None:
        inp = self.session.get_inputs()[0]
        out = self.session.get_outputs()[0]
        shape = list(inp.shape)
        size = self.spec.input_px
        if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
            raise ModelError(f"'{self.path.name}' takes input {inp.name} {shape}; an encoder must take (batch, 3, H, W)")
        for dim in shape[2:]:
            if isinstance(dim, int) and dim != size:
                raise ModelError(
                    f"'{self.path.name}' takes {shape[2]}x{shape[3]} px but spec {self.spec.name!r} says input_px={size}; "
                    "use the spec the model was exported with"
                )
        if isinstance(shape[0], int) and shape[0] != -1:
            logger.warning("'%s' has a fixed batch size %d; export with a dynamic batch axis for speed", self.path.name, shape[0])
        if self._score_output is not None:
            score = next(o for o in self.session.get_outputs() if o.name == self._score_output)
            if len(score.shape) != 1:
                raise ModelError(f"'{self.path.name}' output {score.name} is {list(score.shape)}; expected (batch,)")
        out_shape = list(out.shape)
        if len(out_shape) != 2 or (isinstance(out_shape[1], int) and out_shape[1] != self.spec.embed_dim):
            raise ModelError(
                f"'{self.path.name}' outputs {out.name} {out_shape} but spec {self.spec.name!r} says embed_dim={self.spec.embed_dim}"
            )
        if "float" not in inp.type:
            raise ModelError(f"'{self.path.name}' input is {inp.type}; expected float pixels")
        self._fixed_batch = shape[0] if isinstance(shape[0], int) else None

    # -- inference ------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    @property
    def has_tile_scores(self) -> bool:
        """Whether the model also outputs its own tile tumour probability (``tumour_probability``)."""
        return self._score_output is not None

    def run(self, pixels: np.ndarray) -> np.ndarray:
        """Run the network on preprocessed ``(B, 3, S, S)`` float32 input -> ``(B, D)`` float32."""
        return self._run(pixels, [self._output])[0]

    def _run(self, pixels: np.ndarray, names: list[str]) -> list[np.ndarray]:
        if self._fixed_batch and pixels.shape[0] != self._fixed_batch:
            parts = [self._run(pixels[i : i + 1], names) for i in range(pixels.shape[0])]
            return [np.concatenate([p[k] for p in parts]) for k in range(len(names))]
        if self._io_binding:
            binding = self.session.io_binding()
            binding.bind_cpu_input(self._input, pixels)
            for name in names:
                binding.bind_output(name, "cpu")
            self.session.run_with_iobinding(binding)
            outs = binding.copy_outputs_to_cpu()
        else:
            outs = self.session.run(names, {self._input: pixels})
        return [np.asarray(o, dtype=np.float32) for o in outs]

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Embed ``(B, H, W, 3)`` uint8 RGB patches -> ``(B, embed_dim)`` float32."""
        if len(images) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        return self.run(preprocess(images, self.spec))

    def embed_with_scores(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``(embeddings (B, embed_dim), tumour probability (B,) or None)`` of uint8 RGB patches in
        one forward pass; the second is None when the model has no tile classifier output."""
        if self._score_output is None:
            return self.embed(images), None
        if len(images) == 0:
            return np.zeros((0, self.embed_dim), np.float32), np.zeros(0, np.float32)
        features, scores = self._run(preprocess(images, self.spec), [self._output, self._score_output])
        return features, scores

    def stream(
        self,
        slide: Slide,
        grid: TileGrid,
        batch_size: int = 64,
        **stream_options: Any,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Embed every patch of ``grid``, yielding ``(index, features)`` per batch.

        Reading runs ahead in :func:`~wsiengine.stream.stream_patches`' worker threads while
        the current batch is in ONNX Runtime (which releases the GIL), so reading and
        inference overlap. Batches come in completion order; ``index`` says which grid rows.
        """
        note = tiling_mismatch_message(self.tiling, grid.target_mpp, grid.tile_px)
        if note:  # the head's tiling decides a run's grid; the encoder's is a note for debugging
            logger.debug(note)
        for batch in stream_patches(slide, grid, batch_size, **stream_options):
            yield batch.index, self.embed(batch.images)

    def describe(self) -> dict[str, Any]:
        """Provenance: spec, file, its sha256 and the active providers (the hash is computed once per encoder)."""
        sha256 = getattr(self, "_sha256", None)
        if sha256 is None:
            sha256 = self._sha256 = sha256_file(self.path)
        return {"spec": self.spec.to_dict(), "file": str(self.path), "sha256": sha256, "providers": self.providers,
                "precision": self.precision}

    def __repr__(self) -> str:
        return (f"<Encoder {self.spec.name!r} {self.spec.input_px}px -> {self.embed_dim}-d, {self.precision} "
                f"on {self.providers[0]}>")


def int8_path(spec: EncoderSpec, fp32_path: Path) -> Path:
    """The statically quantised int8 copy of an encoder: the spec's shipped ``onnx_int8_file`` when
    ``fp32_path`` is its shipped model, else ``<stem>.int8.onnx`` beside ``fp32_path``.
    ModelError, saying how to make one, when there is none."""
    if spec.onnx_int8_file and spec.onnx_file and fp32_path == _packaged(spec.onnx_file):
        candidate = _packaged(spec.onnx_int8_file)
    else:
        candidate = fp32_path.with_name(f"{fp32_path.stem}.int8.onnx")
    if not candidate.is_file():
        raise ModelError(
            f"encoder {spec.name!r} has no int8 copy ('{candidate.name}' not found beside '{fp32_path.name}'); "
            "use precision 'fp32' (or 'fp16' on a GPU), or quantise it with ONNX Runtime's static QDQ "
            "quantisation calibrated on your own tiles and save it there")
    return candidate


def _input_name(path: Path) -> str:
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.input[0].name


def _spec_from_json(path: Path) -> EncoderSpec:
    data = json.loads(path.read_text())
    data = data.get("spec", data)
    fields = {f.name for f in dataclasses.fields(EncoderSpec)}
    for key in ("mean", "std"):
        if key in data:
            data[key] = tuple(data[key])
    try:
        return EncoderSpec(**{k: v for k, v in data.items() if k in fields})
    except TypeError as exc:
        raise ModelError(f"spec file '{path}' is not an EncoderSpec: {exc}") from None


def float16_model(path: str | os.PathLike[str]) -> Any:
    """The ONNX model at ``path`` (external data loaded) converted to float16 weights and compute
    with float32 inputs and outputs (ONNX Runtime's float16 converter, ``keep_io_types=True``).

    Returns an ``onnx.ModelProto``, not saved: :func:`float16_variant` caches it for CUDA, and the
    export (``wsiengine.models.training.export``) saves it beside the float32 model. Needs the
    ``onnx`` package; no torch.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(onnx.load(str(path), load_external_data=True), keep_io_types=True)


def _float16_source_hash(path: Path) -> str:
    """SHA-256 of the ONNX model at ``path`` followed by its external data files, if any (in
    the order the graph names them): what a float16 copy of it is keyed by."""
    files = [path]
    if path.stat().st_size < _GRAPH_ONLY_BYTES:  # a graph whose weights may live in external files
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        seen: list[str] = []
        all_tensors = getattr(onnx.external_data_helper, "_get_all_tensors", lambda m: m.graph.initializer)
        for tensor in all_tensors(model):
            if onnx.external_data_helper.uses_external_data(tensor):
                location = next((e.value for e in tensor.external_data if e.key == "location"), "")
                if location not in seen:
                    seen.append(location)
        folder = path.parent.resolve()
        for location in seen:
            candidate = path.parent / location
            real = candidate.resolve()
            if Path(location).is_absolute() or folder not in real.parents:
                raise ModelError(f"'{path}' names external data {location!r} outside its folder; an encoder's "
                                 "weights must lie beside its .onnx file (re-export it with wsiengine export-encoder)")
            if candidate.is_file():
                files.append(candidate)
    return sha256_files(files)


#: A model file smaller than this is parsed to find its external data files (a graph with
#: external weights is small; a large file holds its own weights).
_GRAPH_ONLY_BYTES = 64 << 20


def float16_variant(path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A float16 copy (:func:`float16_model`) of the ONNX model at ``path``, made once and reused.

    Written as ``<stem>.<hash>.fp16.onnx``, ``<hash>`` the first 16 hex digits of the SHA-256 of
    the source model (its ``.onnx`` file and external data files), beside the model or in
    ``cache_dir`` (default ``~/.cache/wsiengine`` when the model's folder is not writable). The
    copy is keyed by content, not by name or time: two different models named ``model.onnx``
    never share a copy, and a replaced model gets a new one. Returns its path.
    """
    path = Path(path)
    source_hash = _float16_source_hash(path)[:16]
    name = f"{path.stem}.{source_hash}.fp16.onnx"
    target = path.with_name(name)
    if cache_dir is not None or not os.access(path.parent, os.W_OK):
        base = Path(cache_dir or Path.home() / ".cache" / "wsiengine").expanduser()
        base.mkdir(parents=True, exist_ok=True)
        target = base / name
    if target.is_file():
        return target
    import onnx

    model = float16_model(path)
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")
    try:
        onnx.save(model, str(partial))
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("wrote float16 variant %s", target)
    return target
