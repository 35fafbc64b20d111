"""An OpenAI-compatible chat-completions client that phrases a slide's findings (optional).

Works with the ``/v1/chat/completions`` endpoint of vLLM, Ollama, llama.cpp's ``llama-server``,
``llama-cpp-python[server]`` and LM Studio. The findings go as text; when the model takes images,
the evidence tiles go as ``data:image/png;base64`` URLs. Requests use temperature 0, a fixed
seed, a timeout and a bounded number of retries. Standard library only.

The model decides nothing: its reply is parsed and checked by :mod:`wsiengine.report.guard`, and
:meth:`VLMClient.narrate` never raises for server trouble; every failure becomes a flag and the
report keeps its template narrative.

Servers without image input answer image parts with an error rather than ignoring them:
llama.cpp ``llama-server`` without ``--mmproj`` with HTTP 500 ``"image input is not supported -
hint: if this is unexpected, you may need to provide the mmproj"``; vLLM with HTTP 400 ``"<model>
is not a multimodal model"``; Ollama with HTTP 400 ``"this model does not support image
input"``; ``llama-cpp-python[server]`` with a text-only model (its Jinja chat template
concatenates the content) with HTTP 500 ``can only concatenate str (not "list") to str``. With
``vlm_images="auto"`` such an answer (not retried) makes the client resend text only (flag
``vlm_text_only``) and remember it for its later calls.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import json
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any

from ..config import VLMConfig
from ..errors import ConfigError, RemoteEndpointError, VLMError
from .guard import check_narrative, identifier_strings, parse_reply, violation_kind

__all__ = ["VLMClient", "Narration", "VLMRequestError", "is_loopback", "findings_prompt", "build_messages",
           "SYSTEM_PROMPT", "REPLY_SCHEMA", "FLAGS"]

logger = logging.getLogger("wsiengine")

#: Flag codes a :class:`Narration` can carry.
FLAGS = ("vlm_timeout", "vlm_http_error", "vlm_connection_error", "vlm_malformed", "vlm_contradiction",
         "vlm_treatment_advice", "vlm_identifier", "vlm_text_only")

_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_IMAGE_REJECT_STATUS = frozenset({400, 415, 422, 500, 501})
_IMAGE_REJECT_WORDS = re.compile(
    r"image|vision|multi-?modal|mmproj|image_url|content[ _-]?type|clip"
    # servers whose chat template or schema takes only string content (llama-cpp-python, pydantic)
    r"|concatenate str|\(not \"list\"\)|valid string|string_type", re.I)
_MAX_ERROR_BODY = 64 * 1024
_MAX_REPLY_BODY = 8 * 1024 * 1024


# --------------------------------------------------------------------------------------------
# Endpoint checks
# --------------------------------------------------------------------------------------------

def is_loopback(url: str) -> bool:
    """True when ``url`` is an http(s) URL whose host is this machine: an address in
    127.0.0.0/8, ``::1`` (or IPv4-mapped loopback) or the name ``localhost``. Nothing is
    resolved through DNS, so any other name counts as remote."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not host:
        return False
    host = host.rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


# --------------------------------------------------------------------------------------------
# Prompt
# --------------------------------------------------------------------------------------------

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


def _image_mime(data: bytes) -> str | None:
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
        mime = _image_mime(bytes(data)) or "image/png"
        url = f"data:{mime};base64,{base64.b64encode(bytes(data)).decode('ascii')}"
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return [system, {"role": "user", "content": parts}]


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------

