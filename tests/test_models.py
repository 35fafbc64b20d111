"""Encoder architectures (torch), checkpoint loading and ONNX export.

Every registered encoder builds and returns ``(B, embed_dim)``; the four giants (0.6-1.1 B
parameters) are built on the ``meta`` device and checked against their published parameter
counts instead of being run. Checkpoints round-trip strictly, published layouts (Hugging Face
Dinov2, CONCH's CoCa ``visual.`` tower, torchvision's full ResNet-50, CTransPath's buffers) map
on, and bad paths and keys fail with messages that name the problem. ONNX exports agree with
torch (cosine >= 0.999) and take any batch size.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the model zoo's torch side needs the [train] extra (pip install 'wsiengine[train]')")

from wsiengine.models import get_encoder_spec, list_encoders  # noqa: E402
from wsiengine.models.training.build import (  # noqa: E402
    BUILDERS,
    CheckpointError,
    WeightsNotFoundError,
    build_encoder,
    hf_dinov2_to_timm,
)

GIANTS = {"h-optimus-0", "gigapath", "uni2-h", "virchow2"}

#: Parameter counts of the reference models (timm / Hugging Face builds of the published
#: checkpoints, as tabulated in public benchmark code; Phikon-v2's figure there, 303,351,808,
#: also counts the Dinov2 ``mask_token`` (1024), which is training-only and dropped here).
PUBLISHED_PARAMS = {
    "uni": 303_350_784,
    "phikon-v2": 303_351_808 - 1024,
    "uni2-h": 681_394_176,
    "virchow2": 631_239_424,
    "h-optimus-0": 1_134_774_272,
    "gigapath": 1_134_953_984,
    "resnet50-trunc": 8_543_296,  # CLAM's resnet50_baseline (layers 1-3)
}


def _shrunk(name: str, depth: int = 2) -> object:
    """A registry spec with fewer blocks, so tests that run it stay fast."""
    spec = get_encoder_spec(name)
    return dataclasses.replace(spec, builder_kwargs={**spec.builder_kwargs, "depth": depth})


def _batch(spec, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, spec.input_px, spec.input_px, generator=torch.Generator().manual_seed(seed))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(autouse=True, scope="module")
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(before, 4))
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------
# every recipe builds
# ------------------------------------------------------------------------------------------

def test_every_architecture_in_the_registry_has_a_builder():
    for name in list_encoders():
        assert get_encoder_spec(name).architecture in BUILDERS, name


@pytest.mark.parametrize("name", sorted(set(list_encoders()) - GIANTS))
def test_recipe_builds_with_random_weights_and_embeds(name):
    spec = get_encoder_spec(name)
    model = build_encoder(spec)
    assert not model.training
    with torch.no_grad():
        out = model(_batch(spec))
    assert out.shape == (2, spec.embed_dim)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    if name in PUBLISHED_PARAMS:
        assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(GIANTS))
def test_giant_recipe_matches_published_size_on_the_meta_device(name):
    spec = get_encoder_spec(name)
    model = build_encoder(spec, device="meta")
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]
    out = model(torch.empty(3, 3, spec.input_px, spec.input_px, device="meta"))
    assert out.shape == (3, spec.embed_dim)


def test_random_weights_are_reproducible():
    spec = get_encoder_spec("ctranspath")
    a, b = build_encoder(spec), build_encoder(spec)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_timm_key_names_and_shapes_of_the_vit_recipes():
    """Keys and shapes follow timm's VisionTransformer as configured on each model card."""
    sd = build_encoder("uni2-h", device="meta").state_dict()
    assert sd["pos_embed"].shape == (1, 256, 1536)  # no_embed_class: patches only
    assert sd["reg_token"].shape == (1, 8, 1536)
    assert sd["cls_token"].shape == (1, 1, 1536)
    assert sd["patch_embed.proj.weight"].shape == (1536, 3, 14, 14)
    assert sd["blocks.23.mlp.fc1.weight"].shape == (8192, 1536)  # SwiGLUPacked: gate and value packed
    assert sd["blocks.23.mlp.fc2.weight"].shape == (1536, 4096)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * 1536, 1536)
    assert {"blocks.0.ls1.gamma", "blocks.0.ls2.gamma", "norm.weight", "norm.bias"} <= set(sd)

    sd = build_encoder("virchow2", device="meta").state_dict()
    assert sd["pos_embed"].shape == (1, 1 + 4 + 256, 1280)  # class and register tokens embedded too
    assert sd["blocks.31.mlp.fc1.weight"].shape == (6832, 1280)
    assert sd["blocks.31.mlp.fc2.weight"].shape == (1280, 3416)

    sd = build_encoder("gigapath", device="meta").state_dict()
    assert sd["pos_embed"].shape == (1, 197, 1536)
    assert sd["patch_embed.proj.weight"].shape == (1536, 3, 16, 16)
    assert "reg_token" not in sd

    sd = build_encoder("conch", device="meta").state_dict()
    assert sd["trunk.pos_embed"].shape == (1, 1 + 28 * 28, 768)
    assert sd["attn_pool_contrast.query"].shape == (1, 512)
    assert sd["attn_pool_contrast.attn.k_proj_weight"].shape == (512, 768)
    assert sd["proj_contrast"].shape == (512, 512)
    assert not any("ls1" in k for k in sd)  # CONCH's trunk has no LayerScale


