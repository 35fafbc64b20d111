"""Slide reports: findings computed by code, categories, evidence tiles, schema, files, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from wsiengine.config import ReportConfig
from wsiengine.errors import ReportError
from wsiengine.report import (CATEGORIES, DISCLAIMER, load_schema, make_report, metastasis_call, size_category,
                              template_narrative, validate_report)
from wsiengine.report.findings import ITC_MAX_MM, MICRO_MAX_MM, build_findings, evidence_tiles
from wsiengine.store import FeatureWriter, open_result
from wsiengine.tiling import TileGrid

# ---------------------------------------------------------------------------------------------
# categories and calls
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("largest_mm, code", [
    (0.05, "itc"), (0.2, "itc"), (0.2 + 1e-9, "micrometastasis"), (1.0, "micrometastasis"), (2.0, "micrometastasis"),
    (2.0 + 1e-9, "macrometastasis"), (12.0, "macrometastasis"), (None, "indeterminate"), (math.nan, "indeterminate"),
])
def test_size_category_follows_ajcc_boundaries(largest_mm, code):
    assert size_category(largest_mm, tile_mm=0.01)[0] == code
    assert ITC_MAX_MM == 0.2 and MICRO_MAX_MM == 2.0


@pytest.mark.parametrize("largest_mm, low", [
    (0.05, False), (0.15, True), (0.25, True), (0.31, False), (1.5, False), (1.95, True), (2.05, True), (2.2, False),
])
def test_size_category_is_low_confidence_within_one_tile_of_a_boundary(largest_mm, low):
    assert size_category(largest_mm, tile_mm=0.1)[1] is low


@pytest.mark.parametrize("p, margin, call", [
    (0.9, 0.05, "yes"), (0.56, 0.05, "yes"), (0.52, 0.05, "indeterminate"), (0.48, 0.05, "indeterminate"),
    (0.44, 0.05, "no"), (0.5, 0.0, "yes"), (0.4999, 0.0, "no"), (math.nan, 0.05, "indeterminate"),
])
def test_metastasis_call_has_an_indeterminate_band_around_the_threshold(p, margin, call):
    assert metastasis_call(p, 0.5, margin) == call


def test_evidence_tiles_are_ranked_by_attention_then_score():
    att = np.array([0.1, 0.4, 0.4, 0.05, np.nan], np.float32)
    scores = np.array([0.9, 0.2, 0.7, 0.1, 1.0], np.float32)
    assert evidence_tiles(att, scores, 3).tolist() == [2, 1, 0]
    assert evidence_tiles(None, scores, 2).tolist() == [4, 0]
    assert evidence_tiles(att, scores, 10).tolist() == [2, 1, 0, 3, 4]


# ---------------------------------------------------------------------------------------------
# findings from a store with known tile scores
# ---------------------------------------------------------------------------------------------

TILE_PX = 100          # level-0 pixels per tile side
MPP = 1.0              # µm per level-0 pixel: a tile is 0.1 mm


def _grid(rows: int, cols: int) -> TileGrid:
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    index = np.column_stack([rr.ravel(), cc.ravel()]).astype(np.int64)
    return TileGrid(coords=index[:, ::-1] * TILE_PX, tissue_fraction=np.ones(len(index), np.float32),
                    grid_index=index, grid_shape=(rows, cols), target_mpp=MPP, tile_px=TILE_PX, overlap_px=0,
                    read_level=0, read_size=(TILE_PX, TILE_PX), stride_level_px=(TILE_PX, TILE_PX),
                    tile_size_level0=(float(TILE_PX), float(TILE_PX)), slide_dimensions=(cols * TILE_PX, rows * TILE_PX),
                    slide_mpp=(MPP, MPP))


def _store(tmp_path: Path, scores: np.ndarray, probability: float | None, *, rows: int = 20, cols: int = 20,
           mpp_source: str = "vendor", threshold: float = 0.5, features: np.ndarray | None = None,
           name: str = "s") -> Path:
    """A committed store of a rows x cols grid of 0.1 mm tiles with the given tile scores."""
    grid = _grid(rows, cols)
    n = len(grid)
    feats = features if features is not None else np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    attrs = {"slide_id": name,
             "slide": {"path": str(tmp_path / f"{name}.svs"), "name": f"{name}.svs", "dimensions": [cols * TILE_PX,
                       rows * TILE_PX], "mpp": [MPP, MPP], "mpp_source": mpp_source, "backend": "x", "vendor": None},
             "config": {"mil": {"tile_threshold": 0.5}}, "encoder": {"spec": {"name": "test"}, "sha256": "e" * 64},
             "mil": {"name": "test-head", "model": "abmil", "sha256": "m" * 64, "threshold": threshold},
             "config_key": "k"}
    with FeatureWriter(tmp_path / f"{name}.zarr", grid, feats.shape[1], attrs=attrs) as w:
        w.write(np.arange(n), feats)
        attention = np.exp(scores * 4.0)
        w.add_array("attention", (attention / attention.sum()).astype(np.float32))
        w.add_array("tile_scores", scores.astype(np.float32))
        w.add_array("tissue_mask", np.ones((rows * 4, cols * 4), np.uint8),
                    attrs={"mask_mpp": [25.0, 25.0], "level0_per_mask_px": [25.0, 25.0]})
        prediction = None if probability is None else {"probability": probability, "label": int(probability >= threshold),
                                                       "label_name": "x", "threshold": threshold, "n_tiles": n}
        return w.commit(prediction=prediction, status="ok")


def _scores_with_blocks(blocks: list[tuple[int, int, int, int]], rows: int = 20, cols: int = 20) -> np.ndarray:
    """Tile scores 0.05 everywhere and 0.95 in each (row0, col0, n_rows, n_cols) block."""
    s = np.full((rows, cols), 0.05)
    for r, c, h, w in blocks:
        s[r:r + h, c:c + w] = 0.95
    return s.ravel()


def test_findings_measure_the_largest_deposit_and_count_foci(tmp_path):
    # Two deposits: 3 x 4 tiles (0.3 x 0.4 mm, diagonal 0.5 mm) and one tile (diagonal 0.141 mm).
    path = _store(tmp_path, _scores_with_blocks([(2, 2, 3, 4), (12, 12, 1, 1)]), 0.93)
    f = build_findings(open_result(path), config=ReportConfig(top_k=4))
    assert f["metastasis"] == {"call": "yes", "probability": 0.93, "threshold": 0.5, "indeterminate_margin": 0.05,
                               "head_call": "yes"}
    dep = f["deposits"]
    assert dep["foci"] == 2 and dep["tiles_above_threshold"] == 13
    assert dep["largest_mm"] == pytest.approx(0.5, abs=1e-3)
    assert [r["tiles"] for r in dep["regions"]] == [12, 1]
    assert dep["regions"][1]["max_diameter_mm"] == pytest.approx(math.hypot(0.1, 0.1), abs=1e-3)
    assert dep["total_area_mm2"] == pytest.approx(0.12 + 0.01, abs=1e-4)
    assert dep["tile_size_mm"] == pytest.approx(0.1) and dep["size_uncertainty_mm"] == pytest.approx(0.1)
    assert [r["size_uncertainty_mm"] for r in dep["regions"]] == [pytest.approx(0.1)] * 2
    assert f["category"]["code"] == "micrometastasis" and not f["category"]["low_confidence"]
    assert f["extranodal_extension"] == "not assessed"
    # Evidence: the 4 highest-attention tiles are deposit tiles, with level-0 coordinates.
    assert [e["rank"] for e in f["evidence"]] == [1, 2, 3, 4]
    assert all(e["tile_score"] == pytest.approx(0.95) for e in f["evidence"])
    assert all(e["width"] == TILE_PX and e["x"] % TILE_PX == 0 for e in f["evidence"])
    assert f["qc"]["n_tiles"] == 400 and f["qc"]["tissue_area_mm2"] == pytest.approx(4.0)


@pytest.mark.parametrize("block, code", [
    ((5, 5, 1, 1), "itc"),                # 0.141 mm: within a tile of 0.2 mm, so low-confidence
    ((5, 5, 2, 2), "micrometastasis"),    # 0.283 mm: low-confidence
    ((5, 5, 5, 5), "micrometastasis"),    # 0.707 mm
    ((2, 2, 10, 10), "micrometastasis"),  # 1.414 mm
    ((1, 1, 14, 14), "micrometastasis"),  # 1.980 mm: low-confidence (one tile from 2 mm)
    ((0, 0, 16, 16), "macrometastasis"),  # 2.263 mm
])
def test_findings_category_from_real_geometry(tmp_path, block, code):
    path = _store(tmp_path, _scores_with_blocks([block]), 0.97)
    f = build_findings(open_result(path))
    largest = f["deposits"]["largest_mm"]
    assert largest == pytest.approx(math.hypot(block[2], block[3]) * 0.1, abs=1e-3)
    assert f["category"]["code"] == code
    expected_low = min(abs(largest - 0.2), abs(largest - 2.0)) <= 0.1
    assert f["category"]["low_confidence"] is expected_low


def test_a_deposit_decides_the_category_against_a_negative_slide_call(tmp_path):
    path = _store(tmp_path, _scores_with_blocks([(4, 4, 5, 5)]), 0.10)
    f = build_findings(open_result(path))
    assert f["metastasis"]["head_call"] == "no" and f["metastasis"]["call"] == "yes"
    assert f["category"]["code"] == "micrometastasis" and f["deposits"]["foci"] == 1
    assert "discordant_call" in [q["code"] for q in f["qc"]["flags"]]
    # a slide with no deposit keeps the head's negative call
    clean = build_findings(open_result(_store(tmp_path, _scores_with_blocks([]), 0.10, name="clean")))
    assert clean["metastasis"]["call"] == "no" and clean["category"]["code"] == "negative"
    assert "discordant_call" not in [q["code"] for q in clean["qc"]["flags"]]


def test_positive_call_without_a_measurable_deposit_is_indeterminate_in_size(tmp_path):
    path = _store(tmp_path, _scores_with_blocks([]), 0.90)
    f = build_findings(open_result(path))
    assert f["metastasis"]["call"] == "yes"
    assert f["category"]["code"] == "indeterminate" and f["deposits"]["largest_mm"] is None
    assert "no deposit" in f["category"]["note"]


def test_probability_near_threshold_is_indeterminate_unless_a_deposit_is_measured(tmp_path):
    path = _store(tmp_path, _scores_with_blocks([]), 0.53)
    f = build_findings(open_result(path))
    assert f["metastasis"]["call"] == "indeterminate" and f["category"]["code"] == "indeterminate"
    assert build_findings(open_result(path), config=ReportConfig(indeterminate_margin=0.0))["metastasis"]["call"] == "yes"
    with_deposit = build_findings(open_result(_store(tmp_path, _scores_with_blocks([(1, 1, 3, 3)]), 0.53, name="d")))
    assert with_deposit["metastasis"]["head_call"] == "indeterminate" and with_deposit["metastasis"]["call"] == "yes"
    assert with_deposit["category"]["code"] == "micrometastasis"


def test_qc_flags_few_tiles_low_tissue_user_mpp_and_missing_prediction(tmp_path):
    path = _store(tmp_path, np.full(9, 0.1), None, rows=3, cols=3, mpp_source="user")
    f = build_findings(open_result(path))
    codes = {q["code"] for q in f["qc"]["flags"]}
    assert {"few_tiles", "low_tissue", "mpp_user", "no_prediction"} <= codes
    assert f["metastasis"]["call"] == "indeterminate" and f["metastasis"]["probability"] is None
    assert f["qc"]["tissue_area_mm2"] == pytest.approx(0.09)


def test_ood_flag_from_an_embedding_reference(tmp_path):
    from wsiengine.ood import EmbeddingReference

    rng = np.random.default_rng(1)
    centre, elsewhere = np.eye(8)[0] * 3, np.eye(8)[1] * 3  # embeddings cluster around one direction

    def embeddings(n: int, mean: np.ndarray) -> np.ndarray:
        return (rng.normal(size=(n, 8)) * 0.3 + mean).astype(np.float32)

    reference = EmbeddingReference.fit(embeddings(4000, centre), n_components=4)
    same = _store(tmp_path, np.full(400, 0.1), 0.1, features=embeddings(400, centre), name="a")
    shifted = _store(tmp_path, np.full(400, 0.1), 0.1, features=embeddings(400, elsewhere), name="b")
    fa = build_findings(open_result(same), reference=reference)
    fb = build_findings(open_result(shifted), reference=reference)
    assert fa["qc"]["ood_fraction"] < 0.05 and "ood_embeddings" not in [q["code"] for q in fa["qc"]["flags"]]
    assert fb["qc"]["ood_fraction"] > 0.9 and "ood_embeddings" in [q["code"] for q in fb["qc"]["flags"]]
    assert build_findings(open_result(same))["qc"]["ood_fraction"] is None  # no reference: not assessed


# ---------------------------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------------------------


def test_report_document_matches_schema_and_schema_rejects_contradictions(tmp_path):
    path = _store(tmp_path, _scores_with_blocks([(2, 2, 3, 4)]), 0.93)
    doc = make_report(path, write=False).document
    validate_report(doc)
    assert doc["disclaimer"] == DISCLAIMER and doc["narrative"]["source"] == "template"
    assert load_schema()["properties"]["schema_version"]["const"] == doc["schema_version"]

    bad = json.loads(json.dumps(doc))
    bad["findings"]["metastasis"]["call"] = "no"  # negative call with a micrometastasis category
    with pytest.raises(ReportError, match="findings"):
        validate_report(bad)
    bad = json.loads(json.dumps(doc))
    bad["findings"]["category"]["code"] = "huge"
    with pytest.raises(ReportError, match="category"):
        validate_report(bad)
    bad = json.loads(json.dumps(doc))
    del bad["disclaimer"]
    with pytest.raises(ReportError, match="disclaimer"):
        validate_report(bad)
    bad = json.loads(json.dumps(doc))
    bad["findings"]["evidence"][0]["tile_score"] = 1.5
    with pytest.raises(ReportError, match="evidence/0/tile_score"):
        validate_report(bad)


def test_template_narrative_states_the_findings(tmp_path):
    path = _store(tmp_path, _scores_with_blocks([(2, 2, 3, 4)]), 0.93)
    f = build_findings(open_result(path))
    text = template_narrative(f)
    assert "Metastatic carcinoma is detected" in text and "0.50 mm" in text and "micrometastasis" in text
    assert "Extranodal extension is not assessed" in text
    negative = build_findings(open_result(_store(tmp_path, _scores_with_blocks([]), 0.05, name="neg")))
    assert template_narrative(negative).startswith("No metastasis is detected (slide probability 0.05")
    assert CATEGORIES["itc"].name == "Isolated tumour cells"


# ---------------------------------------------------------------------------------------------
# a real slide end to end
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cmu_result(tmp_path_factory, cmu_small):
    """The pipeline run (default encoder and head, with report) on CMU-1-Small-Region."""
    from wsiengine import Pipeline

    out = tmp_path_factory.mktemp("report-cmu")
    return Pipeline(vlm=None).run(cmu_small, out=out), out


def test_pipeline_writes_report_files_beside_the_store(cmu_result):
    res, out = cmu_result
    assert res.report == out / "cmu-1-small-region.report.json"
    doc = json.loads(res.report.read_text())
    validate_report(doc)
    md = (out / "cmu-1-small-region.report.md").read_text()
    assert md.startswith("# Slide report: cmu-1-small-region")
    assert DISCLAIMER in md and md.count(DISCLAIMER) == 2
    for rel in [doc["images"]["thumbnail"], doc["images"]["heatmap"], *doc["images"]["evidence"]]:
        assert (out / rel).is_file() and f"]({rel})" in md
    assert len(doc["findings"]["evidence"]) == 8
    assert doc["findings"]["metastasis"]["probability"] == pytest.approx(res.probability, abs=1e-4)
    assert doc["provenance"]["report_key"] and doc["provenance"]["config_key"] == open_result(res.store).attrs["config_key"]
    assert res.timings["report"] > 0
    assert not list(out.glob(".*"))  # no temporaries left


def test_evidence_pngs_hold_the_slide_pixels_of_their_tiles(cmu_result, cmu_small):
    from PIL import Image

    from wsiengine.slide import open_slide

    res, out = cmu_result
    doc = json.loads(res.report.read_text())
    grid = open_result(res.store).grid
    with open_slide(cmu_small) as slide:
        for e in doc["findings"]["evidence"][:3]:
            tile = slide.read_at_mpp((e["x"], e["y"]), (grid["tile_px"], grid["tile_px"]), grid["target_mpp"])
            png = np.asarray(Image.open(out / e["image"]))
            factor = png.shape[0] // tile.shape[0]
            assert factor >= 2 and png.shape[0] >= 192
            np.testing.assert_array_equal(png[::factor, ::factor], tile)


def test_reports_never_read_label_or_macro_images(tmp_path, cmu_small, monkeypatch):
    import openslide
    import tiffslide

    from wsiengine import Pipeline

    def refuse(self):
        raise AssertionError("associated (label/macro) images must never be read")

    monkeypatch.setattr(openslide.OpenSlide, "associated_images", property(refuse))
    monkeypatch.setattr(tiffslide.TiffSlide, "associated_images", property(refuse))
    res = Pipeline(vlm=None).run(cmu_small, out=tmp_path)
    rep = make_report(res.store, tmp_path / "again")
    assert rep.json_path.is_file() and len(rep.document["images"]["evidence"]) == 8
    names = {p.name for p in (tmp_path / "again" / "cmu-1-small-region.report").iterdir()}
    assert not any("label" in n or "macro" in n for n in names)


def test_report_from_a_moved_slide_flags_missing_evidence_and_accepts_slide_override(cmu_result, tmp_path, cmu_small):
    import shutil

    res, out = cmu_result
    store = tmp_path / "moved.zarr"
    shutil.copytree(res.store, store)
    group_attrs = json.loads((store / "zarr.json").read_text())
    group_attrs["attributes"]["slide"]["path"] = str(tmp_path / "gone.svs")
    group_attrs["attributes"]["slide"]["path_from_results"] = "gone.svs"  # moved from both recorded places
    (store / "zarr.json").write_text(json.dumps(group_attrs))
    rep = make_report(store, tmp_path / "a", slide_id="moved")
    assert "evidence_unavailable" in [q["code"] for q in rep.findings["qc"]["flags"]]
    assert rep.document["images"]["evidence"] == [] and rep.findings["evidence"][0]["image"] is None
    validate_report(rep.document)
    rep = make_report(store, tmp_path / "b", slide=cmu_small, slide_id="moved")
    assert len(rep.document["images"]["evidence"]) == 8


def test_report_refuses_a_different_slide_file(cmu_result, tmp_path, no_mpp_slide):
    res, _ = cmu_result
    rep = make_report(res.store, tmp_path, slide=no_mpp_slide)  # same tissue, another file
    flags = {q["code"]: q["message"] for q in rep.findings["qc"]["flags"]}
    assert "not the file the store was made from" in flags["evidence_unavailable"]


def test_cli_report_prints_json_and_writes_files(cmu_result, tmp_path, capsys):
    from wsiengine.cli import main

    res, _ = cmu_result
    assert main(["report", str(res.store), "-o", str(tmp_path), "--format", "json", "--top-k", "3"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["findings"]["evidence"]) == 3
    assert (tmp_path / "cmu-1-small-region.report.md").is_file()
    assert json.loads((tmp_path / "cmu-1-small-region.report.json").read_text())["findings"] == doc["findings"]
    assert main(["report", str(tmp_path / "missing.zarr")]) == 1


def test_batch_rewrites_only_a_missing_or_stale_report(tmp_path, cmu_small):
    import shutil

    from wsiengine.batch import run_batch

    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(cmu_small, slides / "node.svs")
    out = tmp_path / "out"
    first = run_batch(slides, out, workers=1)
    assert first.counts["done"] == 1
    report, store_meta = out / "node.report.json", out / "node.zarr" / "zarr.json"
    stamp = store_meta.stat().st_mtime_ns
    assert len(json.loads(report.read_text())["findings"]["evidence"]) == 8

    report.unlink()
    again = run_batch(slides, out, workers=1)
    assert again.counts["skipped"] == 1 and report.is_file() and store_meta.stat().st_mtime_ns == stamp

    fewer = run_batch(slides, out, workers=1, top_k=3)
    assert fewer.counts["skipped"] == 1 and store_meta.stat().st_mtime_ns == stamp
    assert len(json.loads(report.read_text())["findings"]["evidence"]) == 3
    assert sorted(p.name for p in (out / "node.report").iterdir()) == [
        "evidence-01.png", "evidence-02.png", "evidence-03.png", "heatmap.png", "thumbnail.png"]

    bare = run_batch(slides, tmp_path / "bare", workers=1, report=False)
    assert bare.counts["done"] == 1 and not list((tmp_path / "bare").glob("*.report*"))


# ---------------------------------------------------------------------------------------------
# the VLM narrative through make_report and the CLI (a loopback server started by the test)
# ---------------------------------------------------------------------------------------------


def _vlm(server, **kw):
    from wsiengine.config import VLMConfig

    return VLMConfig(vlm_url=server.url, vlm_model=server.model, vlm_timeout_s=kw.pop("timeout", 5.0),
                     vlm_retries=kw.pop("retries", 1), **kw)


def _baseline(cmu_result, tmp_path):
    res, _ = cmu_result
    return make_report(res.store, tmp_path / "template").document


@pytest.mark.parametrize("mode, source, flags", [
    ("good", "vlm", []),
    ("hallucinated", "template", ["vlm_contradiction", "vlm_rejected"]),
    ("advice", "template", ["vlm_treatment_advice", "vlm_rejected"]),
    ("malformed", "template", ["vlm_malformed", "vlm_rejected"]),
    ("http500", "template", ["vlm_http_error", "vlm_rejected"]),
    ("timeout", "template", ["vlm_timeout", "vlm_rejected"]),
])
def test_vlm_replies_are_used_only_when_they_agree_with_the_findings(cmu_result, tmp_path, mode, source, flags):
    import time

    from wsiengine.testing.vlm_server import FakeVLMServer, good_reply

    res, _ = cmu_result
    baseline = _baseline(cmu_result, tmp_path)
    reply = good_reply(baseline["findings"])
    if mode == "hallucinated":
        reply = {**reply, "narrative": reply["narrative"] + " The largest deposit measures 3.4 mm."}
    if mode == "advice":
        reply = {**reply, "narrative": reply["narrative"] + " Adjuvant chemotherapy is recommended."}
    behaviour = "good" if mode in ("hallucinated", "advice") else mode
    started = time.perf_counter()
    with FakeVLMServer(behaviour, reply=reply) as server:
        rep = make_report(res.store, tmp_path / mode, vlm=_vlm(server, timeout=0.5 if mode == "timeout" else 5.0))
        requests = server.chat_requests
    assert time.perf_counter() - started < 20
    doc = rep.document
    validate_report(doc)
    assert doc["narrative"]["source"] == source and doc["flags"] == flags
    assert doc["findings"] == baseline["findings"]  # the classifier's findings never change
    assert doc["disclaimer"] == DISCLAIMER
    md = rep.markdown_path.read_text()
    assert DISCLAIMER in md and md.count(DISCLAIMER) == 2
    if source == "vlm":
        assert doc["narrative"]["text"] == reply["narrative"] and reply["narrative"] in md
    else:
        assert doc["narrative"]["text"] == baseline["narrative"]["text"] and "Template narrative" in md
    assert requests and all(r["body"]["temperature"] == 0 for r in requests)
    if mode == "http500":
        assert len(requests) == 2  # one retry (vlm_retries=1), then the template


def test_vlm_request_holds_findings_and_evidence_pngs_but_no_identifiers(cmu_result, tmp_path):
    import base64

    from wsiengine.testing.vlm_server import FakeVLMServer, good_reply

    res, _ = cmu_result
    baseline = _baseline(cmu_result, tmp_path)
    with FakeVLMServer("good", reply=good_reply(baseline["findings"])) as server:
        rep = make_report(res.store, tmp_path / "vlm", vlm=_vlm(server))
        (request,) = server.chat_requests
    raw = json.dumps(request["body"])
    for identifier in ("cmu-1-small-region", "cmu_small", str(res.store.parent)):
        assert identifier not in raw
    user = request["body"]["messages"][-1]["content"]
    urls = [part["image_url"]["url"] for part in user if part["type"] == "image_url"]
    text = " ".join(part["text"] for part in user if part["type"] == "text")
    assert f"{baseline['findings']['metastasis']['probability']}" in text
    assert len(urls) == 8 == len(rep.document["images"]["evidence"])
    for url, rel in zip(urls, rep.document["images"]["evidence"]):
        assert url.startswith("data:image/png;base64,")
        assert base64.b64decode(url.split(",", 1)[1]) == (rep.json_path.parent / rel).read_bytes()
    assert rep.document["narrative"]["vlm"]["images_sent"] == 8


def test_text_only_server_gets_text_and_the_report_says_so(cmu_result, tmp_path):
    from wsiengine.testing.vlm_server import FakeVLMServer, good_reply

    res, _ = cmu_result
    baseline = _baseline(cmu_result, tmp_path)
    with FakeVLMServer("text_only", reply=good_reply(baseline["findings"])) as server:
        rep = make_report(res.store, tmp_path / "t", vlm=_vlm(server))
        first, second = server.chat_requests
    assert isinstance(first["body"]["messages"][-1]["content"], list)
    assert isinstance(second["body"]["messages"][-1]["content"], str)
    assert rep.document["narrative"]["source"] == "vlm" and rep.document["flags"] == ["vlm_text_only"]


def test_remote_endpoints_are_refused_without_allow_remote(cmu_result, tmp_path, capsys):
    from wsiengine.cli import main
    from wsiengine.config import VLMConfig
    from wsiengine.errors import RemoteEndpointError

    res, _ = cmu_result
    remote = VLMConfig(vlm_url="http://10.20.30.40:8000/v1", vlm_model="m")
    with pytest.raises(RemoteEndpointError, match="allow"):
        make_report(res.store, tmp_path / "r", vlm=remote)
    assert not (tmp_path / "r").exists()
    assert main(["report", str(res.store), "-o", str(tmp_path / "c"), "--vlm-url", "https://vlm.example.org/v1",
                 "--vlm-model", "m"]) == 1
    assert "RemoteEndpointError" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert main(["run", str(res.store.parent / "nothing-here"), "-o", str(tmp_path / "run"), "--vlm-url",
                 "http://192.168.1.5/v1", "--vlm-model", "m"]) == 2
    # With the flag the endpoint is accepted (unreachable here: the report falls back to the template).
    rep = make_report(res.store, tmp_path / "ok", vlm=VLMConfig(vlm_url="https://10.255.255.1:9/v1", vlm_model="m",
                                                               allow_remote=True, vlm_timeout_s=0.3, vlm_retries=0))
    assert rep.document["narrative"]["source"] == "template" and "vlm_rejected" in rep.document["flags"]


def test_vlm_settings_come_from_the_environment(cmu_result, tmp_path, monkeypatch):
    from wsiengine.cli import main
    from wsiengine.testing.vlm_server import FakeVLMServer, good_reply

    res, _ = cmu_result
    baseline = _baseline(cmu_result, tmp_path)
    with FakeVLMServer("good", reply=good_reply(baseline["findings"])) as server:
        monkeypatch.setenv("WSIENGINE_VLM_URL", server.url)
        monkeypatch.setenv("WSIENGINE_VLM_MODEL", server.model)
        monkeypatch.setenv("WSIENGINE_VLM_API_KEY", "sk-test-123")
        assert main(["report", str(res.store), "-o", str(tmp_path / "env"), "--format", "none"]) == 0
        (request,) = server.chat_requests
    assert request["headers"].get("Authorization") == "Bearer sk-test-123"
    written = (tmp_path / "env" / "cmu-1-small-region.report.json").read_text()
    assert "sk-test-123" not in written and json.loads(written)["narrative"]["source"] == "vlm"


def test_run_writes_vlm_reports_for_a_folder(tmp_path, cmu_small):
    import shutil

    from wsiengine.cli import main
    from wsiengine.testing.vlm_server import FakeVLMServer

    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(cmu_small, slides / "node.svs")
    with FakeVLMServer("malformed") as server:
        code = main(["run", str(slides), "-o", str(tmp_path / "out"), "--workers", "1", "--vlm-url", server.url,
                     "--vlm-model", server.model, "--vlm-images", "never", "--top-k", "2"])
        (request,) = server.chat_requests
    assert code == 0
    assert isinstance(request["body"]["messages"][-1]["content"], str)
    doc = json.loads((tmp_path / "out" / "node.report.json").read_text())
    assert doc["flags"] == ["vlm_malformed", "vlm_rejected"] and len(doc["findings"]["evidence"]) == 2


def test_embeddings_only_pipeline_writes_no_report(tmp_path, cmu_small):
    from wsiengine import Pipeline

    res = Pipeline(mil=None).run(cmu_small, out=tmp_path)
    assert res.report is None and res.prediction is None
    assert not list(tmp_path.glob("*.report*"))


def test_scattered_single_tile_foci_are_flagged(tmp_path):
    singles = [(r, c, 1, 1) for r, c in ((1, 1), (1, 5), (1, 9), (5, 1), (5, 9), (9, 1))]
    path = _store(tmp_path, _scores_with_blocks([(12, 12, 4, 4), *singles]), 0.9)
    f = build_findings(open_result(path))
    assert f["deposits"]["foci"] == 7 and f["category"]["code"] == "micrometastasis"
    flags = {q["code"]: q["message"] for q in f["qc"]["flags"]}
    assert flags["scattered_tiles"].startswith("6 of the 7 foci are single tiles")
    fewer = build_findings(open_result(_store(tmp_path, _scores_with_blocks([(12, 12, 4, 4), *singles[:4]]), 0.9,
                                              name="fewer")))
    assert "scattered_tiles" not in [q["code"] for q in fewer["qc"]["flags"]]


@pytest.mark.parametrize("probability, block", [(0.93, (2, 2, 3, 4)), (0.05, (2, 2, 1, 1)), (0.52, (2, 2, 2, 2)),
                                                (0.95, (0, 0, 18, 18))])
def test_template_narrative_passes_the_guard_with_every_flag(tmp_path, probability, block):
    from wsiengine.report.guard import check_narrative
    from wsiengine.report.render import FLAG_PHRASES

    f = build_findings(open_result(_store(tmp_path, _scores_with_blocks([block]), probability)))
    f["qc"]["flags"] = [{"code": code, "message": "x"} for code in FLAG_PHRASES]
    reply = {"narrative": template_narrative(f), "metastasis": f["metastasis"]["call"],
             "category": f["category"]["code"], "largest_deposit_mm": f["deposits"]["largest_mm"],
             "foci": f["deposits"]["foci"]}
    assert check_narrative(reply, f) == []
