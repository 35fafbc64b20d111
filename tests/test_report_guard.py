"""Guard-rails on model narratives: parsing replies, and every way a reply can depart from the findings."""

from __future__ import annotations

import copy
import json

import pytest

from wsiengine.errors import VLMError
from wsiengine.report.guard import (
    DISCLAIMER,
    check_narrative,
    findings_numbers,
    identifier_strings,
    parse_reply,
    violation_kind,
)


def positive_findings() -> dict:
    return {
        "metastasis": {"call": "yes", "probability": 0.91, "threshold": 0.5015, "indeterminate_margin": 0.05},
        "category": {"code": "micrometastasis", "name": "Micrometastasis", "definition": "> 0.2 mm and <= 2 mm",
                     "low_confidence": False, "note": ""},
        "deposits": {"foci": 2, "largest_mm": 1.21, "total_area_mm2": 0.63, "tile_threshold": 0.5,
                     "tile_size_mm": 0.093,
                     "regions": [{"rank": 1, "max_diameter_mm": 1.21, "area_mm2": 0.5, "tiles": 40}]},
        "extranodal_extension": "not assessed",
        "evidence": [{"rank": r, "x": 1000 * r, "y": 2000, "width": 192, "height": 192, "attention": 0.012,
                      "attention_relative": 1.0, "tile_score": 0.97, "image": f"x.report/evidence-0{r}.png"}
                     for r in (1, 2, 3)],
        "qc": {"flags": [{"code": "few_tiles", "message": "Only 120 tissue tile(s) (fewer than 150)."}],
               "n_tiles": 120, "tissue_area_mm2": 12.3, "tissue_fraction": 0.21, "mpp": [0.499, 0.499],
               "mpp_source": "vendor", "ood_fraction": 0.02},
        "second_opinion": None,
    }


def negative_findings() -> dict:
    f = positive_findings()
    f["metastasis"].update(call="no", probability=0.03)
    f["category"].update(code="negative", name="Negative", definition="no tumour deposit")
    f["deposits"].update(foci=0, largest_mm=None, total_area_mm2=0.0, regions=[])
    return f


def kinds(violations: list[str]) -> set[str]:
    return {violation_kind(v) for v in violations}


def check(text: str, findings: dict, **reply) -> list[str]:
    return check_narrative({"narrative": text, **reply}, findings)


# ---- parse_reply ---------------------------------------------------------------------------

GOOD = {"narrative": "Micrometastasis, 1.21 mm.", "metastasis": "yes", "category": "micrometastasis",
        "largest_deposit_mm": 1.21, "foci": 2}


@pytest.mark.parametrize("content", [
    json.dumps(GOOD),
    "```json\n" + json.dumps(GOOD, indent=2) + "\n```",
    "Here is the report:\n" + json.dumps(GOOD) + "\nI hope this helps.",
    "```\n" + json.dumps(GOOD) + "\n```",
    json.dumps({**GOOD, "metastasis": "YES", "category": "Micrometastasis"}),
])
def test_parse_reply_accepts_json_with_fences_and_surrounding_text(content):
    reply = parse_reply(content)
    assert reply == GOOD


def test_parse_reply_normalises_category_names_and_whitespace():
    reply = parse_reply(json.dumps({"narrative": "  Isolated   tumour\ncells. ", "category": "Isolated Tumor Cells",
                                    "foci": 1.0, "largest_deposit_mm": None}))
    assert reply == {"narrative": "Isolated tumour cells.", "category": "itc", "foci": 1, "largest_deposit_mm": None}


def test_parse_reply_skips_objects_without_a_narrative():
    content = 'Schema: {"type": "object"} Answer: ' + json.dumps(GOOD)
    assert parse_reply(content)["narrative"] == GOOD["narrative"]


