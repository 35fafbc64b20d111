/* wsiengine view: one patient's nodes and pN stage. */
"use strict";
(async function () {
  const id = wsi.pathId();
  const p = await wsi.json(`/api/patients/${encodeURIComponent(id)}`);
  document.title = `wsiengine: patient ${p.patient_id}`;
  document.getElementById("title").textContent = `Patient ${p.patient_id}`;
  document.getElementById("stage").textContent = p.pn_stage;
  document.getElementById("summary").textContent =
    `${p.n_nodes} nodes: ${p.n_positive} positive (${p.n_macro} macro, ${p.n_micro} micro), ${p.n_itc} with ITC only.`;
  const uncertain = new Set(p.uncertain || []);
  const body = document.querySelector("#nodes tbody");
  for (const n of p.nodes) {
    const tr = wsi.el("tr");
    const name = wsi.el("td");
    if (n.link) name.append(wsi.el("a", { href: n.link }, n.slide_id)); else name.textContent = n.slide_id;
    tr.append(name);
    tr.append(wsi.el("td", { class: `category-${n.category}` }, n.category));
    tr.append(wsi.el("td", { class: "num" }, wsi.fmt(n.largest_mm, 2)));
    tr.append(wsi.el("td", { class: "num" }, n.foci === null || n.foci === undefined ? "-" : n.foci));
    tr.append(wsi.el("td", { class: "num" }, wsi.fmt(n.probability, 3)));
    tr.append(wsi.el("td", {}, uncertain.has(n.slide_id) || n.low_confidence ? "review" : ""));
    body.append(tr);
  }
  if (p.missing && p.missing.length) {
    const m = document.getElementById("missing");
    m.hidden = false;
    m.textContent = `Incomplete: no result for ${p.missing.join(", ")}; the stage is not given.`;
  }
  document.getElementById("disclaimer").textContent = p.disclaimer || "";
  document.body.dataset.ready = "true";
})();
