/* wsiengine view: helpers shared by the pages. Data from the server is only ever written with
   textContent / attributes, never as HTML. */
"use strict";
const wsi = {
  el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined) node.setAttribute(k, v);
    }
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  },
  fmt(value, digits) {
    if (value === null || value === undefined || Number.isNaN(value)) return "-";
    return typeof value === "number" ? value.toFixed(digits === undefined ? 3 : digits) : String(value);
  },
  async json(url) {
    const response = await fetch(url, { credentials: "same-origin" });
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    return response.json();
  },
  pathId() {
    return decodeURIComponent(window.location.pathname.split("/").filter(Boolean).pop() || "");
  },
};