@pytest.mark.parametrize("content, message", [
    ("The slide shows a micrometastasis.", "no JSON object"),
    ('["a", "list"]', "no JSON object"),
    ('{"narrative": "unterminated', "no JSON object"),
    ('{"metastasis": "yes"}', "no 'narrative'"),
    ('{"narrative": "   "}', "no 'narrative'"),
    ('{"narrative": 42}', "no 'narrative'"),
    ('{"narrative": "x", "metastasis": true}', "'metastasis'"),
    ('{"narrative": "x", "metastasis": "probably"}', "unknown value"),
    ('{"narrative": "x", "category": "pT2"}', "unknown value"),
    ('{"narrative": "x", "largest_deposit_mm": "1.2 mm"}', "'largest_deposit_mm'"),
    ('{"narrative": "x", "largest_deposit_mm": -1}', "'largest_deposit_mm'"),
    ('{"narrative": "x", "foci": 1.5}', "'foci'"),
    ('{"narrative": "x", "foci": true}', "'foci'"),
])
def test_parse_reply_rejects_unusable_replies(content, message):
    with pytest.raises(VLMError, match=message):
        parse_reply(content)


def test_parse_reply_rejects_non_text():
    with pytest.raises(VLMError, match="not text"):
        parse_reply(None)  # type: ignore[arg-type]


# ---- acceptances ---------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "Metastatic carcinoma is present: a micrometastasis measuring 1.21 mm across 2 foci.",
    "The slide probability of metastasis is 91%, above the decision threshold of 0.50.",
    "A micrometastasis (greater than 0.2 mm and up to 2 mm) is identified; no macrometastasis is seen.",
    "A micrometastasis, not a macrometastasis, is present. The deposit is larger than an ITC.",
    "Micrometastasis of approximately 1.2 mm; total tumour area 0.63 mm2. Two foci are present.",
    "The top three evidence tiles have tumour scores of 0.97.",
    "Quality control notes few tiles (120 analysed). Extranodal extension was not assessed.",
    "Findings are consistent with micrometastatic disease (pN1mi).",
    "Classified as micrometastasis according to the AJCC 8th edition criteria.",
    "Tumour is present with 2 foci, the largest 1.21 mm: a micrometastasis rather than isolated tumour cells or a "
    "macrometastasis.",
    "Micrometastatic carcinoma is present; extranodal extension has not been assessed. Clinical correlation is "
    "recommended.",
])
def test_positive_narratives_that_restate_the_findings_are_accepted(text):
    assert check(text, positive_findings(), metastasis="yes", category="micrometastasis",
                 largest_deposit_mm=1.21, foci=2) == []


@pytest.mark.parametrize("text", [
    "No evidence of metastatic carcinoma (slide probability 0.03, below the threshold of 0.5015).",
    "No micrometastasis, macrometastasis or isolated tumour cells are identified.",
    "The lymph node is negative for metastatic carcinoma. No treatment advice is given.",
    "Negative for metastasis; the probability of metastasis is 3%.",
    "Metastatic tumor is not identified.",
    "Micrometastasis: not identified. Extranodal extension: not assessed.",
])
def test_negative_narratives_are_accepted(text):
    assert check(text, negative_findings(), metastasis="no", category="negative", largest_deposit_mm=None,
                 foci=0) == []


def test_deposit_size_tolerates_rounding_to_the_decimals_given():
    f = positive_findings()
    for stated in (1.21, 1.2, 1, 1.25, 1.17):
        assert check("Micrometastasis.", f, largest_deposit_mm=stated) == [], stated
    for stated in (1.3, 1.1, 2, 0.9):
        assert kinds(check("Micrometastasis.", f, largest_deposit_mm=stated)) == {"contradiction"}, stated


def test_numbers_at_any_depth_are_supported_but_not_numbers_inside_strings():
    f = positive_findings()
    assert 40.0 in findings_numbers(f)  # deposits.regions[0].tiles
    assert 150.0 not in findings_numbers(f)  # only written in a QC message
    assert check("The largest region spans 40 tiles.", f) == []
    assert kinds(check("The QC threshold is 150 tiles.", f)) == {"unsupported number"}


