"""wsiengine.view without a browser: routes, deep-zoom tiles, security (traversal, CSP, loopback,
token), read-only, the bounded reader cache, and that a slow tile does not block other requests."""

from __future__ import annotations

import csv
import http.client
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsiengine.cli import main
from wsiengine.view import CONTENT_SECURITY_POLICY, DeepZoom, ReaderCache, ViewServer
from wsiengine.view.catalog import Catalog

from .conftest import VIEW_SLIDE as SLIDE


@pytest.fixture(scope="module")
def server(view_results):
    with ViewServer(view_results, port=0) as srv:
        yield srv


def request(srv: ViewServer, path: str, *, host: str | None = None, method: str = "GET",
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One raw request: the path is sent exactly as given (no client-side normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host or f"127.0.0.1:{srv.port}")
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


# -- pages and data ----------------------------------------------------------------------------
def test_index_and_slide_list(server):
    status, headers, body = request(server, "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"/static/index.js" in body
    status, _, body = request(server, "/api/slides")
    data = json.loads(body)
    rows = {s["id"]: s for s in data["slides"]}
    assert set(rows) == {SLIDE, "broken"} and data["patients"] == ["patient_a"]
    assert rows["broken"]["status"] == "failed" and not rows["broken"]["has_store"]
    good = rows[SLIDE]
    assert good["has_store"] and good["has_slide"] and 0 <= good["probability"] <= 1
    assert good["category"] in ("itc", "micrometastasis", "macrometastasis") and good["largest_mm"] > 0
    assert "low_tissue" in good["flags"]


def test_slide_detail_matches_the_report_and_store(server, view_results):
    from wsiengine.store import open_result

    status, _, body = request(server, f"/api/slides/{SLIDE}")
    d = json.loads(body)
    report = json.loads((view_results / f"{SLIDE}.report.json").read_text())
    store = open_result(view_results / f"{SLIDE}.zarr")
    assert status == 200 and d["slide"]["width"] == 2220 and d["slide"]["height"] == 2967
    assert d["slide"]["dzi"] == f"/dzi/{SLIDE}.dzi" and d["node"] == store.node
    assert d["report"]["deposits"]["largest_mm"] == report["findings"]["deposits"]["largest_mm"]
    assert d["report"]["disclaimer"] and d["report"]["narrative"] == report["narrative"]["text"] != ""
    assert [e["rank"] for e in d["report"]["evidence"]] == [e["rank"] for e in report["findings"]["evidence"]]
    names = {h["name"]: h for h in d["heatmaps"]}
    assert set(names) == set(store.heatmap_names())
    x, y, w, h = names["tile_scores"]["bounds"]
    assert 0 <= x < 2220 and 0 <= y < 2967 and w > 0 and h > 0


def test_regions_are_the_geojson_deposits_with_their_measurements(server, view_results):
    status, _, body = request(server, f"/regions/{SLIDE}.json")
    regions = json.loads(body)
    collection = json.loads((view_results / f"{SLIDE}.geojson").read_text())
    tumours = [f for f in collection["features"] if f["properties"]["classification"]["name"] == "Tumor"
               and f["properties"]["objectType"] == "annotation"]
    assert status == 200 and len(regions["deposits"]) == len(tumours) >= 1 and regions["tissue"]
    for dep, feature in zip(regions["deposits"], tumours):
        assert dep["measurements"] == feature["properties"]["measurements"]
        import shapely
        from shapely.geometry import shape

        assert shape(feature["geometry"]).contains(shapely.Point(dep["point"]))


def test_deep_zoom_descriptor_and_tiles(server, cmu_small):
    from wsiengine.slide import open_slide

    status, headers, body = request(server, f"/dzi/{SLIDE}.dzi")
    assert status == 200 and b'Width="2220"' in body and b'Height="2967"' in body and b'TileSize="254"' in body
    dz = DeepZoom(2220, 2967, (1.0, 4.0), ((2220, 2967), (555, 741)))
    assert dz.max_level == 12 and dz.level_size(12) == (2220, 2967) and dz.level_size(0) == (1, 1)
    status, headers, body = request(server, f"/dzi/{SLIDE}_files/12/1_1.jpeg")
    assert status == 200 and headers["content-type"] == "image/jpeg" and "max-age" in headers["cache-control"]
    tile = np.asarray(Image.open(__import__("io").BytesIO(body)).convert("RGB")).astype(float)
    assert tile.shape == (256, 256, 3)  # 254 px plus one overlap pixel each side
    with open_slide(cmu_small) as slide:  # full resolution: the pixels of level 0 at (253, 253)
        expected = slide.read_region((253, 253), 0, (256, 256)).astype(float)
    assert np.abs(tile - expected).mean() < 6  # JPEG q80
    edge = request(server, f"/dzi/{SLIDE}_files/12/8_11.jpeg")  # last column and row: clipped tiles
    assert edge[0] == 200 and Image.open(__import__("io").BytesIO(edge[2])).size == (2220 - 8 * 254 + 1, 2967 - 11 * 254 + 1)
    small = request(server, f"/dzi/{SLIDE}_files/9/0_0.jpeg")  # 1/8 of full size: read from the 4x level
    assert small[0] == 200 and Image.open(__import__("io").BytesIO(small[2])).size == (255, 255)
    assert dz.level_size(9) == (278, 371) and dz.read_plan(9, 0, 0) == (1, (0, 0), (510, 510), (255, 255))
    assert dz.read_plan(9, 1, 1)[0] == 1 and dz.read_plan(12, 1, 1)[0] == 0 and dz.read_plan(11, 0, 0)[0] == 0
    assert request(server, f"/dzi/{SLIDE}_files/12/99_0.jpeg")[0] == 404
    assert request(server, f"/dzi/{SLIDE}_files/13/0_0.jpeg")[0] == 404
    etag = headers["etag"]
    assert request(server, f"/dzi/{SLIDE}_files/12/1_1.jpeg", headers={"If-None-Match": etag})[0] == 304


def test_images_thumbnail_heatmap_evidence_colorbar(server):
    for path in (f"/thumbnail/{SLIDE}.png", f"/heatmap/{SLIDE}/tile_scores.png", f"/evidence/{SLIDE}/1.png",
                 "/colorbar.png", "/static/favicon.png", "/static/vendor/openseadragon/images/zoomin_rest.png"):
        status, headers, body = request(server, path)
        assert status == 200 and headers["content-type"] == "image/png" and body[:8] == b"\x89PNG\r\n\x1a\n", path
    heat = Image.open(__import__("io").BytesIO(request(server, f"/heatmap/{SLIDE}/tile_scores.png")[2]))
    alpha = np.asarray(heat.convert("RGBA"))[..., 3]
    assert heat.mode == "RGBA" and (alpha == 0).any() and (alpha == 255).any()  # glass transparent
    assert request(server, f"/heatmap/{SLIDE}/nope.png")[0] == 404
    assert request(server, f"/evidence/{SLIDE}/99.png")[0] == 404


def test_patient_page_and_data(server):
    assert request(server, "/patient/patient_a")[0] == 200
    data = json.loads(request(server, "/api/patients/patient_a")[2])
    assert data["patient_id"] == "patient_a" and data["pn_stage"] in ("pN0(i+)", "pN1mi", "pN1")
    assert data["nodes"][0]["slide_id"] == SLIDE and data["nodes"][0]["link"] == f"/slide/{SLIDE}"
    assert request(server, "/patient/nobody")[0] == 404


# -- security ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [
    "/slide/..", "/slide/../../etc/passwd", "/slide/%2e%2e", "/slide/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/dzi/..%2f..%2fetc%2fpasswd.dzi", f"/dzi/{SLIDE}_files/../../../etc/passwd", "/static/../app.py",
    "/static/..%2fapp.py", "/static/%2e%2e/catalog.py", "/static/", "/static", "/static/vendor/", "//etc/passwd",
    "/etc/passwd", "/%2fetc%2fpasswd", "/thumbnail/..%2f..%2f.png", f"/evidence/{SLIDE}/..%2f1.png",
    f"/{SLIDE}.zarr/zarr.json", f"/{SLIDE}.report.json", "/summary.csv", "/patients/patient_a.patient.json",
    "/api/slides/..", "/api/slides/nope", "/slide/C:%5Cwindows", "/slide/%00", "/static/view.css%00.png",
    "/static/vendor/openseadragon/LICENSE.txt/..", f"/heatmap/{SLIDE}/../../x.png", "/label.png", "/macro.png",
    f"/dzi/{SLIDE}/label.jpeg", f"/dzi/{SLIDE}_files/label/0_0.jpeg",
])
def test_paths_outside_the_catalog_are_404(server, path):
    status, headers, body = request(server, path)
    assert status == 404, (path, status, body[:200])
    assert b"root:" not in body and b"zarr_format" not in body and b"slide_id,path" not in body
    assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY


