"""One slide end to end, composed from the stages."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .aggregate import MILHead, SlidePrediction, default_head_path
from .config import RunConfig, SlideConfig, StreamConfig
from .encode import Encoder
from .errors import ConfigError, SlideTimeoutError, log_safe
from .resolve import resolve_config
from .slide import Slide, open_slide, slide_id_for
from .store import FeatureWriter, ResultStore
from .tiling import TileGrid, plan_tiles
from .tissue import TissueMask

if TYPE_CHECKING:  # pragma: no cover
    from .deposits import DepositMap

__all__ = ["embed_slide", "Pipeline", "SlideResult", "slide_id_for", "slide_attrs", "plan_slide", "open_run_slide",
           "configured_mpp",
           "load_encoder",
           "load_mil"]

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
    config: RunConfig | None = None,
    stream: StreamConfig | None = None,
) -> Path:
    """Embed every tile of ``grid`` into the Zarr store ``out`` (``features``, ``tiles/coords``),
    streaming batches to disk as they are produced; returns the committed store's path.

    Memory holds the in-flight patch batches and the feature chunks being filled, never the
    slide's features. If anything fails, no store appears under ``out``. ``progress`` shows
    a tile progress bar on stderr. ``config``, the run's resolved configuration, is recorded
    in the store; ``stream`` sets the parallel reading (default ``config.stream``).
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    attrs = {"slide": slide_attrs(slide, Path(out).parent), "encoder": encoder.describe()}
    if config is not None:
        attrs["config"] = config.to_dict()
    with FeatureWriter(out, grid, encoder.embed_dim, attrs=attrs, chunk_rows=chunk_rows) as writer, \
            tqdm(total=len(grid), unit="tile", desc=slide.path.name, disable=not progress, leave=False) as bar:
        stream = stream or (config.stream if config is not None else None)
        for index, features in encoder.stream(slide, grid, batch_size, config=stream):
            writer.write(index, features)
            bar.update(len(index))
        path = writer.commit(timings={"embed_s": round(time.perf_counter() - started, 3)})
    logger.info("%s: %d tiles embedded into %s in %.1f s", log_safe(slide.path.name), len(grid), log_safe(path),
                time.perf_counter() - started)
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
    node : dict or None
        The node's findings (category, largest_mm, foci, total_area_mm2, ...; the store's ``node``
        attribute), None without a prediction.
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
    node: dict[str, Any] | None = None

    @property
    def label(self) -> int | None:
        return None if self.prediction is None else self.prediction.label

    @property
    def probability(self) -> float | None:
        return None if self.prediction is None else self.prediction.probability


#: ``embed(slide, grid) -> iterator of (index (B,) int64, features (B, D) float32)``.
EmbedFunction = Callable[[Slide, TileGrid], Iterator[tuple[np.ndarray, np.ndarray]]]


def slide_attrs(slide: Slide, out_dir: str | os.PathLike[str] | None, *,
                anonymous_id: str | None = None) -> dict[str, Any]:
    """What a store records about its slide: the absolute path, the path relative to the
    results folder ``out_dir`` (so a results tree moved together with its slides still finds
    them; None: not recorded), name, size, resolution and its source, backend, vendor and
    content fingerprint. With ``anonymous_id`` neither path is recorded and the name is
    ``ANONYMOUS_ID.EXT``."""
    from .store import slide_fingerprint

    path = Path(slide.path).expanduser().absolute()
    try:
        relative = None if out_dir is None else os.path.relpath(path, Path(out_dir).expanduser().absolute())
    except ValueError:  # another drive (Windows)
        relative = None
    if anonymous_id is not None:
        where = {"path": None, "path_from_results": None, "name": anonymous_id + path.suffix.lower()}
    else:
        where = {"path": str(path), "path_from_results": relative, "name": path.name}
    return {**where, "dimensions": list(slide.dimensions), "mpp": list(slide.mpp), "mpp_source": slide.mpp_source,
            "backend": slide.backend_name, "vendor": slide.vendor, "fingerprint": slide_fingerprint(path)}


def configured_mpp(path: str | os.PathLike[str], config: SlideConfig,
                   table: dict[str, tuple[float, float]] | None = None) -> tuple[float, float] | None:
    """The level-0 µm/px the settings give one slide: its row of ``config.mpp_csv`` (``table``,
    when already read), else ``config.mpp``, else None (the file's own metadata decides)."""
    if table is None and config.mpp_csv:
        from .resolution import read_mpp_csv

        table = read_mpp_csv(config.mpp_csv)
    if table:
        from .resolution import lookup_mpp

        row = lookup_mpp(table, path)
        if row is not None:
            return row
    return config.mpp


