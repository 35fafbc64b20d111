"""HTTP transport to one OpenAI-compatible ``/v1/chat/completions`` endpoint: loopback checks,
POST with a total deadline per request (connecting, sending and reading the whole reply, which is
read in chunks up to a few MB) and bounded retries (timeouts, connection errors, HTTP 429 and 5xx), no
redirects, no environment proxies for loopback endpoints, the API key read from the environment
at each request, and the reply's ``choices[0].message.content``.

Standard library only. Failures raise :class:`VLMRequestError` (a
:class:`~wsiengine.errors.VLMError`) with the reason.
"""

from __future__ import annotations

import http.client
import io
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
from http.client import HTTPException
from typing import Any

from ..errors import VLMError

__all__ = ["ChatTransport", "VLMRequestError", "is_loopback", "display_url"]

logger = logging.getLogger("wsiengine")

_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_IMAGE_REJECT_STATUS = frozenset({400, 415, 422, 500, 501})
_IMAGE_REJECT_WORDS = re.compile(
    r"image|vision|multi-?modal|mmproj|image_url|content[ _-]?type|clip"
    # servers whose chat template or schema takes only string content (llama-cpp-python, pydantic)
    r"|concatenate str|\(not \"list\"\)|valid string|string_type", re.I)
_MAX_ERROR_BODY = 64 * 1024
#: The most reply bytes read: a chat completion of a few hundred tokens is a few kB.
_MAX_REPLY_BODY = 4 * 1024 * 1024
_READ_CHUNK = 64 * 1024