def test_every_response_carries_the_security_headers(server):
    for path in ("/", f"/slide/{SLIDE}", "/api/slides", f"/dzi/{SLIDE}_files/10/0_0.jpeg", "/static/slide.js", "/nope"):
        _, headers, _ = request(server, path)
        csp = headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self';" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "http" not in csp
        assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"
    api = request(server, "/api/slides")[1]
    assert api["cache-control"] == "no-store"


def test_only_get_and_head(server):
    assert request(server, "/api/slides", method="POST")[0] == 405
    assert request(server, "/api/slides", method="DELETE")[0] == 405
    status, headers, body = request(server, "/api/slides", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0


def test_binds_loopback_and_refuses_other_host_headers(server):
    assert server._server.socket.getsockname()[0] == "127.0.0.1" and server.url.startswith("http://127.0.0.1:")
    assert server.token is None
    assert request(server, "/api/slides", host=f"localhost:{server.port}")[0] == 200
    assert request(server, "/api/slides", host="evil.example:80")[0] == 403  # DNS rebinding
    assert request(server, "/api/slides", host=f"127.0.0.1:{server.port + 1}")[0] == 403


def test_another_host_needs_the_token(view_results):
    with ViewServer(view_results, host="0.0.0.0", port=0) as srv:
        assert srv.token and f"?token={srv.token}" in srv.url and len(srv.token) >= 32
        assert request(srv, "/")[0] == 403 and request(srv, "/api/slides")[0] == 403
        assert request(srv, "/?token=wrong")[0] == 403
        status, headers, _ = request(srv, f"/?token={srv.token}")
        assert status == 200 and "HttpOnly" in headers["set-cookie"] and "SameSite=Strict" in headers["set-cookie"]
        cookie = headers["set-cookie"].split(";")[0]
        assert request(srv, f"/dzi/{SLIDE}_files/10/0_0.jpeg", headers={"Cookie": cookie})[0] == 200
        assert request(srv, "/api/slides", headers={"Cookie": "wsiengine_view_token=nope"})[0] == 403


def test_the_viewer_never_writes_into_the_results(view_results):
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in view_results.rglob("*")}
    with ViewServer(view_results, port=0) as srv:
        for path in ("/", "/api/slides", f"/api/slides/{SLIDE}", f"/regions/{SLIDE}.json", f"/thumbnail/{SLIDE}.png",
                     f"/heatmap/{SLIDE}/attention.png", f"/dzi/{SLIDE}_files/11/0_0.jpeg", "/api/patients/patient_a"):
            assert request(srv, path)[0] == 200
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in view_results.rglob("*")}
    assert after == before