def test_torchvision_and_ctranspath_key_names():
    sd = build_encoder("resnet50-trunc", device="meta").state_dict()
    assert sd["layer3.5.bn3.running_var"].shape == (1024,)
    assert sd["layer2.0.downsample.0.weight"].shape == (512, 256, 1, 1)
    assert not any(k.startswith(("layer4.", "fc.")) for k in sd)

    sd = build_encoder("ctranspath", device="meta").state_dict()
    assert sd["patch_embed.proj.0.weight"].shape == (12, 3, 3, 3)  # ConvStem: 3 -> 12 -> 24 -> 96
    assert sd["patch_embed.proj.6.weight"].shape == (96, 24, 1, 1)
    assert sd["layers.0.downsample.reduction.weight"].shape == (192, 384)  # merging at the end of a stage
    assert sd["layers.3.blocks.1.attn.relative_position_bias_table"].shape == (169, 24)
    assert "layers.3.downsample.reduction.weight" not in sd
    assert sd["norm.weight"].shape == (768,)


def test_virchow2_pooling_concatenates_class_token_and_mean_patch_token():
    spec = _shrunk("virchow2")
    model = build_encoder(spec)
    x = _batch(spec, 1)
    with torch.no_grad():
        tokens = model.forward_features(x)
        out = model(x)
    assert tokens.shape == (1, 1 + 4 + 256, 1280)
    assert torch.allclose(out[:, :1280], tokens[:, 0])
    assert torch.allclose(out[:, 1280:], tokens[:, 5:].mean(1), atol=1e-6)


def test_vit_accepts_another_input_size_by_resampling_positions():
    spec = _shrunk("uni", depth=1)
    model = build_encoder(spec)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 256, 256))
    assert out.shape == (1, 1024)


# ------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------

def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Move every float weight away from the seed-0 initialisation, so a load that silently
    fell back to random weights would be caught."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(0.01 * torch.randn(value.shape, generator=g))
    return model


ROUND_TRIP = ["resnet50-trunc", "ctranspath", "default", "conch@2", "uni2-h@2", "virchow2@2", "h-optimus-0@1",
              "gigapath@1"]


@pytest.mark.parametrize("recipe", ROUND_TRIP)
def test_state_dict_round_trip_loads_strictly(recipe, tmp_path):
    name, _, depth = recipe.partition("@")
    spec = _shrunk(name, int(depth)) if depth else get_encoder_spec(name)
    source = _perturbed(build_encoder(spec))
    path = tmp_path / "checkpoint.pth"
    torch.save(source.state_dict(), path)
    loaded = build_encoder(spec, weights=path)
    x = _batch(spec, 1)
    with torch.no_grad():
        assert torch.equal(source(x), loaded(x))


def test_wrapped_and_prefixed_checkpoints_load(tmp_path):
    spec = get_encoder_spec("ctranspath")
    source = _perturbed(build_encoder(spec))
    state = {"module." + k: v for k, v in source.state_dict().items()}
    torch.save({"model": state, "epoch": 3}, tmp_path / "wrapped.pth")
    loaded = build_encoder(spec, weights=tmp_path / "wrapped.pth")
    x = _batch(spec, 1)
    with torch.no_grad():
        assert torch.equal(source(x), loaded(x))


