"""Encoder throughput: ONNX Runtime vs torch eager, same model, batch and threads, same run.

    python benchmarks/bench_encoder.py                       # the shipped default (EfficientNet-Lite0)
    python benchmarks/bench_encoder.py --model resnet50-trunc --batch 32 --threads 2
    python benchmarks/bench_encoder.py --model uni --providers cuda   # on a GPU machine (random weights)

Prints patches/s for the network alone (``Encoder.run`` vs ``model(x)``), for ONNX Runtime
with preprocessing (``Encoder.embed`` on uint8 patches), the ratio ORT / torch, and the
agreement of the two outputs. Registry models other than ``default`` are exported with random
weights to a temporary ONNX file first (needs torch and onnx).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _timed(fn, iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="registry name (default: default)")
    parser.add_argument("--weights", help="checkpoint for torch (and export); random weights if omitted")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--providers", default="cpu", help="ONNX Runtime providers for the ORT run: cpu, cuda, tensorrt, auto")
    parser.add_argument("--skip-torch", action="store_true", help="ONNX Runtime only (e.g. no torch on a GPU box)")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    import wsiengine
    from wsiengine import Encoder, get_encoder_spec

    spec = get_encoder_spec(args.model)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, spec.input_px, spec.input_px, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        model = None
        if not args.skip_torch or spec.onnx_file is None:
            import torch

            from wsiengine.models.training.build import build_encoder

            torch.set_num_threads(args.threads)
            weights = args.weights
            if weights is None and spec.name == "default":  # the same weights as the shipped ONNX
                from wsiengine.models.training.architectures.efficientnet_lite import default_checkpoint_path

                weights = default_checkpoint_path()
            model = build_encoder(spec, weights=weights)
        if spec.onnx_file is not None and args.weights is None:
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
        if model is not None and not args.skip_torch:
            import torch

            x = torch.from_numpy(pixels)

            def torch_run():
                with torch.inference_mode():
                    return model(x)

            torch_times = _timed(torch_run, args.iters, args.warmup)
            rows.append(("torch eager", torch_times))
            a = encoder.run(pixels)
            b = torch_run().numpy()
            cosine = float(np.min(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))

    print("wsiengine encoder benchmark")
    print(f"machine : {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}")
    versions = f"onnxruntime {ort.__version__}, numpy {np.__version__}, wsiengine {wsiengine.__version__}"
    if model is not None:
        import torch

        versions += f", torch {torch.__version__}"
    print(f"versions: {versions}")
    print(f"model   : {spec.name} ({spec.architecture}, {spec.input_px} px -> {spec.embed_dim}-d), batch {args.batch}, "
          f"{args.threads} threads, providers {encoder.providers}")
    print()
    print(f"{'run':<52} {'patches/s':>10} {'ms/batch (median)':>18}")
    rates = {}
    for name, times in rows:
        median = statistics.median(times)
        rates[name] = args.batch / median
        print(f"{name:<52} {rates[name]:>10.1f} {1e3 * median:>18.1f}")
    if "torch eager" in rates:
        print(f"\nratio onnxruntime / torch eager (network only): {rates['onnxruntime run'] / rates['torch eager']:.2f}x")
        print(f"agreement: min cosine {cosine:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
