"""One slide end to end, composed from the stages."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .aggregate import MILHead, SlidePrediction
from .config import ReportConfig, StreamConfig, TilingConfig, TissueConfig, VLMConfig
from .encode import Encoder
from .errors import ConfigError
from .slide import Slide, open_slide
from .store import FeatureWriter
from .tiling import TileGrid, plan_tiles

__all__ = ["embed_slide", "Pipeline", "SlideResult", "slide_id_for"]

logger = logging.getLogger("wsiengine")


def embed_slide(
    slide: Slide,
    grid: TileGrid,
    encoder: Encoder,
    out: str | os.PathLike[str],
    *,
    batch_size: int = 64,
    chunk_rows: int = 512,
    progress: bool = False,
    **stream_options: Any,
) -> Path:
    """Embed every tile of ``grid`` into the Zarr store ``out`` (``features``, ``tiles/coords``),
    streaming batches to disk as they are produced; returns the committed store's path.

    Memory holds the in-flight patch batches and the feature chunks being filled, never the
    slide's features. If anything fails, no store appears under ``out``. ``progress`` shows
    a tile progress bar on stderr.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    attrs = {
        "slide": {"path": str(slide.path), "dimensions": list(slide.dimensions), "mpp": list(slide.mpp),
                  "mpp_source": slide.mpp_source, "backend": slide.backend_name},
        "encoder": encoder.describe(),
    }
    with FeatureWriter(out, grid, encoder.embed_dim, attrs=attrs, chunk_rows=chunk_rows) as writer, \
            tqdm(total=len(grid), unit="tile", desc=slide.path.name, disable=not progress, leave=False) as bar:
        for index, features in encoder.stream(slide, grid, batch_size, **stream_options):
            writer.write(index, features)
            bar.update(len(index))
        path = writer.commit(timings={"embed_s": round(time.perf_counter() - started, 3)})
    logger.info("%s: %d tiles embedded into %s in %.1f s", slide.path.name, len(grid), path, time.perf_counter() - started)
    return path


@dataclass(frozen=True, eq=False)
class SlideResult:
    """What :meth:`Pipeline.run` produced for one slide.

    Attributes
    ----------
    slide_id : str
    store : Path
        The committed ``SLIDE_ID.zarr``.
    geojson, overlay : Path or None
        ``SLIDE_ID.geojson`` and ``SLIDE_ID.heatmap.png`` when written.
    report : Path or None
        ``SLIDE_ID.report.json`` when written (with ``.report.md`` and the ``.report/`` images).
    prediction : SlidePrediction or None
        None without a MIL head or when the slide has no tissue tiles.
    n_tiles : int
    status : str
        ``"ok"`` or ``"no_tissue"``.
    timings : dict[str, float]
        Seconds per stage (``open``, ``tissue``, ``tiling``, ``embed``, ``mil``, ``outputs``, ``report``,
        ``total``).
    """

    slide_id: str
    store: Path
    geojson: Path | None
    overlay: Path | None
    report: Path | None
    prediction: SlidePrediction | None
    n_tiles: int
    status: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> int | None:
        return None if self.prediction is None else self.prediction.label

    @property
    def probability(self) -> float | None:
        return None if self.prediction is None else self.prediction.probability


#: ``embed(slide, grid) -> iterator of (index (B,) int64, features (B, D) float32)``.
EmbedFunction = Callable[[Slide, TileGrid], Iterator[tuple[np.ndarray, np.ndarray]]]


