"""Slide reports: findings computed by code, a template narrative, optionally phrased by a VLM.

>>> rep = make_report("results/x.zarr")                       # results/x.report.json, .md, x.report/
>>> rep.document["findings"]["category"]["code"]              # 'micrometastasis'
>>> make_report("results/x.zarr", vlm=VLMConfig(vlm_url="http://127.0.0.1:8080/v1", vlm_model="qwen2.5-vl"))

The findings (metastasis call, AJCC/CAP category, deposits, evidence tiles, QC flags) are the
report's truth. A language model only phrases them; its text is checked against the findings
(:func:`~wsiengine.report.guard.check_narrative`) and replaced by the template when it
contradicts them, gives treatment advice or fails. A fixed disclaimer is always added. Label
and macro images are never read, sent or written.

Files written next to the store (``OUT/``)::

    SLIDE_ID.report.json      the document (schema: wsiengine/report/schema.json)
    SLIDE_ID.report.md        the same as Markdown, with the images below
    SLIDE_ID.report/          thumbnail.png (evidence tiles numbered), heatmap.png, evidence-NN.png
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..atomic import replace_directory
from ..config import ReportConfig, VLMConfig
from ..errors import ReportError
from .findings import CATEGORIES, build_findings, metastasis_call, size_category
from .guard import DISCLAIMER
from .images import evidence_images, heatmap_image, open_slide_for_evidence, save_png, thumbnail_image
from .render import headline, render_markdown, template_narrative
from .second_opinion import TileBank, second_opinion

if TYPE_CHECKING:  # pragma: no cover
    from ..deposits import DepositMap
    from ..encode import Encoder
    from .vlm import VLMClient
    from ..ood import EmbeddingReference
    from ..slide import Slide
    from ..store import ResultStore

__all__ = ["make_report", "Report", "report_key", "validate_report", "load_schema", "build_findings",
           "metastasis_call", "size_category", "CATEGORIES", "template_narrative", "render_markdown", "headline",
           "TileBank", "second_opinion", "DISCLAIMER", "REPORT_FORMAT", "REPORT_SCHEMA_VERSION"]

logger = logging.getLogger("wsiengine")

REPORT_FORMAT = "wsiengine.report"
REPORT_SCHEMA_VERSION = 1


@dataclass(frozen=True, eq=False)
class Report:
    """A slide report: the ``document`` (JSON-ready dict) and, when written, its files."""

    document: dict[str, Any]
    json_path: Path | None = None
    markdown_path: Path | None = None
    assets: Path | None = None

    @property
    def findings(self) -> dict[str, Any]:
        return self.document["findings"]

    @property
    def narrative(self) -> str:
        return self.document["narrative"]["text"]

    def to_markdown(self) -> str:
        return render_markdown(self.document)


def report_key(config: ReportConfig, vlm: VLMConfig | None = None, tile_bank: str | os.PathLike[str] | None = None,
               reference: str | None = None) -> str:
    """A hash of what changes a report (its config, the VLM endpoint and model, the tile bank,
    the embedding reference); ``wsiengine run`` rewrites a report whose key differs."""
    payload = {"config": config.to_dict(), "format": REPORT_SCHEMA_VERSION, "reference": reference,
               "vlm": None if vlm is None or not vlm.enabled else
               {k: v for k, v in vlm.to_dict().items() if k not in ("vlm_api_key_env", "vlm_timeout_s", "vlm_retries")},
               "bank": None if tile_bank is None else _file_key(Path(tile_bank))}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _file_key(p: Path) -> str:
    if p.is_dir():
        return ";".join(f"{f.relative_to(p)}:{f.stat().st_size}" for f in sorted(p.rglob("*")) if f.is_file())
    return f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" if p.exists() else str(p)


def load_schema() -> dict[str, Any]:
    """The report document's JSON Schema (draft 2020-12)."""
    from importlib import resources

    return json.loads(resources.files("wsiengine.report").joinpath("schema.json").read_text(encoding="utf-8"))


def validate_report(document: dict[str, Any]) -> None:
    """Check a report document against :func:`load_schema`; raises ``ReportError`` listing the
    first problems. Needs ``jsonschema`` (``pip install wsiengine[report]``)."""
    try:
        import jsonschema
    except ImportError as exc:  # pragma: no cover - jsonschema is in [report] and [test]
        raise ReportError("validating reports needs jsonschema: pip install 'wsiengine[report]'") from exc
    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors[:10]]
        raise ReportError("the report does not match its schema:\n  " + "\n  ".join(lines))