def test_a_slow_tile_does_not_block_other_requests(view_results, monkeypatch):
    release, entered = threading.Event(), threading.Event()
    original = ReaderCache.tile

    def slow_tile(self, *args, **kwargs):
        entered.set()
        assert release.wait(30), "the test never released the tile"
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ReaderCache, "tile", slow_tile)
    with ViewServer(view_results, port=0) as srv:
        results: dict[str, int] = {}
        worker = threading.Thread(target=lambda: results.update(tile=request(srv, f"/dzi/{SLIDE}_files/10/0_0.jpeg")[0]))
        worker.start()
        assert entered.wait(30)
        # the tile is still being rendered: the page, the API and thumbnails answer meanwhile
        assert request(srv, "/api/slides")[0] == 200 and request(srv, f"/thumbnail/{SLIDE}.png")[0] == 200
        assert "tile" not in results
        release.set()
        worker.join(30)
        assert results["tile"] == 200


def test_reader_cache_stays_bounded_and_reopens_evicted_slides(cmu_small, tmp_path):
    from wsiengine.slide import open_slide

    paths = []
    for k in range(3):
        paths.append(tmp_path / f"s{k}.svs")
        paths[-1].symlink_to(cmu_small)
    opened: list[Path] = []
    cache = ReaderCache(max_open=2, opener=lambda p: (opened.append(p), open_slide(p, require_mpp=False))[1])
    for p in paths:
        assert cache.tile(p, 10, 0, 0).shape[2] == 3
    assert len(cache) == 2 and opened == paths
    cache.tile(paths[0], 10, 0, 0)  # evicted earlier: opened again, still two open
    assert len(cache) == 2 and opened == [*paths, paths[0]]
    cache.close()
    assert len(cache) == 0


