"""A folder of slides: discovery, resume, fault isolation, and Dask-parallel processing.

>>> summary = run_batch("slides/", "results/")                       # local, sized to the machine
>>> summary = run_batch("slides/", "results/", scheduler="tcp://host:8786")   # an existing cluster
>>> [row.status for row in summary.rows]                             # done / failed / skipped

Each slide goes through :class:`~wsiengine.pipeline.Pipeline` (tissue, tiles, embeddings, MIL,
heatmaps, GeoJSON, overlay) into ``RESULTS_DIR/SLIDE_ID.*``. ``RESULTS_DIR/summary.csv`` has one
row per slide (``slide_id, path, status, label, probability, n_tiles, seconds, error``) and is
rewritten atomically after every slide, so it is always readable.

- **Resume.** A slide whose complete store exists with the same slide fingerprint and the
  same pipeline configuration key (:meth:`Pipeline.config_key`) is ``skipped``; a changed
  configuration, encoder or head redoes it. Failures stay ``failed`` on a rerun unless
  ``retry_failed``.
- **Fault isolation.** Any error of one slide (unreadable file, missing mpp, ...) becomes a
  ``failed`` row with its message; the batch goes on. A killed run leaves only temporary
  names (removed by the next run) and stores that are not marked complete.
- **Parallelism.** Without a scheduler, slides run in a local ``dask.distributed`` cluster of
  ``workers`` processes with ``cores // workers`` encoder threads each (never more threads
  than cores); ``workers=1`` runs in this process. With ``scheduler`` (an address) or
  ``client``, the same tasks run on that cluster; each worker process loads the pipeline
  once and reuses it. Results go to ``out_dir``, which every worker must see.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write
from .config import ReportConfig, StreamConfig, TilingConfig, TissueConfig, VLMConfig, physical_cores
from .errors import ConfigError, WsiEngineError
from .pipeline import Pipeline, slide_id_for

__all__ = ["SLIDE_EXTENSIONS", "SlideEntry", "SummaryRow", "BatchSummary", "PipelineSpec", "discover_slides",
           "run_batch", "read_summary", "SUMMARY_NAME", "LOG_NAME"]

logger = logging.getLogger("wsiengine")

#: File extensions taken as slides without probing (case-insensitive).
SLIDE_EXTENSIONS = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide",
                              ".bif", ".dcm", ".qptiff", ".btf"})
#: Extensions never probed (results, tables, documents, archives).
_NOT_SLIDES = frozenset({".csv", ".txt", ".json", ".geojson", ".md", ".xml", ".log", ".py", ".zip", ".gz",
                         ".tar", ".pdf", ".html", ".yaml", ".yml", ".ini", ".npz", ".npy", ".pt", ".onnx"})
SUMMARY_NAME = "summary.csv"
LOG_NAME = "wsiengine.log"
SUMMARY_FIELDS = ("slide_id", "path", "status", "label", "probability", "n_tiles", "seconds", "error")


@dataclass(frozen=True)
class SlideEntry:
    """A discovered slide: its id (unique in the folder) and path."""

    slide_id: str
    path: Path


def _probe(path: Path) -> bool:
    from .slide import open_slide

    try:
        open_slide(path, require_mpp=False).close()
        return True
    except Exception:  # noqa: BLE001 - anything that does not open is not a slide
        return False


def discover_slides(root: str | os.PathLike[str], *, probe_unknown: bool = True,
                    exclude: Iterable[str | os.PathLike[str]] = ()) -> list[SlideEntry]:
    """Every slide under ``root`` (recursive, sorted): files with a slide extension
    (:data:`SLIDE_EXTENSIONS`), and, with ``probe_unknown``, other files that open as a slide.

    Ids are the path relative to ``root`` without its slide suffix, folders joined by ``__``
    (``a/b/x.svs`` -> ``a__b__x``; ``x.svs`` -> ``x``), so equal stems in different folders do
    not collide; an id taken twice anyway gets a ``-2``, ``-3`` suffix in path order. Hidden
    entries, Zarr stores, MIRAX data folders and ``exclude`` folders are skipped.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise ConfigError(f"slide folder '{root}' does not exist")
    if root.is_file():
        return [SlideEntry(slide_id_for(root), root)]
    excluded = {Path(e).expanduser().resolve() for e in exclude}
    mirax_data = {p.with_suffix("") for p in root.rglob("*.mrxs")}
    entries: list[SlideEntry] = []
    taken: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not d.endswith(".zarr")
                             and not d.endswith(".partial") and (here / d).resolve() not in excluded
                             and here / d not in mirax_data)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = here / name
            suffix = path.suffix.lower()
            if suffix not in SLIDE_EXTENSIONS:
                if not probe_unknown or suffix in _NOT_SLIDES or not _probe(path):
                    continue
            rel = path.relative_to(root)
            sid = "__".join([*rel.parent.parts, slide_id_for(rel.name)])
            count = taken.get(sid, 0) + 1
            taken[sid] = count
            entries.append(SlideEntry(sid if count == 1 else f"{sid}-{count}", path))
    return entries