@dataclass
class Narration:
    """What :meth:`VLMClient.narrate` made of one report.

    Attributes
    ----------
    text : str or None
        The accepted narrative, or None (the report keeps its template text).
    accepted : bool
    flags : list of str
        Codes from :data:`FLAGS`.
    violations : list of str
        What :func:`~wsiengine.report.guard.check_narrative` found wrong.
    model : str or None
        The model that answered (as the server names it) or was asked for.
    images_sent : int
        Evidence images in the request that produced the reply.
    attempts : int
        HTTP requests made (retries and a text-only resend included).
    raw : str or None
        The reply content as received, kept for audit.
    elapsed_s : float
        Seconds spent, all attempts included.
    error : str or None
        Why no usable reply arrived (timeout, HTTP status and message, malformed reply).
    """

    text: str | None
    accepted: bool
    flags: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    model: str | None = None
    images_sent: int = 0
    attempts: int = 0
    raw: str | None = None
    elapsed_s: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of all fields."""
        return asdict(self)


class VLMRequestError(VLMError):
    """A chat request failed after its retries.

    Attributes
    ----------
    kind : str
        ``timeout``, ``http``, ``connection`` or ``malformed`` (the HTTP body is not a chat completion).
    status : int or None
        HTTP status, for ``http``.
    body : str
        Start of the error body the server sent.
    attempts : int
        Requests made.
    """

    def __init__(self, message: str, *, kind: str, status: int | None = None, body: str = "",
                 attempts: int = 1) -> None:
        super().__init__(message)
        self.kind, self.status, self.body, self.attempts = kind, status, body, attempts
        self.retry_after_s: float | None = None

    @property
    def rejects_images(self) -> bool:
        """Whether the server refused the request for carrying images."""
        return (self.kind == "http" and self.status in _IMAGE_REJECT_STATUS
                and bool(_IMAGE_REJECT_WORDS.search(self.body)))


_FLAG_OF_KIND = {"timeout": "vlm_timeout", "http": "vlm_http_error", "connection": "vlm_connection_error",
                 "malformed": "vlm_malformed"}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are errors: a loopback endpoint must not forward findings elsewhere."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, D102
        return None


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------

class VLMClient:
    """A client for one OpenAI-compatible endpoint and model.

    Parameters
    ----------
    config : VLMConfig
        ``vlm_url`` (base URL, ``/chat/completions`` is appended), ``vlm_model``, the name of the
        API-key environment variable, ``allow_remote``, ``vlm_images``, ``vlm_timeout_s``,
        ``vlm_retries``, ``vlm_max_tokens``.
    backoff_s : float
        First wait before a retry, seconds; doubled each retry (capped at 8 s).

    Raises
    ------
    ConfigError
        No ``vlm_url`` or no ``vlm_model``, or a URL with ``user:password@``.
    RemoteEndpointError
        The URL is not loopback and ``allow_remote`` is False.

    Notes
    -----
    The API key is read from the environment at each request, sent only as an
    ``Authorization: Bearer`` header, and never stored, logged or shown in ``repr``. Proxies from
    the environment are bypassed for loopback endpoints, and redirects are never followed.
    """

    def __init__(self, config: VLMConfig, *, backoff_s: float = 0.5) -> None:
        if not config.vlm_url:
            raise ConfigError("no VLM endpoint: set vlm_url (--vlm-url, WSIENGINE_VLM_URL), e.g. "
                              "http://127.0.0.1:8080/v1")
        if not config.vlm_model:
            raise ConfigError(f"no VLM model for {config.vlm_url}: set vlm_model (--vlm-model, WSIENGINE_VLM_MODEL) "
                              "to the model name the server expects")
        self.loopback = is_loopback(config.vlm_url)
        self.url = _display_url(config.vlm_url)
        if self.url != config.vlm_url:
            raise ConfigError(f"the VLM URL {self.url!r} carries a user name or password; remove it and put the API "
                              f"key in the environment variable {config.vlm_api_key_env} (vlm_api_key_env), sent "
                              "as a bearer token")
        if not self.loopback and not config.allow_remote:
            host = urllib.parse.urlsplit(config.vlm_url).hostname
            raise RemoteEndpointError(
                f"the VLM endpoint {self.url!r} is not on this machine (host {host!r}): findings and evidence "
                "tiles would leave it. Use a loopback URL (127.0.0.1, ::1, localhost) or, if the endpoint is "
                "approved for this data, pass --allow-remote (allow_remote=True).")
        self.config = config
        self.backoff_s = float(backoff_s)
        self.endpoint = config.vlm_url.rstrip("/") + "/chat/completions"
        self.text_only = config.vlm_images == "never"
        handlers: list[Any] = [_NoRedirect()]
        if self.loopback:
            handlers.append(urllib.request.ProxyHandler({}))
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:
        return (f"VLMClient(url={self.url!r}, model={self.config.vlm_model!r}, "
                f"images={self.config.vlm_images!r}, text_only={self.text_only})")

    # ---- HTTP -----------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "wsiengine"}
        key = os.environ.get(self.config.vlm_api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key.strip()}"
        return headers

    def _post_once(self, payload: bytes) -> dict[str, Any]:
        """One POST; returns the decoded JSON body or raises VLMRequestError (attempts=1)."""
        request = urllib.request.Request(self.endpoint, data=payload, headers=self._headers(), method="POST")
        timeout = self.config.vlm_timeout_s
        try:
            with self._opener.open(request, timeout=timeout) as response:
                body = response.read(_MAX_REPLY_BODY + 1)
        except urllib.error.HTTPError as exc:
            try:
                text = exc.read(_MAX_ERROR_BODY).decode("utf-8", "replace")
            except (OSError, HTTPException):
                text = ""
            finally:
                exc.close()
            error = VLMRequestError(f"HTTP {exc.code} from {self.endpoint}: {_error_message(text) or exc.reason}",
                                    kind="http", status=exc.code, body=text)
            error.retry_after_s = _retry_after(exc.headers)
            raise error from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise VLMRequestError(f"no answer from {self.endpoint} within {timeout:g} s (connect)",
                                      kind="timeout") from None
            raise VLMRequestError(f"cannot connect to {self.endpoint}: {exc.reason}", kind="connection") from None
        except (TimeoutError, socket.timeout):
            raise VLMRequestError(f"no answer from {self.endpoint} within {timeout:g} s", kind="timeout") from None
        except (OSError, HTTPException) as exc:
            raise VLMRequestError(f"connection to {self.endpoint} failed: {exc!r}", kind="connection") from None
        if len(body) > _MAX_REPLY_BODY:
            raise VLMRequestError(f"the reply from {self.endpoint} exceeds {_MAX_REPLY_BODY} bytes", kind="malformed")
        try:
            decoded = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise VLMRequestError(f"the reply from {self.endpoint} is not JSON: {body[:120]!r}",
                                  kind="malformed", body=body[:_MAX_ERROR_BODY].decode("utf-8", "replace")) from None
        if not isinstance(decoded, dict):
            raise VLMRequestError(f"the reply from {self.endpoint} is not a JSON object", kind="malformed")
        return decoded

    def _post(self, payload: dict[str, Any], *, images: bool = False) -> tuple[dict[str, Any], int]:
        """POST with retries on timeout, connection error, 429 and 5xx; returns (body, attempts)."""
        data = json.dumps(payload).encode("utf-8")
        attempts = 0
        while True:
            attempts += 1
            try:
                return self._post_once(data), attempts
            except VLMRequestError as exc:
                exc.attempts = attempts
                retryable = exc.kind in ("timeout", "connection") or (
                    exc.kind == "http" and exc.status in _RETRY_STATUS and not (images and exc.rejects_images))
                if not retryable or attempts > self.config.vlm_retries:
                    raise
                wait = min(max(self.backoff_s * 2 ** (attempts - 1), exc.retry_after_s or 0.0), 8.0)
                logger.info("VLM request failed (%s); retry %d of %d in %.1f s", exc, attempts,
                            self.config.vlm_retries, wait)
                time.sleep(wait)

    def _payload(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        payload = {"model": self.config.vlm_model, "messages": messages, "temperature": 0,
                   "max_tokens": self.config.vlm_max_tokens, "stream": False, "seed": 0}
        mode = self.config.vlm_response_format
        if mode == "json_object":  # llama-cpp-python turns "schema" into a grammar; others ignore it
            payload["response_format"] = {"type": "json_object", "schema": REPLY_SCHEMA}
        elif mode == "json_schema":  # OpenAI structured outputs: vLLM, Ollama, LM Studio
            payload["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "slide_report_narrative", "strict": True, "schema": REPLY_SCHEMA}}
        return payload

    def _complete(self, messages: list[dict[str, Any]], *, images: bool = False) -> tuple[str, str | None, int]:
        """(content, model name the server reports, attempts)."""
        body, attempts = self._post(self._payload(messages), images=images)
        try:
            message = body["choices"][0]["message"]
            content = message["content"]
        except (KeyError, IndexError, TypeError):
            raise VLMRequestError(f"the reply from {self.endpoint} has no choices[0].message.content: "
                                  f"{json.dumps(body)[:200]}", kind="malformed", attempts=attempts) from None
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise VLMRequestError(f"the reply from {self.endpoint} has no text content", kind="malformed",
                                  attempts=attempts)
        model = body.get("model") if isinstance(body.get("model"), str) else None
        return content, model, attempts

    def chat(self, messages: list[dict[str, Any]]) -> str:
        """Send ``messages`` and return the reply text (``choices[0].message.content``).

        Retries ``vlm_retries`` times, with a short backoff, after a timeout, a connection error,
        HTTP 429 or 5xx; other 4xx answers are not retried.

        Raises
        ------
        VLMRequestError
            (a :class:`~wsiengine.errors.VLMError`) with the reason.
        """
        images = any(isinstance(m.get("content"), list) for m in messages)
        return self._complete(messages, images=images)[0]

    # ---- narrative ----------------------------------------------------------------------------

    def _read_images(self, images: Sequence[str | os.PathLike[str]]) -> list[bytes]:
        out = []
        for p in images:
            path = Path(p)
            if re.search(r"label|macro", path.name, re.I):
                logger.warning("VLM: not sending '%s' (label and macro images are never sent)", path.name)
                continue
            try:
                data = path.read_bytes()
            except OSError as exc:
                logger.warning("VLM: cannot read evidence image '%s' (%s); not sent", path.name, exc.strerror)
                continue
            if _image_mime(data) is None:
                logger.warning("VLM: '%s' is not a PNG or JPEG file; not sent", path.name)
                continue
            out.append(data)
        return out

    def narrate(self, findings: dict[str, Any], images: Sequence[str | os.PathLike[str]] = (), *,
                forbidden_strings: Sequence[str] = ()) -> Narration:
        """Ask the model to phrase ``findings`` and check what it says.

        Parameters
        ----------
        findings : dict
            The slide's findings (not modified).
        images : sequence of paths
            Evidence tile PNGs, sent when ``vlm_images`` is ``auto`` or ``always`` and the server
            takes images.
        forbidden_strings : sequence of str
            Slide id, file name...: redacted from the prompt and rejected in the reply.

        Returns
        -------
        Narration
            Never raises for server trouble: timeouts, HTTP and connection errors, malformed
            replies and guard violations become ``flags`` with ``accepted=False``.
        """
        start = time.monotonic()
        findings = copy.deepcopy(findings)
        flags: list[str] = []
        if self.text_only and images and self.config.vlm_images == "auto":
            flags.append("vlm_text_only")  # detected on an earlier call of this client
        pngs = [] if self.text_only else self._read_images(images)
        content: str | None = None
        model: str | None = None
        error: VLMRequestError | None = None
        attempts = 0
        try:
            content, model, attempts = self._complete(self._messages(findings, pngs, forbidden_strings),
                                                      images=bool(pngs))
        except VLMRequestError as exc:
            attempts, error = exc.attempts, exc
            if pngs and exc.rejects_images and self.config.vlm_images == "auto":
                logger.warning("VLM server %s takes no images (%s); resending the findings as text only "
                               "(vlm_images='never' skips the first try)", self.endpoint, exc)
                self.text_only, pngs, error = True, [], None
                flags.append("vlm_text_only")
                try:
                    content, model, more = self._complete(self._messages(findings, [], forbidden_strings))
                    attempts += more
                except VLMRequestError as exc2:
                    attempts, error = attempts + exc2.attempts, exc2
        narration = Narration(text=None, accepted=False, flags=flags, model=_model_name(model) or self.config.vlm_model,
                              images_sent=len(pngs), attempts=attempts)
        if error is not None:
            narration.flags.append(_FLAG_OF_KIND[error.kind])
            narration.error = str(error)
            if error.rejects_images and pngs:
                narration.error += " (the server takes no images; use vlm_images='auto' or 'never')"
            logger.warning("VLM narrative not used: %s", narration.error)
        else:
            self._judge(narration, content or "", findings, forbidden_strings)
        narration.elapsed_s = round(time.monotonic() - start, 3)
        return narration

    def _messages(self, findings: dict[str, Any], pngs: list[bytes],
                  forbidden_strings: Sequence[str]) -> list[dict[str, Any]]:
        """:func:`build_messages`, with ``forbidden_strings`` (and their base names and stems)
        redacted from the text."""
        messages = build_messages(findings, pngs)
        extra = identifier_strings({}, forbidden_strings)
        for m in messages if extra else ():
            if isinstance(m["content"], str):
                m["content"] = _redact(m["content"], extra)
            else:
                for part in m["content"]:
                    if part.get("type") == "text":
                        part["text"] = _redact(part["text"], extra)
        return messages

    @staticmethod
    def _judge(narration: Narration, content: str, findings: dict[str, Any],
               forbidden_strings: Sequence[str]) -> None:
        """Parse and check the reply; fill ``narration`` in place."""
        narration.raw = content
        try:
            reply = parse_reply(content)
        except VLMError as exc:
            narration.flags.append("vlm_malformed")
            narration.error = str(exc)
            logger.warning("VLM narrative not used: %s", exc)
            return
        violations = check_narrative(reply, findings, forbidden_strings=identifier_strings(findings, forbidden_strings))
        narration.violations = violations
        kinds = {violation_kind(v) for v in violations}
        if "treatment advice" in kinds:
            narration.flags.append("vlm_treatment_advice")
        if "identifier" in kinds:
            narration.flags.append("vlm_identifier")
        if kinds - {"treatment advice", "identifier"}:
            narration.flags.append("vlm_contradiction")
        if violations:
            logger.warning("VLM narrative rejected: %s", "; ".join(violations))
            return
        narration.text, narration.accepted = reply["narrative"], True


def _display_url(url: str) -> str:
    """``url`` without any ``user:password@`` part."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _retry_after(headers: Any) -> float | None:
    """Seconds from a ``Retry-After: N`` header (dates are ignored)."""
    try:
        value = float(headers.get("Retry-After")) if headers is not None and headers.get("Retry-After") else None
    except (TypeError, ValueError):
        return None
    return value if value is not None and value >= 0 else None


def _model_name(name: str | None) -> str | None:
    """The model name a server reports; a file path (llama-cpp-python reports the GGUF's path)
    is cut to its base name."""
    if not name:
        return None
    return re.split(r"[\\/]", name.rstrip("/\\"))[-1] or None


def _error_message(text: str) -> str:
    """The message of an OpenAI-style error body (``{"error": {"message": ...}}`` or
    ``{"message": ...}``), else the start of the text."""
    try:
        body = json.loads(text)
    except ValueError:
        return " ".join(text.split())[:300]
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"][:300]
        if isinstance(err, str):
            return err[:300]
    return " ".join(text.split())[:300]
