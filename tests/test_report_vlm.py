"""The VLM client against a loopback OpenAI-compatible server started by the test."""

from __future__ import annotations

import base64
import copy
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from wsiengine.config import VLMConfig
from wsiengine.errors import ConfigError, RemoteEndpointError, VLMError
from wsiengine.report.vlm import Narration, VLMClient, build_messages, findings_prompt, is_loopback
from wsiengine.testing.vlm_server import LLAMA_CPP_NO_MMPROJ, FakeVLMServer, chat_completion, good_reply

from .test_report_guard import negative_findings, positive_findings

KEY_ENV = "WSIENGINE_TEST_VLM_KEY"
SECRET = "sk-test-0123456789abcdef"


@pytest.fixture
def findings() -> dict:
    f = positive_findings()
    f["slide"] = {"slide_id": "patient_jones_17", "name": "patient_jones_17.svs",
                  "path": "/archive/2024/patient_jones_17.svs"}
    f["provenance"] = {"store": "patient_jones_17.zarr"}
    for e in f["evidence"]:
        e["image"] = f"patient_jones_17.report/evidence-0{e['rank']}.png"
    return f


@pytest.fixture
def pngs(tmp_path) -> list:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        p = tmp_path / f"evidence-0{i + 1}.png"
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def client(server: FakeVLMServer, **kw) -> VLMClient:
    config = VLMConfig(vlm_url=server.url, vlm_model=kw.pop("model", "test-model"), vlm_api_key_env=KEY_ENV,
                       **{"vlm_timeout_s": 5.0, "vlm_retries": 2, **kw})
    return VLMClient(config, backoff_s=0.01)


def user_content(request: dict):
    return request["body"]["messages"][1]["content"]


def user_text(request: dict) -> str:
    content = user_content(request)
    return content if isinstance(content, str) else content[0]["text"]


# ---- a good narrative ----------------------------------------------------------------------

