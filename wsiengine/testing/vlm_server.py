"""A loopback OpenAI-compatible chat server for tests: scripted replies, recorded requests.

>>> from wsiengine.testing.vlm_server import FakeVLMServer, good_reply
>>> with FakeVLMServer("good", reply=good_reply(findings)) as server:
...     config = VLMConfig(vlm_url=server.url, vlm_model=server.model)   # http://127.0.0.1:PORT/v1
...     narration = VLMClient(config).narrate(findings)
...     server.chat_requests[0]["body"]["temperature"]                   # 0

Behaviours (``respond``), one per server or a list consumed one per chat request (the last one
repeats):

``"good"``
    HTTP 200 with ``reply`` as the message content (a dict is sent as its JSON text, a str as
    is; default: :func:`good_reply` of nothing, a neutral narrative).
``"malformed"``
    HTTP 200, a chat completion whose content is prose, not the JSON object asked for.
``"malformed_body"``
    HTTP 200 whose body is not JSON at all.
``"http500"``
    HTTP 500 with an OpenAI-style error body.
``"timeout"``
    Waits ``hang_s`` seconds (longer than any client timeout in tests) before answering; the
    wait ends early when the server closes, so closing never hangs.
``"text_only"``
    Like llama.cpp's ``llama-server`` without ``--mmproj``: a message whose content holds an
    ``image_url`` part gets HTTP 500 ``{"error": {"code": 500, "message": "image input is not
    supported - hint: if this is unexpected, you may need to provide the mmproj", "type":
    "server_error"}}``; string content gets the ``good`` reply.
``"deep_json"``
    HTTP 200 whose body is a JSON array nested ``depth`` levels deep (``json.loads`` raises
    RecursionError on it).
``"deep_content"``
    HTTP 200, a chat completion whose content is ``{"narrative": [[[...]]]}`` nested ``depth``
    levels deep.
``"numeric_parts"``
    HTTP 200, a chat completion whose content is a list of parts whose ``text`` is a number.
``"huge"``
    HTTP 200 whose body is ``huge_bytes`` of JSON whitespace around a good reply (more than a
    client should read).
``"trickle"``
    A good answer, status line and headers included, sent one byte every ``trickle_s`` seconds
    (a slow-loris server); stops when the server closes or the client hangs up.
callable
    ``respond(request_body) -> (status, body, delay_s)`` or ``(status, body, delay_s, headers)``;
    ``body`` is bytes, str or a JSON-ready object; :func:`chat_completion` builds a 200 body.

``GET /v1/models`` lists ``model``. Every request is recorded in :attr:`FakeVLMServer.requests`
as ``{"method", "path", "headers", "body"}`` (``body``: the parsed JSON, or the text when it is
not JSON).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Union

__all__ = ["FakeVLMServer", "good_reply", "chat_completion", "LLAMA_CPP_NO_MMPROJ", "MODES"]

Responder = Callable[[Any], tuple]
Behaviour = Union[str, Responder]

MODES = ("good", "malformed", "malformed_body", "http500", "timeout", "text_only", "deep_json", "deep_content",
         "numeric_parts", "huge", "trickle")

#: What llama.cpp's server answers to image content without a multimodal projector (2025).
LLAMA_CPP_NO_MMPROJ = {"error": {"code": 500, "message": "image input is not supported - hint: if this is "
                                 "unexpected, you may need to provide the mmproj", "type": "server_error"}}


def chat_completion(content: str, model: str = "fake-vlm") -> dict[str, Any]:
    """An OpenAI ``chat.completion`` body whose only choice has ``content``."""
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}


def good_reply(findings: dict[str, Any] | None = None) -> dict[str, Any]:
    """A reply that agrees with ``findings`` (what a well-behaved model returns): the call,
    category, largest deposit and foci copied, and a narrative that restates only them.
    Without findings, a neutral narrative with no claims."""
    if findings is None:
        return {"narrative": "The automated findings are summarised below for review."}
    m, cat, dep = findings["metastasis"], findings["category"], findings.get("deposits") or {}
    largest, foci = dep.get("largest_mm"), int(dep.get("foci") or 0)
    if m["call"] == "yes":
        text = f"Metastatic carcinoma is present, classified as {cat['name'].lower()}."
        if largest is not None:
            text += f" The largest deposit measures {largest} mm across {foci} {'focus' if foci == 1 else 'foci'}."
    elif m["call"] == "no":
        text = "No metastatic carcinoma is identified in this lymph node."
    else:
        text = "The result is indeterminate and the slide needs review."
    if m.get("probability") is not None:
        text += f" The slide probability is {m['probability']}."
    return {"narrative": text, "metastasis": m["call"], "category": cat["code"], "largest_deposit_mm": largest,
            "foci": foci}


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # handler threads are joined by server_close()
    block_on_close = True
    allow_reuse_address = True


class FakeVLMServer:
    """A loopback OpenAI-compatible server in a background thread (a context manager).

    Parameters
    ----------
    respond : str, callable, or a sequence of them
        The behaviour (see the module docstring); a sequence gives one per chat request, the
        last repeating.
    reply : dict or str, optional
        The content of ``good`` answers.
    model : str
        Model name reported in replies and ``/v1/models``.
    hang_s : float
        How long ``timeout`` waits before answering, seconds.
    host : str
        Loopback address to bind.
    depth : int
        Nesting depth of ``deep_json`` and ``deep_content``.
    trickle_s : float
        Seconds between the bytes of a ``trickle`` answer.
    huge_bytes : int
        Size of a ``huge`` body, bytes.

    Attributes
    ----------
    url : str
        Base URL for :class:`~wsiengine.config.VLMConfig`, ``http://127.0.0.1:PORT/v1``.
    requests : list of dict
        Every request received, in order.
    """

    def __init__(self, respond: Behaviour | Sequence[Behaviour] = "good", *, reply: dict[str, Any] | str | None = None,
                 model: str = "fake-vlm", hang_s: float = 30.0, host: str = "127.0.0.1", depth: int = 200_000,
                 trickle_s: float = 1.0, huge_bytes: int = 64 * 1024 * 1024) -> None:
        script = [respond] if isinstance(respond, str) or callable(respond) else list(respond)
        if not script:
            raise ValueError("respond must be a mode, a callable or a non-empty sequence of them")
        for b in script:
            if isinstance(b, str) and b not in MODES:
                raise ValueError(f"unknown FakeVLMServer mode {b!r}; expected one of {MODES} or a callable")
        self._script = script
        self.reply = reply if reply is not None else good_reply()
        self.model = model
        self.hang_s = float(hang_s)
        self.depth = int(depth)
        self.trickle_s = float(trickle_s)
        self.huge_bytes = int(huge_bytes)
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = _Server((host, 0), self._handler_class())
        self._thread: threading.Thread | None = None

    # ---- life cycle -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self._server.server_address[0]
        return f"http://{host}:{self.port}/v1"

    def start(self) -> "FakeVLMServer":
        """Serve in a daemon thread (called by ``with``)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                            name=f"FakeVLMServer:{self.port}", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving, wake any hanging ``timeout`` answer and join every thread."""
        self._closing.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.server_close()  # joins the handler threads

    def __enter__(self) -> "FakeVLMServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FakeVLMServer(url={self.url!r}, requests={len(self.requests)})"

    # ---- recorded requests -------------------------------------------------------------------

    @property
    def chat_requests(self) -> list[dict[str, Any]]:
        """The recorded POSTs to ``/chat/completions``."""
        with self._lock:
            return [r for r in self.requests if r["method"] == "POST" and r["path"].endswith("/chat/completions")]

    # ---- behaviour ---------------------------------------------------------------------------

    def _next_behaviour(self) -> Behaviour:
        with self._lock:
            n = sum(1 for r in self.requests if r["method"] == "POST" and r["path"].endswith("/chat/completions"))
        return self._script[min(n - 1, len(self._script) - 1)]

    def _good(self) -> tuple[int, Any, float]:
        content = self.reply if isinstance(self.reply, str) else json.dumps(self.reply)
        return 200, chat_completion(content, self.model), 0.0

    def _answer(self, behaviour: Behaviour, body: Any) -> tuple:
        if callable(behaviour):
            return tuple(behaviour(body))
        if behaviour == "good":
            return self._good()
        if behaviour == "malformed":
            return 200, chat_completion("The slide shows metastatic carcinoma, in my opinion.", self.model), 0.0
        if behaviour == "malformed_body":
            return 200, b"<html>upstream proxy error</html>", 0.0
        if behaviour == "http500":
            return 500, {"error": {"code": 500, "message": "internal server error", "type": "server_error"}}, 0.0
        if behaviour == "timeout":
            status, payload, _ = self._good()
            return status, payload, self.hang_s
        if behaviour == "deep_json":
            return 200, ("[" * self.depth + "]" * self.depth).encode(), 0.0
        if behaviour == "deep_content":
            content = '{"narrative": ' + "[" * self.depth + "]" * self.depth + "}"
            return 200, chat_completion(content, self.model), 0.0
        if behaviour == "numeric_parts":
            body = chat_completion("", self.model)
            body["choices"][0]["message"]["content"] = [{"type": "text", "text": 42}, {"type": "text", "text": 1.5}]
            return 200, body, 0.0
        if behaviour == "huge":
            data = json.dumps(self._good()[1]).encode()
            return 200, b" " * max(0, self.huge_bytes - len(data)) + data, 0.0
        if behaviour == "trickle":
            status, payload, _ = self._good()
            return status, payload, 0.0, {}, self.trickle_s
        if behaviour == "text_only":
            if _has_image_parts(body):
                return 500, LLAMA_CPP_NO_MMPROJ, 0.0
            return self._good()
        raise AssertionError(behaviour)  # pragma: no cover - validated in __init__

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # a client that sends nothing cannot hold a thread for long

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
                return

            def _record(self, body: Any) -> None:
                with fake._lock:
                    fake.requests.append({"method": self.command, "path": self.path,
                                          "headers": {k: v for k, v in self.headers.items()}, "body": body})

            def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None,
                      trickle_s: float = 0.0) -> None:
                data = payload if isinstance(payload, bytes) else (
                    payload.encode() if isinstance(payload, str) else json.dumps(payload).encode())
                if trickle_s > 0:
                    self._trickle(status, data, trickle_s)
                    return
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timed out) and closed
                    pass

            def _trickle(self, status: int, data: bytes, trickle_s: float) -> None:
                raw = (f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data
                self.close_connection = True
                try:
                    for i in range(len(raw)):
                        self.wfile.write(raw[i:i + 1])
                        self.wfile.flush()
                        if fake._closing.wait(trickle_s):
                            return
                except OSError:  # the client gave up and closed
                    pass

            def do_GET(self) -> None:  # noqa: N802
                self._record(None)
                if self.path.rstrip("/") in ("/v1/models", "/models"):
                    self._send(200, {"object": "list", "data": [{"id": fake.model, "object": "model",
                                                                 "owned_by": "wsiengine-testing"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body: Any = json.loads(raw)
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                self._record(body)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                    return
                status, payload, delay, *extra = fake._answer(fake._next_behaviour(), body)
                if delay > 0 and fake._closing.wait(delay):
                    return  # closing: drop the connection
                self._send(status, payload, extra[0] if extra else None, extra[1] if len(extra) > 1 else 0.0)

        return Handler


def _has_image_parts(body: Any) -> bool:
    if not isinstance(body, dict):
        return False
    for m in body.get("messages") or []:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") != "text" for p in content):
            return True
    return False
