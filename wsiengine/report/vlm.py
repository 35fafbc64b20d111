"""An OpenAI-compatible chat-completions client that phrases a slide's findings (optional).

Works with the ``/v1/chat/completions`` endpoint of vLLM, Ollama, llama.cpp's ``llama-server``,
``llama-cpp-python[server]`` and LM Studio. The findings go as text; when the model takes images,
the evidence tiles go as ``data:image/png;base64`` URLs. Requests use temperature 0, a fixed
seed, a timeout and a bounded number of retries. Standard library only.

This module is the client that composes three others: :mod:`.prompt` (what is sent),
:mod:`.transport` (HTTP) and :mod:`.reply` (judging what comes back, with :mod:`.guard`).

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

import copy
import logging
import os
import re
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import VLMConfig
from ..errors import ConfigError, RemoteEndpointError
from .prompt import REPLY_SCHEMA, SYSTEM_PROMPT, build_messages, chat_payload, findings_prompt, image_mime, redact_messages
from .reply import FLAG_OF_KIND, FLAGS, Narration, judge_reply, model_name
from .transport import ChatTransport, VLMRequestError, display_url, is_loopback

__all__ = ["VLMClient", "Narration", "VLMRequestError", "is_loopback", "findings_prompt", "build_messages",
           "SYSTEM_PROMPT", "REPLY_SCHEMA", "FLAGS"]

logger = logging.getLogger("wsiengine")


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
        The URL is not loopback and ``allow_remote`` is False, or it is remote and not ``https``
        (the API key and the findings would cross the network unencrypted).

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
        self.url = display_url(config.vlm_url)
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
        if not self.loopback and urllib.parse.urlsplit(config.vlm_url).scheme != "https":
            raise RemoteEndpointError(
                f"the VLM endpoint {self.url!r} is remote but not https: the API key and the findings would "
                "cross the network unencrypted. Use an https:// URL for remote endpoints (plain http is "
                "accepted only for loopback: 127.0.0.1, ::1, localhost).")
        self.config = config
        self.backoff_s = float(backoff_s)
        self.endpoint = config.vlm_url.rstrip("/") + "/chat/completions"
        self.text_only = config.vlm_images == "never"
        self.transport = ChatTransport(self.endpoint, timeout_s=config.vlm_timeout_s, retries=config.vlm_retries,
                                       backoff_s=self.backoff_s, api_key_env=config.vlm_api_key_env,
                                       loopback=self.loopback)

    def __repr__(self) -> str:
        return (f"VLMClient(url={self.url!r}, model={self.config.vlm_model!r}, "
                f"images={self.config.vlm_images!r}, text_only={self.text_only})")

    def _complete(self, messages: list[dict[str, Any]], *, images: bool = False) -> tuple[str, str | None, int]:
        """(content, model name the server reports, attempts)."""
        payload = chat_payload(messages, model=self.config.vlm_model, max_tokens=self.config.vlm_max_tokens,
                               response_format=self.config.vlm_response_format)
        return self.transport.complete(payload, images=images)

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
            if image_mime(data) is None:
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
        narration = Narration(text=None, accepted=False, flags=flags, model=self.config.vlm_model)
        try:
            self._narrate(narration, findings, pngs, forbidden_strings)
        except Exception as exc:  # noqa: BLE001 - the promise: whatever comes back, never raise
            logger.warning("VLM narrative not used: the reply could not be handled (%s: %s)", type(exc).__name__,
                           str(exc)[:200], exc_info=logger.isEnabledFor(logging.DEBUG))
            narration.text, narration.accepted = None, False
            if "vlm_malformed" not in narration.flags:
                narration.flags.append("vlm_malformed")
            narration.error = f"the reply could not be handled: {type(exc).__name__}: {str(exc)[:200]}"
        narration.elapsed_s = round(time.monotonic() - start, 3)
        return narration

    def _narrate(self, narration: Narration, findings: dict[str, Any], pngs: list[bytes],
                 forbidden_strings: Sequence[str]) -> None:
        """The request(s) and the judging of :meth:`narrate`, filling ``narration`` in place."""
        flags = narration.flags
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
        narration.model = model_name(model) or self.config.vlm_model
        narration.images_sent, narration.attempts = len(pngs), attempts
        if error is not None:
            narration.flags.append(FLAG_OF_KIND[error.kind])
            narration.error = str(error)
            if error.rejects_images and pngs:
                narration.error += " (the server takes no images; use vlm_images='auto' or 'never')"
            logger.warning("VLM narrative not used: %s", narration.error)
        else:
            judge_reply(narration, content or "", findings, forbidden_strings)

    def _messages(self, findings: dict[str, Any], pngs: list[bytes],
                  forbidden_strings: Sequence[str]) -> list[dict[str, Any]]:
        """:func:`build_messages`, with ``forbidden_strings`` (and their base names and stems)
        redacted from the text."""
        return redact_messages(build_messages(findings, pngs), forbidden_strings)