def _load_reference(store: "ResultStore") -> "EmbeddingReference | None":
    """The embedding reference of the store's MIL head (``reference.npz`` in its folder), if any,
    read without loading the head's ONNX session."""
    from ..aggregate import REFERENCE_NAME, default_head_path
    from ..ood import EmbeddingReference

    mil = store.mil or {}
    folders = [Path(mil["path"])] if mil.get("path") else []
    if mil.get("name") == "default":
        folders.append(default_head_path())
    for folder in folders:
        if (folder / REFERENCE_NAME).is_file():
            return EmbeddingReference.load(folder / REFERENCE_NAME)
    return None


def make_report(store: "str | os.PathLike[str] | ResultStore", out_dir: str | os.PathLike[str] | None = None, *,
                config: ReportConfig | None = None, vlm: "VLMConfig | VLMClient | None" = None,
                slide: "Slide | str | os.PathLike[str] | None" = None,
                reference: "EmbeddingReference | str | None" = "auto",
                tile_bank: TileBank | str | os.PathLike[str] | None = None, encoder: "Encoder | None" = None,
                slide_id: str | None = None, write: bool = True, key: str | None = None,
                tile_threshold: float | None = None, deposits: "DepositMap | None" = None) -> Report:
    """Make a slide's report from its result store.

    Parameters
    ----------
    store : path or ResultStore
        ``SLIDE_ID.zarr`` from ``wsiengine run`` / :class:`~wsiengine.Pipeline`.
    out_dir : path, optional
        Where the report files go (default: the store's folder).
    config : ReportConfig, optional
        Default: the run configuration's (:meth:`wsiengine.config.RunConfig.load`: TOML file,
        ``WSIENGINE_*`` environment, :func:`~wsiengine.config.set_defaults`).
    vlm : VLMConfig or VLMClient, optional
        An OpenAI-compatible endpoint to phrase the narrative (default: the run configuration's:
        none, or ``WSIENGINE_VLM_URL``/``WSIENGINE_VLM_MODEL``). Non-loopback URLs need ``allow_remote``.
        A client is reused (it remembers a text-only server).
    slide : Slide or path, optional
        The slide for the evidence PNGs (default: the recorded path, if it is still the same file).
    reference : EmbeddingReference, "auto" or None
        Training embeddings for the OOD flag; "auto" takes the MIL head's ``reference.npz``.
    tile_bank : TileBank or path, optional
        Labelled tiles for the few-shot second opinion (an ``.npz`` or a folder of class folders;
        a folder needs ``encoder``); default ``config.tile_bank``.
    slide_id : str, optional
        Names the files; one file name, no folders (default: the store's recorded id when it is a
        safe file name, else the store folder's name without ``.zarr``: a store may come from anyone).
    write : bool
        False builds the document without writing files or evidence PNGs.
    key : str, optional
        The report key to record (default: :func:`report_key` of these settings).
    tile_threshold : float, optional
        Tile score at or above which tiles form deposits (default: the one the store's run used).
    deposits : DepositMap, optional
        The deposits already found from this store's tile scores with its rules (the pipeline
        passes the ones it wrote into the store, so they are found once).

    Raises
    ------
    ReportError
        The store cannot support a report (no resolution recorded), the files cannot be written,
        ``slide_id`` is not one file name, or ``SLIDE_ID.report/`` exists and is not a report
        folder wsiengine wrote (it is never deleted).
    RemoteEndpointError
        ``vlm`` points off this machine without ``allow_remote``.
    """
    from ..store import ResultStore, open_result

    if config is None or vlm is None:  # an entry point: the run configuration, resolved once here
        from ..config import RunConfig

        run_config = RunConfig.load()
        config = config or run_config.report
        vlm = vlm if vlm is not None else run_config.vlm
    if tile_bank is None:
        tile_bank = config.tile_bank
    client = None
    if not isinstance(vlm, VLMConfig):  # a VLMClient, reused
        client, vlm = vlm, vlm.config
    else:
        if vlm.enabled:
            from .vlm import VLMClient

            client = VLMClient(vlm)  # refuses remote endpoints before any work
    result = store if isinstance(store, ResultStore) else open_result(store)
    sid = _report_id(result, slide_id)
    out = Path(out_dir) if out_dir is not None else Path(str(result.path)).parent
    if reference == "auto":
        reference = _load_reference(result)
    elif isinstance(reference, (str, os.PathLike)):
        from ..ood import EmbeddingReference

        reference = EmbeddingReference.load(reference)
    findings = build_findings(result, config=config, reference=reference, tile_threshold=tile_threshold,
                              deposits=deposits)
    evidence = findings["evidence"]
    report_flags: list[str] = []

    if tile_bank is not None and evidence:
        bank = tile_bank if isinstance(tile_bank, TileBank) else TileBank.open(tile_bank, encoder)
        rows = np.array([e["tile_index"] for e in evidence])
        order = np.argsort(rows)
        feats = np.empty((len(rows), result.group["features"].shape[1]), np.float32)
        feats[order] = np.asarray(result.group["features"].get_orthogonal_selection((rows[order], slice(None))))
        scores = result.tile_scores
        findings["second_opinion"] = second_opinion(
            bank, feats, None if scores is None else scores[rows],
            tile_threshold=findings["deposits"]["tile_threshold"], ranks=[e["rank"] for e in evidence],
            encoder_sha256=result.encoder.get("sha256"),
            positive_names=(result.mil or {}).get("class_names", [])[1:])

    tmp = out / f".{sid}.report.partial-{os.getpid()}"
    assets_name = f"{sid}.report"
    images: dict[str, Any] = {"thumbnail": None, "heatmap": None, "evidence": []}
    evidence_paths: list[Path] = []
    try:
        if write:
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "assets").mkdir(parents=True)
            slide_obj, opened, why = open_slide_for_evidence(result, slide) if evidence else (None, False, None)
            try:
                if slide_obj is not None:
                    evidence_paths = evidence_images(slide_obj, result, evidence, tmp / "assets", config)
                    for e, p in zip(evidence, evidence_paths):
                        e["image"] = f"{assets_name}/{p.name}"
                    images["evidence"] = [e["image"] for e in evidence]
                elif why:
                    findings["qc"]["flags"].append({"code": "evidence_unavailable",
                                                    "message": f"Evidence tile images not made: {why}."})
            finally:
                if opened:
                    slide_obj.close()
            for name, image in (("thumbnail", thumbnail_image(result, evidence)), ("heatmap", heatmap_image(result))):
                if image is not None:
                    save_png(tmp / "assets" / f"{name}.png", image)
                    images[name] = f"{assets_name}/{name}.png"

        narrative = {"text": template_narrative(findings), "source": "template", "vlm": None}
        if client is not None:
            info = result.slide
            recorded = result.attrs.get("slide_id")
            forbidden = [s for s in (sid, recorded if isinstance(recorded, str) else None, info.get("name"),
                                     Path(info.get("path") or "").stem) if s]
            narration = client.narrate(findings, images=[tmp / "assets" / Path(p).name for p in images["evidence"]],
                                       forbidden_strings=forbidden)
            narrative["vlm"] = narration.to_dict()
            if narration.accepted and narration.text:
                narrative.update(text=narration.text, source="vlm")
            report_flags += [f for f in narration.flags if f not in report_flags]
            if not narration.accepted and "vlm_rejected" not in report_flags:
                report_flags.append("vlm_rejected")
        if key is None:
            bank_path = tile_bank.source if isinstance(tile_bank, TileBank) else tile_bank
            key = report_key(config, vlm, bank_path, getattr(reference, "source", None) if reference is not None else None)
        document = _document(result, sid, findings, narrative, report_flags, images, key)
        if not write:
            return Report(document)
        (tmp / "report.md").write_text(render_markdown(document), encoding="utf-8")
        (tmp / "report.json").write_text(json.dumps(document, indent=1, allow_nan=False), encoding="utf-8")
        paths = _publish(tmp, out, sid)
        logger.info("%s: report %s (%s)", sid, paths[0].name, headline(findings))
        return Report(document, *paths)
    except OSError as exc:
        raise ReportError(f"cannot write the report of '{sid}' into '{out}': {exc}. Check the disk has space.") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _document(result: "ResultStore", sid: str, findings: dict[str, Any], narrative: dict[str, Any],
              flags: list[str], images: dict[str, Any], key: str) -> dict[str, Any]:
    from ..store import engine_version

    info, mil, enc = result.slide, result.mil or {}, result.encoder
    return {
        "format": REPORT_FORMAT,
        "schema_version": REPORT_SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "slide": {"slide_id": sid, "name": info.get("name") or Path(info.get("path") or "").name,
                  "dimensions": info.get("dimensions"), "mpp": info.get("mpp"), "mpp_source": info.get("mpp_source"),
                  "vendor": info.get("vendor")},
        "findings": findings,
        "narrative": narrative,
        "flags": flags,
        "images": images,
        "provenance": {
            "engine_version": engine_version(),
            "store": f"{sid}.zarr",
            "store_created": result.attrs.get("created"),
            "config_key": result.attrs.get("config_key"),
            "encoder": {"name": (enc.get("spec") or {}).get("name"), "sha256": enc.get("sha256")},
            "mil": {k: mil.get(k) for k in ("name", "model", "sha256", "threshold")} if mil else None,
            "report_key": key,
        },
        "disclaimer": DISCLAIMER,
    }