def test_ctranspath_checkpoint_buffers_are_checked_then_dropped(tmp_path):
    """ctranspath.pth (timm 0.5.4) stores relative_position_index and attn_mask buffers."""
    spec = get_encoder_spec("ctranspath")
    source = _perturbed(build_encoder(spec))
    state = dict(source.state_dict())
    buffers = {k: v for k, v in source.named_buffers() if k.endswith(("relative_position_index", "attn_mask"))}
    assert "layers.0.blocks.1.attn_mask" in buffers and "layers.3.blocks.1.attn_mask" not in buffers
    torch.save({"model": {**state, **buffers}}, tmp_path / "ctranspath.pth")
    loaded = build_encoder(spec, weights=tmp_path / "ctranspath.pth")
    with torch.no_grad():
        assert torch.equal(source(_batch(spec, 1)), loaded(_batch(spec, 1)))

    bad = dict(buffers)
    bad["layers.0.blocks.1.attn_mask"] = torch.zeros_like(bad["layers.0.blocks.1.attn_mask"])
    torch.save({"model": {**state, **bad}}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="attn_mask"):
        build_encoder(spec, weights=tmp_path / "bad.pth")


def test_full_torchvision_resnet50_checkpoint_loads_into_the_truncated_model(tmp_path):
    spec = get_encoder_spec("resnet50-trunc")
    source = _perturbed(build_encoder(spec))
    state = dict(source.state_dict())
    state["layer4.0.conv1.weight"] = torch.zeros(512, 1024, 1, 1)
    state["layer4.2.bn3.running_mean"] = torch.zeros(2048)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    torch.save(state, tmp_path / "resnet50-0676ba61.pth")
    loaded = build_encoder(spec, weights=tmp_path / "resnet50-0676ba61.pth")
    with torch.no_grad():
        assert torch.equal(source(_batch(spec, 1)), loaded(_batch(spec, 1)))


def test_conch_coca_checkpoint_keeps_only_the_image_tower(tmp_path):
    spec = _shrunk("conch", 1)
    source = _perturbed(build_encoder(spec))
    state = {"visual." + k: v for k, v in source.state_dict().items()}
    state["visual.attn_pool_caption.query"] = torch.zeros(256, 768)
    state["visual.ln_caption.weight"] = torch.ones(768)
    state["text.token_embedding.weight"] = torch.zeros(10, 768)
    state["logit_scale"] = torch.tensor(4.6)
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = build_encoder(spec, weights=tmp_path / "pytorch_model.bin")
    with torch.no_grad():
        assert torch.equal(source(_batch(spec, 1)), loaded(_batch(spec, 1)))


