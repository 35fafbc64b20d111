"""Encoder benchmarks: the shipped encoders on PCam patches (default), or ORT vs torch for one registry model.

    python benchmarks/bench_encoder.py                       # imagenet-lite0 vs lymphnode-lite0 fp32/int8(/fp16), 2 threads
    python benchmarks/bench_encoder.py --threads 2 --batch 64 --iters 20 --no-auc
    python benchmarks/bench_encoder.py --model imagenet-lite0 --batch 32 --threads 2   # ORT vs torch eager
    python benchmarks/bench_encoder.py --model uni --providers cuda --skip-torch          # on a GPU machine (random weights)

Default mode (no ``--model``), one run, CPU provider, ``--threads`` intra-op threads: patches/s of
``Encoder.embed`` on one batch of real 96-px PCam valid patches (random uint8 patches when PCam is
absent; said so), median of ``--iters`` timed calls after ``--warmup``, the configurations
interleaved call by call so that machine load hits them alike, for ``imagenet-lite0`` fp32 (the
old default, 96 -> 224 px), ``lymphnode-lite0`` fp32 and int8, and fp16 on the CPU (information
only: ORT's CPU kernels are float32). Then, unless ``--no-auc``, the AUC of the
``tumour_probability`` output on all of PCam valid and test at fp32 and int8, their difference,
the shipping rule (int8 within 0.005 of fp32 on valid) and the min cosine of int8 vs fp32 embeddings.

``--model NAME``: ``Encoder.run`` / ``Encoder.embed`` (ONNX Runtime) vs torch eager, same model,
batch and threads, and the agreement of the two outputs. Registry models without a shipped ONNX
(or with ``--weights``) are exported from torch to a temporary ONNX file first (needs torch and
onnx); a shipped model is compared with torch only where the same weights exist for torch
(``imagenet-lite0``: the ImageNet checkpoint).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import busy_cpu_s, cpu_model  # noqa: E402
from bench_fewshot import DEFAULT_DATA, load_patches  # noqa: E402

BASELINE = "imagenet-lite0"
CANDIDATE = "lymphnode-lite0"
INT8_TOLERANCE = 0.005  # the shipping rule, on PCam valid


def _timed(fn: Callable[[], object], iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _timed_interleaved(fns: dict[str, Callable[[], object]], iters: int, warmup: int) -> dict[str, list[float]]:
    """Each function ``warmup`` times, then ``iters`` rounds of one timed call each, in turn."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def pcam_split(data: Path, split: str) -> tuple[list[Path], np.ndarray]:
    """All JPEGs of one PCam split, label 0 then label 1 -> paths, labels."""
    paths = [sorted((data / split / str(label)).glob("*.jpg")) for label in (0, 1)]
    return paths[0] + paths[1], np.repeat([0, 1], [len(paths[0]), len(paths[1])])


def scores_and_embeddings(encoder, paths: list[Path], batch: int) -> tuple[np.ndarray, np.ndarray]:
    feats, probs = [], []
    for i in range(0, len(paths), batch):
        f, p = encoder.embed_with_scores(load_patches(paths[i : i + batch]))
        feats.append(f)
        probs.append(p)
    return np.concatenate(feats), np.concatenate(probs)