#: Longest report id, in UTF-8 bytes: with ``.{id}.report.partial-PID`` it stays under the usual 255-byte name limit.
_MAX_ID_BYTES = 200
#: The files an assets folder of ours holds; a folder with anything else was not written by wsiengine.
_ASSET_NAME = re.compile(r"(thumbnail|heatmap|evidence-\d+)\.png")


def _unsafe_component(name: object, *, strict: bool) -> str | None:
    """Why ``name`` cannot name report files in the output folder (None when it can).

    Always: a non-empty string that is one path component (no ``/`` or other separator of this
    system, not ``.`` or ``..``, no NUL). ``strict`` (ids read from a store, which may come from
    anyone) also refuses ``\\``, a leading dot, control or other non-printable characters and
    names over :data:`_MAX_ID_BYTES` bytes.
    """
    if not isinstance(name, str):
        return "it is not text"
    if not name:
        return "it is empty"
    if "/" in name or os.sep in name or (os.altsep and os.altsep in name) or (strict and "\\" in name):
        return "it contains a path separator"
    if name in (".", "..") or "\0" in name:
        return "it is not a file name"
    if strict:
        if name.startswith("."):
            return "it starts with a dot"
        if not name.isprintable():
            return "it contains control characters"
        if len(name.encode("utf-8", "surrogateescape")) > _MAX_ID_BYTES:
            return f"it is longer than {_MAX_ID_BYTES} bytes"
    return None


