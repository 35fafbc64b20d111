"""Encoder runtime: ONNX Runtime sessions, provider choice, preprocessing, streaming into Zarr."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest

from wsiengine import errors, open_slide, plan_tiles
from wsiengine.encode import Encoder, preprocess, resolve_providers
from wsiengine.models import EncoderSpec
from wsiengine.pipeline import embed_slide
from wsiengine.store import open_store, read_features

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

SPEC = EncoderSpec(name="tiny-test", architecture="test", input_px=32, embed_dim=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def tiny_onnx(path, *, input_px=32, embed_dim=8, batch="batch", seed=0):
    """A real ONNX graph: 4x4 average pool -> flatten -> linear -> tanh, with a dynamic batch."""
    rng = np.random.default_rng(seed)
    features = 3 * (input_px // 4) ** 2
    weight = numpy_helper.from_array((rng.standard_normal((features, embed_dim)) / np.sqrt(features)).astype(np.float32), "W")
    nodes = [
        helper.make_node("AveragePool", ["pixels"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["projected"]),
        helper.make_node("Tanh", ["projected"], ["embeddings"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [batch, 3, input_px, input_px])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, [batch, embed_dim])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path, weight


@pytest.fixture()
def tiny(tmp_path):
    path, _ = tiny_onnx(tmp_path / "tiny.onnx")
    return path


def test_embed_matches_a_numpy_forward_pass(tmp_path):
    path, weight = tiny_onnx(tmp_path / "tiny.onnx")
    encoder = Encoder.load(path, spec=SPEC, providers="cpu")
    assert encoder.providers == ["CPUExecutionProvider"]
    images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    x = (images / 255.0 - 0.5) / 0.25
    pooled = x.reshape(5, 8, 4, 8, 4, 3).mean(axis=(2, 4)).transpose(0, 3, 1, 2).reshape(5, -1)
    expected = np.tanh(pooled @ numpy_helper.to_array(weight))
    np.testing.assert_allclose(encoder.embed(images), expected, atol=1e-5)
    assert encoder.embed(images[:1]).shape == (1, 8)  # dynamic batch
    np.testing.assert_array_equal(encoder.embed(images), encoder.embed(images))  # deterministic


def test_preprocess_resizes_once_and_normalises():
    patch = np.full((1, 64, 64, 3), 191, np.uint8)
    out = preprocess(patch, SPEC)
    assert out.shape == (1, 3, 32, 32) and out.dtype == np.float32
    np.testing.assert_allclose(out, (191 / 255 - 0.5) / 0.25, rtol=1e-6)
    crop = dataclasses.replace(SPEC, resize="center-crop")
    wide = np.zeros((1, 32, 64, 3), np.uint8)
    wide[:, :, 16:48] = 255
    np.testing.assert_allclose(preprocess(wide, crop), (1 - 0.5) / 0.25)  # the centre square only
    with pytest.raises(errors.ConfigError):
        preprocess(np.zeros((2, 32, 32, 3), np.float32), SPEC)


def test_provider_resolution():
    cpu_only = ["CPUExecutionProvider"]
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers("auto", cpu_only) == cpu_only
    assert resolve_providers("auto", gpu) == gpu
    assert resolve_providers(["cuda"], gpu) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers("cpu", gpu) == cpu_only
    with pytest.raises(errors.ProviderError, match="onnxruntime-gpu|wsiengine\\[gpu\\]"):
        resolve_providers("cuda", cpu_only)
    with pytest.raises(errors.ProviderError):
        resolve_providers(["tensorrt", "cuda"], cpu_only)
    with pytest.raises(errors.ConfigError, match="unknown execution provider"):
        resolve_providers("rocm-ish", cpu_only)


def test_missing_gpu_is_an_error_or_a_logged_fallback(tiny, caplog):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA; the fallback path needs a CPU-only onnxruntime")
    with pytest.raises(errors.ProviderError):
        Encoder.load(tiny, spec=SPEC, providers="cuda")
    with caplog.at_level(logging.WARNING, logger="wsiengine"):
        encoder = Encoder.load(tiny, spec=SPEC, providers="cuda", allow_fallback=True)
    assert encoder.providers == ["CPUExecutionProvider"]
    assert "Falling back" in caplog.text


def test_bad_model_paths_and_mismatched_specs_are_clear_errors(tmp_path, tiny):
    with pytest.raises(errors.ModelError, match="does not exist"):
        Encoder.load(tmp_path / "nope.onnx", spec=SPEC)
    with pytest.raises(errors.ModelError, match="no spec"):
        Encoder.load(tiny)
    with pytest.raises(errors.ModelError, match="input_px=64"):
        Encoder.load(tiny, spec=dataclasses.replace(SPEC, input_px=64))
    with pytest.raises(errors.ModelError, match="embed_dim=16"):
        Encoder.load(tiny, spec=dataclasses.replace(SPEC, embed_dim=16))
    with pytest.raises(errors.ModelError, match="unknown encoder"):
        Encoder.load("not-a-model")
    with pytest.raises(errors.ModelError, match="export-encoder uni"):
        Encoder.load("uni")
    checkpoint = tmp_path / "uni.pth"
    checkpoint.write_bytes(b"not onnx")
    with pytest.raises(errors.ModelError, match="not an ONNX file"):
        Encoder.load("uni", weights=checkpoint)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00garbage")
    with pytest.raises(errors.ModelError, match="cannot load"):
        Encoder.load(garbage, spec=SPEC)


def test_sidecar_spec_is_read(tiny):
    (tiny.parent / "tiny.onnx.json").write_text(json.dumps({"spec": SPEC.to_dict()}))
    assert Encoder.load(tiny).spec == SPEC


def test_stream_into_zarr_is_complete_and_in_grid_order(cmu_small, tiny, tmp_path):
    slide = open_slide(cmu_small)
    grid = plan_tiles(slide, None, target_mpp=0.5, tile_px=224, min_tissue=0)
    encoder = Encoder.load(tiny, spec=SPEC)
    out = embed_slide(slide, grid, encoder, tmp_path / "cmu.zarr", batch_size=7, chunk_rows=16)
    assert out == tmp_path / "cmu.zarr" and not (tmp_path / "cmu.zarr.partial").exists()
    coords, features = read_features(out)
    np.testing.assert_array_equal(coords, grid.coords)
    assert features.shape == (len(grid), 8) and np.isfinite(features).all()
    for i in (0, len(grid) // 2, len(grid) - 1):
        x, y = grid.coords[i]
        patch = slide.read_region((int(x), int(y)), 0, (224, 224))
        np.testing.assert_allclose(features[i], encoder.embed(patch[None])[0], atol=1e-6)
    group = open_store(out)
    assert group.attrs["complete"] and group.attrs["encoder"]["spec"]["name"] == "tiny-test"


def test_a_failed_run_leaves_no_store(cmu_small, tiny, tmp_path, monkeypatch):
    slide = open_slide(cmu_small)
    grid = plan_tiles(slide, None, min_tissue=0)
    encoder = Encoder.load(tiny, spec=SPEC)
    calls = {"n": 0}
    real = encoder.embed

    def failing(images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(images)

    monkeypatch.setattr(encoder, "embed", failing)
    with pytest.raises(RuntimeError):
        embed_slide(slide, grid, encoder, tmp_path / "x.zarr", batch_size=4)
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "x.zarr.partial").exists()