def is_loopback(url: str) -> bool:
    """True when ``url`` is an http(s) URL whose host is this machine: a literal address in
    127.0.0.0/8, ``::1`` (or IPv4-mapped loopback) or exactly the name ``localhost``. Nothing is
    resolved through DNS, so any other name counts as remote, ``localhost.`` (a fully qualified
    name, looked up through DNS) included."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not host:
        return False
    host = host.lower()
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


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


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are errors: a loopback endpoint must not forward findings elsewhere."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, D102
        return None


class _DeadlineReader(io.RawIOBase):
    """Reads a socket with a timeout that shrinks to what is left of one request's total deadline,
    so a server that trickles bytes cannot stretch a request past it."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        # the socket's own reader holds a reference, so urllib closing the connection's socket
        # after reading the headers leaves it open until this reader closes
        self._raw = sock.makefile("rb", buffering=0)
        self._sock, self._deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self._sock.settimeout(_remaining(self._deadline))
        return self._raw.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _DeadlineSocket:
    """What :class:`http.client.HTTPResponse` is given instead of the socket: its ``makefile``
    reads through :class:`_DeadlineReader`."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock, self._deadline = sock, deadline

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))


def _deadline_connection(base: type[http.client.HTTPConnection], deadline: float) -> Any:
    """A connection factory for ``urllib``'s ``do_open``: connecting, sending and every read of
    the response (status line, headers, body) end at the monotonic ``deadline``."""

    class Connection(base):  # type: ignore[misc, valid-type]
        def connect(self) -> None:
            self.timeout = _remaining(deadline)
            super().connect()
            self.sock.settimeout(_remaining(deadline))  # sendall: the timeout bounds the whole send

        def send(self, data: Any) -> None:
            if self.sock is not None:
                self.sock.settimeout(_remaining(deadline))
            super().send(data)

        def getresponse(self) -> http.client.HTTPResponse:
            sock = self.sock
            self.response_class = lambda _sock, *a, **kw: http.client.HTTPResponse(  # type: ignore[assignment]
                _DeadlineSocket(sock, deadline), *a, **kw)
            return super().getresponse()

    def factory(host: str, **kwargs: Any) -> http.client.HTTPConnection:
        return Connection(host, **kwargs)

    return factory


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("the request's total deadline passed")
    return remaining


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_deadline_connection(http.client.HTTPConnection, req.wsi_deadline), req)  # type: ignore[attr-defined]


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_deadline_connection(http.client.HTTPSConnection, req.wsi_deadline), req,  # type: ignore[attr-defined]
                            context=self._context)


# --------------------------------------------------------------------------------------------


class ChatTransport:
    """POSTs chat-completions requests to ``endpoint`` and returns the replies.

    Parameters
    ----------
    endpoint : str
        The full ``.../chat/completions`` URL (no ``user:password@``).
    timeout_s : float
        Total time allowed to each request (attempt), seconds: connecting, sending and reading
        the whole reply, however slowly the server trickles it.
    retries : int
        Retries after a timeout, a connection error, HTTP 429 or 5xx (other 4xx are not retried).
    backoff_s : float
        First wait before a retry, seconds; doubled each retry (capped at 8 s, or longer when the
        server's ``Retry-After`` asks for it).
    api_key_env : str
        Environment variable whose value, when set, is sent as ``Authorization: Bearer``; read at
        each request, never stored.
    loopback : bool
        The endpoint is this machine: environment proxies are bypassed.
    """

    def __init__(self, endpoint: str, *, timeout_s: float, retries: int, backoff_s: float = 0.5,
                 api_key_env: str, loopback: bool) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.api_key_env = api_key_env
        handlers: list[Any] = [_NoRedirect(), _DeadlineHTTPHandler(), _DeadlineHTTPSHandler()]
        if loopback:
            handlers.append(urllib.request.ProxyHandler({}))
        self._opener = urllib.request.build_opener(*handlers)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "wsiengine"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key.strip()}"
        return headers

    def _post_once(self, payload: bytes) -> dict[str, Any]:
        """One POST, all of it within ``timeout_s``; returns the decoded JSON body or raises
        VLMRequestError (attempts=1)."""
        request = urllib.request.Request(self.endpoint, data=payload, headers=self._headers(), method="POST")
        timeout = self.timeout_s
        request.wsi_deadline = time.monotonic() + timeout  # type: ignore[attr-defined]
        too_slow = f"no complete answer from {self.endpoint} within {timeout:g} s"
        try:
            with self._opener.open(request, timeout=timeout) as response:
                body = _read_bounded(response, _MAX_REPLY_BODY + 1)
        except urllib.error.HTTPError as exc:
            try:
                text = _read_bounded(exc, _MAX_ERROR_BODY).decode("utf-8", "replace")
            except (OSError, HTTPException, ValueError):
                text = ""
            finally:
                exc.close()
            error = VLMRequestError(f"HTTP {exc.code} from {self.endpoint}: {_error_message(text) or exc.reason}",
                                    kind="http", status=exc.code, body=text)
            error.retry_after_s = _retry_after(exc.headers)
            raise error from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise VLMRequestError(too_slow, kind="timeout") from None
            raise VLMRequestError(f"cannot connect to {self.endpoint}: {exc.reason}", kind="connection") from None
        except (TimeoutError, socket.timeout):
            raise VLMRequestError(too_slow, kind="timeout") from None
        except (OSError, HTTPException, ValueError) as exc:
            raise VLMRequestError(f"connection to {self.endpoint} failed: {exc!r}", kind="connection") from None
        if len(body) > _MAX_REPLY_BODY:
            raise VLMRequestError(f"the reply from {self.endpoint} exceeds {_MAX_REPLY_BODY} bytes", kind="malformed")
        try:
            decoded = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            raise VLMRequestError(f"the reply from {self.endpoint} is not usable JSON: {body[:120]!r}",
                                  kind="malformed", body=body[:_MAX_ERROR_BODY].decode("utf-8", "replace")) from None
        if not isinstance(decoded, dict):
            raise VLMRequestError(f"the reply from {self.endpoint} is not a JSON object", kind="malformed")
        return decoded

    def post(self, payload: dict[str, Any], *, images: bool = False) -> tuple[dict[str, Any], int]:
        """POST with retries on timeout, connection error, 429 and 5xx; returns (body, attempts).

        With ``images``, an answer saying the server takes no images is not retried."""
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
                if not retryable or attempts > self.retries:
                    raise
                wait = min(max(self.backoff_s * 2 ** (attempts - 1), exc.retry_after_s or 0.0), 8.0)
                logger.info("VLM request failed (%s); retry %d of %d in %.1f s", exc, attempts, self.retries, wait)
                time.sleep(wait)

    def complete(self, payload: dict[str, Any], *, images: bool = False) -> tuple[str, str | None, int]:
        """POST ``payload`` (see :func:`~wsiengine.report.prompt.chat_payload`); returns (reply text
        ``choices[0].message.content``, the model name the server reports, attempts)."""
        body, attempts = self.post(payload, images=images)
        try:
            message = body["choices"][0]["message"]
            content = message["content"]
        except (KeyError, IndexError, TypeError):
            raise VLMRequestError(f"the reply from {self.endpoint} has no choices[0].message.content "
                                  f"(keys {sorted(map(str, body))[:10]})", kind="malformed", attempts=attempts) from None
        if isinstance(content, list):  # content parts: the text of those whose text is a string
            texts = [p.get("text") for p in content if isinstance(p, dict)]
            texts = [t for t in texts if isinstance(t, str)]
            content = "".join(texts) if texts else None
        if not isinstance(content, str):
            raise VLMRequestError(f"the reply from {self.endpoint} has no text content", kind="malformed",
                                  attempts=attempts)
        model = body.get("model") if isinstance(body.get("model"), str) else None
        return content, model, attempts


def _read_bounded(response: Any, limit: int) -> bytes:
    """At most ``limit`` bytes of ``response``, read in chunks (each read is bounded by the
    request's deadline)."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = response.read(min(_READ_CHUNK, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def display_url(url: str) -> str:
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
