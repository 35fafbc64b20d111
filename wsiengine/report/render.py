"""Findings -> words: the deterministic template narrative and the Markdown rendering.

Both read only the report document (:func:`wsiengine.report.make_report` builds it), so a
report JSON can be re-rendered anywhere.
"""

from __future__ import annotations

import re
from typing import Any

from .guard import DISCLAIMER

__all__ = ["template_narrative", "headline", "render_markdown", "escape_markdown"]

_CALL_TEXT = {"yes": "YES", "no": "NO", "indeterminate": "INDETERMINATE"}
#: How the template narrative names each QC flag.
FLAG_PHRASES = {
    "few_tiles": "few tissue tiles", "low_tissue": "little tissue", "mpp_user": "resolution given by the user",
    "mpp_tiff": "resolution from generic TIFF tags", "ood_embeddings": "tissue unlike the training data",
    "tiling_mismatch": "tiles unlike those of training", "evidence_unavailable": "evidence tiles unavailable",
    "no_prediction": "no slide prediction", "discordant_tiles": "discordant tile scores",
    "discordant_call": "deposits found although the slide probability is not above the threshold",
    "scattered_tiles": "scattered single-tile foci",
}


# Characters that start Markdown or HTML constructs inline; backslash-escaped (CommonMark and GFM).
_INLINE_SPECIALS = re.compile(r"([\\`*_\[\]<>!|~&])")
# Autolink triggers (GFM): a scheme's "://", "www." and e-mail "@"; escaping splits them.
_AUTOLINK = re.compile(r"(?<=[A-Za-z0-9])(:)(?=//)|(?<=\bwww)(\.)|(@)", re.I)
# A line that a block construct would take over: heading, list, quote, rule, setext.
_BLOCK_START = re.compile(r"^(\s*)([-+=>#]|\d+[.)])")


def escape_markdown(text: str) -> str:
    """``text`` as one paragraph of literal Markdown text: every character that could start an
    image, a link, an autolink, HTML, an entity, emphasis, code or a block construct is
    backslash-escaped and line breaks become spaces, so what renders is exactly the words."""
    text = " ".join(str(text).split())
    text = _INLINE_SPECIALS.sub(r"\\\1", text)
    text = _AUTOLINK.sub(lambda m: "\\" + m.group(0), text)
    return _BLOCK_START.sub(lambda m: m.group(1) + "\\" + m.group(2) if not m.group(2)[0].isdigit()
                            else m.group(1) + m.group(2)[:-1] + "\\" + m.group(2)[-1], text)


