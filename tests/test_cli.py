"""The command line: ``wsiengine info`` and clear errors."""

from __future__ import annotations

import json

import pytest

from wsiengine.cli import main

from .conftest import shared_file


def test_info_prints_format_backend_levels_and_mpp_source(cmu_small, capsys):
    assert main(["info", str(cmu_small)]) == 0
    out = capsys.readouterr().out
    assert "format      aperio" in out
    assert "backend     tifffile" in out
    assert "0.499 x 0.499 µm/px" in out and "source: vendor" in out
    assert "2220 x 2967" in out


def test_info_json_for_a_dicom_slide(capsys):
    path = shared_file("ez-wsi-dicomweb/multiframe_camelyon_challenge_image.dcm")
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "dicom" and info["backend"] == "openslide"
    assert info["mpp_source"] == "vendor" and info["mpp"][0] == pytest.approx(28.969, rel=1e-4)
    assert "tifffile" in info["backends_tried"]
    assert info["levels"][0]["width"] == 1152


def test_info_without_mpp_says_how_to_give_it(no_mpp_slide, capsys, tmp_path):
    assert main(["info", str(no_mpp_slide)]) == 0
    assert "mpp         unknown" in capsys.readouterr().out
    csv = tmp_path / "mpp.csv"
    csv.write_text(f"slide,mpp\n{no_mpp_slide.name},0.2527\n")
    assert main(["info", str(no_mpp_slide), "--mpp-csv", str(csv)]) == 0
    assert "source: user" in capsys.readouterr().out


def test_unsupported_file_exits_2_with_the_reason(capsys):
    path = shared_file("pathml/small_dicom.dcm")
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: UnsupportedFormatError") and "openslide:" in err and "tiffslide:" in err


def test_tiles_command_streams_the_sample(cmu_small, capsys):
    assert main(["tiles", str(cmu_small), "--target-mpp", "0.5", "--tile-px", "224"]) == 0
    out = capsys.readouterr().out
    assert "tiles of 224 px at 0.5 µm/px" in out and "patches/s" in out


def test_export_encoder_then_embed_with_it(cmu_small, tmp_path, capsys):
    pytest.importorskip("torch")
    import numpy as np

    from wsiengine import Encoder

    out = tmp_path / "imagenet.onnx"
    assert main(["export-encoder", "imagenet-lite0", "-o", str(out)]) == 0
    assert "min cosine 1.0" in capsys.readouterr().out
    assert (tmp_path / "imagenet.onnx.json").is_file()
    exported, shipped = Encoder.load(out), Encoder.load("imagenet-lite0")
    patches = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    np.testing.assert_allclose(exported.embed(patches), shipped.embed(patches), atol=1e-4)
    store = tmp_path / "cmu.zarr"
    assert main(["embed", str(cmu_small), "-o", str(store), "--encoder", str(out), "--providers", "cpu", "--mil", "none"]) == 0
    assert "1280-d imagenet-lite0, fp32, on CPUExecutionProvider" in capsys.readouterr().out


def test_export_encoder_without_weights_is_refused_for_gated_models(tmp_path, capsys):
    pytest.importorskip("torch")
    assert main(["export-encoder", "uni", "-o", str(tmp_path / "uni.onnx")]) == 2
    assert "ships no weights" in capsys.readouterr().err
    assert main(["export-encoder", "default", "-o", str(tmp_path / "d.onnx")]) == 2
    assert "lymphnode-lite0 ships as ONNX only" in capsys.readouterr().err