def slide_id_for(path: str | os.PathLike[str]) -> str:
    """The id a slide's outputs are named by: its file name without slide suffixes (``x.ome.tiff`` -> ``x``)."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem if Path(name).suffix else name


def _publish(tmp: Path, final: Path) -> Path:
    os.replace(tmp, final)
    return final


class Pipeline:
    """One slide end to end: tissue -> tiles -> embeddings -> MIL -> store, heatmaps, GeoJSON, overlay.

    >>> pipe = Pipeline(encoder="default", mil="default")
    >>> res = pipe.run("x.svs", out="results/")       # results/x.zarr, x.geojson, x.heatmap.png
    >>> res.prediction.probability, res.store

    Parameters
    ----------
    encoder : str, path or Encoder
        ``"default"``, a registry name (with ``weights``), an ``.onnx`` path, or a loaded encoder.
    mil : str, path, MILHead or None
        ``"default"`` (the shipped head), a head folder from ``wsiengine train-mil``, a loaded
        head, or None for embeddings only.
    weights, providers, allow_fallback
        Passed to :meth:`Encoder.load`.
    tissue, tiling, stream : config dataclasses, optional
        Without ``tiling``, tiles follow the MIL head's training tiling (``target_mpp``,
        ``tile_px`` recorded in its config) or else the encoder spec's.
    heatmaps : sequence of str
        Per-tile values stored as multiscale heatmaps: ``"attention"``, ``"tile_scores"``,
        ``"tissue_fraction"``.
    geojson, overlay : bool
        Write ``SLIDE_ID.geojson`` (tissue, predicted tumour regions) and ``SLIDE_ID.heatmap.png``.
    tumour_threshold : float
        Tile score at or above which tiles form the GeoJSON's tumour regions.
    threads : int, optional
        ONNX Runtime intra-op threads for the encoder (default: physical cores); a batch running
        several slides at once gives each a share.
    report : bool
        Write the slide report (``SLIDE_ID.report.json``, ``.report.md``, ``SLIDE_ID.report/``);
        see :mod:`wsiengine.report`. Ignored without a MIL head (nothing to report).
    report_config : ReportConfig, optional
    vlm : VLMConfig, optional
        An OpenAI-compatible endpoint that phrases the report's narrative (default: none, or
        ``WSIENGINE_VLM_URL``/``WSIENGINE_VLM_MODEL``); a remote one needs ``allow_remote``.
    tile_bank : path, optional
        Labelled tiles (``.npz`` or a folder of class folders) for the few-shot second opinion.
    """

    def __init__(self, encoder: str | os.PathLike[str] | Encoder = "default",
                 mil: str | os.PathLike[str] | MILHead | None = "default", *,
                 weights: str | os.PathLike[str] | None = None, providers: str | Sequence[str] | None = "auto",
                 allow_fallback: bool = False, tissue: TissueConfig | None = None, tiling: TilingConfig | None = None,
                 stream: StreamConfig | None = None, heatmaps: Sequence[str] = ("attention", "tile_scores"),
                 geojson: bool = True, overlay: bool = True, tumour_threshold: float = 0.5,
                 threads: int | None = None, report: bool = True, report_config: ReportConfig | None = None,
                 vlm: VLMConfig | None = None, tile_bank: str | os.PathLike[str] | None = None) -> None:
        self.encoder = encoder if isinstance(encoder, Encoder) else Encoder.load(
            encoder, weights=weights, providers=providers, allow_fallback=allow_fallback, threads=threads)
        self.mil = mil if (mil is None or isinstance(mil, MILHead)) else MILHead.load(mil)
        if self.mil is not None and self.mil.in_dim != self.encoder.embed_dim:
            raise ConfigError(f"the MIL head {self.mil.name!r} takes D={self.mil.in_dim} features but encoder "
                              f"{self.encoder.spec.name!r} gives {self.encoder.embed_dim}; use a head trained on this "
                              "encoder's features")
        self.tissue = tissue or TissueConfig.from_env()
        if tiling is None:
            source = self.mil if (self.mil is not None and self.mil.target_mpp and self.mil.tile_px) else None
            tiling = TilingConfig.from_env(
                target_mpp=source.target_mpp if source else self.encoder.spec.target_mpp,
                tile_px=source.tile_px if source else self.encoder.spec.patch_px)
        self.tiling = tiling
        self.stream = stream or StreamConfig.from_env()
        unknown = set(heatmaps) - {"attention", "tile_scores", "tissue_fraction"}
        if unknown:
            raise ConfigError(f"unknown heatmap value(s) {sorted(unknown)}; choose attention, tile_scores, tissue_fraction")
        self.heatmaps = tuple(heatmaps)
        self.geojson = bool(geojson)
        self.overlay = bool(overlay)
        self.tumour_threshold = float(tumour_threshold)
        self.report = bool(report) and self.mil is not None  # a report needs a slide call
        self.report_config = report_config or ReportConfig.from_env()
        self.vlm = vlm if vlm is not None else VLMConfig.from_env()
        self.vlm_client = None
        self.tile_bank_path = tile_bank
        self.tile_bank = None
        if self.report:
            from .report import TileBank

            if self.vlm.enabled:
                from .report.vlm import VLMClient

                self.vlm_client = VLMClient(self.vlm)  # a remote endpoint without allow_remote fails here
            if tile_bank is not None:
                self.tile_bank = TileBank.open(tile_bank, self.encoder)

    def report_key(self) -> str | None:
        """A hash of the report settings (None without reports); a report with another key is stale."""
        if not self.report:
            return None
        from .report import report_key

        reference = self.mil.reference  # reports exist only with a head
        return report_key(self.report_config, self.vlm, self.tile_bank_path,
                          reference.source if reference is not None else None)

    def write_report(self, store: Any, out: str | os.PathLike[str], *, slide: Slide | str | os.PathLike[str] | None = None,
                     slide_id: str | None = None) -> Path:
        """The report of one slide from its store (a path or an open ``ResultStore``) with this
        pipeline's report settings; returns ``SLIDE_ID.report.json``."""
        from .report import make_report

        rep = make_report(store, out, config=self.report_config, vlm=self.vlm_client or self.vlm, slide=slide,
                          reference=self.mil.reference, tile_bank=self.tile_bank, slide_id=slide_id,
                          key=self.report_key())
        assert rep.json_path is not None
        return rep.json_path

    def describe(self) -> dict[str, Any]:
        """The configuration recorded in every store (JSON-ready)."""
        return {"tissue": self.tissue.to_dict(), "tiling": self.tiling.to_dict(), "stream": self.stream.to_dict(),
                "heatmaps": list(self.heatmaps), "tumour_threshold": self.tumour_threshold}

    def config_key(self) -> str:
        """A hash of everything that changes results: the configs, the encoder and MIL files. A
        store written with another key is stale (``wsiengine run`` redoes it)."""
        import hashlib
        import json

        stream = self.stream.to_dict()
        for name in ("batch_size", "num_workers", "max_in_flight", "ordered"):  # affect speed, not results
            stream.pop(name, None)
        payload = {**self.describe(), "stream": stream, "encoder": self.encoder.describe()["sha256"],
                   "encoder_spec": self.encoder.spec.to_dict(),
                   "mil": self.mil.config.get("sha256") if self.mil is not None else None,
                   "mil_threshold": self.mil.threshold if self.mil is not None else None,
                   "geojson": self.geojson, "overlay": self.overlay}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def _mil_provenance(self) -> dict[str, Any] | None:
        if self.mil is None:
            return None
        return {"name": self.mil.name, "model": self.mil.model, "path": str(self.mil.path),
                "sha256": self.mil.config.get("sha256"), "threshold": self.mil.threshold,
                "encoder": self.mil.encoder, "class_names": self.mil.class_names,
                "target_mpp": self.mil.target_mpp, "tile_px": self.mil.tile_px}

    def run(self, slide: str | os.PathLike[str] | Slide, out: str | os.PathLike[str], *,
            slide_id: str | None = None, mpp: tuple[float, float] | float | None = None,
            progress: bool = False, embed: EmbedFunction | None = None) -> SlideResult:
        """Process one slide into ``out/`` (created). Outputs are written under temporary names;
        the GeoJSON and overlay are renamed into place first and the store last, so a complete
        ``SLIDE_ID.zarr`` marks a finished slide and an interrupted run leaves none.

        ``embed(slide, grid)`` replaces the local encoder loop: an iterator of ``(index,
        features)`` pairs covering every grid row once (``wsiengine.batch`` passes one that
        spreads tile chunks over a Dask cluster).

        Raises the stage's error (:class:`~wsiengine.errors.SlideOpenError`,
        :class:`~wsiengine.errors.MissingMppError`, ...) with nothing published.
        """
        from .geojson import export_slide_geojson
        from .heatmap import render_overlay, save_overlay_png, tile_raster, write_heatmap
        from .store import slide_fingerprint
        from .tissue import detect_tissue

        t = {"start": time.perf_counter()}
        own = not isinstance(slide, Slide)
        slide_obj = open_slide(slide, mpp=mpp) if own else slide
        try:
            sid = slide_id or slide_id_for(slide_obj.path)
            out_dir = Path(out)
            out_dir.mkdir(parents=True, exist_ok=True)
            t["open"] = time.perf_counter()
            mask = detect_tissue(slide_obj, config=self.tissue, keep_thumbnail=True)
            t["tissue"] = time.perf_counter()
            grid = plan_tiles(slide_obj, mask, config=self.tiling)
            t["tiling"] = time.perf_counter()
            attrs = {
                "slide_id": sid,
                "slide": {"path": str(slide_obj.path), "name": slide_obj.path.name,
                          "dimensions": list(slide_obj.dimensions), "mpp": list(slide_obj.mpp),
                          "mpp_source": slide_obj.mpp_source, "backend": slide_obj.backend_name,
                          "vendor": slide_obj.vendor, "fingerprint": slide_fingerprint(slide_obj.path)},
                "config": self.describe(),
                "encoder": self.encoder.describe(),
                "mil": self._mil_provenance(),
                "config_key": self.config_key(),
            }
            store_path = out_dir / f"{sid}.zarr"
            prediction = None
            extra: dict[str, Path] = {}
            with FeatureWriter(store_path, grid, self.encoder.embed_dim, attrs=attrs) as writer:
                from tqdm.auto import tqdm

                with tqdm(total=len(grid), unit="tile", desc=sid, disable=not progress, leave=False) as bar:
                    if len(grid):
                        batches = (embed(slide_obj, grid) if embed is not None else
                                   self.encoder.stream(slide_obj, grid, self.stream.batch_size, config=self.stream))
                        for index, features in batches:
                            writer.write(index, features)
                            bar.update(len(index))
                t["embed"] = time.perf_counter()
                if self.mil is not None and len(grid):
                    prediction = self.mil.predict(writer.group["features"][:])
                    writer.add_array("attention", prediction.attention)
                    writer.add_array("tile_scores", prediction.tile_scores)
                t["mil"] = time.perf_counter()
                writer.add_array("tissue_mask", mask.raster.astype(np.uint8), attrs={
                    "mask_mpp": list(mask.mask_mpp), "level0_per_mask_px": list(mask.level0_per_mask_px)})
                if mask.thumbnail is not None:
                    writer.add_array("thumbnail", mask.thumbnail, attrs={
                        "mpp": list(mask.mask_mpp), "level0_per_px": list(mask.level0_per_mask_px)})
                values = {"tissue_fraction": grid.tissue_fraction}
                if prediction is not None:
                    values.update(attention=prediction.attention / prediction.attention.max(),
                                  tile_scores=prediction.tile_scores)
                rasters = {}
                for name in self.heatmaps:
                    if name in values and len(grid):
                        rasters[name] = tile_raster(grid, values[name])
                        write_heatmap(writer.group, name, rasters[name], attrs={
                            "note": "attention divided by its maximum" if name == "attention" else ""})
                tmp_files: list[tuple[Path, Path]] = []
                try:
                    if self.geojson:
                        tmp = out_dir / f".{sid}.geojson.partial"
                        export_slide_geojson(
                            tmp, tissue=mask, grid=grid if prediction is not None else None,
                            scores=prediction.tile_scores if prediction is not None else None,
                            threshold=self.tumour_threshold, mpp=slide_obj.mpp, slide_id=sid, gzip=False)
                        tmp_files.append((tmp, out_dir / f"{sid}.geojson"))
                    shown = "tile_scores" if "tile_scores" in rasters else next(iter(rasters), None)
                    if self.overlay and shown and mask.thumbnail is not None:
                        image = render_overlay(mask.thumbnail, tuple(mask.level0_per_mask_px), rasters[shown],
                                               label="tumour probability" if shown == "tile_scores" else shown)
                        tmp = out_dir / f".{sid}.heatmap.partial.png"
                        save_overlay_png(tmp, image)
                        tmp_files.append((tmp, out_dir / f"{sid}.heatmap.png"))
                    t["outputs"] = time.perf_counter()
                    timings = _stage_seconds(t)
                    summary = None
                    if prediction is not None:
                        summary = {"probability": prediction.probability, "label": prediction.label,
                                   "label_name": self.mil.class_names[prediction.label],
                                   "threshold": prediction.threshold, "n_tiles": prediction.n_tiles,
                                   "top_attention_tile": int(prediction.attention.argmax())}
                    status = "ok" if len(grid) else "no_tissue"
                    for tmp, final in tmp_files:
                        extra[final.suffix] = _publish(tmp, final)
                    if self.report:
                        from .store import ResultStore

                        writer.group.attrs.update(prediction=summary, status=status)
                        extra[".report"] = self.write_report(ResultStore(store_path, writer.group), out_dir,
                                                             slide=slide_obj, slide_id=sid)
                        timings = _stage_seconds({**t, "report": time.perf_counter()})
                    writer.commit(prediction=summary, timings=timings, status=status)
                finally:
                    for tmp, _ in tmp_files:
                        tmp.unlink(missing_ok=True)
            if not len(grid):
                logger.warning("%s: no tissue tiles; the store records status no_tissue and no prediction", sid)
            result = SlideResult(slide_id=sid, store=store_path, geojson=extra.get(".geojson"),
                                 overlay=extra.get(".png"), report=extra.get(".report"), prediction=prediction, n_tiles=len(grid),
                                 status=status, timings=timings)
            logger.info("%s: %s in %.1f s", sid, "no tissue" if prediction is None else
                        f"p={prediction.probability:.3f} label={prediction.label}", timings["total"])
            return result
        finally:
            if own:
                slide_obj.close()


def _stage_seconds(t: dict[str, float]) -> dict[str, float]:
    order = ["start", "open", "tissue", "tiling", "embed", "mil", "outputs", "report"]
    out = {}
    for prev, cur in zip(order, order[1:]):
        if cur in t and prev in t:
            out[cur] = round(t[cur] - t[prev], 3)
    out["total"] = round(max(t.values()) - t["start"], 3)
    return out