def _fmt(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _deposit_clause(deposits: dict[str, Any]) -> str:
    foci = int(deposits.get("foci") or 0)
    largest = deposits.get("largest_mm")
    if largest is None:
        return "no measurable deposit"
    return f"largest deposit {largest:.2f} mm, {foci} {'focus' if foci == 1 else 'foci'}"


def headline(findings: dict[str, Any]) -> str:
    """One line a reader takes in at a glance, e.g. ``Metastasis: YES - Micrometastasis
    (largest deposit 1.21 mm, 2 foci)``."""
    call = findings["metastasis"]["call"]
    cat = findings["category"]
    text = f"Metastasis: {_CALL_TEXT[call]}"
    if call == "yes":
        text += f" - {cat['name']} ({_deposit_clause(findings['deposits'])})"
    elif call == "indeterminate":
        text += " - review required"
    if cat.get("low_confidence") and call == "yes":
        text += " [low confidence]"
    return text


def template_narrative(findings: dict[str, Any]) -> str:
    """The default narrative: a few fixed sentences filled from the findings (deterministic,
    always available, and used whenever a VLM's narrative is rejected)."""
    m, cat, dep = findings["metastasis"], findings["category"], findings["deposits"]
    p, t = m.get("probability"), m.get("threshold")
    prob = f"slide probability {_fmt(p)}, threshold {_fmt(t)}" if p is not None else "no slide probability"
    sentences = []
    if m["call"] == "yes":
        sentences.append(f"Metastatic carcinoma is detected ({prob}).")
        if dep.get("largest_mm") is not None:
            foci = int(dep.get("foci") or 0)
            sentences.append(
                f"The largest deposit measures {dep['largest_mm']:.2f} mm ({foci} {'focus' if foci == 1 else 'foci'}), "
                f"in the {cat['name'].lower()} category ({cat['definition']}).")
        else:
            sentences.append("No deposit could be measured from the tile scores, so the size category is indeterminate.")
        if cat.get("low_confidence"):
            sentences.append("The size category is low-confidence because the size is close to a category boundary.")
    elif m["call"] == "no":
        sentences.append(f"No metastasis is detected ({prob}).")
    else:
        sentences.append(f"The result is indeterminate ({prob}); the slide needs review.")
    sentences.append(f"Extranodal extension is {findings.get('extranodal_extension', 'not assessed')}.")
    flags = findings.get("qc", {}).get("flags") or []
    if flags:
        sentences.append("Quality flags: " + "; ".join(FLAG_PHRASES.get(f["code"], f["code"].replace("_", " "))
                                                       for f in flags) + ".")
    return " ".join(sentences)


def _largest_text(call: str, dep: dict[str, Any]) -> str:
    if dep.get("largest_mm") is None:
        return "none measured"
    text = f"{dep['largest_mm']:.2f} mm"
    return text + " (tile regions only; the slide is called negative)" if call == "no" else text


def _table(rows: list[tuple[str, str]]) -> list[str]:
    out = ["| Finding | Value |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    return out


def render_markdown(report: dict[str, Any]) -> str:
    """The report document as Markdown: headline, narrative, findings table, QC flags,
    evidence tiles, thumbnail and heatmap, second opinion, provenance and the disclaimer.

    Image links are relative to the folder holding the ``.report.md`` file. The narrative (a
    model's words when accepted) is rendered as escaped text (:func:`escape_markdown`): no image,
    link or HTML in it can render.
    """
    f = report["findings"]
    m, cat, dep, qc = f["metastasis"], f["category"], f["deposits"], f["qc"]
    slide = report.get("slide") or {}
    narrative = report["narrative"]
    lines = [f"# Slide report: {slide.get('slide_id', '')}", "", f"> **{headline(f)}**", ">",
             f"> {DISCLAIMER}", "", escape_markdown(narrative["text"]), ""]
    if narrative["source"] == "vlm":
        lines += [f"*Narrative phrased by {narrative['vlm']['model']} from the findings below and checked against "
                  "them; the findings are authoritative.*", ""]
    elif narrative.get("vlm"):
        lines += [f"*Template narrative: the language model's text was not used "
                  f"({', '.join(narrative['vlm'].get('flags') or ['no reply'])}).*", ""]
    rows = [("Metastasis", f"**{m['call']}**"),
            ("Probability (threshold)", f"{_fmt(m.get('probability'), 3)} ({_fmt(m.get('threshold'), 3)})"),
            ("Category (AJCC/CAP)", f"{cat['name']} ({cat['definition']})" +
             (" - low confidence" if cat.get("low_confidence") else "")),
            ("Largest deposit", _largest_text(m["call"], dep)),
            ("Foci", str(dep.get("foci", 0)) + (" (discordant with the negative call)" if m["call"] == "no" and
                                                 dep.get("foci") else "")),
            ("Tumour area", f"{dep.get('total_area_mm2') or 0:.3f} mm²"),
            ("Extranodal extension", f.get("extranodal_extension", "not assessed")),
            ("Tissue tiles", f"{qc['n_tiles']} ({dep.get('tile_size_mm', 0):.3f} mm each)"),
            ("Tissue area", "n/a" if qc.get("tissue_area_mm2") is None else f"{qc['tissue_area_mm2']:.2f} mm²"),
            ("Resolution", f"{qc['mpp'][0]:.4f} µm/px ({qc.get('mpp_source') or 'unknown'})")]
    if qc.get("ood_fraction") is not None:
        rows.append(("Out-of-distribution tiles", f"{qc['ood_fraction']:.1%}"))
    lines += ["## Findings", ""] + _table(rows) + [""]
    if cat.get("note"):
        lines += [f"Note: {cat['note']}", ""]
    lines += ["## Quality control", ""]
    lines += [f"- **{fl['code']}**: {fl['message']}" for fl in qc["flags"]] or ["- No QC flags."]
    lines += [f"- **{code}**" for code in report.get("flags", [])]
    lines.append("")
    images = report.get("images") or {}
    if images.get("thumbnail") or images.get("heatmap"):
        lines += ["## Slide", ""]
        if images.get("thumbnail"):
            lines.append(f"![Thumbnail with evidence tiles numbered]({images['thumbnail']})")
        if images.get("heatmap"):
            lines.append(f"![Tumour probability heatmap]({images['heatmap']})")
        lines.append("")
    if f["evidence"]:
        lines += ["## Evidence tiles", "", "Tiles of highest attention (level-0 pixel coordinates).", "",
                  "| # | Tile | x, y (px) | Attention (relative) | Tumour score |", "|---|---|---|---|---|"]
        for e in f["evidence"]:
            img = f"![tile {e['rank']}]({e['image']})" if e.get("image") else "not available"
            lines.append(f"| {e['rank']} | {img} | {e['x']}, {e['y']} | {_fmt(e.get('attention_relative'))} | "
                         f"{_fmt(e.get('tile_score'), 3)} |")
        lines.append("")
    so = f.get("second_opinion")
    if so:
        lines += ["## Few-shot second opinion", "",
                  f"A {so['method']} classifier on {so['n_bank']} labelled bank tiles ({so['bank']}) labels the "
                  f"evidence tiles; it agrees with the MIL tile scores on {so['n_agree']} of {len(so['tiles'])} "
                  f"({so['agreement']:.0%}).", "",
                  "| # | Few-shot | p(tumour) | MIL tile | Agree |", "|---|---|---|---|---|"]
        for t in so["tiles"]:
            lines.append(f"| {t['rank']} | {t['fewshot_label']} | {_fmt(t['fewshot_probability'])} | {t['mil_label']} | "
                         f"{'yes' if t['agree'] else '**no**'} |")
        lines.append("")
    prov = report.get("provenance") or {}
    lines += ["## Provenance", ""]
    for key in ("engine_version", "created", "encoder", "mil", "config_key", "store"):
        if prov.get(key) is not None:
            value = prov[key]
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items() if v is not None)
            lines.append(f"- {key}: {value}")
    lines += ["", "---", f"*{DISCLAIMER}*", ""]
    return "\n".join(lines)