def open_run_slide(path: str | os.PathLike[str], config: SlideConfig, *, mpp: tuple[float, float] | float | None = None,
                   require_mpp: bool = True) -> Slide:
    """Open a slide with a run's slide settings: ``backend``, ``force_mpp`` and the level-0 mpp
    from ``mpp`` (given here), else :func:`configured_mpp`."""
    if mpp is None:
        mpp = configured_mpp(path, config)
    return open_slide(path, backend=config.backend, mpp=mpp, force_mpp=config.force_mpp, require_mpp=require_mpp)


def load_encoder(config: RunConfig) -> Encoder:
    """The encoder ``config.encoder`` names, with its ONNX Runtime options."""
    e = config.encoder
    return Encoder.load(e.encoder, weights=e.encoder_weights, providers=e.provider_list, allow_fallback=e.allow_fallback,
                        threads=e.threads or None, precision=e.precision, device_id=e.device_id, trt_cache_dir=e.trt_cache_dir)


def load_mil(config: RunConfig) -> MILHead | None:
    """The MIL head ``config.mil`` names, or None for embeddings only."""
    return MILHead.load(config.mil.mil) if config.mil.mil is not None else None


_GIVEN_BY_CONFIG = object()


def _encoder_names(encoder: Encoder) -> dict[str, str | None]:
    """The ``encoder``/``encoder_weights`` settings that load ``encoder`` again."""
    from .models import list_encoders

    default_spec, default_path = Encoder.locate("default")
    if encoder.spec == default_spec and Path(encoder.path) == default_path:
        return {"encoder": "default", "encoder_weights": None}
    if encoder.spec.name in list_encoders():
        return {"encoder": encoder.spec.name, "encoder_weights": str(encoder.path)}
    return {"encoder": str(encoder.path), "encoder_weights": None}


def _warn_if_head_was_trained_on_another_encoder(mil: MILHead | None, encoder: Encoder) -> None:
    """Log a warning when the head names a registry encoder other than the one loaded: two
    encoders of the same width give features of different meaning ("default" names no encoder
    for sure, since it has pointed at different ones)."""
    from .models import ENCODERS

    if mil is None or not mil.encoder or mil.encoder == "default" or mil.encoder not in ENCODERS:
        return
    if mil.encoder != encoder.spec.name:
        logger.warning("the MIL head %r was trained on %r embeddings but the encoder is %r: its probabilities "
                       "will not mean what its card says; use --encoder %s or a head trained on this encoder",
                       mil.name, mil.encoder, encoder.spec.name, mil.encoder)