def _report_id(result: "ResultStore", slide_id: str | None) -> str:
    """The id the report files are named by: ``slide_id`` if given (refused when it is not one
    file name), else the store's recorded id when it is a safe file name, else the store folder's
    own name without ``.zarr`` (made safe). A recorded id is untrusted input: a received store
    must never name files outside the output folder, hidden files or another path."""
    if slide_id:
        why = _unsafe_component(slide_id, strict=False)
        if why:
            raise ReportError(f"cannot name report files by slide_id {slide_id!r}: {why}. "
                              "Pass a plain file name (no folders).")
        return slide_id
    folder = Path(str(result.path).rstrip("/\\")).name
    recorded = result.attrs.get("slide_id")
    if recorded is not None:
        why = _unsafe_component(recorded, strict=True)
        if why is None:
            return recorded
        logger.warning("%s: the recorded slide_id %s is not a safe file name (%s); the report is named "
                       "after the store folder", ascii(folder), ascii(recorded), why)
    name = folder[: -len(".zarr")] if folder.lower().endswith(".zarr") else folder
    name = "".join(ch if ch.isprintable() and ch not in "/\\" else "_" for ch in name).lstrip(".")
    while len(name.encode("utf-8", "surrogateescape")) > _MAX_ID_BYTES:
        name = name[:-1]
    return name or "slide"


def _check_replaceable(assets: Path) -> None:
    """Refuse to replace ``assets`` unless it is a report assets folder wsiengine wrote: a real
    folder (not a link) holding only regular files named like ours (``thumbnail.png``,
    ``heatmap.png``, ``evidence-NN.png``). Anything else may be the user's; it is never deleted."""
    if not os.path.lexists(assets):
        return
    why = None
    if assets.is_symlink() or not assets.is_dir():
        why = "it is not a folder" if not assets.is_symlink() else "it is a link"
    else:
        with os.scandir(assets) as entries:
            for entry in entries:
                if not _ASSET_NAME.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
                    why = f"it holds {entry.name!r}, which wsiengine does not write"
                    break
    if why:
        raise ReportError(f"cannot write the report: '{assets}' already exists and is not a report folder "
                          f"wsiengine wrote ({why}); it is left untouched. Move it away or choose another "
                          "output folder.")


def _publish(tmp: Path, out: Path, sid: str) -> tuple[Path, Path, Path]:
    """Move the assets folder, the Markdown and last the JSON (the completion marker) into place.
    An existing assets folder is replaced only if wsiengine wrote it (:func:`_check_replaceable`)."""
    assets, md, js = out / f"{sid}.report", out / f"{sid}.report.md", out / f"{sid}.report.json"
    _check_replaceable(assets)
    replace_directory(tmp / "assets", assets)
    os.replace(tmp / "report.md", md)
    os.replace(tmp / "report.json", js)
    return js, md, assets