@dataclass
class SummaryRow:
    """One slide's line in ``summary.csv``."""

    slide_id: str
    path: str
    status: str  # done | failed | skipped
    label: str = ""
    probability: float | None = None
    n_tiles: int | None = None
    seconds: float | None = None
    error: str = ""

    def as_csv(self) -> dict[str, Any]:
        row = asdict(self)
        row["probability"] = "" if self.probability is None else f"{self.probability:.6f}"
        row["n_tiles"] = "" if self.n_tiles is None else self.n_tiles
        row["seconds"] = "" if self.seconds is None else f"{self.seconds:.2f}"
        return row


@dataclass
class BatchSummary:
    """The rows of a batch run (in discovery order) and where they were written."""

    rows: list[SummaryRow]
    out_dir: Path | str
    seconds: float = 0.0
    workers: int = 1
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def path(self) -> Path | str:
        """``summary.csv`` (a path, or a URL for URL targets)."""
        if isinstance(self.out_dir, str):
            return f"{self.out_dir}/{SUMMARY_NAME}"
        return self.out_dir / SUMMARY_NAME


class ResultsLocation:
    """Where results go: a local folder, or an fsspec URL (``s3://bucket/run``, ``file:///...``).

    Local files are written atomically by rename. On a URL, small files are written as whole
    objects, and a slide's outputs are made in a local staging folder and uploaded by
    :meth:`publish`: GeoJSON and PNG first, then the store with its root ``zarr.json`` (which
    says ``complete: true``) last, so a store that opens is a finished one.
    """

    def __init__(self, target: str | os.PathLike[str]) -> None:
        text = os.fspath(target)
        self.is_url = "://" in text
        if self.is_url:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(text)
            self.root = self.root.rstrip("/")
            self.target = text.rstrip("/")
            self.fs.makedirs(self.root, exist_ok=True)
        else:
            self.path = Path(text).expanduser()
            self.path.mkdir(parents=True, exist_ok=True)
            self.target = str(self.path)

    def __str__(self) -> str:
        return self.target

    def join(self, name: str) -> str:
        """The path or URL of ``name`` in the results."""
        return f"{self.target}/{name}" if self.is_url else str(self.path / name)

    def write_bytes(self, name: str, data: bytes) -> None:
        if self.is_url:
            self.fs.pipe_file(f"{self.root}/{name}", data)
        else:
            with atomic_write(self.path / name) as fh:
                fh.write(data)

    def read_text(self, name: str) -> str | None:
        try:
            if self.is_url:
                return self.fs.cat_file(f"{self.root}/{name}").decode("utf-8")
            return (self.path / name).read_text(encoding="utf-8")
        except (OSError, FileNotFoundError):
            return None

    def _put(self, local: Path, remote: str) -> None:
        parent = remote.rsplit("/", 1)[0]
        if parent not in self._made:
            self.fs.makedirs(parent, exist_ok=True)  # object stores: a no-op; file systems need folders
            self._made.add(parent)
        self.fs.put_file(str(local), remote)

    def publish(self, staging: Path, slide_id: str) -> None:
        """Upload one slide's outputs from ``staging`` (URL targets only)."""
        self._made: set[str] = set()
        assets = staging / f"{slide_id}.report"
        for f in sorted(p for p in assets.rglob("*") if p.is_file()) if assets.is_dir() else ():
            self._put(f, f"{self.root}/{slide_id}.report/{f.relative_to(assets).as_posix()}")
        for side in (f"{slide_id}.geojson", f"{slide_id}.heatmap.png", f"{slide_id}.report.md", f"{slide_id}.report.json"):
            if (staging / side).is_file():
                self._put(staging / side, f"{self.root}/{side}")
        store = staging / f"{slide_id}.zarr"
        remote = f"{self.root}/{slide_id}.zarr"
        if self.fs.exists(remote):
            self.fs.rm(remote, recursive=True)
        files = sorted(p for p in store.rglob("*") if p.is_file())
        root_meta = store / "zarr.json"
        for f in files:
            if f != root_meta:
                self._put(f, f"{remote}/{f.relative_to(store).as_posix()}")
        self._put(root_meta, f"{remote}/zarr.json")  # last: the store opens only once it is all there