class Pipeline:
    """One slide end to end: tissue -> tiles -> embeddings -> MIL -> store, heatmaps, GeoJSON,
    overlay, report.

    >>> pipe = Pipeline()                                   # the shipped encoder and head
    >>> pipe = Pipeline("run.toml", target_mpp=0.5, tile_px=224, report=False)
    >>> res = pipe.run("x.svs", out="results/")             # results/x.zarr, x.geojson, x.heatmap.png
    >>> res.prediction.probability, pipe.config.tiling

    Parameters
    ----------
    config : RunConfig, path or None
        The run's settings; a path is a TOML file; None loads the defaults, ``$WSIENGINE_CONFIG``
        and the ``WSIENGINE_*`` environment (:meth:`RunConfig.load`).
    encoder : str, path or Encoder, optional
        A loaded encoder, or a name overriding ``config.encoder.encoder``.
    mil : str, path, MILHead or None, optional
        A loaded head, a name overriding ``config.mil.mil``, or None for embeddings only.
    **settings
        Any setting by flat or dotted name (``target_mpp=0.5``, ``tile_threshold=0.6``,
        ``report=False``) or whole sections (``tiling=TilingConfig(...)``), applied over
        ``config`` as explicit code arguments.

    The resolved configuration is :attr:`config`: tiling from the settings, else the head's
    training tiling, else the encoder's spec (:mod:`wsiengine.config.tiling`), and the models'
    hashes. It is recorded verbatim in every store and its :meth:`RunConfig.key` is the resume key.
    """

    def __init__(self, config: RunConfig | str | os.PathLike[str] | None = None, *,
                 encoder: str | os.PathLike[str] | Encoder | None = None,
                 mil: Any = _GIVEN_BY_CONFIG, **settings: Any) -> None:
        if isinstance(config, RunConfig):
            base = config.replace(**settings)
        else:
            base = RunConfig.load(config, **settings)
        if isinstance(encoder, Encoder):  # the configuration names the model it holds
            for name, value in _encoder_names(encoder).items():
                base = base.set(f"encoder.{name}", value)
        elif encoder is not None:
            base = base.replace(encoder=os.fspath(encoder))
        if mil is None:
            base = base.set("mil.mil", None)
        elif isinstance(mil, MILHead):
            base = base.set("mil.mil", "default" if mil.path == default_head_path() else str(mil.path))
        elif mil is not _GIVEN_BY_CONFIG:
            base = base.replace(mil=os.fspath(mil))
        self.encoder = encoder if isinstance(encoder, Encoder) else load_encoder(base)
        self.mil = mil if isinstance(mil, MILHead) else load_mil(base)
        if self.mil is not None and self.mil.in_dim != self.encoder.embed_dim:
            raise ConfigError(f"the MIL head {self.mil.name!r} takes D={self.mil.in_dim} features but encoder "
                              f"{self.encoder.spec.name!r} gives {self.encoder.embed_dim}; use a head trained on this "
                              "encoder's features")
        _warn_if_head_was_trained_on_another_encoder(self.mil, self.encoder)
        self.config = resolve_config(base, encoder=self.encoder, mil=self.mil)
        self._model_stamps = self._stamp_models()
        self.report = self.config.outputs.report and self.mil is not None  # a report needs a slide call
        self.vlm_client = None
        self.tile_bank = None
        if self.report:
            from .report import TileBank

            if self.config.vlm.enabled:
                from .report.vlm import VLMClient

                self.vlm_client = VLMClient(self.config.vlm)  # a remote endpoint without allow_remote fails here
            if self.config.report.tile_bank is not None:
                self.tile_bank = TileBank.open(self.config.report.tile_bank, self.encoder)

    def _stamp_models(self) -> tuple[tuple[str, int, int] | tuple[str], ...]:
        """``(path, size, mtime ns)`` of the encoder file and of each file in the head's folder."""
        files = [Path(self.encoder.path)]
        if self.mil is not None and self.mil.path is not None and Path(self.mil.path).is_dir():
            files += sorted(p for p in Path(self.mil.path).iterdir() if p.is_file())
        stamps = []
        for f in files:
            try:
                st = f.stat()
                stamps.append((str(f), st.st_size, st.st_mtime_ns))
            except OSError:
                stamps.append((str(f),))
        return tuple(stamps)

    def models_unchanged(self) -> bool:
        """False when the encoder file or a file of the head's folder changed on disk since this
        pipeline loaded them (a long-lived process must load and verify them again)."""
        return self._stamp_models() == self._model_stamps

    @property
    def tiling(self):
        """The resolved tiling (``config.tiling``)."""
        return self.config.tiling

    def report_key(self) -> str | None:
        """A hash of the report settings (None without reports); a report with another key is stale."""
        if not self.report:
            return None
        from .report import report_key

        reference = self.mil.reference  # reports exist only with a head
        return report_key(self.config.report, self.config.vlm, self.config.report.tile_bank,
                          reference.source if reference is not None else None)

    def write_report(self, store: Any, out: str | os.PathLike[str], *, slide: Slide | str | os.PathLike[str] | None = None,
                     slide_id: str | None = None, deposits: "DepositMap | None" = None) -> Path:
        """The report of one slide from its store (a path or an open ``ResultStore``) with this
        pipeline's report settings; returns ``SLIDE_ID.report.json``. ``deposits``: the ones
        :meth:`run` found from this store's tile scores (found again otherwise)."""
        from .report import make_report

        rep = make_report(store, out, config=self.config.report, vlm=self.vlm_client or self.config.vlm, slide=slide,
                          reference=self.mil.reference, tile_bank=self.tile_bank, slide_id=slide_id,
                          key=self.report_key(), deposits=deposits)
        assert rep.json_path is not None
        return rep.json_path

    def _mil_provenance(self) -> dict[str, Any] | None:
        if self.mil is None:
            return None
        return {"name": self.mil.name, "model": self.mil.model, "path": str(self.mil.path),
                "sha256": self.mil.config.get("sha256"), "threshold": self.mil.threshold,
                "encoder": self.mil.encoder, "class_names": self.mil.class_names,
                "target_mpp": self.mil.target_mpp, "tile_px": self.mil.tile_px}

    def open(self, slide: str | os.PathLike[str], *, mpp: tuple[float, float] | float | None = None) -> Slide:
        """Open ``slide`` with the run's slide settings (backend, ``mpp``/``mpp_csv``, ``force_mpp``);
        ``mpp`` given here beats the configured one."""
        return open_run_slide(slide, self.config.slide, mpp=mpp)

    def plan(self, slide: Slide) -> tuple[TissueMask, TileGrid]:
        """Tissue mask (with its thumbnail) and tile grid of ``slide``: the grid every command plans."""
        return plan_slide(slide, self.config, keep_thumbnail=True)

    def run(self, slide: str | os.PathLike[str] | Slide, out: str | os.PathLike[str], *,
            slide_id: str | None = None, mpp: tuple[float, float] | float | None = None,
            progress: bool = False, embed: EmbedFunction | None = None,
            results_dir: str | os.PathLike[str] | None | Any = _GIVEN_BY_CONFIG,
            timeout_s: float | None = None) -> SlideResult:
        """Process one slide into ``out/`` (created). Outputs are written under temporary names;
        the GeoJSON and overlay are renamed into place first and the store last, so a complete
        ``SLIDE_ID.zarr`` marks a finished slide and an interrupted run leaves none.

        ``embed(slide, grid)`` replaces the local encoder loop: an iterator of ``(index,
        features)`` pairs covering every grid row once (``wsiengine.batch`` passes one that
        spreads tile chunks over a Dask cluster). ``results_dir``: the folder the store's
        ``path_from_results`` is relative to (default ``out``; None records none, for outputs
        staged here and uploaded elsewhere). ``timeout_s``: the slide's time budget, checked
        between stages and embedding batches (:class:`~wsiengine.errors.SlideTimeoutError`).

        Raises the stage's error (:class:`~wsiengine.errors.SlideOpenError`,
        :class:`~wsiengine.errors.MissingMppError`, ...) with nothing published.
        """
        if self.config.outputs.anonymize_ids and not slide_id:
            raise ConfigError("anonymize_ids: give Pipeline.run an anonymous slide_id (wsiengine run and run_batch "
                              "make them and keep the private map); the file's name would name the outputs")
        clock = _Clock(timeout_s)
        own = not isinstance(slide, Slide)
        slide_obj = self.open(slide, mpp=mpp) if own else slide
        try:
            sid = slide_id or slide_id_for(slide_obj.path)
            out_dir = Path(out)
            out_dir.mkdir(parents=True, exist_ok=True)
            clock.mark("open")
            mask, grid = plan_slide(slide_obj, self.config, keep_thumbnail=True, on_stage=clock.mark)
            store_path = out_dir / f"{sid}.zarr"
            relative_to = out_dir if results_dir is _GIVEN_BY_CONFIG else results_dir
            with FeatureWriter(store_path, grid, self.encoder.embed_dim,
                               attrs=self._store_attrs(slide_obj, sid, relative_to)) as writer:
                self._embed(slide_obj, grid, writer, sid, progress, embed, clock)
                clock.mark("embed")
                prediction = self._predict(writer, grid)
                deposits = self._find_deposits(writer, grid, prediction, slide_obj)
                clock.mark("mil")
                rasters = _write_rasters(writer, mask, grid, prediction, self.config.outputs.heatmaps)
                status = "ok" if len(grid) else "no_tissue"
                summary = self._prediction_summary(prediction)
                writer.group.attrs.update(prediction=summary, status=status)
                node = self._node_summary(ResultStore(store_path, writer.group), deposits)
                with _Staged(out_dir) as staged:
                    self._side_outputs(staged, sid, slide_obj, mask, grid, prediction, rasters, deposits, node)
                    clock.mark("outputs")
                    report = None
                    if self.report:  # first: a report that fails leaves nothing of this run behind
                        report = self.write_report(ResultStore(store_path, writer.group), out_dir, slide=slide_obj,
                                                   slide_id=sid, deposits=deposits)
                        clock.mark("report", check=False)
                    published = staged.publish()
                    writer.commit(prediction=summary, timings=clock.seconds(), status=status, node=node,
                                  outputs=sorted(p.name for p in published.values()))
                    if report is not None:
                        published[".report"] = report
            if not len(grid):
                logger.warning("%s: no tissue tiles; the store records status no_tissue and no prediction", log_safe(sid))
            timings = clock.seconds()
            logger.info("%s: %s in %.1f s", log_safe(sid), "no tissue" if prediction is None else
                        f"p={prediction.probability:.3f} label={prediction.label}", timings["total"])
            return SlideResult(slide_id=sid, store=store_path, geojson=published.get(".geojson"),
                               overlay=published.get(".png"), report=published.get(".report"), prediction=prediction,
                               n_tiles=len(grid), status=status, timings=timings, node=node)
        finally:
            if own:
                slide_obj.close()

    # -- the stages of run() ------------------------------------------------------------------
    def _store_attrs(self, slide: Slide, sid: str, results_dir: str | os.PathLike[str] | None) -> dict[str, Any]:
        anonymous = sid if self.config.outputs.anonymize_ids else None
        return {"slide_id": sid, "slide": slide_attrs(slide, results_dir, anonymous_id=anonymous),
                "config": self.config.to_dict(),
                "encoder": self.encoder.describe(), "mil": self._mil_provenance(), "config_key": self.config.key()}

    def _embed(self, slide: Slide, grid: TileGrid, writer: FeatureWriter, sid: str, progress: bool,
               embed: EmbedFunction | None, clock: "_Clock") -> None:
        from tqdm.auto import tqdm

        if not len(grid):
            return
        stream = self.config.stream
        batches = embed(slide, grid) if embed is not None else self.encoder.stream(slide, grid, stream.batch_size,
                                                                                   config=stream)
        with tqdm(total=len(grid), unit="tile", desc=sid, disable=not progress, leave=False) as bar:
            for index, features in batches:
                writer.write(index, features)
                bar.update(len(index))
                clock.check("embedding")

    def _predict(self, writer: FeatureWriter, grid: TileGrid) -> SlidePrediction | None:
        if self.mil is None or not len(grid):
            return None
        prediction = self.mil.predict(writer.group["features"][:])
        writer.add_array("attention", prediction.attention)
        writer.add_array("tile_scores", prediction.tile_scores)
        return prediction

    def _find_deposits(self, writer: FeatureWriter, grid: TileGrid, prediction: SlidePrediction | None,
                       slide: Slide) -> "DepositMap | None":
        """Tumour deposits from the tile probabilities by the run's rules; each tile's deposit
        rank (0: none) is stored as ``tile_deposit``."""
        from .deposits import DepositRules, find_deposits

        if prediction is None:
            return None
        found = find_deposits(grid, prediction.tile_scores, slide.mpp, DepositRules.from_config(self.config.mil))
        writer.add_array("tile_deposit", found.tile_deposit, attrs={
            "note": "rank of the tumour deposit each tile belongs to (1 = largest), 0 = none"})
        return found

    def _node_summary(self, store: Any, deposits: "DepositMap | None") -> dict[str, Any] | None:
        """The node's findings (category, largest deposit, foci, tumour area) as the report states them."""
        from .report.findings import build_findings, node_summary

        if deposits is None:
            return None
        return node_summary(build_findings(store, config=self.config.report, deposits=deposits))

    def _prediction_summary(self, prediction: SlidePrediction | None) -> dict[str, Any] | None:
        if prediction is None:
            return None
        return {"probability": prediction.probability, "label": prediction.label,
                "label_name": self.mil.class_names[prediction.label], "threshold": prediction.threshold,
                "n_tiles": prediction.n_tiles, "top_attention_tile": int(prediction.attention.argmax())}

    def _side_outputs(self, staged: "_Staged", sid: str, slide: Slide, mask: TissueMask, grid: TileGrid,
                      prediction: SlidePrediction | None, rasters: dict[str, np.ndarray],
                      deposits: "DepositMap | None" = None, node: dict[str, Any] | None = None) -> None:
        """GeoJSON and overlay PNG under temporary names in ``staged``."""
        from .geojson import export_slide_geojson
        from .heatmap import render_overlay, save_overlay_png

        outputs = self.config.outputs
        if outputs.geojson:
            export_slide_geojson(
                staged.path(f"{sid}.geojson"), tissue=mask, grid=grid if prediction is not None else None,
                scores=prediction.tile_scores if prediction is not None else None,
                threshold=self.config.mil.tile_threshold, mpp=slide.mpp, slide_id=sid, gzip=False,
                deposits=deposits.deposits if deposits is not None else None, node=node)
        shown = "tile_scores" if "tile_scores" in rasters else next(iter(rasters), None)
        if outputs.overlay and shown and mask.thumbnail is not None:
            image = render_overlay(mask.thumbnail, tuple(mask.level0_per_mask_px), rasters[shown],
                                   label="tumour probability" if shown == "tile_scores" else shown)
            save_overlay_png(staged.path(f"{sid}.heatmap.png"), image)