def test_catalog_skips_unsafe_ids_and_links_out_of_the_folder(view_results, tmp_path):
    import shutil

    copy = tmp_path / "results"
    shutil.copytree(view_results, copy, symlinks=True)
    with (copy / "summary.csv").open("a", newline="") as fh:
        csv.writer(fh).writerow(["../../etc", "x", "failed", "", "", "", "", "", "", "bad"])
    outside = tmp_path / "outside.report.json"
    outside.write_text("{}")
    (copy / "linked.report.json").symlink_to(outside)
    catalog = Catalog.load(copy)
    assert "../../etc" not in catalog.slides and SLIDE in catalog.slides
    assert "linked" not in catalog.slides or catalog.slides["linked"].report_json is None


def test_view_command_prints_the_url_and_needs_a_results_folder(tmp_path, capsys):
    assert main(["view", str(tmp_path / "absent"), "--port", "0"]) == 2
    assert "not a results folder" in capsys.readouterr().err


def test_wsiengine_view_serves_until_stopped(view_results):
    import re
    import subprocess
    import sys
    import urllib.request

    process = subprocess.Popen([sys.executable, "-m", "wsiengine", "view", str(view_results), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, line
        with urllib.request.urlopen(match.group(0) + "api/slides", timeout=30) as response:
            assert response.status == 200 and SLIDE in response.read().decode()
        assert "2 slides" in line
    finally:
        process.terminate()
        process.wait(timeout=30)


class _OneLevelSlide:
    """A 16384 x 12288 slide stored with one level whose reads are recorded (and refused when huge)."""

    dimensions = (16384, 12288)
    level_downsamples = (1.0,)
    level_dimensions = ((16384, 12288),)

    def __init__(self) -> None:
        self.reads: list[tuple[int, int]] = []

    def read_region(self, location, level, size):
        self.reads.append(tuple(size))
        assert size[0] * size[1] <= 4096 * 4096, f"read {size} of the whole slide"
        return np.full((size[1], size[0], 3), 200, np.uint8)

    def close(self) -> None:
        pass


def test_zoomed_out_tiles_of_a_one_level_slide_come_from_the_overview(tmp_path):
    from wsiengine.view.tiles import Overview

    slide = _OneLevelSlide()
    cache = ReaderCache(opener=lambda path: slide)
    dz = cache.deepzoom(tmp_path / "x.tif")
    assert dz.max_level == 14
    # the stored thumbnail: 32 level-0 px per pixel, a left-to-right gradient
    gradient = np.broadcast_to(np.linspace(0, 255, 512).astype(np.uint8)[None, :, None], (384, 512, 3)).copy()
    overview = Overview(gradient, (32.0, 32.0))
    calls = []

    def give():
        calls.append(1)
        return overview

    whole = cache.tile(tmp_path / "x.tif", 7, 0, 0, overview=give)  # 1/128: the whole slide in one tile
    assert whole.shape == (96, 128, 3) and not slide.reads and calls
    assert cache.tile(tmp_path / "x.tif", 9, 1, 1, overview=give).shape == (131, 256, 3) and not slide.reads
    assert whole[:, 0].mean() < 10 and whole[:, -1].mean() > 245  # the overview's pixels
    near = cache.tile(tmp_path / "x.tif", 13, 1, 1, overview=give)  # 1/2: read from the slide
    assert near.shape == (256, 256, 3) and slide.reads == [(512, 512)]
    # between the two (1/16: a 16x shrink, but the overview is coarser than the tile): the slide
    mid = cache.tile(tmp_path / "x.tif", 10, 0, 0, overview=give)
    assert mid.shape == (255, 255, 3) and slide.reads[-1] == (4080, 4080)
