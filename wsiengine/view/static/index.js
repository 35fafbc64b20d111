/* wsiengine view: the index of slides (sortable) and patients. */
"use strict";
(async function () {
  const body = document.querySelector("#slides tbody");
  const data = await wsi.json("/api/slides");
  let rows = data.slides;
  document.getElementById("count").textContent =
    `${rows.length} slide${rows.length === 1 ? "" : "s"}; click a column to sort, a slide to open it.`;

  function render() {
    body.replaceChildren();
    for (const s of rows) {
      const tr = wsi.el("tr", { "data-id": s.id });
      const thumb = wsi.el("td", { class: "thumb" });
      if (s.has_store) thumb.append(wsi.el("img", { src: `/thumbnail/${encodeURIComponent(s.id)}.png`, alt: `Thumbnail of ${s.id}`, loading: "lazy" }));
      tr.append(thumb);
      const name = wsi.el("td");
      if (s.has_store) name.append(wsi.el("a", { href: `/slide/${encodeURIComponent(s.id)}` }, s.id));
      else name.textContent = s.id;
      tr.append(name);
      tr.append(wsi.el("td", { class: `status-${s.status}`, title: s.error || null }, s.status));
      tr.append(wsi.el("td", {}, s.call || s.label || "-"));
      tr.append(wsi.el("td", { class: "num" }, wsi.fmt(s.probability, 3)));
      tr.append(wsi.el("td", { class: `category-${s.category}` }, s.category || "-"));
      tr.append(wsi.el("td", { class: "num" }, wsi.fmt(s.largest_mm, 2)));
      const flags = wsi.el("td");
      for (const f of s.flags) flags.append(wsi.el("span", { class: "flag" }, f));
      tr.append(flags);
      body.append(tr);
    }
  }

  function sortBy(th) {
    const key = th.dataset.key, numeric = th.dataset.type === "number";
    const ascending = !th.classList.contains("sorted-asc");
    document.querySelectorAll("#slides th").forEach((h) => h.classList.remove("sorted-asc", "sorted-desc"));
    th.classList.add(ascending ? "sorted-asc" : "sorted-desc");
    const value = (s) => (key === "flags" ? s.flags.join(",") : s[key]);
    rows = [...rows].sort((a, b) => {
      const x = value(a), y = value(b);
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      const order = numeric ? x - y : String(x).localeCompare(String(y));
      return ascending ? order : -order;
    });
    render();
  }

  document.querySelectorAll("#slides th[data-key]").forEach((th) => {
    th.addEventListener("click", () => sortBy(th));
    th.addEventListener("keydown", (e) => { if (e.key === "Enter") sortBy(th); });
  });
  render();
  if (data.patients.length) {
    const section = document.getElementById("patients");
    section.hidden = false;
    const list = section.querySelector("ul");
    for (const p of data.patients) {
      const li = wsi.el("li");
      li.append(wsi.el("a", { href: `/patient/${encodeURIComponent(p)}` }, p));
      list.append(li);
    }
  }
  document.body.dataset.ready = "true";
})();
