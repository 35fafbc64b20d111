"""The viewer's WSGI application: read-only routes over a :class:`~wsiengine.view.catalog.Catalog`.

Every route names ids, never paths: ``/slide/ID``, ``/dzi/ID.dzi``, ``/dzi/ID_files/L/C_R.jpeg``,
``/heatmap/ID/NAME.png``, ``/regions/ID.json``, ``/thumbnail/ID.png``, ``/evidence/ID/RANK.png``,
``/api/slides``, ``/api/slides/ID``, ``/patient/ID``, ``/api/patients/ID``, and the packaged
assets under ``/static/`` (a fixed list read at start). Anything else, an unknown id included, is
404; there is no directory listing. Only GET and HEAD are served.

Every response carries a restrictive Content-Security-Policy (scripts, styles, images and
fetches from this origin only; no frames, forms or plugins), ``nosniff`` and ``no-referrer``.
With a token (any non-loopback bind), a request must carry it once as ``?token=`` (it is then
kept in an HttpOnly, SameSite=Strict cookie) or in that cookie, else 403. On loopback, the Host
header must name the loopback address the server is bound to (DNS rebinding is refused).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import numpy as np

from .catalog import SAFE_ID, Catalog, ViewSlide, read_json_file
from .tiles import Overview, ReaderCache, encode_jpeg, encode_png

__all__ = ["ViewerApp", "CONTENT_SECURITY_POLICY", "TOKEN_COOKIE"]

logger = logging.getLogger("wsiengine")

#: The one inline style the vendored OpenSeadragon injects (a focus-outline rule for touch screens),
#: allowed by its hash alone; no other inline style or script can run.
OPENSEADRAGON_STYLE = ("@media (hover: none) {    .openseadragon-canvas:focus {        outline: none !important;    }}")
OPENSEADRAGON_STYLE_HASH = "sha256-" + base64.b64encode(hashlib.sha256(OPENSEADRAGON_STYLE.encode()).digest()).decode()
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; "
                           f"style-src 'self' '{OPENSEADRAGON_STYLE_HASH}'; img-src 'self' data: blob:; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
]
TOKEN_COOKIE = "wsiengine_view_token"
#: Cache lifetime of tiles, images and assets, seconds (results do not change under a running viewer
#: often; a rerun changes the ETag).
CACHE_SECONDS = 3600
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".png": "image/png", ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8",
          ".json": "application/json"}
_ID = SAFE_ID.pattern
_ROUTES: list[tuple[re.Pattern[str], str]] = [(re.compile(p), name) for p, name in [
    (r"/", "index"),
    (rf"/slide/({_ID})", "slide_page"),
    (rf"/patient/({_ID})", "patient_page"),
    (r"/api/slides", "api_slides"),
    (rf"/api/slides/({_ID})", "api_slide"),
    (rf"/api/patients/({_ID})", "api_patient"),
    (rf"/dzi/({_ID})\.dzi", "dzi"),
    (rf"/dzi/({_ID})_files/(\d{{1,2}})/(\d{{1,6}})_(\d{{1,6}})\.jpeg", "tile"),
    (rf"/heatmap/({_ID})/([a-z_]{{1,40}})\.png", "heatmap"),
    (rf"/regions/({_ID})\.json", "regions"),
    (rf"/thumbnail/({_ID})\.png", "thumbnail"),
    (rf"/evidence/({_ID})/(\d{{1,3}})\.png", "evidence"),
    (r"/colorbar\.png", "colorbar"),
    (r"/static/([A-Za-z0-9_-]{1,40}(?:/[A-Za-z0-9_-]{1,40}){0,3}\.[a-z]{2,4})", "static"),
]]


class HTTPError(Exception):
    def __init__(self, status: HTTPStatus, message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message or status.phrase


def _static_files() -> dict[str, bytes]:
    """The packaged assets by their URL path under /static/ (read once; nothing else is served)."""
    root = resources.files("wsiengine.view") / "static"
    out: dict[str, bytes] = {}

    def walk(folder, prefix: str) -> None:
        for entry in folder.iterdir():
            name = f"{prefix}{entry.name}"
            if entry.is_dir():
                walk(entry, name + "/")
            elif Path(entry.name).suffix in _TYPES:
                out[name] = entry.read_bytes()

    walk(root, "")
    return out


class _LRU:
    """A small thread-safe least-recently-used cache of rendered bytes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