def read_summary(path: str | os.PathLike[str] | ResultsLocation) -> list[SummaryRow]:
    """Rows of an existing ``summary.csv`` (a results folder, URL, or the file; empty when absent)."""
    if isinstance(path, ResultsLocation):
        text = path.read_text(SUMMARY_NAME)
    else:
        p = Path(path)
        if p.is_dir():
            p = p / SUMMARY_NAME
        text = p.read_text(encoding="utf-8") if p.is_file() else None
    if not text:
        return []
    rows = []
    for r in csv.DictReader(io.StringIO(text)):
        rows.append(SummaryRow(
            slide_id=r["slide_id"], path=r["path"], status=r["status"], label=r.get("label", ""),
            probability=float(r["probability"]) if r.get("probability") else None,
            n_tiles=int(r["n_tiles"]) if r.get("n_tiles") else None,
            seconds=float(r["seconds"]) if r.get("seconds") else None, error=r.get("error", "")))
    return rows


def _write_summary(out: ResultsLocation, rows: Sequence[SummaryRow]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=SUMMARY_FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow(row.as_csv())
    out.write_bytes(SUMMARY_NAME, text.getvalue().encode("utf-8"))


FAILURES_NAME = ".wsiengine-failures.json"


def _failure_inputs(entry: SlideEntry, key: str, mpp: tuple[float, float] | None) -> dict[str, Any]:
    """What a failed slide was tried with; a rerun retries it when any of this changed."""
    try:
        stat = entry.path.stat()
        file_id = [stat.st_size, stat.st_mtime_ns]
    except OSError:
        file_id = None
    return {"path": str(entry.path), "file": file_id, "config_key": key, "mpp": list(mpp) if mpp else None}


def _read_failures(out: ResultsLocation) -> dict[str, Any]:
    import json

    try:
        return dict(json.loads(out.read_text(FAILURES_NAME) or "{}"))
    except (ValueError, TypeError):
        return {}


def _write_failures(out: ResultsLocation, failures: dict[str, Any]) -> None:
    import json

    out.write_bytes(FAILURES_NAME, json.dumps(failures, indent=1).encode())


@dataclass(frozen=True)
class PipelineSpec:
    """Everything a worker needs to build the same :class:`Pipeline` (picklable, hashable)."""

    encoder: str = "default"
    weights: str | None = None
    mil: str | None = "default"
    providers: str = "auto"
    allow_fallback: bool = False
    target_mpp: float | None = None
    tile_px: int | None = None
    min_tissue: float | None = None
    threads: int | None = None
    heatmaps: tuple[str, ...] = ("attention", "tile_scores")
    report: bool = True
    report_config: ReportConfig | None = None
    vlm: VLMConfig | None = None
    tile_bank: str | None = None

    def build(self) -> Pipeline:
        """The pipeline: tiling from the MIL head / encoder defaults, overridden by what is set here."""
        stream = StreamConfig.from_env(num_workers=self.threads or 0)
        pipe = Pipeline(encoder=self.encoder, mil=self.mil, weights=self.weights, providers=self.providers,
                        allow_fallback=self.allow_fallback, tissue=TissueConfig.from_env(), stream=stream,
                        heatmaps=self.heatmaps, threads=self.threads, report=self.report,
                        report_config=self.report_config, vlm=self.vlm, tile_bank=self.tile_bank)
        given = {k: v for k, v in (("target_mpp", self.target_mpp), ("tile_px", self.tile_px),
                                   ("min_tissue", self.min_tissue)) if v is not None}
        if given:
            pipe.tiling = TilingConfig.from_env(**{**pipe.tiling.to_dict(), **given})
        return pipe


_PIPELINES: dict[PipelineSpec, Pipeline] = {}


def _pipeline(spec: PipelineSpec) -> Pipeline:
    """The process's pipeline for ``spec``: loaded once per worker process and reused."""
    pipe = _PIPELINES.get(spec)
    if pipe is None:
        pipe = _PIPELINES[spec] = spec.build()
    return pipe


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, WsiEngineError):
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}: {exc} (unexpected; see {LOG_NAME})"