@pytest.mark.parametrize("text", [
    "The slide probability is 0.2.",          # an AJCC boundary, but not as a size
    "The decision threshold is 1.",           # a small count, but used as a threshold
    "The largest deposit measures 2 mm.",     # a boundary quoted as the measured size ... still 2 mm
    "A deposit of 3 mm is seen.",             # a small integer with a unit is a measurement
])
def test_boundary_constants_and_counts_pass_only_as_boundaries_and_counts(text):
    f = positive_findings()
    if "measures 2 mm" in text:
        assert check(text, f) == []  # "2 mm" reads as the boundary; the stated fields catch a wrong size
    else:
        assert kinds(check(text, f)) == {"unsupported number"}


def test_numbers_under_slide_and_provenance_are_not_support():
    f = {**positive_findings(), "slide": {"slide_id": "case 4711"}, "provenance": {"store": "x_9137.zarr"}}
    assert 4711.0 not in findings_numbers(f)
    assert kinds(check("Micrometastasis in case 4711.", f)) == {"unsupported number"}


# ---- violations ----------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("metastasis", "no"), ("category", "macrometastasis"), ("largest_deposit_mm", 3.7), ("largest_deposit_mm", None),
    ("foci", 3),
])
def test_stated_fields_that_differ_from_the_findings_are_contradictions(field, value):
    reply = {"metastasis": "yes", "category": "micrometastasis", "largest_deposit_mm": 1.21, "foci": 2, field: value}
    violations = check("Micrometastasis.", positive_findings(), **reply)
    assert len(violations) == 1 and kinds(violations) == {"contradiction"}
    assert field.split("_")[0] in violations[0] or "deposit" in violations[0]


def test_a_deposit_stated_when_there_is_none_is_a_contradiction():
    violations = check("No metastasis.", negative_findings(), largest_deposit_mm=0.5)
    assert kinds(violations) == {"contradiction"}


@pytest.mark.parametrize("text, word", [
    ("Metastatic carcinoma: a macrometastasis is identified.", "macrometastasis"),
    ("Isolated tumour cells are present.", "isolated tumour cells"),
    ("ITC identified in the node.", "isolated tumour cells"),
    ("Micrometastasis is not identified; metastatic carcinoma is present.", "denies micrometastasis"),
    ("No evidence of metastatic carcinoma.", "denies metastasis"),
    ("The node is negative.", "negative"),
    ("The result is equivocal.", "indeterminate"),
])
def test_text_naming_another_category_contradicts_a_positive_slide(text, word):
    violations = check(text, positive_findings())
    assert kinds(violations) == {"contradiction"}, violations
    assert any(word in v for v in violations), violations


@pytest.mark.parametrize("text", [
    "Micrometastasis identified.",
    "Micro-metastases are present.",
    "Macrometastasis present.",
    "Isolated tumor cells are seen.",
    "Metastatic carcinoma is present.",
    "The findings are consistent with metastatic carcinoma.",
    "Positive for metastatic carcinoma.",
])
def test_text_claiming_metastasis_contradicts_a_negative_slide(text):
    violations = check(text, negative_findings())
    assert kinds(violations) == {"contradiction"}, violations


@pytest.mark.parametrize("text", [
    "Micrometastasis identified; no evidence of extranodal extension.",
    "Micrometastasis with extranodal extension.",
    "Micrometastasis identified, ENE absent.",
])
def test_extranodal_extension_claims_contradict_not_assessed(text):
    violations = check(text, positive_findings())
    assert len(violations) == 1 and "extranodal extension" in violations[0], violations


def test_an_indeterminate_slide_accepts_neither_a_positive_nor_a_negative_claim():
    f = positive_findings()
    f["metastasis"].update(call="indeterminate", probability=0.52)
    f["category"].update(code="indeterminate", name="Indeterminate", low_confidence=True)
    assert check("The result is indeterminate and needs review by a pathologist.", f) == []
    assert kinds(check("Metastatic carcinoma is present.", f)) == {"contradiction"}
    assert kinds(check("No metastatic carcinoma is identified.", f)) == {"contradiction"}


