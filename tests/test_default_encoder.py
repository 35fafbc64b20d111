"""The shipped ImageNet encoder `imagenet-lite0` (EfficientNet-Lite0, the default until the
lymph-node encoder replaced it), shipped as ONNX.

The shipped file runs in ONNX Runtime without torch; where torch is installed, the ONNX graph
agrees with the torch module it was exported from, and the torch module with its ported ImageNet
weights classifies real photographs as ImageNet classes.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wsiengine.models import get_encoder_spec

from .conftest import sample_region, shared_file

ROOT = Path(__file__).resolve().parents[1]
SPEC = get_encoder_spec("imagenet-lite0")

# The few ImageNet-1k indices the photographs are checked against (names from the ILSVRC-2012 synsets).
IMAGENET = {
    281: "tabby cat", 282: "tiger cat", 283: "Persian cat", 284: "Siamese cat", 285: "Egyptian cat",
    504: "coffee mug", 967: "espresso", 968: "cup",
    657: "missile", 744: "projectile, missile", 812: "space shuttle",
}
CATS = {281, 282, 283, 284, 285}


def shipped_onnx() -> Path:
    path = Path(str(importlib.resources.files("wsiengine.models") / SPEC.onnx_file))
    assert path.is_file(), f"the default encoder's ONNX file is missing: {path} (python -m wsiengine.models.training.make_default_onnx)"
    return path


def pcam_patches(per_label: int) -> tuple[np.ndarray, list[str]]:
    """The first ``per_label`` PCam test patches of each label, resized from 96 to 224 px."""
    from PIL import Image

    root = shared_file("pcam/test")
    images, names = [], []
    for label in ("0", "1"):
        for path in sorted((root / label).glob("*.jpg"))[:per_label]:
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB").resize((SPEC.input_px, SPEC.input_px), Image.BILINEAR)))
            names.append(path.name)
    return np.stack(images), names


def normalise(images: np.ndarray) -> np.ndarray:
    from wsiengine.models.training.make_default_onnx import normalise as _normalise

    return _normalise(images, SPEC.mean, SPEC.std)


# --- the shipped file, without torch ------------------------------------------------------------

_NO_TORCH_SCRIPT = r"""
import json, sys
sys.modules["torch"] = None  # any "import torch" now raises ImportError
import importlib.resources
import numpy as np
import onnxruntime as ort
from PIL import Image
from wsiengine.models import get_encoder_spec

spec = get_encoder_spec(sys.argv[2])
path = str(importlib.resources.files("wsiengine.models") / spec.onnx_file)
with Image.open(sys.argv[1]) as im:
    rgb = np.asarray(im.convert("RGB").resize((spec.input_px, spec.input_px), Image.BILINEAR), np.float32)
x = ((rgb / 255 - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)).transpose(2, 0, 1)[None]
x = np.ascontiguousarray(x, np.float32)
options = ort.SessionOptions()
options.intra_op_num_threads = 2
runs = []
for _ in range(2):  # two sessions, as two processes of a batch would have
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    (name_in,), name_out = session.get_inputs(), session.get_outputs()[0]
    runs.append(session.run([name_out.name], {name_in.name: x})[0])
    runs.append(session.run([name_out.name], {name_in.name: x})[0])
a = runs[0]
print(json.dumps({
    "input": name_in.name, "output": name_out.name, "shape": list(a.shape),
    "finite": bool(np.isfinite(a).all()), "identical": all(np.array_equal(a, r) for r in runs[1:]),
    "norm": float(np.linalg.norm(a)), "torch_imported": sys.modules.get("torch") is not None,
}))
"""


def test_shipped_onnx_embeds_a_real_patch_without_torch(tmp_path):
    from PIL import Image

    patch = tmp_path / "patch.png"  # 224 x 224 px of real tissue from the sample slide, at its 0.5 µm/px
    Image.fromarray(sample_region("sample-tissue")[:224, :224]).save(patch)
    shipped_onnx()
    result = subprocess.run([sys.executable, "-c", _NO_TORCH_SCRIPT, str(patch), SPEC.name], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["input"] == "pixels" and out["output"] == "embeddings"
    assert out["shape"] == [1, SPEC.embed_dim] == [1, 1280]
    assert out["finite"] and out["norm"] > 0
    assert out["identical"], "the same patch gave different embeddings across runs and sessions"
    assert not out["torch_imported"]


def test_shipped_onnx_has_a_dynamic_batch_and_rows_do_not_depend_on_the_batch():
    ort = pytest.importorskip("onnxruntime")
    images, _ = pcam_patches(3)
    x = normalise(images)
    session = ort.InferenceSession(str(shipped_onnx()), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.shape[1:] == [3, SPEC.input_px, SPEC.input_px] and not isinstance(inp.shape[0], int)
    assert out.shape[1:] == [SPEC.embed_dim] and not isinstance(out.shape[0], int)
    batch = session.run(None, {"pixels": x})[0]
    assert batch.shape == (len(x), SPEC.embed_dim) and batch.dtype == np.float32
    single = np.concatenate([session.run(None, {"pixels": x[i:i + 1]})[0] for i in range(len(x))])
    np.testing.assert_allclose(batch, single, rtol=1e-4, atol=1e-5)
    # pooled ReLU6 activations: non-negative, bounded, and different for different tissue
    assert batch.min() >= 0 and batch.max() <= 6
    assert not np.allclose(batch[0], batch[-1])


def test_shipped_onnx_is_one_self_contained_lean_file_recorded_in_the_model_card():
    path = shipped_onnx()
    size = path.stat().st_size
    assert 10e6 < size < 20e6, f"{size} bytes"
    assert not list(path.parent.glob("*.data")), "external data files beside the ONNX model"
    card = (ROOT / "models" / "cards" / "imagenet-lite0.md").read_text()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest in card, "models/cards/imagenet-lite0.md does not record the shipped file's sha256"
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert {op.domain or "ai.onnx": op.version for op in proto.opset_import}["ai.onnx"] == 17
    assert "BatchNormalization" not in {node.op_type for node in proto.graph.node}


# --- torch: weights, agreement, ImageNet sanity ----------------------------------------------------

@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("torch")
    from wsiengine.models.training.architectures.efficientnet_lite import build_efficientnet_lite0, default_checkpoint_path

    try:
        default_checkpoint_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    return build_efficientnet_lite0()


def test_torch_and_onnx_agree_on_real_patches(lite0):
    import torch

    ort = pytest.importorskip("onnxruntime")
    images, _ = pcam_patches(8)
    x = normalise(images)
    with torch.no_grad():
        expected = lite0(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(shipped_onnx()), providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[0]
    cosine = (expected * got).sum(1) / (np.linalg.norm(expected, axis=1) * np.linalg.norm(got, axis=1))
    assert got.shape == expected.shape == (16, 1280)
    assert cosine.min() >= 0.999, cosine.min()
    assert np.abs(expected - got).max() < 1e-3


def _photo(name: str):
    """A scikit-image photograph, centre-cropped (224/256 of the short side) and resized to 224."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    img = getattr(skimage_data, name)()
    h, w = img.shape[:2]
    crop = round(min(h, w) * 224 / 256)
    y0, x0 = (h - crop) // 2, (w - crop) // 2
    img = Image.fromarray(img[y0:y0 + crop, x0:x0 + crop]).resize((SPEC.input_px, SPEC.input_px), Image.BICUBIC)
    return np.asarray(img)[None]