def _timm_to_hf_dinov2(state: dict) -> dict:
    """The inverse of the loader's mapping, written out independently: Hugging Face Dinov2Model names."""
    out = {"embeddings.mask_token": torch.zeros(1, state["cls_token"].shape[-1])}
    for key, value in state.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if m is None:
            out[{"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
                 "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
                 "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
                 "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}[key]] = value
            continue
        i, rest = m.groups()
        p = f"encoder.layer.{i}."
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            q, k, v = value.chunk(3, dim=0)
            out.update({p + f"attention.attention.query.{kind}": q, p + f"attention.attention.key.{kind}": k,
                        p + f"attention.attention.value.{kind}": v})
        elif rest.startswith("attn.proj."):
            out[p + "attention.output.dense." + rest.rsplit(".", 1)[1]] = value
        elif rest in ("ls1.gamma", "ls2.gamma"):
            out[p + f"layer_scale{rest[2]}.lambda1"] = value
        else:  # norm1, norm2, mlp.fc1, mlp.fc2 keep their names
            out[p + rest] = value
    return out


def test_phikon_v2_loads_from_the_hugging_face_dinov2_layout(tmp_path):
    spec = _shrunk("phikon-v2")
    source = _perturbed(build_encoder(spec))
    hf = _timm_to_hf_dinov2(source.state_dict())
    assert "encoder.layer.1.attention.attention.query.weight" in hf and "embeddings.mask_token" in hf
    torch.save(hf, tmp_path / "model.bin")
    loaded = build_encoder(spec, weights=tmp_path / "model.bin")
    with torch.no_grad():
        assert torch.allclose(source(_batch(spec, 1)), loaded(_batch(spec, 1)))
    assert set(hf_dinov2_to_timm(hf)) == set(source.state_dict())


def test_safetensors_checkpoint_loads_when_the_package_is_present(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    spec = get_encoder_spec("resnet50-trunc")
    source = _perturbed(build_encoder(spec))
    safetensors_torch.save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "m.safetensors"))
    loaded = build_encoder(spec, weights=tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(source(_batch(spec, 1)), loaded(_batch(spec, 1)))


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------

def test_missing_weights_file_is_a_clear_file_not_found_error(tmp_path):
    missing = tmp_path / "nowhere" / "uni.bin"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        build_encoder("resnet50-trunc", weights=missing)
    assert isinstance(info.value, WeightsNotFoundError)
    assert str(missing) in str(info.value)
    with pytest.raises(FileNotFoundError, match="not a file"):
        build_encoder("resnet50-trunc", weights=tmp_path)


def test_checkpoint_of_another_model_names_missing_and_unexpected_keys(tmp_path):
    torch.save(build_encoder("resnet50-trunc").state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ValueError) as info:
        build_encoder("ctranspath", weights=tmp_path / "resnet.pth")
    message = str(info.value)
    assert isinstance(info.value, CheckpointError)
    assert "missing from the checkpoint" in message and "patch_embed.proj.0.weight" in message
    assert "unexpected in the checkpoint" in message and "layer1.0.conv1.weight" in message
    assert "resnet.pth" in message and "'ctranspath'" in message


def test_shape_mismatch_is_reported_even_when_not_strict(tmp_path):
    state = build_encoder("ctranspath").state_dict()
    state["norm.weight"] = torch.ones(512)
    torch.save(state, tmp_path / "ckpt.pth")
    for strict in (True, False):
        with pytest.raises(CheckpointError, match=r"norm\.weight checkpoint \(512,\) vs model \(768,\)"):
            build_encoder("ctranspath", weights=tmp_path / "ckpt.pth", strict=strict)


def test_partial_checkpoint_loads_only_when_not_strict(tmp_path):
    spec = get_encoder_spec("resnet50-trunc")
    source = _perturbed(build_encoder(spec))
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("layer3.")}
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint \(\d+\): layer3\.0\.conv1\.weight"):
        build_encoder(spec, weights=tmp_path / "partial.pth")
    loaded = build_encoder(spec, weights=tmp_path / "partial.pth", strict=False)
    assert torch.equal(loaded.conv1.weight, source.conv1.weight)


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        build_encoder("resnet50-trunc", weights=tmp_path / "junk.pth")
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="no state dict of tensors"):
        build_encoder("resnet50-trunc", weights=tmp_path / "empty.pth")


def test_spec_whose_embedding_size_disagrees_with_the_architecture_is_refused():
    from wsiengine.errors import ModelError

    spec = dataclasses.replace(get_encoder_spec("ctranspath"), embed_dim=1024)
    with pytest.raises(ModelError, match="returns 768 features but the spec says embed_dim=1024"):
        build_encoder(spec)
    with pytest.raises(ModelError, match="meta device"):
        build_encoder("uni", weights="x.bin", device="meta")


# ------------------------------------------------------------------------------------------
# ONNX export
# ------------------------------------------------------------------------------------------

try:
    import onnx
    import onnxruntime as ort

    from wsiengine.models.training.export import ExportVerificationError, export_encoder_onnx
except ImportError as _exc:  # the torch-side tests above still run
    onnx = ort = None
    _ONNX_MISSING = f"ONNX export needs onnx and onnxruntime: {_exc}"
else:
    _ONNX_MISSING = ""

needs_onnx = pytest.mark.skipif(bool(_ONNX_MISSING), reason=_ONNX_MISSING or "n/a")


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _check_dynamic_batch(path, spec, model):
    """The graph runs at batch 1 and 5 and agrees with torch on both."""
    session = _session(path)
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, outp.name) == ("pixels", "embeddings")
    assert inp.type == "tensor(float)" and inp.shape[1:] == [3, spec.input_px, spec.input_px]
    assert isinstance(inp.shape[0], str)  # a symbolic (dynamic) batch axis
    for n in (1, 5):
        x = _batch(spec, n, seed=n)
        got = session.run(["embeddings"], {"pixels": x.numpy()})[0]
        with torch.no_grad():
            want = model(x).numpy()
        assert got.shape == (n, spec.embed_dim)
        assert _cosine(got, want).min() >= 0.999


