/* wsiengine view: one slide in OpenSeadragon with its heatmap, regions, report and evidence.
   window.wsiview exposes the viewer and a coordinate helper for tests. */
"use strict";
(async function () {
  const SVG = "http://www.w3.org/2000/svg";
  const id = wsi.pathId();
  const d = await wsi.json(`/api/slides/${encodeURIComponent(id)}`);
  const state = { viewer: null, heatmap: null, width: null, height: null, deposits: [], ready: false };
  window.wsiview = state;
  document.title = `wsiengine: ${d.id}`;
  document.getElementById("title").textContent = d.id;
  renderReport(d);
  const regions = await wsi.json(`/regions/${encodeURIComponent(id)}.json`);
  state.deposits = regions.deposits;

  if (!d.slide || !d.slide.dzi) {
    document.getElementById("no-slide").hidden = false;
    document.getElementById("viewer").hidden = true;
    document.body.dataset.ready = "true";
    return;
  }

  const viewer = OpenSeadragon({
    id: "viewer",
    prefixUrl: "/static/vendor/openseadragon/images/",
    tileSources: d.slide.dzi,
    showNavigator: true,
    navigatorPosition: "BOTTOM_RIGHT",
    drawer: "canvas",
    crossOriginPolicy: false,
    gestureSettingsMouse: { clickToZoom: false },
    animationTime: 0.4,
    maxZoomPixelRatio: 2,
    maxTilesPerFrame: 6, // OpenSeadragon asks for one new tile per frame by default: slow first screens
    imageLoaderLimit: 8,
  });
  state.viewer = viewer;

  state.imageToPage = function (x, y) {
    const point = state.slideItem.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
    const box = viewer.element.getBoundingClientRect();
    return { x: box.left + point.x, y: box.top + point.y };
  };

  viewer.addOnceHandler("open", () => {
    state.slideItem = viewer.world.getItemAt(0);
    const size = state.slideItem.getContentSize();
    state.width = size.x;
    state.height = size.y;
    addRegions(size.x, size.y);
    setUpHeatmaps(size.x);
    viewer.addHandler("canvas-click", onClick);
    const markReady = () => {
      if (state.slideItem.getFullyLoaded()) {
        state.ready = true;
        document.body.dataset.ready = "true";
      }
    };
    state.slideItem.addHandler("fully-loaded-change", markReady);
    markReady();
  });
  viewer.addHandler("open-failed", (e) => {
    document.getElementById("no-slide").hidden = false;
    document.getElementById("no-slide").textContent = `The slide could not be shown: ${e.message}`;
    document.body.dataset.ready = "true";
  });

  function setUpHeatmaps(width) {
    const select = document.getElementById("heatmap-name");
    const toggle = document.getElementById("heatmap-toggle");
    const opacity = document.getElementById("heatmap-opacity");
    if (!d.heatmaps.length) {
      toggle.disabled = true;
      select.disabled = true;
      return;
    }
    const preferred = d.heatmaps.find((h) => h.name === "tile_scores") || d.heatmaps[0];
    for (const h of d.heatmaps) {
      const option = wsi.el("option", { value: h.name }, h.name === "tile_scores" ? "tumour probability" : h.name);
      if (h === preferred) option.selected = true;
      select.append(option);
    }
    const level = () => (toggle.checked ? Number(opacity.value) / 100 : 0);
    function show(name) {
      const h = d.heatmaps.find((x) => x.name === name);
      if (state.heatmap) viewer.world.removeItem(state.heatmap);
      state.heatmap = null;
      viewer.addTiledImage({
        tileSource: { type: "image", url: h.url, buildPyramid: false },
        x: h.bounds[0] / width, y: h.bounds[1] / width, width: h.bounds[2] / width,
        opacity: level(), index: 1, compositeOperation: "source-over",
        success: (e) => {
          state.heatmap = e.item;
          state.heatmap.setOpacity(level());
          if (e.item.source && e.item.source.levels) e.item.imageSmoothingEnabled = false;
        },
      });
    }
    toggle.addEventListener("change", () => state.heatmap && state.heatmap.setOpacity(level()));
    opacity.addEventListener("input", () => state.heatmap && state.heatmap.setOpacity(level()));
    select.addEventListener("change", () => show(select.value));
    show(preferred.name);
  }

  function pathData(rings) {
    return rings.map((r) => "M" + r.map((p) => `${p[0]} ${p[1]}`).join("L") + "Z").join("");
  }

  function addRegions(width, height) {
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "regions");
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("width", "100%");
    svg.setAttribute("height", "100%");
    for (const t of regions.tissue) {
      const path = document.createElementNS(SVG, "path");
      path.setAttribute("class", "tissue");
      path.setAttribute("d", pathData(t.rings));
      svg.append(path);
    }
    regions.deposits.forEach((dep, k) => {
      const path = document.createElementNS(SVG, "path");
      path.setAttribute("class", "deposit");
      path.setAttribute("data-index", String(k));
      path.setAttribute("d", pathData(dep.rings));
      svg.append(path);
    });
    viewer.addOverlay({ element: svg, location: new OpenSeadragon.Rect(0, 0, 1, height / width) });
    const regionsToggle = document.getElementById("regions-toggle");
    const tissueToggle = document.getElementById("tissue-toggle");
    regionsToggle.addEventListener("change", () => svg.classList.toggle("hidden-deposits", !regionsToggle.checked));
    tissueToggle.addEventListener("change", () => svg.classList.toggle("hidden-tissue", !tissueToggle.checked));
    state.svg = svg;
  }

  function inside(point, rings) {
    let hit = false; // even-odd over every ring: holes count
    for (const ring of rings) {
      for (let i = 0, j = ring.length - 1; i < ring.length; j = i++) {
        const [xi, yi] = ring[i], [xj, yj] = ring[j];
        if ((yi > point.y) !== (yj > point.y) && point.x < ((xj - xi) * (point.y - yi)) / (yj - yi) + xi) hit = !hit;
      }
    }
    return hit;
  }

  function onClick(event) {
    if (!event.quick || !document.getElementById("regions-toggle").checked) return;
    const p = state.slideItem.viewerElementToImageCoordinates(event.position);
    const k = state.deposits.findIndex((dep) => inside(p, dep.rings));
    state.svg.querySelectorAll("path.deposit").forEach((el) => el.classList.toggle("selected", Number(el.dataset.index) === k));
    if (k < 0) return;
    showRegion(state.deposits[k]);
  }

  function showRegion(dep) {
    const box = document.getElementById("region-info");
    box.hidden = false;
    document.getElementById("region-name").textContent = dep.name;
    const body = document.querySelector("#region-measurements tbody");
    body.replaceChildren();
    for (const [k, v] of Object.entries(dep.measurements)) {
      const tr = wsi.el("tr");
      tr.append(wsi.el("th", {}, k), wsi.el("td", { class: "num" }, wsi.fmt(v, Number.isInteger(v) ? 0 : 4)));
      body.append(tr);
    }
  }

  function renderReport(data) {
    const r = data.report;
    const findings = document.querySelector("#findings tbody");
    const row = (k, v) => {
      const tr = wsi.el("tr");
      tr.append(wsi.el("th", {}, k), wsi.el("td", {}, v));
      findings.append(tr);
    };
    if (!r) {
      document.getElementById("narrative").textContent = "No report for this slide.";
      return;
    }
    const m = r.metastasis || {}, c = r.category || {}, dep = r.deposits || {};
    document.getElementById("headline").textContent =
      `Metastasis: ${String(m.call || "-").toUpperCase()}${c.name ? " - " + c.name : ""}${c.low_confidence ? " (low confidence)" : ""}`;
    document.getElementById("narrative").textContent = r.narrative;
    row("Call", `${m.call || "-"} (slide probability ${wsi.fmt(m.probability, 3)}, threshold ${wsi.fmt(m.threshold, 3)})`);
    row("Category", `${c.name || "-"}${c.low_confidence ? " (low confidence)" : ""}`);
    const size = dep.largest_mm === null || dep.largest_mm === undefined ? "-"
      : `${wsi.fmt(dep.largest_mm, 2)} mm` + (dep.size_uncertainty_mm ? ` ± ${wsi.fmt(dep.size_uncertainty_mm, 2)} mm` : "");
    row("Largest deposit", size);
    row("Foci", dep.foci === null || dep.foci === undefined ? "-" : String(dep.foci));
    row("Tumour area", dep.total_area_mm2 === null || dep.total_area_mm2 === undefined ? "-" : `${wsi.fmt(dep.total_area_mm2, 3)} mm²`);
    row("Extranodal extension", r.extranodal_extension || "-");
    if (c.note) row("Note", c.note);
    const flags = document.getElementById("flags");
    if (!r.flags.length) flags.append(wsi.el("li", {}, "none"));
    for (const f of r.flags) flags.append(wsi.el("li", { "data-code": f.code }, `${f.code}: ${f.message}`));
    document.getElementById("disclaimer").textContent = r.disclaimer;
    const evidence = document.getElementById("evidence");
    for (const e of r.evidence) {
      const button = wsi.el("button", { type: "button", "data-rank": String(e.rank),
        title: `Evidence ${e.rank}: tile score ${wsi.fmt(e.tile_score, 3)} at (${e.x}, ${e.y})` });
      if (e.image) button.append(wsi.el("img", { src: e.image, alt: `Evidence tile ${e.rank}` }));
      else button.append(wsi.el("span", { class: "no-image" }, `#${e.rank}`));
      button.addEventListener("click", () => goTo(e));
      evidence.append(button);
    }
  }

  function goTo(e) {
    const viewer = state.viewer;
    if (!viewer || !state.width) return;
    const margin = 2;
    const rect = state.slideItem.imageToViewportRectangle(e.x - margin * e.width, e.y - margin * e.height,
      (2 * margin + 1) * e.width, (2 * margin + 1) * e.height);
    viewer.viewport.fitBounds(rect);
    if (state.evidenceBox) viewer.removeOverlay(state.evidenceBox);
    state.evidenceBox = wsi.el("div", { class: "evidence-box" });
    viewer.addOverlay({ element: state.evidenceBox, location: state.slideItem.imageToViewportRectangle(e.x, e.y, e.width, e.height) });
    state.lastEvidence = e.rank;
  }
})();
