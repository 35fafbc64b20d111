"""Serving the viewer: waitress (a pure-Python, multi-threaded WSGI server) on loopback by
default, a token for any other address.

Why waitress: it is a maintained production WSGI server (Pylons project) with no C extensions
and no dependencies, runs the same on Linux, macOS and Windows, and serves requests from a
thread pool, so a slow tile never blocks the page, the API or other tiles (the slide readers
release the GIL while decoding). The viewer is synchronous by nature (read a region, encode a
JPEG), which WSGI in threads fits without an event loop.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import threading

import numpy as np

from ..errors import ConfigError
from .app import ViewerApp
from .catalog import Catalog
from .tiles import ReaderCache, encode_jpeg

__all__ = ["ViewServer", "is_loopback"]

logger = logging.getLogger("wsiengine")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``127.0.0.0/8``, ``::1``) or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ViewServer:
    """``wsiengine view``: the results folder in a browser (see :mod:`wsiengine.view`).

    Parameters
    ----------
    results : path
        A ``wsiengine run`` results folder (read only).
    slides_dir : path, optional
        Where the slide files are, when not at the paths the stores record.
    host : str
        Bind address; loopback by default. Any other address gets a random access token, in
        :attr:`url`.
    port : int
        TCP port; 0 picks a free one.
    threads : int
        Requests served at once.
    max_open_slides : int
        Slides kept open (the reader cache's bound).
    """

    def __init__(self, results: str | os.PathLike[str], *, slides_dir: str | os.PathLike[str] | None = None,
                 host: str = "127.0.0.1", port: int = 8765, threads: int = 8, max_open_slides: int = 4) -> None:
        from waitress.server import create_server

        if not 0 <= int(port) <= 65535:
            raise ConfigError(f"--port must be 0..65535, got {port}")
        self.catalog = Catalog.load(results, slides_dir)
        self.host = host
        self.token = None if is_loopback(host) else secrets.token_urlsafe(24)
        self.readers = ReaderCache(max_open_slides)
        self.app = ViewerApp(self.catalog, token=self.token, readers=self.readers)
        try:
            self._server = create_server(self.app, host=host, port=int(port), threads=threads, ident="wsiengine",
                                         clear_untrusted_proxy_headers=True)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.port = int(self._server.effective_port)
        if self.token is None:
            shown = f"[{host}]" if ":" in host else host
            self.app.allowed_hosts = {f"{shown}:{self.port}", f"localhost:{self.port}", f"127.0.0.1:{self.port}",
                                      f"[::1]:{self.port}"}
        self._thread: threading.Thread | None = None
        self._closed = False
        encode_jpeg(np.zeros((8, 8, 3), np.uint8))  # the first JPEG encode loads the codec: not on a user's tile

    @property
    def url(self) -> str:
        """The address to open (with the token when there is one)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "[::]") else host
        return f"http://{shown}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def serve_forever(self) -> None:
        """Serve until interrupted (Ctrl-C)."""
        try:
            self._server.run()
        finally:
            self.close()

    def start(self) -> "ViewServer":
        """Serve from a background thread (tests, notebooks); :meth:`close` stops it."""
        self._thread = threading.Thread(target=self._server.run, name="wsiengine-view", daemon=True)
        self._thread.start()
        return self

    def _close_channels(self) -> None:
        """Close the listening socket, the trigger and every open connection: the serving loop
        ends when none is left. Runs in the loop's own thread (or when no loop runs)."""
        for channel in list(self._server._map.values()):
            try:
                channel.close()
            except OSError:
                pass

    def close(self) -> None:
        """Stop serving: the loop closes its own sockets (closing them from another thread would
        race with it), in-flight requests finish, the slides are closed."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None and self._thread.is_alive():
            self._server.trigger.pull_trigger(self._close_channels)
            self._thread.join(timeout=10)
        else:
            self._close_channels()
        self._server.task_dispatcher.shutdown(timeout=10)
        self.readers.close()

    def __enter__(self) -> "ViewServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