@pytest.mark.parametrize("text, number", [
    ("A micrometastasis measuring 1.7 mm.", "1.7"),
    ("There are 17 foci of micrometastasis.", "17"),
    ("The probability of metastasis is 87%.", "87%"),
    ("Micrometastasis; 4,500 tumour cells.", "4,500"),
    ("Micrometastasis (0.75 mm).", "0.75"),
    ("Micrometastasis in seventeen foci.", "seventeen"),
])
def test_hallucinated_numbers_are_rejected(text, number):
    violations = check(text, positive_findings())
    assert len(violations) == 1 and violations[0].startswith(f"unsupported number: '{number}' is not in the findings"), violations


def test_counting_is_allowed_only_up_to_the_number_of_evidence_tiles():
    f = positive_findings()  # three evidence tiles
    assert check("Three of the evidence tiles show tumour.", f) == []
    assert kinds(check("Six of the evidence tiles show tumour.", f)) == {"unsupported number"}


def test_ajcc_boundaries_may_be_quoted():
    f = negative_findings()
    text = "No deposit larger than 0.2 mm or 2 mm and no cluster of 200 cells is identified."
    assert check(text, f) == []


@pytest.mark.parametrize("text", [
    "Micrometastasis identified; adjuvant chemotherapy should be considered.",
    "Micrometastasis identified. We recommend axillary lymph node dissection.",
    "Micrometastasis identified; radiotherapy to the axilla.",
    "Micrometastasis identified; consider axillary clearance.",
    "Micrometastasis identified, the patient should be treated accordingly.",
    "Micrometastasis identified; tamoxifen is indicated.",
    "Micrometastasis identified; trastuzumab may help.",
    "Micrometastasis identified; surgery is advised.",
    "Micrometastasis identified; endocrine therapy.",
    "Micrometastasis identified; refer to oncology.",
])
def test_treatment_advice_is_rejected(text):
    violations = check(text, positive_findings())
    assert kinds(violations) == {"treatment advice"}, violations


def test_slide_identifiers_in_the_narrative_are_rejected():
    reply = {"narrative": "Micrometastasis identified in slide Tumor_042."}
    violations = check_narrative(reply, positive_findings(), forbidden_strings=["tumor_042", "tumor_042.tif"])
    assert violations == ["identifier: the narrative contains 'tumor_042'"]
    # a substring of a longer token is not the identifier
    reply = {"narrative": "Micrometastasis identified."}
    assert check_narrative(reply, positive_findings(), forbidden_strings=["metastasis"]) == []


def test_identifier_strings_come_from_slide_and_provenance_with_base_names_and_stems():
    f = {"slide": {"slide_id": "patient_smith_01", "name": "patient_smith_01.svs", "vendor": "aperio"},
         "provenance": {"store": "patient_smith_01.zarr", "engine_version": "0.1"}}
    ids = identifier_strings(f, ["/data/case-77/slide 3.ndpi"])
    assert "patient_smith_01" in ids and "patient_smith_01.svs" in ids and "patient_smith_01.zarr" in ids
    assert "slide 3.ndpi" in ids and "slide 3" in ids and "/data/case-77/slide 3.ndpi" in ids
    assert "aperio" not in ids


def test_checking_never_alters_the_findings():
    f = positive_findings()
    before = copy.deepcopy(f)
    check("Macrometastasis of 9.9 mm; start chemotherapy.", f, metastasis="no", foci=7)
    assert f == before


def test_the_template_narrative_passes_the_guard():
    from wsiengine.report.render import template_narrative

    for f in (positive_findings(), negative_findings()):
        assert check(template_narrative(f), f) == []


def test_disclaimer_is_the_fixed_text():
    assert DISCLAIMER == ("Research use only. Not for diagnostic use: this report is generated by software and "
                          "requires review by a pathologist.")
