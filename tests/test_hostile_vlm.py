"""Hostile VLM servers and replies (issue 13): whatever comes back, the report keeps its template
narrative and says why; a slow server cannot hold a request past its timeout; endpoints that
would leak the key or resolve through DNS are refused; an accepted narrative renders as text."""

from __future__ import annotations

import json
import time

import pytest
from markdown_it import MarkdownIt

from wsiengine.config import VLMConfig
from wsiengine.errors import RemoteEndpointError
from wsiengine.report import make_report
from wsiengine.report.guard import check_narrative, plain_text
from wsiengine.report.render import escape_markdown, template_narrative
from wsiengine.report.vlm import VLMClient, is_loopback
from wsiengine.testing.vlm_server import FakeVLMServer, good_reply

from .test_report import _scores_with_blocks, _store
from .test_report_guard import negative_findings, positive_findings

BEACON = "![](https://beacon.example/p.png?id=1)"


def client(server: FakeVLMServer, **kw) -> VLMClient:
    config = VLMConfig(vlm_url=server.url, vlm_model="m", **{"vlm_timeout_s": 5.0, "vlm_retries": 0, **kw})
    return VLMClient(config, backoff_s=0.01)


def rendered_html(markdown: str) -> str:
    return MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(markdown)


# ---- 1. replies that used to raise ----------------------------------------------------------

@pytest.mark.parametrize("mode", ["deep_json", "deep_content", "numeric_parts", "huge"])
def test_hostile_replies_end_as_a_malformed_flag_not_an_exception(mode):
    with FakeVLMServer(mode, huge_bytes=6 * 1024 * 1024) as server:
        narration = client(server).narrate(positive_findings())
    assert not narration.accepted and narration.text is None
    assert narration.flags == ["vlm_malformed"] and narration.error
    assert narration.raw is None or len(narration.raw) <= 100_000
    json.dumps(narration.to_dict())  # the report can store it


def test_report_with_a_deeply_nested_reply_keeps_the_template_and_flags_it(tmp_path):
    path = _store(tmp_path, _scores_with_blocks([(2, 2, 3, 4)]), 0.93)
    for mode in ("deep_json", "numeric_parts"):
        with FakeVLMServer(mode) as server:
            doc = make_report(path, tmp_path / mode, vlm=VLMConfig(vlm_url=server.url, vlm_model="m",
                                                                   vlm_timeout_s=5.0, vlm_retries=0)).document
        assert doc["narrative"]["source"] == "template"
        assert doc["narrative"]["text"] == template_narrative(doc["findings"])
        assert "vlm_malformed" in doc["flags"] and "vlm_rejected" in doc["flags"]
        assert (tmp_path / mode).exists()


# ---- 2. a total deadline per request ---------------------------------------------------------

def test_a_trickling_server_cannot_stretch_a_request_past_its_timeout():
    # ~400 bytes at one every 0.05 s: 20 s for the whole answer, against a 1 s timeout
    with FakeVLMServer("trickle", trickle_s=0.05, reply=good_reply(positive_findings())) as server:
        start = time.monotonic()
        narration = client(server, vlm_timeout_s=1.0, vlm_retries=1).narrate(positive_findings())
        elapsed = time.monotonic() - start
    assert narration.flags == ["vlm_timeout"] and not narration.accepted
    assert narration.attempts == 2
    assert elapsed < 4.0, elapsed
    assert "1 s" in narration.error


def test_a_slow_but_complete_answer_within_the_timeout_is_used():
    with FakeVLMServer("trickle", trickle_s=0.001, reply=good_reply(positive_findings())) as server:
        narration = client(server, vlm_timeout_s=20.0).narrate(positive_findings())
    assert narration.accepted, narration.error


# ---- 3. loopback means literal loopback ----------------------------------------------------------

