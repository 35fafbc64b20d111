"""What is sent to the VLM: the system prompt, the findings as text (identifiers redacted), the
evidence tiles as ``data:`` URLs, the reply schema and the chat-completions request body.

Standard library only; nothing here talks to the network (see :mod:`.transport`).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from typing import Any

from .guard import identifier_strings

__all__ = ["SYSTEM_PROMPT", "REPLY_SCHEMA", "findings_prompt", "build_messages", "redact_messages", "chat_payload",
           "image_mime"]

SYSTEM_PROMPT = (
    "You are a pathology report writer. You phrase findings; you do not make them. The findings "
    "in the user's message were computed by a validated classifier and measurement software and "
    "are authoritative: restate them faithfully and never change the metastasis call, the "
    "category, the sizes or the counts. Write two to four sentences of plain clinical English for "
    "a pathologist. Use only numbers that appear in the findings. Do not give treatment, "
    "management or follow-up advice. Do not mention patient or slide identifiers. "
    "Answer ONLY with one JSON object and no other text, in this form: "
    '{"narrative": "<two to four sentences>", "metastasis": "<the metastasis call: yes, no or '
    'indeterminate>", "category": "<the category code from the findings>", "largest_deposit_mm": '
    '<the largest deposit in mm from the findings, or null>, "foci": <the number of foci from the '
    "findings>}"
)


#: The reply's JSON Schema, sent as ``response_format`` when ``vlm_response_format`` asks for it
#: (servers then constrain decoding to it); :func:`~wsiengine.report.guard.parse_reply` checks
#: replies either way.
REPLY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "narrative": {"type": "string"},
        "metastasis": {"type": "string", "enum": ["yes", "no", "indeterminate"]},
        "category": {"type": "string",
                     "enum": ["negative", "itc", "micrometastasis", "macrometastasis", "indeterminate"]},
        "largest_deposit_mm": {"type": ["number", "null"]},
        "foci": {"type": "integer"},
    },
    "required": ["narrative", "metastasis", "category", "largest_deposit_mm", "foci"],
    "additionalProperties": False,
}


def _fmt(value: Any) -> str:
    """A number as short plain text (4 significant digits, never scientific notation)."""
    if value is None:
        return "not available"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = f"{value:.4g}"
        if "e" in text:
            text = f"{value:.8f}".rstrip("0").rstrip(".")
        return text
    return str(value)


def findings_prompt(findings: dict[str, Any]) -> str:
    """The findings as plain text for the model.

    Holds the metastasis call with probability and threshold, the category (code, name,
    definition, low confidence; not its free-text note), the largest deposit
    (mm), foci, total tumour area (mm²), QC flags, tile counts and the evidence tiles (rank,
    attention, tile score). Never includes anything under ``slide`` or ``provenance``, image
    paths or file names; identifier strings found there are also redacted from free-text fields.

    Parameters
    ----------
    findings : dict
        The slide's findings (a report document is accepted too).

    Returns
    -------
    str
    """
    m = findings.get("metastasis") or {}
    cat = findings.get("category") or {}
    dep = findings.get("deposits") or {}
    qc = findings.get("qc") or {}
    lines = ["Findings (authoritative):"]
    call = f"- Metastasis call: {m.get('call', 'not available')}"
    extras = [f"{label} {_fmt(m[k])}" for k, label in (("probability", "slide probability"),
                                                        ("threshold", "decision threshold")) if m.get(k) is not None]
    if m.get("indeterminate_margin"):
        extras.append(f"calls within {_fmt(m['indeterminate_margin'])} of the threshold are indeterminate")
    lines.append(call + (f" ({'; '.join(extras)})" if extras else ""))
    category = f"- Category: {cat.get('name', cat.get('code', 'not available'))} (code: {cat.get('code')})"
    if cat.get("definition"):
        category += f"; definition: {cat['definition']}"
    if cat.get("low_confidence"):
        category += "; low confidence (close to a category boundary)"
    lines.append(category)
    largest = dep.get("largest_mm")
    lines.append(f"- Largest deposit: {_fmt(largest) + ' mm' if largest is not None else 'none measured (null)'}")
    lines.append(f"- Foci (separate tumour deposits): {int(dep.get('foci') or 0)}")
    if dep.get("total_area_mm2") is not None:
        lines.append(f"- Total tumour area: {_fmt(dep['total_area_mm2'])} mm2")
    if "extranodal_extension" in findings:
        lines.append(f"- Extranodal extension: {findings['extranodal_extension']}")
    tissue = [f"{_fmt(qc['n_tiles'])} tissue tiles analysed" if qc.get("n_tiles") is not None else "",
              f"tissue area {_fmt(qc['tissue_area_mm2'])} mm2" if qc.get("tissue_area_mm2") is not None else ""]
    if any(tissue):
        lines.append("- Tissue: " + ", ".join(t for t in tissue if t))
    flags = qc.get("flags") or []
    if flags:
        lines.append("- Quality-control flags: " + "; ".join(
            f"{f.get('code')}: {f.get('message', '')}".rstrip(": ") for f in flags if isinstance(f, dict)))
    else:
        lines.append("- Quality-control flags: none")
    evidence = findings.get("evidence") or []
    if evidence:
        lines.append("- Evidence tiles (highest attention first):")
        for e in evidence:
            lines.append(f"  - rank {e.get('rank')}: attention {_fmt(e.get('attention'))}, "
                         f"tumour score {_fmt(e.get('tile_score'))}")
    lines += _second_opinion_lines(findings.get("second_opinion"))
    return _redact("\n".join(lines), identifier_strings(findings))


def _second_opinion_lines(so: Any) -> list[str]:
    if not isinstance(so, dict):
        return []
    text = f"- Second opinion ({so.get('method', 'few-shot')} on labelled tiles)"
    if so.get("n_agree") is not None and so.get("tiles") is not None:
        text += f": agrees with the classifier on {so['n_agree']} of {len(so['tiles'])} evidence tiles"
    if so.get("agreement") is not None:
        text += f" (agreement {_fmt(so['agreement'])})"
    return [text]


def _redact(text: str, identifiers: Sequence[str]) -> str:
    for s in sorted(identifiers, key=len, reverse=True):
        text = re.sub(re.escape(s), "[redacted]", text, flags=re.I)
    return text


def image_mime(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    return None


def build_messages(findings: dict[str, Any], images: Sequence[bytes] = ()) -> list[dict[str, Any]]:
    """The chat messages: a system message (the writer's role and rules) and a user message.

    Parameters
    ----------
    findings : dict
    images : sequence of bytes
        Evidence tile image files (PNG, as saved), sent in order as ``image_url`` parts with
        ``data:image/png;base64,...`` URLs. Empty: the user content is a plain string.

    Returns
    -------
    list of dict
    """
    text = findings_prompt(findings)
    if images:
        text += (f"\n\nThe {len(images)} attached images are the evidence tiles in rank order (H&E). "
                 "Describe what the findings say; do not infer new findings from the images.")
    text += "\n\nWrite the narrative now, as the JSON object only."
    system = {"role": "system", "content": SYSTEM_PROMPT}
    if not images:
        return [system, {"role": "user", "content": text}]
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    for data in images:
        mime = image_mime(bytes(data)) or "image/png"
        url = f"data:{mime};base64,{base64.b64encode(bytes(data)).decode('ascii')}"
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return [system, {"role": "user", "content": parts}]


def redact_messages(messages: list[dict[str, Any]], forbidden_strings: Sequence[str]) -> list[dict[str, Any]]:
    """Replace ``forbidden_strings`` (and their base names and stems) with ``[redacted]`` in the text
    of ``messages``, in place; returns ``messages``."""
    extra = identifier_strings({}, forbidden_strings)
    for m in messages if extra else ():
        if isinstance(m["content"], str):
            m["content"] = _redact(m["content"], extra)
        else:
            for part in m["content"]:
                if part.get("type") == "text":
                    part["text"] = _redact(part["text"], extra)
    return messages


def chat_payload(messages: list[dict[str, Any]], *, model: str, max_tokens: int,
                 response_format: str | None = None) -> dict[str, Any]:
    """The JSON body of a chat-completions request: temperature 0, a fixed seed, no streaming.

    ``response_format`` ``"json_object"`` (llama-cpp-python turns the schema into a grammar; other
    servers ignore it) or ``"json_schema"`` (OpenAI structured outputs: vLLM, Ollama, LM Studio)
    sends :data:`REPLY_SCHEMA`; anything else sends no ``response_format``. ``max_tokens`` caps
    the reply, in tokens.
    """
    payload: dict[str, Any] = {"model": model, "messages": messages, "temperature": 0,
                               "max_tokens": max_tokens, "stream": False, "seed": 0}
    if response_format == "json_object":
        payload["response_format"] = {"type": "json_object", "schema": REPLY_SCHEMA}
    elif response_format == "json_schema":
        payload["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "slide_report_narrative", "strict": True, "schema": REPLY_SCHEMA}}
    return payload