@pytest.mark.parametrize(
    ("photo", "expected", "k"),
    [
        ("chelsea", CATS, 1),                # a tabby cat
        ("coffee", {967, 968, 504}, 1),       # a cup of coffee
        ("rocket", {657, 744, 812}, 5),       # a rocket on its launch pad
    ],
)
def test_imagenet_weights_classify_real_photographs(lite0, photo, expected, k):
    import torch

    with torch.no_grad():
        probs = lite0.logits(torch.from_numpy(normalise(_photo(photo)))).softmax(-1)[0]
    top = probs.topk(5)
    top_k = [int(i) for i in top.indices[:k]]
    names = [(int(i), IMAGENET.get(int(i), "?"), round(float(p), 3)) for p, i in zip(top.values, top.indices)]
    assert expected & set(top_k), f"{photo}: top-5 {names}"
    assert float(probs[sorted(expected)].sum()) > 0.25, f"{photo}: the expected classes are not confident: {names}"


def test_random_weights_do_not_look_like_imagenet(lite0):
    """The photograph checks above mean something: untrained weights put little mass on cats."""
    import torch

    from wsiengine.models.training.architectures.efficientnet_lite import EfficientNetLite0

    torch.manual_seed(0)
    random_model = EfficientNetLite0().eval()
    x = torch.from_numpy(normalise(_photo("chelsea")))
    with torch.no_grad():
        trained = float(lite0.logits(x).softmax(-1)[0, sorted(CATS)].sum())
        untrained = float(random_model.logits(x).softmax(-1)[0, sorted(CATS)].sum())
    assert trained > 0.8 and untrained < 0.05


def test_checkpoint_loading_is_strict(tmp_path, lite0):
    import torch

    from wsiengine.models.training.architectures.efficientnet_lite import (
        EfficientNetLite0,
        default_checkpoint_path,
        load_efficientnet_lite0_weights,
    )

    state = torch.load(default_checkpoint_path(), map_location="cpu", weights_only=True)
    assert len(state) == len(EfficientNetLite0().state_dict()) == 296

    missing = dict(state)
    del missing["_blocks.3._depthwise_conv.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"not filled \(1\): blocks\.3\.dw\.conv\.weight"):
        load_efficientnet_lite0_weights(EfficientNetLite0(), tmp_path / "missing.pth")

    extra = dict(state)
    extra["_blocks.3._se_reduce.weight"] = torch.zeros(6, 144, 1, 1)
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unused checkpoint keys \(1\): _blocks\.3\._se_reduce\.weight"):
        load_efficientnet_lite0_weights(EfficientNetLite0(), tmp_path / "extra.pth")

    shaped = dict(state)
    shaped["_fc.weight"] = torch.zeros(10, 1280)
    torch.save(shaped, tmp_path / "shaped.pth")
    with pytest.raises(ValueError, match=r"shape mismatches \(1\): _fc\.weight"):
        load_efficientnet_lite0_weights(EfficientNetLite0(), tmp_path / "shaped.pth")


def test_default_spec_matches_the_architecture():
    assert SPEC.architecture == "efficientnet_lite0" and SPEC.embed_dim == 1280 and SPEC.input_px == 224
    # TF EfficientNet-Lite preprocessing: (pixel - 127) / 128
    assert np.allclose(np.asarray(SPEC.mean) * 255, 127) and np.allclose(np.asarray(SPEC.std) * 255, 128)