@pytest.mark.parametrize("url", ["http://localhost./v1", "http://LOCALHOST.:8080/v1", "http://127.0.0.1./v1",
                                 "http://localhost..", "http://localhost.localdomain/v1"])
def test_names_resolved_through_dns_are_not_loopback(url):
    assert is_loopback(url) is False
    with pytest.raises(RemoteEndpointError):
        VLMClient(VLMConfig(vlm_url=url, vlm_model="m"))


# ---- 4. remote endpoints need https -------------------------------------------------------------

def test_remote_plain_http_is_refused_even_with_allow_remote():
    with pytest.raises(RemoteEndpointError, match="https"):
        VLMClient(VLMConfig(vlm_url="http://vlm.example.org/v1", vlm_model="m", allow_remote=True))
    with pytest.raises(RemoteEndpointError, match="https"):
        VLMClient(VLMConfig(vlm_url="http://localhost./v1", vlm_model="m", allow_remote=True))
    assert VLMClient(VLMConfig(vlm_url="https://vlm.example.org/v1", vlm_model="m", allow_remote=True)).endpoint \
        == "https://vlm.example.org/v1/chat/completions"
    assert VLMClient(VLMConfig(vlm_url="http://127.0.0.1:9/v1", vlm_model="m")).loopback  # loopback http is fine


# ---- 5. narratives are judged as read and rendered as text ----------------------------------------

def test_emphasised_call_is_judged_without_its_markers():
    assert plain_text("Metastasis **yes**, __present__ `x`") == "Metastasis yes, present x"
    violations = check_narrative({"narrative": "Metastasis **yes**."}, negative_findings())
    assert violations and all(v.startswith("contradiction") for v in violations)
    with FakeVLMServer("good", reply={"narrative": "Metastasis **yes**."}) as server:
        narration = client(server).narrate(negative_findings())
    assert not narration.accepted and narration.flags == ["vlm_contradiction"]


@pytest.mark.parametrize("narrative", [
    f"No metastatic carcinoma is identified. {BEACON}",
    'No metastatic carcinoma is identified. <img src="https://beacon.example/p.png">',
    "No metastatic carcinoma is identified, see [details](https://evil.example).",
])
def test_narratives_with_images_links_or_html_are_rejected(narrative):
    with FakeVLMServer("good", reply={"narrative": narrative, "metastasis": "no"}) as server:
        narration = client(server).narrate(negative_findings())
    assert not narration.accepted and "vlm_markup" in narration.flags


def test_markdown_in_the_narrative_renders_as_literal_text():
    text = (f"See {BEACON} <img src=x onerror=alert(1)> [a](http://b.example) https://c.example www.d.example "
            "e@f.example &amp; Metastasis **yes** ~~no~~ `code`\n# heading\n- item")
    html = rendered_html(escape_markdown(text))
    for bad in ("<img", "<a ", "<strong", "<em", "<del", "<code", "<h1", "<li", "<script"):
        assert bad not in html, (bad, html)
    assert html.count("<p>") == 1
    assert "![](https://beacon.example/p.png?id=1)" in html and "**yes**" in html


def test_report_md_renders_an_accepted_narrative_without_markup(tmp_path):
    path = _store(tmp_path, _scores_with_blocks([(2, 2, 3, 4)]), 0.93)
    baseline = make_report(path, write=False).document
    reply = good_reply(baseline["findings"])
    reply["narrative"] += " The *tile scores* support the call."
    with FakeVLMServer("good", reply=reply) as server:
        rep = make_report(path, tmp_path / "r", vlm=VLMConfig(vlm_url=server.url, vlm_model="m", vlm_retries=0))
    assert rep.document["narrative"]["source"] == "vlm"
    markdown = next((tmp_path / "r").glob("*.report.md")).read_text(encoding="utf-8")
    html = rendered_html(markdown)
    paragraph = next(line for line in html.splitlines() if "tile scores" in line)
    assert "<em>" not in paragraph and "*tile scores*" in paragraph
