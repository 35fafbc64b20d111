"""The default encoder ``lymphnode-lite0``: EfficientNet-Lite0 fine-tuned on PCam, shipped as
fp32 and int8 ONNX; its training script on a tiny run (never the full model)."""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wsiengine import Encoder, RunConfig
from wsiengine.errors import ConfigError, ModelError
from wsiengine.models import get_encoder_spec, list_encoders

from .conftest import sample_region, shared_file
from .test_default_encoder import _NO_TORCH_SCRIPT

ROOT = Path(__file__).resolve().parents[1]
SPEC = get_encoder_spec("lymphnode-lite0")
MAX_BYTES = 20_000_000


def shipped(relative: str) -> Path:
    path = Path(str(importlib.resources.files("wsiengine.models") / relative))
    assert path.is_file(), f"{path} is missing (python -m wsiengine.models.train_lymphnode_encoder)"
    return path


def slide_patches() -> np.ndarray:
    """Sixteen 96-px patches at about 1 µm/px (the sample slide's 0.5 µm/px halved): tissue,
    tissue edge and glass."""
    tiles = []
    for name in ("sample-tissue", "sample-tissue-2", "sample-border", "sample-glass"):
        region = sample_region(name)[:384, :384].astype(np.float32)
        half = region.reshape(192, 2, 192, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
        tiles += [half[y:y + 96, x:x + 96] for y in (0, 96) for x in (0, 96)]
    return np.stack(tiles)


def pcam_valid(per_label: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    root = shared_file("pcam/valid")
    images, labels = [], []
    for label in (0, 1):
        for path in sorted((root / str(label)).glob("*.jpg"))[:per_label]:
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB")))
            labels.append(label)
    return np.stack(images), np.asarray(labels)


# --- the registry and the default ------------------------------------------------------------------

def test_default_is_the_lymph_node_encoder_and_the_imagenet_one_keeps_its_name():
    assert get_encoder_spec("default") is SPEC
    assert {"default", "lymphnode-lite0", "imagenet-lite0"} <= set(list_encoders())
    encoder = Encoder.load(providers="cpu", threads=1)
    assert encoder.spec.name == "lymphnode-lite0" and encoder.path == shipped(SPEC.onnx_file)
    imagenet = get_encoder_spec("imagenet-lite0")
    assert imagenet.input_px == 224 and imagenet.onnx_file == "weights/efficientnet_lite0.onnx"
    assert RunConfig().encoder.encoder == "default"


def test_spec_records_native_96_px_at_0972_and_its_data():
    assert (SPEC.input_px, SPEC.patch_px, SPEC.target_mpp, SPEC.embed_dim) == (96, 96, 0.972, 1280)
    assert np.allclose(np.asarray(SPEC.mean) * 255, 127) and np.allclose(np.asarray(SPEC.std) * 255, 128)
    assert "PatchCamelyon" in SPEC.licence and "CC0" in SPEC.licence
    assert SPEC.onnx_int8_file == "weights/lymphnode_lite0.int8.onnx"


def test_shipped_files_are_small_self_contained_and_recorded_in_the_card():
    card = (ROOT / "models" / "cards" / "lymphnode-lite0.md").read_text()
    training = json.loads(shipped("weights/lymphnode_lite0.training.json").read_text())
    for relative in (SPEC.onnx_file, SPEC.onnx_int8_file):
        path = shipped(relative)
        assert path.stat().st_size < MAX_BYTES, (path.name, path.stat().st_size)
        assert hashlib.sha256(path.read_bytes()).hexdigest() in card, f"the card does not record {path.name}'s sha256"
    assert training["int8"]["shipped"] and abs(training["int8"]["valid_auc"] - training["fp32"]["valid_auc"]) <= 0.005
    assert training["agreement"]["min_cosine"] >= 0.999
    for phrase in ("CC0", "not a general foundation model", "not independent of CAMELYON16", "Other tissues"):
        assert phrase.lower() in card.lower(), phrase


def test_shipped_onnx_runs_without_torch_and_has_both_outputs(tmp_path):
    from PIL import Image

    patch = tmp_path / "patch.png"
    Image.fromarray(slide_patches()[0]).save(patch)
    result = subprocess.run([sys.executable, "-c", _NO_TORCH_SCRIPT, str(patch), "default"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["shape"] == [1, 1280] and out["finite"] and out["identical"] and not out["torch_imported"]
    encoder = Encoder.load("default", providers="cpu", threads=1)
    assert encoder.has_tile_scores
    features, scores = encoder.embed_with_scores(slide_patches())
    assert features.shape == (16, 1280) and scores.shape == (16,)
    assert np.all((scores >= 0) & (scores <= 1))
    np.testing.assert_allclose(features, encoder.embed(slide_patches()), rtol=1e-5, atol=1e-5)
    none, _ = encoder.embed_with_scores(np.zeros((0, 96, 96, 3), np.uint8))
    assert none.shape == (0, 1280)


# --- precision -----------------------------------------------------------------------------------

def test_int8_embeds_like_fp32_on_real_tissue():
    fp32 = Encoder.load("default", providers="cpu", threads=1, precision="fp32")
    int8 = Encoder.load("default", providers="cpu", threads=1, precision="int8")
    assert (fp32.precision, int8.precision) == ("fp32", "int8") and int8.path.name == "lymphnode_lite0.int8.onnx"
    a, pa = fp32.embed_with_scores(slide_patches())
    b, pb = int8.embed_with_scores(slide_patches())
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() > 0.95, cosine.min()
    assert np.abs(pa - pb).max() < 0.15
    assert int8.describe()["precision"] == "int8"


def test_precision_errors_say_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="precision must be one of"):
        Encoder.load("default", precision="int4")
    with pytest.raises(ModelError, match="has no int8 copy"):
        Encoder.load("imagenet-lite0", precision="int8")
    with pytest.raises(ConfigError, match="precision"):
        RunConfig().replace(precision="bf16")


def test_an_int8_copy_beside_a_user_model_is_found(tmp_path):
    import shutil

    shutil.copy(shipped(SPEC.onnx_file), tmp_path / "mine.onnx")
    with pytest.raises(ModelError, match="mine.int8.onnx"):
        Encoder.locate(str(tmp_path / "mine.onnx"), spec="lymphnode-lite0", precision="int8")
    shutil.copy(shipped(SPEC.onnx_int8_file), tmp_path / "mine.int8.onnx")
    spec, path = Encoder.locate(str(tmp_path / "mine.onnx"), spec="lymphnode-lite0", precision="int8")
    assert path == tmp_path / "mine.int8.onnx"


def test_precision_is_a_run_setting_that_changes_the_resume_key():
    from wsiengine.cli import build_parser

    run = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    assert "--precision {auto,fp32,fp16,int8}" in " ".join(run.split())
    assert RunConfig().replace(precision="int8").key() != RunConfig().key()


def test_fp32_separates_pcam_valid_tumour_from_normal_and_int8_keeps_it():
    images, labels = pcam_valid(100)
    from wsiengine.models.training.mil_metrics import roc_auc

    aucs = {}
    for precision in ("fp32", "int8"):
        _, scores = Encoder.load("default", providers="cpu", threads=2, precision=precision).embed_with_scores(images)
        aucs[precision] = roc_auc(labels, scores)
    assert aucs["fp32"] > 0.9, aucs
    assert abs(aucs["int8"] - aucs["fp32"]) < 0.02, aucs


# --- the training script, on a tiny run ------------------------------------------------------------

@pytest.fixture(scope="module")
def trainer():
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from wsiengine.models import train_lymphnode_encoder as trainer
    from wsiengine.models.training.architectures.efficientnet_lite import default_checkpoint_path

    try:
        default_checkpoint_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    return trainer


def test_augment_is_seeded_bounded_and_keeps_content_without_jitter(trainer):
    import torch

    config = trainer.EncoderTrainConfig()
    images = slide_patches()
    a = trainer.Augment(config)(images, np.random.default_rng(3))
    b = trainer.Augment(config)(images, np.random.default_rng(3))
    assert a.shape == (16, 3, 96, 96) and torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    still = trainer.EncoderTrainConfig(stain_sigma=0.0, brightness=0.0, contrast=0.0, blur_p=0.0, jpeg_p=0.0)
    out = trainer.Augment(still)(images, np.random.default_rng(0)).numpy()
    src = images.transpose(0, 3, 1, 2).astype(np.float32) / 255
    for i in range(16):  # each output is one of the 8 flips/rotations of its input
        views = [np.rot90(src[i], k, axes=(1, 2)) for k in range(4)]
        views += [v[:, :, ::-1] for v in views]
        err = min(np.abs(out[i] - v).max() for v in views)
        assert err < 2 / 255, (i, err)


def test_hed_jitter_changes_stain_not_structure(trainer):
    config = trainer.EncoderTrainConfig(stain_sigma=0.1, brightness=0.0, contrast=0.0, blur_p=0.0, jpeg_p=0.0)
    images = slide_patches()[:4]
    out = trainer.Augment(config)(images, np.random.default_rng(1)).numpy()
    assert not np.allclose(out.mean(axis=(2, 3)), out.mean(axis=(2, 3))[0])
    for i in range(4):  # the brightest and darkest pixels stay where they were (up to the dihedral view)
        grey = out[i].mean(0)
        src = images[i].mean(2)
        views = [np.rot90(src, k) for k in range(4)]
        views += [v[:, ::-1] for v in views]
        assert max(np.corrcoef(grey.ravel(), v.ravel())[0, 1] for v in views) > 0.95


def test_a_tiny_training_run_exports_a_verified_onnx_and_an_int8_copy(trainer, tmp_path):
    images = slide_patches()
    labels = np.array([1, 0] * 8)
    config = trainer.EncoderTrainConfig(epochs=2, batch_size=8, warmup_steps=1, threads=2)
    model, best_epoch, records = trainer.train(config, images, labels, images, labels, log=lambda m: None)
    assert [r.epoch for r in records] == [1, 2] and best_epoch in (1, 2)
    assert all(np.isfinite(r.train_loss) and 0 <= r.valid_auc <= 1 for r in records)
    assert records[best_epoch - 1].valid_auc == max(r.valid_auc for r in records)
    fp32 = tmp_path / "tiny.onnx"
    trainer.export_onnx(model, fp32)
    e_torch, p_torch = trainer.predict(model, images)
    e_onnx, p_onnx = trainer.onnx_outputs(fp32, images)
    assert trainer.min_cosine(e_torch, e_onnx) >= 0.999
    np.testing.assert_allclose(p_torch, p_onnx, atol=1e-4)
    trainer.quantize_int8(fp32, tmp_path / "tiny.int8.onnx", images)
    encoder = Encoder.load(str(fp32), spec="lymphnode-lite0", precision="int8", providers="cpu", threads=1)
    features, scores = encoder.embed_with_scores(images)
    assert encoder.precision == "int8" and features.shape == (16, 1280) and scores.shape == (16,)
    cosine = (features * e_onnx).sum(1) / (np.linalg.norm(features, axis=1) * np.linalg.norm(e_onnx, axis=1))
    assert np.median(cosine) > 0.9, cosine  # two steps of training: calibrated, not yet smooth


def test_the_same_seed_gives_the_same_weights(trainer):
    import torch

    images, labels = slide_patches()[:8], np.array([1, 0] * 4)
    config = trainer.EncoderTrainConfig(epochs=1, batch_size=8, warmup_steps=1, threads=2)  # as shipped
    a, _, _ = trainer.train(config, images, labels, images, labels, log=lambda m: None)
    b, _, _ = trainer.train(config, images, labels, images, labels, log=lambda m: None)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_run_with_precision_int8_records_it_and_resumes_only_at_that_precision(cmu_small, tmp_path, capsys):
    from wsiengine.cli import main
    from wsiengine.store import open_result

    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / cmu_small.name).symlink_to(cmu_small)
    out = tmp_path / "out"
    assert main(["-q", "run", str(slides), "-o", str(out), "--precision", "int8", "--providers", "cpu", "--no-report"]) == 0
    store = open_result(next(out.glob("*.zarr")))
    assert store.encoder["precision"] == "int8" and store.encoder["file"].endswith("lymphnode_lite0.int8.onnx")
    assert store.encoder["spec"]["name"] == "lymphnode-lite0"
    int8_key = store.attrs["config_key"]
    assert store.config["encoder"]["precision"] == "int8"
    assert main(["-q", "run", str(slides), "-o", str(out), "--precision", "fp32", "--providers", "cpu", "--no-report"]) == 0
    again = open_result(next(out.glob("*.zarr")))
    assert again.encoder["precision"] == "fp32" and again.attrs["config_key"] != int8_key  # recomputed, not resumed