class ViewerApp:
    """The WSGI application (see the module docstring).

    Parameters
    ----------
    catalog : Catalog
    token : str, optional
        Required on every request when given (non-loopback binds).
    allowed_hosts : set of str, optional
        Host header values accepted (``127.0.0.1:PORT`` ...); None accepts any.
    readers : ReaderCache, optional
        Open slides (default: at most 4).
    """

    def __init__(self, catalog: Catalog, *, token: str | None = None, allowed_hosts: set[str] | None = None,
                 readers: ReaderCache | None = None) -> None:
        self.catalog = catalog
        self.token = token
        self.allowed_hosts = allowed_hosts
        self.readers = readers or ReaderCache()
        self.static = _static_files()
        self._stores = _LRU(16)
        self._images = _LRU(64)  # encoded PNGs (thumbnails, heatmaps): tens of KB each
        self._overviews = _LRU(4)  # decoded store thumbnails: a few MB each

    # -- WSGI ---------------------------------------------------------------------------------
    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "") or "/"
        extra_headers: list[tuple[str, str]] = []
        try:
            if method not in ("GET", "HEAD"):
                raise HTTPError(HTTPStatus.METHOD_NOT_ALLOWED)
            self._check_host(environ)
            extra_headers = self._check_token(environ)
            status, headers, body = self._dispatch(path, environ)
        except HTTPError as exc:
            status, headers, body = exc.status, [("Content-Type", "text/plain; charset=utf-8"),
                                                 ("Cache-Control", "no-store")], exc.message.encode() + b"\n"
            if exc.status == HTTPStatus.METHOD_NOT_ALLOWED:
                headers.append(("Allow", "GET, HEAD"))
        except Exception:  # noqa: BLE001 - a broken result file must not take the viewer down
            logger.exception("view: %s %s failed", method, path[:200])
            status, headers, body = (HTTPStatus.INTERNAL_SERVER_ERROR, [("Content-Type", "text/plain; charset=utf-8"),
                                     ("Cache-Control", "no-store")], b"internal error (see the server log)\n")
        etag = next((v for k, v in headers if k == "ETag"), None)
        if etag is not None and environ.get("HTTP_IF_NONE_MATCH") == etag and status == HTTPStatus.OK:
            status, body = HTTPStatus.NOT_MODIFIED, b""
        headers = [*headers, *extra_headers, *SECURITY_HEADERS, ("Content-Length", str(len(body)))]
        start_response(f"{status.value} {status.phrase}", headers)
        return [b""] if method == "HEAD" else [body]

    def _check_host(self, environ: dict[str, Any]) -> None:
        if self.allowed_hosts is not None and environ.get("HTTP_HOST", "") not in self.allowed_hosts:
            raise HTTPError(HTTPStatus.FORBIDDEN, "this viewer answers only to the loopback address it is bound to")

    def _check_token(self, environ: dict[str, Any]) -> list[tuple[str, str]]:
        if self.token is None:
            return []
        given = (parse_qs(environ.get("QUERY_STRING", "")).get("token") or [""])[0]
        if given and hmac.compare_digest(given.encode(), self.token.encode()):
            return [("Set-Cookie", f"{TOKEN_COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/")]
        for part in environ.get("HTTP_COOKIE", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == TOKEN_COOKIE and hmac.compare_digest(value.encode(), self.token.encode()):
                return []
        raise HTTPError(HTTPStatus.FORBIDDEN, "this viewer needs its access token: open the URL it printed")

    def _dispatch(self, path: str, environ: dict[str, Any]) -> tuple[HTTPStatus, list[tuple[str, str]], bytes]:
        for pattern, name in _ROUTES:
            match = pattern.fullmatch(path)
            if match:
                return getattr(self, "_" + name)(*match.groups())
        raise HTTPError(HTTPStatus.NOT_FOUND)

    # -- helpers ------------------------------------------------------------------------------
    def _slide(self, slide_id: str) -> ViewSlide:
        entry = self.catalog.slides.get(slide_id)
        if entry is None:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no slide {slide_id!r} in these results")
        return entry

    def _store(self, entry: ViewSlide):
        from ..store import open_result

        if entry.store is None:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"slide {entry.slide_id!r} has no result store")
        return self._stores.get(entry.store, lambda: open_result(entry.store))

    def _slide_file(self, entry: ViewSlide) -> Path:
        if entry.slide_path is None:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"the slide file of {entry.slide_id!r} was not found (--slides DIR)")
        return entry.slide_path

    @staticmethod
    def _etag(*parts: Any) -> str:
        return '"' + hashlib.sha256(repr(parts).encode()).hexdigest()[:32] + '"'

    def _version(self, path: Path | None) -> tuple:
        try:
            stat = path.stat() if path is not None else None
        except OSError:
            stat = None
        return (str(path), stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0)

    @staticmethod
    def _json(value: Any) -> tuple[HTTPStatus, list[tuple[str, str]], bytes]:
        body = json.dumps(value, allow_nan=False, separators=(",", ":")).encode()
        return HTTPStatus.OK, [("Content-Type", "application/json"), ("Cache-Control", "no-store")], body

    def _image(self, body: bytes, content_type: str, etag: str) -> tuple[HTTPStatus, list[tuple[str, str]], bytes]:
        return HTTPStatus.OK, [("Content-Type", content_type), ("Cache-Control", f"private, max-age={CACHE_SECONDS}"),
                               ("ETag", etag)], body

    def _page(self, name: str) -> tuple[HTTPStatus, list[tuple[str, str]], bytes]:
        return HTTPStatus.OK, [("Content-Type", _TYPES[".html"]), ("Cache-Control", "no-store")], self.static[name]

    # -- pages --------------------------------------------------------------------------------
    def _index(self):
        return self._page("index.html")

    def _slide_page(self, slide_id: str):
        self._slide(slide_id)
        return self._page("slide.html")

    def _patient_page(self, patient_id: str):
        if patient_id not in self.catalog.patients:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no patient {patient_id!r} in these results")
        return self._page("patient.html")

    def _static(self, name: str):
        body = self.static.get(name)
        if body is None:
            raise HTTPError(HTTPStatus.NOT_FOUND)
        return HTTPStatus.OK, [("Content-Type", _TYPES[Path(name).suffix]),
                               ("Cache-Control", f"private, max-age={CACHE_SECONDS}"),
                               ("ETag", self._etag("static", name, len(body)))], body

    # -- data ---------------------------------------------------------------------------------
    def _api_slides(self):
        from .data import slide_summary

        return self._json({"slides": [slide_summary(e) for e in self.catalog.slides.values()],
                           "patients": sorted(self.catalog.patients)})

    def _api_slide(self, slide_id: str):
        from .data import slide_detail

        entry = self._slide(slide_id)
        store = self._store(entry) if entry.store is not None else None
        deepzoom = None
        if entry.slide_path is not None:
            try:
                deepzoom = self.readers.deepzoom(entry.slide_path)
            except Exception as exc:  # noqa: BLE001 - the page still shows the results
                logger.warning("view: cannot open the slide of %s: %s", slide_id, exc)
        return self._json(slide_detail(entry, store, deepzoom))

    def _api_patient(self, patient_id: str):
        path = self.catalog.patients.get(patient_id)
        if path is None:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no patient {patient_id!r} in these results")
        from .data import patient_detail

        return self._json(patient_detail(read_json_file(path), self.catalog))

    def _dzi(self, slide_id: str):
        path = self._slide_file(self._slide(slide_id))
        body = self.readers.deepzoom(path).dzi().encode()
        return HTTPStatus.OK, [("Content-Type", "application/xml"), ("Cache-Control", "no-store")], body

    def _tile(self, slide_id: str, level: str, col: str, row: str):
        entry = self._slide(slide_id)
        path = self._slide_file(entry)
        deepzoom = self.readers.deepzoom(path)
        lv, c, r = int(level), int(col), int(row)
        if not deepzoom.exists(lv, c, r):
            raise HTTPError(HTTPStatus.NOT_FOUND, "no such tile")
        body = encode_jpeg(self.readers.tile(path, lv, c, r, overview=lambda: self._overview(entry)))
        return self._image(body, "image/jpeg", self._etag("tile", self._version(path), lv, c, r))

    def _overview(self, entry: ViewSlide) -> Overview | None:
        """The store's thumbnail as a whole-slide overview (None without one)."""
        if entry.store is None:
            return None

        def make() -> Overview | None:
            store = self._store(entry)
            image = store.thumbnail
            if image is None:
                return None
            scale = store.array_attrs("thumbnail").get("level0_per_px") or [None, None]
            if not all(isinstance(v, (int, float)) and v > 0 for v in scale):
                return None
            return Overview(np.ascontiguousarray(image[..., :3]), (float(scale[0]), float(scale[1])))

        return self._overviews.get((entry.slide_id, self._version(entry.store / "zarr.json")), make)

    def _heatmap(self, slide_id: str, name: str):
        from .data import heatmap_rgba

        entry = self._slide(slide_id)
        store = self._store(entry)
        if name not in store.heatmap_names():
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no heatmap {name!r} for {slide_id!r}")
        version = self._version(entry.store / "zarr.json")
        body = self._images.get(("heatmap", slide_id, name, version), lambda: encode_png(heatmap_rgba(store, name)))
        return self._image(body, "image/png", self._etag("heatmap", slide_id, name, version))

    def _regions(self, slide_id: str):
        from .data import regions

        entry = self._slide(slide_id)
        if entry.geojson is None:
            return self._json({"tissue": [], "deposits": []})
        return self._json(regions(read_json_file(entry.geojson)))

    def _thumbnail(self, slide_id: str):
        entry = self._slide(slide_id)
        store = self._store(entry)
        version = self._version(entry.store / "zarr.json")

        def make() -> bytes:
            thumb = store.thumbnail
            if thumb is None:
                raise HTTPError(HTTPStatus.NOT_FOUND, "no thumbnail")
            step = max(1, math.ceil(max(thumb.shape[:2]) / 256))
            return encode_png(np.ascontiguousarray(thumb[::step, ::step, :3]))

        return self._image(self._images.get(("thumb", slide_id, version), make), "image/png",
                           self._etag("thumb", slide_id, version))

    def _evidence(self, slide_id: str, rank: str):
        entry = self._slide(slide_id)
        if entry.report_dir is None:
            raise HTTPError(HTTPStatus.NOT_FOUND, "no report images")
        path = entry.report_dir / f"evidence-{int(rank):02d}.png"
        if not path.is_file() or path.is_symlink():
            raise HTTPError(HTTPStatus.NOT_FOUND, "no such evidence image")
        body = path.read_bytes()
        return self._image(body, "image/png", self._etag("evidence", self._version(path)))

    def _colorbar(self):
        from .data import colorbar

        body = self._images.get("colorbar", lambda: encode_png(colorbar()))
        return self._image(body, "image/png", self._etag("colorbar"))