@needs_onnx
def test_resnet50_trunc_exports_to_onnx_that_agrees_with_torch(tmp_path):
    spec = get_encoder_spec("resnet50-trunc")
    model = _perturbed(build_encoder(spec))
    report = export_encoder_onnx(spec, tmp_path / "resnet.onnx", model=model, fp16=True)
    assert report.path.is_file() and report.min_cosine >= 0.999 and report.max_abs_diff < 1e-2
    assert report.n_params == PUBLISHED_PARAMS["resnet50-trunc"]
    assert re.fullmatch(r"[0-9a-f]{64}", report.sha256)
    assert report.spec_path.is_file() and '"name": "resnet50-trunc"' in report.spec_path.read_text()
    meta = {p.key: p.value for p in onnx.load(str(report.path)).metadata_props}
    assert meta["wsiengine.encoder"] == "resnet50-trunc" and meta["wsiengine.embed_dim"] == "1024"
    _check_dynamic_batch(report.path, spec, model)
    assert report.fp16_path.is_file() and report.fp16_path.name == "resnet.fp16.onnx"
    half = _session(report.fp16_path)
    assert half.get_inputs()[0].type == "tensor(float)"  # float32 in and out around float16 weights
    if report.fp16_min_cosine is not None:
        assert report.fp16_min_cosine >= 0.99


@needs_onnx
def test_conch_vit_recipe_exports_to_onnx_that_agrees_with_torch(tmp_path):
    """A real ViT recipe at full size: CONCH's ViT-B/16 at 448 px with its attentional pooler."""
    spec = get_encoder_spec("conch")
    model = build_encoder(spec)
    report = export_encoder_onnx(spec, tmp_path / "conch.onnx", model=model)
    assert report.min_cosine >= 0.999
    assert report.n_params == sum(p.numel() for p in model.parameters())
    session = _session(report.path)
    x = _batch(spec, 5, seed=3)
    got5 = session.run(["embeddings"], {"pixels": x.numpy()})[0]
    got1 = session.run(["embeddings"], {"pixels": x[:1].numpy()})[0]
    with torch.no_grad():
        want = model(x[:2]).numpy()
    assert got5.shape == (5, 512) and got1.shape == (1, 512)
    assert _cosine(got5[:2], want).min() >= 0.999
    assert _cosine(got1, want[:1]).min() >= 0.999


@needs_onnx
def test_swin_exports_with_a_dynamic_batch_axis(tmp_path):
    spec = get_encoder_spec("ctranspath")
    model = _perturbed(build_encoder(spec))
    report = export_encoder_onnx(spec, tmp_path / "ctranspath.onnx", model=model, verify=False)
    assert np.isnan(report.min_cosine)
    _check_dynamic_batch(report.path, spec, model)


@needs_onnx
def test_large_models_keep_weights_in_one_external_data_file(tmp_path, monkeypatch):
    from wsiengine.models.training import export

    monkeypatch.setattr(export, "_EXTERNAL_DATA_BYTES", 0)  # treat the small model as over the 2 GB limit
    spec = get_encoder_spec("resnet50-trunc")
    report = export_encoder_onnx(spec, tmp_path / "big.onnx")
    assert report.external_data == tmp_path / "big.onnx.data" and report.external_data.is_file()
    assert report.path.stat().st_size < 1_000_000 < report.external_data.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data", "big.onnx.json"]
    assert report.min_cosine >= 0.999


@needs_onnx
def test_export_that_disagrees_with_torch_raises(tmp_path, monkeypatch):
    from wsiengine.models.training import export

    real = export._cosines
    monkeypatch.setattr(export, "_cosines", lambda a, b: real(a, b) - 0.01)
    with pytest.raises(ExportVerificationError, match="disagrees with torch"):
        export_encoder_onnx("resnet50-trunc", tmp_path / "r.onnx")


@needs_onnx
def test_export_refuses_an_output_path_that_is_not_onnx(tmp_path):
    from wsiengine.errors import ModelError

    with pytest.raises(ModelError, match=r"must end in \.onnx"):
        export_encoder_onnx("resnet50-trunc", tmp_path / "model.pt")
