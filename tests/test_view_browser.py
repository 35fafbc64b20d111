"""wsiengine view in a real headless Chromium (Debian's ``chromium``, driven by Playwright): pages
load without console errors, the viewer shows tissue, the heatmap overlay toggles and changes the
pixels, a region click shows its measurements, evidence tiles pan the viewer.

``WSIENGINE_VIEW_SCREENSHOT=PATH`` also saves the slide page's screenshot there (the README's).
"""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from .test_view import SLIDE, request

pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install -e '.[test]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium); "
                                                         ".ci/run installs it")


@pytest.fixture(scope="module")
def server(view_results):
    from wsiengine.view import ViewServer

    with ViewServer(view_results, port=0) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.errors = []  # console errors and warnings, uncaught exceptions, failed requests
    page.responses = []
    page.on("console", lambda m: page.errors.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: page.errors.append(f"pageerror: {e}"))
    page.on("requestfailed", lambda r: page.errors.append(f"requestfailed: {r.url}"))
    page.on("response", lambda r: page.responses.append((r.url, r.status)))
    yield page
    context.close()


def pixels(locator) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB")).astype(np.int16)


def he_fraction(rgb: np.ndarray) -> float:
    """Share of pixels coloured like H&E tissue: pink to purple (red and blue above green)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return float(((r - g > 25) & (b - g > 10) & (r < 250)).mean())


def open_slide_page(page, server):
    page.goto(f"{server.url}slide/{SLIDE}")
    page.wait_for_selector("body[data-ready=true]", timeout=60_000)
    page.wait_for_function("window.wsiview && window.wsiview.heatmap !== null", timeout=30_000)
    page.wait_for_timeout(700)  # the opacity change and last tiles are drawn on the next frames


def test_index_lists_the_slides_sorts_and_shows_thumbnails(page, server):
    page.goto(server.url)
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)
    rows = page.locator("#slides tbody tr")
    assert rows.count() == 2
    thumb = page.locator(f"#slides tr[data-id='{SLIDE}'] img")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumb.element_handle())
    page.click("th[data-key=id]")
    first = [page.locator("#slides tbody tr").nth(i).get_attribute("data-id") for i in range(2)]
    page.click("th[data-key=id]")
    second = [page.locator("#slides tbody tr").nth(i).get_attribute("data-id") for i in range(2)]
    assert first == sorted(first) and second == first[::-1]
    assert page.locator("#patients a").inner_text() == "patient_a"
    assert page.errors == []


def test_slide_page_shows_tissue_and_the_heatmap_overlay_toggles(page, server):
    open_slide_page(page, server)
    viewer = page.locator("#viewer")
    with_heatmap = pixels(viewer)
    page.uncheck("#heatmap-toggle")
    page.wait_for_timeout(700)
    without = pixels(viewer)
    assert he_fraction(without) > 0.15  # the slide's tissue is on screen, in H&E colours
    change = np.abs(with_heatmap - without).mean()
    assert change > 3, change  # the overlay changes the picture ...
    assert he_fraction(with_heatmap) < he_fraction(without)  # ... by colouring the tissue
    page.check("#heatmap-toggle")
    page.fill("#heatmap-opacity", "100")
    page.dispatch_event("#heatmap-opacity", "input")
    page.wait_for_timeout(700)
    opaque = pixels(viewer)
    assert np.abs(opaque - without).mean() > change  # more opacity, more change
    urls = {u.split(str(server.port), 1)[1]: s for u, s in page.responses}
    assert any(u.startswith(f"/dzi/{SLIDE}_files/") and s == 200 for u, s in urls.items())
    assert urls[f"/heatmap/{SLIDE}/tile_scores.png"] == 200 and urls["/colorbar.png"] == 200
    report = page.locator("#panel").inner_text()
    data = json.loads(request(server, f"/api/slides/{SLIDE}")[2])
    assert data["report"]["category"]["name"] in report and "Research use only" in report
    assert f"{data['report']['deposits']['largest_mm']:.2f} mm" in report
    assert page.errors == []
    target = os.environ.get("WSIENGINE_VIEW_SCREENSHOT")
    if target:
        page.check("#heatmap-toggle")
        page.fill("#heatmap-opacity", "45")
        page.dispatch_event("#heatmap-opacity", "input")
        page.wait_for_timeout(700)
        page.screenshot(path=target)


def test_a_region_click_shows_its_measurements(page, server):
    open_slide_page(page, server)
    deposits = page.evaluate("window.wsiview.deposits")
    assert deposits
    for k in (0, len(deposits) - 1):
        point = page.evaluate(f"window.wsiview.imageToPage({deposits[k]['point'][0]}, {deposits[k]['point'][1]})")
        page.mouse.click(point["x"], point["y"])
        page.wait_for_selector("#region-info:not([hidden])")
        assert page.locator("#region-name").inner_text() == deposits[k]["name"]
        table = page.locator("#region-measurements").inner_text()
        for name, value in deposits[k]["measurements"].items():
            assert name in table and (f"{value:.4f}" if not float(value).is_integer() else f"{int(value)}") in table
        assert page.locator(f"svg.regions path.deposit.selected[data-index='{k}']").count() == 1
    page.uncheck("#regions-toggle")
    assert page.locator("svg.regions path.deposit").first.evaluate("el => getComputedStyle(el).display") == "none"
    assert page.errors == []


def test_an_evidence_tile_pans_the_viewer_to_it(page, server):
    open_slide_page(page, server)
    evidence = json.loads(request(server, f"/api/slides/{SLIDE}")[2])["report"]["evidence"]
    target = evidence[-1]
    page.click(f"#evidence button[data-rank='{target['rank']}']")
    page.wait_for_timeout(1200)
    centre = page.evaluate("(() => { const v = window.wsiview; const c = v.slideItem.viewportToImageCoordinates("
                           "v.viewer.viewport.getCenter(true)); return [c.x, c.y]; })()")
    assert abs(centre[0] - (target["x"] + target["width"] / 2)) < target["width"]
    assert abs(centre[1] - (target["y"] + target["height"] / 2)) < target["height"]
    assert page.locator(".evidence-box").count() == 1
    assert page.errors == []


def test_the_patient_page_lists_its_nodes(page, server):
    page.goto(f"{server.url}patient/patient_a")
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)
    assert page.locator("#nodes tbody tr").count() == 1
    assert page.locator(f"#nodes a[href='/slide/{SLIDE}']").count() == 1
    assert page.locator("#stage").inner_text().startswith("pN")
    assert page.errors == []


def test_traversal_from_the_browser_is_404(page, server):
    for path in ("slide/..%2f..%2fetc%2fpasswd", "static/..%2f..%2fcli.py", f"dzi/{SLIDE}_files/..%2f..%2f..%2fetc"):
        response = page.goto(server.url + path)
        assert response.status == 404 and "root:" not in page.content()