def plan_slide(slide: Slide, config: RunConfig, *, keep_thumbnail: bool = False,
               on_stage: Callable[[str], None] | None = None) -> tuple[TissueMask, TileGrid]:
    """Tissue mask and tile grid of ``slide`` from a resolved run configuration: what ``run``,
    ``embed``, ``tiles`` and ``doctor`` all plan. ``on_stage("tissue")`` and
    ``on_stage("tiling")`` are called as each finishes (timings)."""
    from .tissue import detect_tissue

    mask = detect_tissue(slide, config=config.tissue, keep_thumbnail=keep_thumbnail)
    if on_stage is not None:
        on_stage("tissue")
    grid = plan_tiles(slide, mask, config=config.tiling)
    if on_stage is not None:
        on_stage("tiling")
    return mask, grid


def _write_rasters(writer: FeatureWriter, mask: TissueMask, grid: TileGrid, prediction: SlidePrediction | None,
                   names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Tissue mask, thumbnail and the ``names`` heatmaps into the store; returns the heatmap rasters."""
    from .heatmap import tile_raster, write_heatmap

    writer.add_array("tissue_mask", mask.raster.astype(np.uint8), attrs={
        "mask_mpp": list(mask.mask_mpp), "level0_per_mask_px": list(mask.level0_per_mask_px)})
    if mask.thumbnail is not None:
        writer.add_array("thumbnail", mask.thumbnail, attrs={
            "mpp": list(mask.mask_mpp), "level0_per_px": list(mask.level0_per_mask_px)})
    values = {"tissue_fraction": grid.tissue_fraction}
    if prediction is not None:
        values.update(attention=prediction.attention / prediction.attention.max(), tile_scores=prediction.tile_scores)
    rasters = {}
    for name in names:
        if name in values and len(grid):
            rasters[name] = tile_raster(grid, values[name])
            write_heatmap(writer.group, name, rasters[name], attrs={
                "note": "attention divided by its maximum" if name == "attention" else ""})
    return rasters


class _Staged:
    """Side files of one slide written under temporary names in ``out_dir``, renamed into place
    by :meth:`publish`; whatever was not published is removed on exit."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.files: list[tuple[Path, Path]] = []

    def path(self, name: str) -> Path:
        final = self.out_dir / name
        tmp = self.out_dir / f".{final.stem}.partial{final.suffix}"
        self.files.append((tmp, final))
        return tmp

    def publish(self) -> dict[str, Path]:
        """Rename every staged file into place; ``{suffix: final path}`` (the store records the
        names, so a rerun redoes a slide whose GeoJSON or overlay was deleted)."""
        published = {}
        for tmp, final in self.files:
            if tmp.exists():
                os.replace(tmp, final)
                published[final.suffix] = final
        return published

    def __enter__(self) -> "_Staged":
        return self

    def __exit__(self, *exc: Any) -> None:
        for tmp, _ in self.files:
            tmp.unlink(missing_ok=True)


class _Clock:
    """Seconds per stage of one run (``open``, ``tissue``, ``tiling``, ``embed``, ``mil``,
    ``outputs``, ``report``, ``total``), and the slide's time budget: past ``timeout_s``,
    :meth:`mark` and :meth:`check` raise :class:`~wsiengine.errors.SlideTimeoutError`."""

    def __init__(self, timeout_s: float | None = None) -> None:
        self.start = self.last = time.perf_counter()
        self.stages: dict[str, float] = {}
        self.timeout_s = timeout_s

    def mark(self, stage: str, *, check: bool = True) -> None:
        """End ``stage``; then, with ``check``, enforce the budget (never once outputs are published)."""
        now = time.perf_counter()
        self.stages[stage] = round(now - self.last, 3)
        self.last = now
        if check:
            self.check(stage)

    def check(self, stage: str) -> None:
        if self.timeout_s is not None and time.perf_counter() - self.start > self.timeout_s:
            raise SlideTimeoutError(
                f"the slide took more than {self.timeout_s:g} s (slide_timeout_s), stopped during or after {stage}; "
                "nothing of it was published. Raise --slide-timeout-s, or check the file (a huge or damaged slide)")

    def seconds(self) -> dict[str, float]:
        return {**self.stages, "total": round(self.last - self.start, 3)}