def process_slide(entry: SlideEntry, out_dir: str, spec: PipelineSpec,
                  mpp: tuple[float, float] | None = None, progress: bool = False) -> SummaryRow:
    """Run one slide (in whichever process the scheduler chose); never raises for slide errors.
    ``progress`` shows a tile progress bar (local runs on a terminal)."""
    return _run_here(entry, out_dir, spec, mpp, None, progress)


def _run_here(entry: SlideEntry, out_dir: str, spec: PipelineSpec, mpp: tuple[float, float] | None,
              embed: Any, progress: bool) -> SummaryRow:
    import shutil
    import tempfile

    started = time.perf_counter()
    staging = None
    try:
        pipe = _pipeline(spec)
        out = ResultsLocation(out_dir)
        if out.is_url:
            staging = Path(tempfile.mkdtemp(prefix=f"wsiengine-{entry.slide_id}-"))
        res = pipe.run(entry.path, out=staging or out.path, slide_id=entry.slide_id, mpp=mpp, progress=progress,
                       embed=embed)
        if staging is not None:
            out.publish(staging, entry.slide_id)
        label = pipe.mil.class_names[res.label] if res.prediction is not None else ("no tissue"
                                                                                   if res.status == "no_tissue" else "")
        return SummaryRow(entry.slide_id, str(entry.path), "done", label=label, probability=res.probability,
                          n_tiles=res.n_tiles, seconds=time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001 - one bad slide never stops the batch
        logging.getLogger("wsiengine").error("%s failed: %s", entry.slide_id, exc,
                                             exc_info=not isinstance(exc, WsiEngineError))
        return SummaryRow(entry.slide_id, str(entry.path), "failed", seconds=time.perf_counter() - started,
                          error=_error_text(exc))
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


_SLIDES: dict[tuple[str, Any], Any] = {}


def embed_tile_chunk(spec: PipelineSpec, path: str, mpp: tuple[float, float] | None, grid: Any) -> np.ndarray:
    """Worker task of the ``chunks`` mode: embed every tile of ``grid`` (a chunk of one slide's
    grid) with the worker's cached pipeline; returns ``(len(grid), D)`` float32 in grid order."""
    from .slide import open_slide

    pipe = _pipeline(spec)
    slide = _SLIDES.get((path, mpp))
    if slide is None:
        if len(_SLIDES) > 4:
            _SLIDES.pop(next(iter(_SLIDES))).close()
        slide = _SLIDES[(path, mpp)] = open_slide(path, mpp=mpp)
    out = np.empty((len(grid), pipe.encoder.embed_dim), dtype=np.float32)
    for index, features in pipe.encoder.stream(slide, grid, pipe.stream.batch_size, config=pipe.stream):
        out[index] = features
    return out


def chunked_embedder(client: Any, spec: PipelineSpec, path: Path, mpp: tuple[float, float] | None, *,
                     chunk_tiles: int = 1024, in_flight: int | None = None):
    """An ``embed(slide, grid)`` for :meth:`Pipeline.run` that spreads the grid over the cluster in
    chunks of ``chunk_tiles`` tiles, at most ``in_flight`` chunks outstanding (default: 2 per
    worker), so memory stays bounded by ``in_flight x chunk_tiles x D`` floats."""
    from dask.distributed import as_completed

    def embed(slide: Any, grid: Any):
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        limit = in_flight or 2 * n_workers
        starts = list(range(0, len(grid), chunk_tiles))
        pending = iter(starts)
        futures = as_completed()
        offsets = {}

        def submit() -> bool:
            start = next(pending, None)
            if start is None:
                return False
            sub = grid.subset(np.arange(start, min(start + chunk_tiles, len(grid))))
            future = client.submit(embed_tile_chunk, spec, str(path), mpp, sub, pure=False)
            offsets[future.key] = start
            futures.add(future)
            return True

        for _ in range(limit):
            if not submit():
                break
        for future in futures:
            start = offsets.pop(future.key)
            features = future.result()
            yield np.arange(start, start + len(features)), features
            submit()

    return embed


def _complete_result(store: str, key: str, path: Path, mpp: tuple[float, float] | None = None) -> SummaryRow | None:
    """The row of a finished, up-to-date result, or None when the slide must be (re)done: a
    missing or incomplete store, another configuration key, another slide file (fingerprint),
    or a user-given mpp (``--mpp-csv``) that changed for a slide whose mpp came from the user."""
    from .store import open_result, slide_fingerprint

    try:
        result = open_result(store)
    except WsiEngineError:
        return None
    if result.attrs.get("config_key") != key:
        return None
    slide = result.slide or {}
    if slide.get("mpp_source", "").startswith("user") and (
            mpp is None or any(abs(a - b) > 1e-9 for a, b in zip(slide.get("mpp") or (), mpp))):
        return None
    try:
        if (result.slide or {}).get("fingerprint") != slide_fingerprint(path):
            return None
    except OSError:
        return None
    pred = result.prediction or {}
    return SummaryRow(result.path.name.removesuffix(".zarr"), str(path), "skipped", label=pred.get("label_name", ""),
                      probability=pred.get("probability"), n_tiles=result.n_tiles,
                      seconds=(result.timings or {}).get("total"))


def _report_current(out: "ResultsLocation", slide_id: str, pipe: Pipeline) -> bool:
    """True when reports are off, or ``SLIDE_ID.report.json`` exists with the pipeline's report key."""
    import json

    wanted = pipe.report_key()
    if wanted is None:
        return True
    text = out.read_text(f"{slide_id}.report.json")
    try:
        return bool(text) and json.loads(text).get("provenance", {}).get("report_key") == wanted
    except ValueError:
        return False


def _refresh_report(out: "ResultsLocation", entry: SlideEntry, pipe: Pipeline, row: SummaryRow) -> SummaryRow | None:
    """Rewrite the report of an up-to-date slide from its store (its settings changed or it is
    missing); None (redo the slide) for URL targets or when that fails."""
    if out.is_url:
        return None
    try:
        pipe.write_report(out.path / f"{entry.slide_id}.zarr", out.path, slide=entry.path, slide_id=entry.slide_id)
    except Exception as exc:  # noqa: BLE001 - the slide is redone instead
        logger.warning("%s: rewriting the report from the store failed (%s); the slide is redone", entry.slide_id, exc)
        return None
    logger.info("%s: report rewritten from the up-to-date store", entry.slide_id)
    return row


def _remove_stale_temporaries(out_dir: Path) -> None:
    import shutil

    for p in out_dir.iterdir():
        stale = p.name.endswith(".partial") or (p.name.startswith(".") and (".partial" in p.name or p.name.endswith(".tmp")))
        if stale and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif stale:
            p.unlink(missing_ok=True)


def _local_workers(n_slides: int, workers: int | None, *, cap_by_slides: bool = True) -> int:
    """Local worker processes: ``workers`` or one per two physical cores (1 below 4 cores), never
    more than cores, and (in ``slides`` mode) never more than slides."""
    cores = physical_cores()
    if workers is None:
        workers = max(1, cores // 2) if cores >= 4 else 1
    limit = max(1, n_slides) if cap_by_slides else cores
    return max(1, min(int(workers), cores, limit))


def run_batch(slides_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
              spec: PipelineSpec | None = None, mpp_csv: str | os.PathLike[str] | None = None,
              workers: int | None = None, scheduler: str | None = None, client: Any | None = None,
              retry_failed: bool = False, progress: bool = False, parallel: str = "auto",
              chunk_tiles: int = 1024, on_row: Callable[[SummaryRow], None] | None = None) -> BatchSummary:
    """Process every slide under ``slides_dir`` into ``out_dir``; see the module docstring.

    Parameters
    ----------
    slides_dir : path
        A folder (searched recursively) or one slide file.
    out_dir : path
        Results folder (created); every worker must be able to write it.
    spec : PipelineSpec
        Encoder, MIL head and tiling (default: the shipped encoder and head).
    mpp_csv : path, optional
        ``slide,mpp`` CSV for slides without resolution metadata.
    workers : int, optional
        Local worker processes (default: one per two physical cores, 1 below 4 cores).
        Encoder threads per worker are ``cores // workers``.
    scheduler : str, optional
        Address of a running ``dask.distributed`` scheduler (``tcp://host:8786``).
    client : dask.distributed.Client, optional
        Use this client instead.
    retry_failed : bool
        Rerun slides that failed in an earlier run.
    progress : bool
        A progress bar over slides.
    parallel : {"auto", "slides", "chunks"}
        With several workers: one slide per worker task (``slides``), or one slide at a time
        with its tiles spread over the workers in chunks of ``chunk_tiles`` (``chunks``: tissue,
        MIL and outputs run here). ``auto`` takes ``chunks`` when fewer slides remain than
        workers, so a few large slides still use every worker.
    """
    if parallel not in ("auto", "slides", "chunks"):
        raise ConfigError(f"parallel must be 'auto', 'slides' or 'chunks', got {parallel!r}")
    from tqdm.auto import tqdm

    from .resolution import lookup_mpp, read_mpp_csv

    started = time.perf_counter()
    out = ResultsLocation(out_dir)
    if not out.is_url:
        _remove_stale_temporaries(out.path)
    entries = discover_slides(slides_dir, exclude=[] if out.is_url else [out.path])
    if not entries:
        raise ConfigError(f"no slides found under '{slides_dir}' (looked for {', '.join(sorted(SLIDE_EXTENSIONS))} "
                          "and files that open as slides)")
    mpp_table = read_mpp_csv(mpp_csv) if mpp_csv else {}
    mpps = {e.slide_id: lookup_mpp(mpp_table, e.path) if mpp_table else None for e in entries}
    previous = {r.slide_id: r for r in read_summary(out)}
    failures = _read_failures(out)

    spec = spec or PipelineSpec()
    distributed = client is not None or scheduler is not None
    n_workers = 1 if distributed else _local_workers(len(entries), workers, cap_by_slides=parallel == "slides")
    if spec.threads is None:
        spec = replace(spec, threads=max(1, physical_cores() // n_workers) if not distributed else None,
                       heatmaps=tuple(spec.heatmaps))
    pipe = _pipeline(spec)  # loads the pipeline here too: fails fast on a bad encoder, head or VLM endpoint
    key = pipe.config_key()

    rows: dict[str, SummaryRow] = {}
    todo: list[SlideEntry] = []
    for e in entries:
        done = _complete_result(out.join(f"{e.slide_id}.zarr"), key, e.path, mpps[e.slide_id])
        old = previous.get(e.slide_id)
        if done is not None and not _report_current(out, e.slide_id, pipe):
            done = _refresh_report(out, e, pipe, done)
        if done is not None:
            rows[e.slide_id] = done
        elif (old is not None and old.status == "failed" and not retry_failed
              and failures.get(e.slide_id) == _failure_inputs(e, key, mpps[e.slide_id])):
            rows[e.slide_id] = old  # failed before with the same inputs: not retried without --retry-failed
        else:
            todo.append(e)
    logger.info("%d slides: %d to process, %d up to date, %d failed before (retry with --retry-failed)",
                len(entries), len(todo), sum(r.status == "skipped" for r in rows.values()),
                sum(r.status == "failed" for r in rows.values()))

    def ordered() -> list[SummaryRow]:
        return [rows[e.slide_id] for e in entries if e.slide_id in rows]

    by_id = {e.slide_id: e for e in entries}

    def record(row: SummaryRow) -> None:
        rows[row.slide_id] = row
        if row.status == "failed":
            failures[row.slide_id] = _failure_inputs(by_id[row.slide_id], key, mpps[row.slide_id])
        else:
            failures.pop(row.slide_id, None)
        _write_failures(out, failures)
        _write_summary(out, ordered())
        bar.update(1)
        if on_row is not None:
            on_row(row)

    _write_summary(out, ordered())
    with tqdm(total=len(todo), unit="slide", disable=not progress, desc="slides") as bar:
        if todo and (distributed or n_workers > 1):
            _run_dask(todo, out, spec, mpps, record, client=client, scheduler=scheduler, workers=n_workers,
                      parallel=parallel, chunk_tiles=chunk_tiles, progress=progress)
        else:
            for e in todo:
                record(process_slide(e, str(out), spec, mpps[e.slide_id], progress))
    final = ordered()
    _write_summary(out, final)
    counts = {s: sum(r.status == s for r in final) for s in ("done", "failed", "skipped")}
    return BatchSummary(rows=final, out_dir=Path(out.target) if not out.is_url else out.target,
                        seconds=time.perf_counter() - started, workers=n_workers, counts=counts)


def _run_dask(todo: Sequence[SlideEntry], out: ResultsLocation, spec: PipelineSpec, mpps: dict[str, Any],
              record: Callable[[SummaryRow], None], *, client: Any | None, scheduler: str | None,
              workers: int, parallel: str = "auto", chunk_tiles: int = 1024, progress: bool = False) -> None:
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError as exc:  # pragma: no cover - distributed is a dependency
        raise ConfigError(f"parallel batches need dask.distributed: pip install distributed ({exc})") from exc
    own_cluster = own_client = None
    try:
        if client is None:
            if scheduler is not None:
                client = own_client = Client(scheduler)
            else:
                own_cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                           dashboard_address=None)
                client = own_client = Client(own_cluster)
        client.wait_for_workers(workers if own_cluster is not None else 1, timeout=120)
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        if parallel == "chunks" or (parallel == "auto" and len(todo) < n_workers):
            logger.info("%d slide(s) on %d workers: splitting each slide's tiles across the workers",
                        len(todo), n_workers)
            for e in todo:
                embed = chunked_embedder(client, spec, e.path, mpps[e.slide_id], chunk_tiles=chunk_tiles)
                record(_run_here(e, str(out), spec, mpps[e.slide_id], embed, progress))
            return
        futures = [client.submit(process_slide, e, str(out), spec, mpps[e.slide_id], pure=False,
                                 key=f"wsiengine-{e.slide_id}-{time.time_ns()}") for e in todo]
        by_key = {f.key: e for f, e in zip(futures, todo)}
        for future in as_completed(futures):
            entry = by_key[future.key]
            try:
                row = future.result()
            except Exception as exc:  # noqa: BLE001 - a worker died (out of memory, killed)
                row = SummaryRow(entry.slide_id, str(entry.path), "failed",
                                 error=f"worker lost while processing the slide: {type(exc).__name__}: {exc}")
            record(row)
    finally:
        if own_client is not None:
            own_client.close()
        if own_cluster is not None:
            own_cluster.close()