def test_good_narrative_is_accepted_and_the_request_follows_the_protocol(findings, pngs, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    before = copy.deepcopy(findings)
    with FakeVLMServer("good", reply=good_reply(findings)) as server:
        c = client(server, vlm_max_tokens=321)
        narration = c.narrate(findings, images=pngs)
    assert narration.accepted and narration.flags == [] and narration.violations == []
    assert narration.text == good_reply(findings)["narrative"]
    assert narration.raw == json.dumps(good_reply(findings))
    assert narration.attempts == 1 and narration.images_sent == 3 and narration.model == "fake-vlm"
    assert findings == before

    (request,) = server.chat_requests
    assert request["path"] == "/v1/chat/completions"
    body = request["body"]
    assert body["model"] == "test-model" and body["temperature"] == 0 and body["stream"] is False
    assert body["max_tokens"] == 321 and body["seed"] == 0
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert "authoritative" in body["messages"][0]["content"] and "JSON" in body["messages"][0]["content"]
    assert request["headers"]["Authorization"] == f"Bearer {SECRET}"
    # the key goes only into that header
    others = {k: v for k, v in request["headers"].items() if k != "Authorization"}
    assert SECRET not in json.dumps(body) + json.dumps(others)
    assert SECRET not in repr(c) + json.dumps(narration.to_dict())


def test_no_authorization_header_without_a_key(findings, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with FakeVLMServer("good", reply=good_reply(findings)) as server:
        assert client(server).narrate(findings).accepted
    assert "Authorization" not in server.chat_requests[0]["headers"]


def test_narration_to_dict_is_json_ready(findings):
    with FakeVLMServer("good", reply=good_reply(findings)) as server:
        d = client(server).narrate(findings).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert set(d) >= {"text", "accepted", "flags", "violations", "model", "images_sent", "attempts", "raw",
                      "elapsed_s"}


def test_negative_slide_good_narrative_is_accepted():
    f = negative_findings()
    with FakeVLMServer("good", reply=good_reply(f)) as server:
        narration = client(server).narrate(f)
    assert narration.accepted, narration.violations
    assert narration.text.startswith("No metastatic carcinoma")


# ---- rejections and failures ----------------------------------------------------------------

def test_hallucinated_number_is_rejected_with_a_flag(findings):
    reply = {**good_reply(findings), "narrative": "Micrometastasis measuring 1.8 mm is present in 2 foci."}
    with FakeVLMServer("good", reply=reply) as server:
        narration = client(server).narrate(findings)
    assert not narration.accepted and narration.text is None
    assert narration.flags == ["vlm_contradiction"]
    assert len(narration.violations) == 1
    assert narration.violations[0].startswith("unsupported number: '1.8' is not in the findings")
    assert narration.raw == json.dumps(reply)


def test_contradicting_category_and_treatment_advice_get_their_flags(findings):
    reply = {**good_reply(findings), "category": "macrometastasis",
             "narrative": "Macrometastasis present; adjuvant chemotherapy is recommended."}
    with FakeVLMServer("good", reply=reply) as server:
        narration = client(server).narrate(findings)
    assert not narration.accepted
    assert set(narration.flags) == {"vlm_contradiction", "vlm_treatment_advice"}
    assert any("macrometastasis" in v for v in narration.violations)


def test_slide_id_in_the_reply_is_rejected(findings):
    reply = {**good_reply(findings), "narrative": "Micrometastasis in slide PATIENT_JONES_17."}
    with FakeVLMServer("good", reply=reply) as server:
        narration = client(server).narrate(findings, forbidden_strings=["other_name.tif"])
    assert not narration.accepted and narration.flags == ["vlm_identifier"]
    assert narration.violations == ["identifier: the narrative contains 'patient_jones_17'"]


@pytest.mark.parametrize("mode", ["malformed", "malformed_body"])
def test_malformed_reply_is_flagged(findings, mode):
    with FakeVLMServer(mode) as server:
        narration = client(server).narrate(findings)
    assert not narration.accepted and narration.text is None
    assert narration.flags == ["vlm_malformed"]
    assert narration.attempts == 1  # a malformed answer is not retried
    assert narration.error
    if mode == "malformed":
        assert narration.raw == "The slide shows metastatic carcinoma, in my opinion."


def test_http_500_is_retried_then_flagged(findings):
    with FakeVLMServer("http500") as server:
        narration = client(server, vlm_retries=2).narrate(findings)
    assert not narration.accepted and narration.flags == ["vlm_http_error"]
    assert narration.attempts == 3 and len(server.chat_requests) == 3
    assert "HTTP 500" in narration.error and "internal server error" in narration.error


def test_a_transient_500_is_recovered_by_a_retry(findings):
    with FakeVLMServer(["http500", "good"], reply=good_reply(findings)) as server:
        narration = client(server, vlm_retries=1).narrate(findings)
    assert narration.accepted and narration.attempts == 2 and len(server.chat_requests) == 2


def test_client_errors_other_than_429_are_not_retried(findings):
    bad_request = lambda body: (400, {"error": {"message": "bad 'max_tokens'", "type": "invalid_request_error"}}, 0)
    with FakeVLMServer(bad_request) as server:
        narration = client(server, vlm_retries=3).narrate(findings)
    assert narration.flags == ["vlm_http_error"] and narration.attempts == 1 and len(server.chat_requests) == 1
    too_many = lambda body: (429, {"error": {"message": "rate limited"}}, 0)
    with FakeVLMServer([too_many, "good"], reply=good_reply(findings)) as server:
        narration = client(server, vlm_retries=3).narrate(findings)
    assert narration.accepted and narration.attempts == 2


def test_timeout_is_flagged_within_a_bounded_time(findings):
    with FakeVLMServer("timeout", hang_s=30) as server:
        start = time.monotonic()
        narration = client(server, vlm_timeout_s=0.5, vlm_retries=1).narrate(findings)
        elapsed = time.monotonic() - start
    assert not narration.accepted and narration.flags == ["vlm_timeout"]
    assert narration.attempts == 2 and len(server.chat_requests) == 2
    assert 0.9 < elapsed < 3.0, elapsed
    assert "0.5 s" in narration.error


def test_connection_refused_is_flagged(findings):
    server = FakeVLMServer("good")
    url = server.url
    server.close()  # the port is now closed
    c = VLMClient(VLMConfig(vlm_url=url, vlm_model="m", vlm_retries=1), backoff_s=0.01)
    narration = c.narrate(findings)
    assert narration.flags == ["vlm_connection_error"] and narration.attempts == 2 and not narration.accepted


def test_chat_raises_vlm_error_with_the_reason(findings):
    with FakeVLMServer("http500") as server:
        with pytest.raises(VLMError, match="HTTP 500"):
            client(server, vlm_retries=0).chat(build_messages(findings))
    with FakeVLMServer("good", reply="plain text answer") as server:
        assert client(server).chat(build_messages(findings)) == "plain text answer"


# ---- images ----------------------------------------------------------------------------------

def test_images_in_the_request_decode_to_the_png_files(findings, pngs):
    with FakeVLMServer("good", reply=good_reply(findings)) as server:
        client(server).narrate(findings, images=pngs)
    content = user_content(server.chat_requests[0])
    assert isinstance(content, list) and content[0]["type"] == "text"
    parts = content[1:]
    assert [p["type"] for p in parts] == ["image_url"] * 3
    for part, path in zip(parts, pngs):
        url = part["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        assert base64.b64decode(url.split(",", 1)[1], validate=True) == path.read_bytes()


def test_text_only_server_is_detected_and_the_request_resent_as_text(findings, pngs):
    with FakeVLMServer("text_only", reply=good_reply(findings)) as server:
        c = client(server, vlm_images="auto")
        first = c.narrate(findings, images=pngs)
        second = c.narrate(findings, images=pngs)
    assert first.accepted and first.flags == ["vlm_text_only"] and first.images_sent == 0 and first.attempts == 2
    # not retried as a 5xx: one request with images, one without
    requests = server.chat_requests
    assert isinstance(user_content(requests[0]), list) and isinstance(user_content(requests[1]), str)
    # the decision is remembered: the next report goes straight to text
    assert second.accepted and second.flags == ["vlm_text_only"] and second.attempts == 1
    assert len(requests) == 3 and isinstance(user_content(requests[2]), str)


def test_vllm_ollama_and_llama_cpp_python_image_rejections_are_detected(findings, pngs):
    answers = [
        (500, {"error": {"message": 'can only concatenate str (not "list") to str', "type": "internal_server_error",
                         "param": None, "code": None}}),
        (400, {"object": "error", "message": "test-model is not a multimodal model", "type": "BadRequestError",
               "code": 400}),
        (400, {"error": {"message": "this model does not support image input", "type": "invalid_request_error"}}),
    ]
    for status, body in answers:
        respond = lambda req, s=status, b=body: (s, b, 0) if isinstance(req["messages"][1]["content"], list) else (
            200, chat_completion(json.dumps(good_reply(findings))), 0)
        with FakeVLMServer(respond) as server:
            narration = client(server).narrate(findings, images=pngs)
        assert narration.accepted and narration.flags == ["vlm_text_only"], body
        assert narration.attempts == 2 and len(server.chat_requests) == 2


def test_an_unrelated_500_with_images_is_not_taken_for_a_text_only_server(findings, pngs):
    with FakeVLMServer("http500") as server:
        narration = client(server, vlm_retries=1).narrate(findings, images=pngs)
    assert narration.flags == ["vlm_http_error"] and narration.attempts == 2
    assert all(isinstance(user_content(r), list) for r in server.chat_requests)


def test_always_mode_fails_on_an_image_rejection(findings, pngs):
    with FakeVLMServer("text_only", reply=good_reply(findings)) as server:
        narration = client(server, vlm_images="always").narrate(findings, images=pngs)
    assert not narration.accepted and narration.flags == ["vlm_http_error"]
    assert len(server.chat_requests) == 1 and "takes no images" in narration.error


def test_never_mode_sends_a_plain_string(findings, pngs):
    with FakeVLMServer("good", reply=good_reply(findings)) as server:
        narration = client(server, vlm_images="never").narrate(findings, images=pngs)
    assert narration.accepted and narration.images_sent == 0 and narration.flags == []
    content = user_content(server.chat_requests[0])
    assert isinstance(content, str) and "data:image" not in content


def test_label_and_macro_images_and_non_images_are_never_sent(findings, pngs, tmp_path):
    label = tmp_path / "label.png"
    macro = tmp_path / "macro.png"
    label.write_bytes(pngs[0].read_bytes())
    macro.write_bytes(pngs[1].read_bytes())
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with FakeVLMServer("good", reply=good_reply(findings)) as server:
        narration = client(server).narrate(findings, images=[label, pngs[2], macro, text, tmp_path / "missing.png"])
    assert narration.images_sent == 1
    urls = [p["image_url"]["url"] for p in user_content(server.chat_requests[0])[1:]]
    assert [base64.b64decode(u.split(",", 1)[1]) for u in urls] == [pngs[2].read_bytes()]


# ---- what the prompt holds -------------------------------------------------------------------

def test_prompt_never_contains_slide_identifiers(findings, pngs):
    f = copy.deepcopy(findings)
    f["qc"]["flags"].append({"code": "mpp_user", "message": "mpp given by the user for patient_jones_17.svs"})
    with FakeVLMServer("good", reply=good_reply(f)) as server:
        client(server).narrate(f, images=pngs, forbidden_strings=["case-2024-0042.svs"])
    raw = json.dumps(server.chat_requests[0]["body"]).lower()
    for forbidden in ("patient_jones_17", "/archive/2024", "case-2024-0042", "evidence-0", ".report"):
        assert forbidden not in raw, forbidden
    assert "[redacted]" in raw


def test_findings_prompt_holds_the_findings():
    text = findings_prompt(positive_findings())
    for expected in ("Metastasis call: yes", "slide probability 0.91", "decision threshold 0.5015", "Micrometastasis",
                     "code: micrometastasis", "Largest deposit: 1.21 mm", "Foci (separate tumour deposits): 2",
                     "Total tumour area: 0.63 mm2", "few_tiles", "120 tissue tiles", "rank 1: attention 0.012",
                     "tumour score 0.97", "Extranodal extension: not assessed"):
        assert expected in text, expected
    negative = findings_prompt(negative_findings())
    assert "Largest deposit: none measured (null)" in negative and "Foci (separate tumour deposits): 0" in negative


def test_findings_prompt_with_a_second_opinion():
    f = positive_findings()
    f["second_opinion"] = {"method": "knn", "bank": "bank_patient_x.npz", "n_bank": 40, "tiles": [{}, {}, {}],
                           "n_agree": 2, "agreement": 0.6667}
    text = findings_prompt(f)
    assert "agrees with the classifier on 2 of 3 evidence tiles (agreement 0.6667)" in text
    assert "bank_patient_x" not in text


def test_build_messages_without_images_is_a_plain_string():
    messages = build_messages(positive_findings())
    assert messages[0]["role"] == "system" and isinstance(messages[1]["content"], str)
    assert "treatment" in messages[0]["content"] and "JSON" in messages[0]["content"]


# ---- endpoint policy ---------------------------------------------------------------------------

@pytest.mark.parametrize("url, expected", [
    ("http://127.0.0.1:8080/v1", True), ("http://127.3.4.5/v1", True), ("http://localhost:11434/v1", True),
    ("https://LOCALHOST/v1", True), ("http://[::1]:8000/v1", True), ("http://[::ffff:127.0.0.1]/v1", True),
    ("http://10.0.0.5:8000/v1", False), ("http://192.168.1.2/v1", False), ("https://api.openai.com/v1", False),
    ("http://localhost.example.com/v1", False), ("http://127.0.0.1.nip.io/v1", False),
    ("http://127.0.0.1@evil.example/v1", False), ("http://0.0.0.0:8080/v1", False), ("ftp://127.0.0.1/", False),
    ("not a url", False),
])
def test_is_loopback(url, expected):
    assert is_loopback(url) is expected


def test_remote_endpoint_is_refused_without_allow_remote():
    config = VLMConfig(vlm_url="https://vlm.example.org/v1", vlm_model="m")
    with pytest.raises(RemoteEndpointError, match="--allow-remote"):
        VLMClient(config)
    c = VLMClient(config.replace(allow_remote=True))  # no network touched by the constructor
    assert c.endpoint == "https://vlm.example.org/v1/chat/completions" and not c.loopback


def test_credentials_in_the_url_are_refused_without_showing_them():
    for url in ("http://alice:hunter2@127.0.0.1:8080/v1", "https://bob:hunter2@vlm.example.org/v1"):
        with pytest.raises(ConfigError, match="user name or password") as info:
            VLMClient(VLMConfig(vlm_url=url, vlm_model="m", allow_remote=True))
        assert "hunter2" not in str(info.value)


def test_retry_after_is_honoured_on_429(findings):
    too_many = lambda body: (429, {"error": {"message": "slow down"}}, 0, {"Retry-After": "1"})
    with FakeVLMServer([too_many, "good"], reply=good_reply(findings)) as server:
        start = time.monotonic()
        narration = client(server, vlm_retries=1).narrate(findings)
        elapsed = time.monotonic() - start
    assert narration.accepted and narration.attempts == 2 and elapsed >= 0.95


def test_missing_url_or_model_is_a_config_error():
    with pytest.raises(ConfigError, match="vlm_url"):
        VLMClient(VLMConfig())
    with pytest.raises(ConfigError, match="vlm_model"):
        VLMClient(VLMConfig(vlm_url="http://127.0.0.1:1/v1"))


def test_loopback_requests_bypass_environment_proxies(findings, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://10.255.255.1:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://10.255.255.1:3128")
    with FakeVLMServer("good", reply=good_reply(findings)) as server:
        narration = client(server, vlm_timeout_s=2.0, vlm_retries=0).narrate(findings)
    assert narration.accepted and len(server.chat_requests) == 1


def test_redirects_are_not_followed(findings):
    with FakeVLMServer("good", reply=good_reply(findings)) as target:
        redirect = lambda body: (302, b"", 0, {"Location": target.url + "/chat/completions"})
        with FakeVLMServer(redirect) as server:
            narration = client(server, vlm_retries=0).narrate(findings)
        assert narration.flags == ["vlm_http_error"] and "HTTP 302" in narration.error
        assert target.requests == []


# ---- the fake server itself ----------------------------------------------------------------------

def test_fake_server_serves_models_and_shuts_down_cleanly(findings):
    import urllib.request

    threads_before = set(threading.enumerate())
    with FakeVLMServer("timeout", hang_s=60, model="tiny") as server:
        with urllib.request.urlopen(server.url + "/models", timeout=5) as r:
            assert json.load(r)["data"][0]["id"] == "tiny"
        client(server, vlm_timeout_s=0.3, vlm_retries=0).narrate(findings)  # leaves a hanging handler
        start = time.monotonic()
    assert time.monotonic() - start < 5
    assert [t for t in threading.enumerate() if t not in threads_before and t.is_alive()] == []
    assert [r["method"] for r in server.requests] == ["GET", "POST"]


def test_fake_server_rejects_unknown_modes():
    with pytest.raises(ValueError, match="unknown FakeVLMServer mode"):
        FakeVLMServer("flaky")


def test_narration_defaults():
    n = Narration(text=None, accepted=False)
    assert n.to_dict()["flags"] == [] and n.to_dict()["attempts"] == 0
    assert LLAMA_CPP_NO_MMPROJ["error"]["code"] == 500


@pytest.mark.parametrize("mode", ["none", "json_object", "json_schema"])
def test_response_format_asks_for_the_reply_schema(findings, mode):
    from wsiengine.report.vlm import REPLY_SCHEMA

    with FakeVLMServer("good", reply=good_reply(findings)) as server:
        narration = client(server, vlm_response_format=mode).narrate(findings)
        body = server.chat_requests[0]["body"]
    assert narration.accepted
    if mode == "none":
        assert "response_format" not in body
    elif mode == "json_object":
        assert body["response_format"] == {"type": "json_object", "schema": REPLY_SCHEMA}
    else:
        assert body["response_format"]["type"] == "json_schema"
        assert body["response_format"]["json_schema"]["schema"] == REPLY_SCHEMA
    with pytest.raises(ConfigError, match="vlm_response_format"):
        VLMConfig(vlm_response_format="yaml")
