"""``wsiengine view``: a results folder in a browser, read-only.

>>> from wsiengine.view import ViewServer
>>> with ViewServer("results/", port=0) as server:     # loopback, a free port
...     print(server.url)                               # http://127.0.0.1:PORT/

Pages: an index of the slides of ``summary.csv`` (status, call, probability, category, QC flags,
thumbnails; sortable); a slide page with the whole slide in a deep-zoom viewer (OpenSeadragon,
vendored), the heatmaps of its store as a toggleable overlay with opacity and a colour bar, the
tissue outlines and tumour deposits of its GeoJSON as vector overlays (click one for its
measurements), evidence tiles that pan the viewer, and the report in a side panel; with
staging results, a page per patient listing its nodes.

Modules: :mod:`~wsiengine.view.catalog` (ids -> files), :mod:`~wsiengine.view.tiles` (deep-zoom
tiles, the bounded reader cache), :mod:`~wsiengine.view.data` (what pages show),
:mod:`~wsiengine.view.app` (the WSGI routes and their security), :mod:`~wsiengine.view.server`
(waitress, loopback and token).
"""

from __future__ import annotations

from .app import CONTENT_SECURITY_POLICY, ViewerApp
from .catalog import Catalog
from .server import ViewServer, is_loopback
from .tiles import DeepZoom, ReaderCache

__all__ = ["ViewServer", "ViewerApp", "Catalog", "DeepZoom", "ReaderCache", "CONTENT_SECURITY_POLICY", "is_loopback"]
