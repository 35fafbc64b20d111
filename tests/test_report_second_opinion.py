"""Few-shot second opinion: a labelled PCam tile bank labels a PCam-mosaic slide's evidence tiles."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from wsiengine.errors import ConfigError, ReportError
from wsiengine.report import TileBank, second_opinion, validate_report

from .conftest import shared_file

N_PER_CLASS = 12


@pytest.fixture(scope="module")
def pcam():
    for label in ("0", "1"):
        shared_file(f"pcam/train/{label}")  # skips naming the PCam train split when absent
    return shared_file("pcam")


@pytest.fixture(scope="module")
def encoder():
    from wsiengine.encode import Encoder

    return Encoder.load("default")


@pytest.fixture(scope="module")
def bank_folder(pcam, tmp_path_factory):
    """bank/tumor/*.jpg and bank/normal/*.jpg: the first PCam train patches of each label."""
    root = tmp_path_factory.mktemp("bank")
    for label, name in (("1", "tumor"), ("0", "normal")):
        (root / name).mkdir()
        for f in sorted((pcam / "train" / label).glob("*.jpg"))[:N_PER_CLASS]:
            shutil.copy(f, root / name / f.name)
    return root


def test_bank_from_folder_embeds_like_the_encoder_and_round_trips(bank_folder, encoder, tmp_path):
    from PIL import Image

    bank = TileBank.from_folder(bank_folder, encoder)
    assert bank.embeddings.shape == (2 * N_PER_CLASS, encoder.embed_dim)
    assert sorted(set(bank.labels)) == ["normal", "tumor"] and bank.positive_label() == "tumor"
    first = sorted((bank_folder / "normal").glob("*.jpg"))[0]
    direct = encoder.embed(np.asarray(Image.open(first).convert("RGB"))[None])
    np.testing.assert_allclose(bank.embeddings[0], direct[0], rtol=1e-5, atol=1e-5)
    saved = TileBank.load(bank.save(tmp_path / "bank.npz"))
    np.testing.assert_array_equal(saved.embeddings, bank.embeddings)
    assert saved.labels.tolist() == bank.labels.tolist() and saved.encoder_sha256 == bank.encoder_sha256


def test_bank_errors_are_clear(tmp_path, bank_folder, encoder):
    with pytest.raises(ConfigError, match="two class subfolders"):
        TileBank.from_folder(tmp_path, encoder)
    bank = TileBank(np.ones((4, 3), np.float32), np.array(["a", "a", "b", "b"]))
    with pytest.raises(ConfigError, match="which one is tumour"):
        bank.positive_label()
    assert bank.positive_label(["b"]) == "b"
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="cannot read tile bank"):
        TileBank.load(tmp_path / "bad.npz")
    other = TileBank(np.ones((2, 3), np.float32), np.array(["tumor", "normal"]), encoder_sha256="a" * 64)
    with pytest.raises(ReportError, match="another encoder"):
        second_opinion(other, np.ones((1, 3)), np.ones(1), tile_threshold=0.5, ranks=[1], encoder_sha256="b" * 64)
    with pytest.raises(ReportError, match="D=3"):
        second_opinion(other, np.ones((1, 5)), np.ones(1), tile_threshold=0.5, ranks=[1])


def test_second_opinion_on_a_positive_mosaic_slide(pcam, bank_folder, encoder, tmp_path):
    from wsiengine import Pipeline
    from wsiengine.fewshot import FewShotClassifier
    from wsiengine.store import open_result
    from wsiengine.testing.mosaic import PatchPool, make_mosaic_slide

    slide = make_mosaic_slide(tmp_path / "node.tiff", PatchPool.from_pcam(pcam, "test"), label=1, seed=5,
                              n_tissue_cells=(150, 200), lesion_cells=(40, 60))
    bank_path = TileBank.from_folder(bank_folder, encoder).save(tmp_path / "bank.npz")
    res = Pipeline(encoder=encoder, vlm=None, tile_bank=bank_path).run(slide.path, out=tmp_path / "out")
    doc = json.loads(res.report.read_text())
    validate_report(doc)
    so = doc["findings"]["second_opinion"]
    evidence = doc["findings"]["evidence"]
    assert so["n_bank"] == 2 * N_PER_CLASS and so["positive_class"] == "tumor" and len(so["tiles"]) == len(evidence)

    # Recompute both opinions from the store: the report's agreement is exactly theirs.
    store = open_result(res.store)
    rows = [e["tile_index"] for e in evidence]
    bank = TileBank.load(bank_path)
    clf = FewShotClassifier(bank.embeddings, bank.labels, method="knn")
    p_tumour = clf.predict_proba(store.features[rows])[:, list(clf.classes_).index("tumor")]
    mil = store.tile_scores[rows] >= doc["findings"]["deposits"]["tile_threshold"]
    agree = (p_tumour >= 0.5) == mil
    assert [t["agree"] for t in so["tiles"]] == agree.tolist()
    assert so["agreement"] == pytest.approx(agree.mean(), abs=1e-4)
    # The evidence tiles of a positive slide are mostly lesion tiles, and both opinions say so.
    labels = slide.labels_at(store.coords[rows])
    assert labels.mean() >= 0.5
    assert so["agreement"] >= 0.5
    md = (tmp_path / "out" / "node.report.md").read_text()
    assert "## Few-shot second opinion" in md and f"{so['n_agree']} of {len(evidence)}" in md

    # The CLI with the bank as a folder (embedded with the store's encoder) gives the same opinion.
    from wsiengine.cli import main

    assert main(["report", str(res.store), "--tile-bank", str(bank_folder), "-o", str(tmp_path / "cli"),
                 "--format", "none"]) == 0
    again = json.loads((tmp_path / "cli" / "node.report.json").read_text())["findings"]["second_opinion"]
    assert again["tiles"] == so["tiles"] and again["agreement"] == so["agreement"]