# -- default mode: the shipped encoders ------------------------------------------------------
def compare_shipped(args: argparse.Namespace) -> int:
    import onnxruntime as ort

    import wsiengine
    from wsiengine import Encoder
    from wsiengine.errors import ModelError
    from wsiengine.models.training.mil_metrics import roc_auc

    have_pcam = all((args.data / s / str(label)).is_dir() for s in ("valid", "test") for label in (0, 1))
    rng = np.random.default_rng(args.seed)
    if have_pcam:
        valid_paths, _ = pcam_split(args.data, "valid")
        pick = sorted(rng.choice(len(valid_paths), size=min(args.batch, len(valid_paths)), replace=False))
        images = load_patches([valid_paths[i] for i in pick])
        source = f"{len(images)} PCam valid patches (96 px, both classes) from {args.data}"
    else:
        images = rng.integers(0, 256, (args.batch, 96, 96, 3), dtype=np.uint8)
        source = f"random uint8 96x96 patches: PCam not found at {args.data} (pass --data); no AUC"

    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:  # the fp16 copy goes here, not beside the shipped model
        encoders = {"imagenet-lite0 fp32": Encoder.load(BASELINE, providers="cpu", threads=args.threads, precision="fp32"),
                    "lymphnode-lite0 fp32": Encoder.load(CANDIDATE, providers="cpu", threads=args.threads, precision="fp32")}
        try:
            encoders["lymphnode-lite0 int8"] = Encoder.load(CANDIDATE, providers="cpu", threads=args.threads, precision="int8")
        except ModelError as exc:
            notes.append(f"int8: not measured ({exc})")
        if not args.no_fp16:
            try:
                encoders["lymphnode-lite0 fp16 (CPU, information only)"] = Encoder.load(
                    CANDIDATE, providers="cpu", threads=args.threads, precision="fp16", trt_cache_dir=tmp)
            except (ImportError, ModelError) as exc:
                notes.append(f"fp16: not measured ({exc})")
        busy0, wall0 = busy_cpu_s(), time.perf_counter()
        times = _timed_interleaved({k: (lambda e=e: e.embed(images)) for k, e in encoders.items()}, args.iters, args.warmup)
        busy1, wall1 = busy_cpu_s(), time.perf_counter()

    print(f"# Encoder throughput ({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)")
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; {platform.platform()}, python {platform.python_version()}")
    print(f"onnxruntime {ort.__version__}, numpy {np.__version__}, wsiengine {wsiengine.__version__}")
    print(f"Encoder.embed (uint8 in: resize to the encoder's input, normalise, inference), CPUExecutionProvider, "
          f"{args.threads} threads, batch {len(images)}; median of {args.iters} timed calls after {args.warmup} warm-up, "
          f"configurations interleaved")
    print(f"patches: {source}")
    if busy0 is not None:
        print(f"machine CPU busy while timing: {busy1 - busy0:.1f} s over {wall1 - wall0:.1f} s wall "
              f"({(busy1 - busy0) / (wall1 - wall0):.2f} cores of {os.cpu_count()}; this benchmark uses up to {args.threads})")
    for note in notes:
        print(note)
    print()
    rates = {name: len(images) / statistics.median(t) for name, t in times.items()}
    base = rates["imagenet-lite0 fp32"]
    print(f"| encoder | precision | input px | patches/s | ms/batch (median) | vs {BASELINE} fp32 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, rate in rates.items():
        model, precision = name.split(" ", 1)
        print(f"| {model} | {precision} | {encoders[name].spec.input_px} | {rate:.1f} | "
              f"{1e3 * statistics.median(times[name]):.1f} | {rate / base:.2f}x |")
    int8_key = "lymphnode-lite0 int8"
    if int8_key in rates:
        print(f"\nint8 / fp32 (lymphnode-lite0): {rates[int8_key] / rates['lymphnode-lite0 fp32']:.2f}x")

    if not have_pcam or args.no_auc:
        return 0
    fp32 = encoders["lymphnode-lite0 fp32"]
    int8 = encoders.get(int8_key)
    print(f"\n## {CANDIDATE} tumour_probability on PCam (all patches of each split; no fitting)\n")
    print("| split | patches | fp32 AUC | int8 AUC | int8 - fp32 | min cosine int8 vs fp32 embeddings |")
    print("| --- | --- | --- | --- | --- | --- |")
    valid_diff = None
    for split in ("valid", "test"):
        paths, y = pcam_split(args.data, split)
        e32, p32 = scores_and_embeddings(fp32, paths, args.batch)
        auc32 = roc_auc(y, p32)
        if int8 is None:
            print(f"| {split} | {len(y)} | {auc32:.4f} | n/a | n/a | n/a |")
            continue
        e8, p8 = scores_and_embeddings(int8, paths, args.batch)
        auc8 = roc_auc(y, p8)
        if split == "valid":
            valid_diff = auc8 - auc32
        print(f"| {split} | {len(y)} | {auc32:.4f} | {auc8:.4f} | {auc8 - auc32:+.4f} | {min_cosine(e8, e32):.6f} |")
    if valid_diff is not None:
        verdict = "PASS" if abs(valid_diff) <= INT8_TOLERANCE else "FAIL"
        print(f"\nshipping rule (|int8 - fp32| valid AUC <= {INT8_TOLERANCE}): {verdict} ({valid_diff:+.4f})")
    return 0


# -- --model: ONNX Runtime vs torch eager ----------------------------------------------------
def ort_vs_torch(args: argparse.Namespace) -> int:
    import onnxruntime as ort

    import wsiengine
    from wsiengine import Encoder, get_encoder_spec

    spec = get_encoder_spec(args.model)
    rng = np.random.default_rng(args.seed)
    images = rng.integers(0, 256, (args.batch, spec.input_px, spec.input_px, 3), dtype=np.uint8)
    shipped = spec.onnx_file is not None and args.weights is None
    # torch runs the ORT model's weights: the shipped ones exist for torch only for imagenet-lite0
    use_torch = not args.skip_torch and (not shipped or spec.name == BASELINE)
    with tempfile.TemporaryDirectory() as tmp:
        model = None
        if use_torch or not shipped:
            import torch

            from wsiengine.models.training.build import build_encoder

            torch.set_num_threads(args.threads)
            weights = args.weights
            if shipped:
                from wsiengine.models.training.architectures.efficientnet_lite import default_checkpoint_path

                weights = default_checkpoint_path()
            model = build_encoder(spec, weights=weights)
        if shipped:
            encoder = Encoder.load(spec.name, providers=args.providers, threads=args.threads)
        else:
            from wsiengine.models.training.export import export_encoder_onnx

            onnx_path = Path(tmp) / f"{spec.name}.onnx"
            export_encoder_onnx(spec, onnx_path, model=model, verify=False)
            encoder = Encoder.load(onnx_path, spec=spec, providers=args.providers, threads=args.threads)
        pixels = wsiengine.encode.preprocess(images, spec)

        ort_run = _timed(lambda: encoder.run(pixels), args.iters, args.warmup)
        ort_embed = _timed(lambda: encoder.embed(images), args.iters, args.warmup)
        rows = [("onnxruntime run", ort_run), ("onnxruntime embed (uint8 in, with preprocessing)", ort_embed)]
        cosine = None
        if use_torch:
            import torch

            x = torch.from_numpy(pixels)

            def torch_run() -> np.ndarray:
                with torch.inference_mode():
                    out = model(x)
                return (out[0] if isinstance(out, tuple) else out).numpy()

            rows.append(("torch eager", _timed(torch_run, args.iters, args.warmup)))
            cosine = min_cosine(encoder.run(pixels), torch_run())

    print("wsiengine encoder benchmark")
    print(f"machine : {cpu_model()}, {os.cpu_count()} cores, {platform.platform()}")
    versions = f"onnxruntime {ort.__version__}, numpy {np.__version__}, wsiengine {wsiengine.__version__}"
    if model is not None:
        import torch

        versions += f", torch {torch.__version__}"
    print(f"versions: {versions}")
    print(f"model   : {spec.name} ({spec.architecture}, {spec.input_px} px -> {spec.embed_dim}-d), batch {args.batch}, "
          f"{args.threads} threads, providers {encoder.providers}")
    if shipped and not use_torch and not args.skip_torch:
        print(f"torch eager: skipped (no torch checkpoint of the shipped {spec.name} weights here; pass --weights)")
    print()
    print(f"{'run':<52} {'patches/s':>10} {'ms/batch (median)':>18}")
    rates = {}
    for name, times in rows:
        median = statistics.median(times)
        rates[name] = args.batch / median
        print(f"{name:<52} {rates[name]:>10.1f} {1e3 * median:>18.1f}")
    if cosine is not None:
        print(f"\nratio onnxruntime / torch eager (network only): {rates['onnxruntime run'] / rates['torch eager']:.2f}x")
        print(f"agreement: min cosine {cosine:.6f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="registry name: ORT vs torch for that model (default: compare the shipped encoders)")
    parser.add_argument("--weights", help="--model: checkpoint for torch (and export); random weights if omitted")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="PCam folder with valid/, test/ (default: %(default)s)")
    parser.add_argument("--no-auc", action="store_true", help="default mode: throughput only")
    parser.add_argument("--no-fp16", action="store_true", help="default mode: leave out the CPU fp16 row")
    parser.add_argument("--providers", default="cpu", help="--model: ONNX Runtime providers for the ORT run: cpu, cuda, tensorrt, auto")
    parser.add_argument("--skip-torch", action="store_true", help="--model: ONNX Runtime only (e.g. no torch on a GPU box)")
    args = parser.parse_args(argv)
    return compare_shipped(args) if args.model is None else ort_vs_torch(args)


if __name__ == "__main__":
    sys.exit(main())
