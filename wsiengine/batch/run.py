"""Orchestration of a batch: what to (re)do, where each slide runs, and recording the rows.

Every process (this one and each Dask worker) builds its :class:`Pipeline` from the same
resolved :class:`~wsiengine.config.RunConfig`, once, and reuses it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import OLD_FOLDER, TEMP_FILE
from ..config import RunConfig, physical_cores
from ..errors import ConfigError, OutputError, WsiEngineError, log_safe
from ..pipeline import Pipeline, configured_mpp
from ..stream import bounded_as_completed
from .anonymize import ID_MAP_NAME, RedactingFormatter, anonymize_entries, redact
from .discovery import SLIDE_EXTENSIONS, SlideEntry, discover_slides
from .location import OutputLock, ResultsLocation, _pid_alive
from .summary import (
    BatchSummary,
    SummaryRow,
    failure_inputs,
    read_failures,
    read_summary,
    write_failures,
    write_summary,
)

__all__ = ["run_batch", "process_slide", "chunked_embedder", "LOG_NAME"]

logger = logging.getLogger("wsiengine")

LOG_NAME = "wsiengine.log"

_PIPELINES: dict[RunConfig, Pipeline] = {}


def _pipeline(config: RunConfig) -> Pipeline:
    """The process's pipeline for ``config``: loaded once per worker process and reused while its
    model files are unchanged on disk (a replaced head is loaded, and verified, again)."""
    pipe = _PIPELINES.get(config)
    if pipe is not None and not pipe.models_unchanged():
        logger.info("model files changed since they were loaded; loading and verifying them again")
        for key in [k for k, v in _PIPELINES.items() if v is pipe]:
            del _PIPELINES[key]
        pipe = None
    if pipe is None:
        pipe = _PIPELINES[config] = Pipeline(config)
    return pipe


#: errno values of a write that failed because of the output, not the slide
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _output_oserror(exc: BaseException) -> OSError | None:
    """The output-side OSError (full disk, quota, read-only, permissions) in ``exc``'s chain, if any."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in _OUTPUT_ERRNOS:
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _error_text(exc: BaseException, out_dir: str = "") -> str:
    disk = _output_oserror(exc)
    if disk is not None and not isinstance(exc, WsiEngineError):
        where = f" in '{out_dir}'" if out_dir else ""
        return (f"OutputError: cannot write the slide's results{where}: {disk.strerror or disk}"
                f"{f' ({disk.filename})' if disk.filename else ''}; free disk space or fix permissions, "
                "then rerun the same command")
    if isinstance(exc, WsiEngineError):
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}: {exc} (unexpected; see {LOG_NAME})"


def process_slide(entry: SlideEntry, out_dir: str, config: RunConfig, mpp: tuple[float, float] | None = None,
                  progress: bool = False, embed: Any = None) -> SummaryRow:
    """Run one slide (in whichever process the scheduler chose); never raises for slide errors.
    ``progress`` shows a tile progress bar (local runs on a terminal); ``embed`` replaces the
    local encoder loop (:func:`chunked_embedder`)."""
    started = time.perf_counter()
    staging = None
    try:
        pipe = _pipeline(config)
        out = ResultsLocation(out_dir)
        if out.is_url:
            staging = Path(tempfile.mkdtemp(prefix=f"wsiengine-{entry.slide_id}-"))
        res = pipe.run(entry.path, out=staging or out.path, slide_id=entry.slide_id, mpp=mpp, progress=progress,
                       embed=embed, results_dir=None if staging is not None else out.path,
                       timeout_s=config.batch.slide_timeout_s)
        if staging is not None:
            out.publish(staging, entry.slide_id)
        label = pipe.mil.class_names[res.label] if res.prediction is not None else (
            "no tissue" if res.status == "no_tissue" else "")
        node = res.node or {}
        return SummaryRow(entry.slide_id, entry.shown_path, "done", label=label, probability=res.probability,
                          category=str(node.get("category") or ""), largest_mm=node.get("largest_mm"),
                          n_tiles=res.n_tiles, seconds=time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001 - one bad slide never stops the batch
        text = redact(entry, _error_text(exc, out_dir))
        logger.error("%s failed: %s", log_safe(entry.slide_id), log_safe(text),
                     exc_info=not isinstance(exc, WsiEngineError) and _output_oserror(exc) is None)
        return SummaryRow(entry.slide_id, entry.shown_path, "failed", seconds=time.perf_counter() - started,
                          error=text)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


_SLIDES: dict[tuple[str, Any], Any] = {}


def embed_tile_chunk(config: RunConfig, path: str, mpp: tuple[float, float] | None, grid: Any) -> np.ndarray:
    """Worker task of the ``chunks`` mode: embed every tile of ``grid`` (a chunk of one slide's
    grid) with the worker's cached pipeline; returns ``(len(grid), D)`` float32 in grid order."""
    pipe = _pipeline(config)
    slide = _SLIDES.get((path, mpp))
    if slide is None:
        if len(_SLIDES) > 4:
            _SLIDES.pop(next(iter(_SLIDES))).close()
        slide = _SLIDES[(path, mpp)] = pipe.open(path, mpp=mpp)
    out = np.empty((len(grid), pipe.encoder.embed_dim), dtype=np.float32)
    for index, features in pipe.encoder.stream(slide, grid, pipe.config.stream.batch_size, config=pipe.config.stream):
        out[index] = features
    return out


def chunked_embedder(client: Any, config: RunConfig, path: Path, mpp: tuple[float, float] | None, *,
                     chunk_tiles: int = 1024, in_flight: int | None = None):
    """An ``embed(slide, grid)`` for :meth:`Pipeline.run` that spreads the grid over the cluster in
    chunks of ``chunk_tiles`` tiles, at most ``in_flight`` chunks outstanding (default: 2 per
    worker), so memory stays bounded by ``in_flight x chunk_tiles x D`` floats."""

    def embed(slide: Any, grid: Any):
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))

        def submit(start: int) -> Any:
            sub = grid.subset(np.arange(start, min(start + chunk_tiles, len(grid))))
            return client.submit(embed_tile_chunk, config, str(path), mpp, sub, pure=False)

        starts = range(0, len(grid), chunk_tiles)
        for start, future in bounded_as_completed(client, submit, starts, in_flight or 2 * n_workers):
            features = future.result()
            yield np.arange(start, start + len(features)), features

    return embed


def _complete_result(store: str, key: str, entry: SlideEntry, mpp: tuple[float, float] | None = None,
                     out: ResultsLocation | None = None) -> SummaryRow | None:
    """The row of a finished, up-to-date result, or None when the slide must be (re)done: a
    missing or incomplete store, another configuration key, another slide file (fingerprint),
    a user-given mpp that changed for a slide whose mpp came from the user, or a side output
    the store records (GeoJSON, overlay) that is no longer in ``out``."""
    from ..store import open_result, slide_fingerprint

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
        if slide.get("fingerprint") != slide_fingerprint(entry.path):
            return None
    except OSError:
        return None
    recorded = result.attrs.get("outputs") or []
    if out is not None and any(isinstance(n, str) and out.read_bytes_size(n) is None for n in recorded):
        return None
    pred = result.prediction or {}
    node = result.node or {}
    largest = node.get("largest_mm")
    return SummaryRow(result.path.name.removesuffix(".zarr"), entry.shown_path, "skipped", label=pred.get("label_name", ""),
                      probability=pred.get("probability"), category=str(node.get("category") or ""),
                      largest_mm=float(largest) if isinstance(largest, (int, float)) else None, n_tiles=result.n_tiles,
                      seconds=(result.timings or {}).get("total"))


def _report_current(out: ResultsLocation, slide_id: str, pipe: Pipeline) -> bool:
    """True when reports are off, or ``SLIDE_ID.report.json`` exists with the pipeline's report key
    and the Markdown and every image it lists exist too (a run killed mid-swap, a deleted file)."""
    import json

    wanted = pipe.report_key()
    if wanted is None:
        return True
    text = out.read_text(f"{slide_id}.report.json")
    try:
        document = json.loads(text) if text else {}
    except ValueError:
        return False
    if not isinstance(document, dict) or document.get("provenance", {}).get("report_key") != wanted:
        return False
    images = document.get("images") or {}
    names = [f"{slide_id}.report.md", images.get("thumbnail"), images.get("heatmap"), *(images.get("evidence") or [])]
    return all(isinstance(n, str) and out.read_bytes_size(n) is not None for n in names if n is not None)


def _refresh_report(out: ResultsLocation, entry: SlideEntry, pipe: Pipeline, row: SummaryRow) -> SummaryRow | None:
    """Rewrite the report of an up-to-date slide from its store (its settings changed or it is
    missing); None (redo the slide) for URL targets or when that fails."""
    if out.is_url:
        return None
    try:
        pipe.write_report(out.path / f"{entry.slide_id}.zarr", out.path, slide=entry.path, slide_id=entry.slide_id)
    except Exception as exc:  # noqa: BLE001 - the slide is redone instead
        logger.warning("%s: rewriting the report from the store failed (%s); the slide is redone", log_safe(entry.slide_id),
                       log_safe(exc))
        return None
    logger.info("%s: report rewritten from the up-to-date store", log_safe(entry.slide_id))
    return row


#: temporaries the engine leaves in an output folder when a run is killed, by exact name pattern:
#: a store being built (store.FeatureWriter: ``SLIDE.zarr.partial``), a side file being staged
#: (pipeline._Staged: ``.SLIDE.partial.geojson``, ``.SLIDE.heatmap.partial.png``), a report being
#: built (``.SLIDE.report.partial-PID``), the temporaries of atomic.atomic_write
#: (``.NAME.PID.HEX8.tmp``) and the set-aside folders of atomic.replace_directory
#: (``.NAME.partial-old-PID-HEX8``; ``NAME.zarr.old`` from older versions).
_STORE_PARTIAL = re.compile(r"^(?P<name>[^/]+\.zarr)\.partial$")
_STAGED_FILE = re.compile(r"^\.(?P<stem>.+)\.partial\.(?:geojson|png|md|json)$")
_REPORT_PARTIAL = re.compile(r"^\.(?P<sid>.+)\.report\.partial-(?P<pid>\d+)$")
_LEGACY_OLD = re.compile(r"^(?P<name>.+\.zarr)\.old$")


def _engine_temporary(p: Path) -> tuple[str, int | None] | None:
    """``(kind, pid or None)`` when ``p`` is a temporary the engine makes, else None."""
    name = p.name
    if _STORE_PARTIAL.match(name) and p.is_dir():
        return "store", None
    if _STAGED_FILE.match(name) and p.is_file():
        return "staged", None
    if (m := _REPORT_PARTIAL.match(name)) and p.is_dir():
        return "report", int(m["pid"])
    if (m := TEMP_FILE.match(name)) and p.is_file():
        return "tmp", int(m["pid"])
    if (m := OLD_FOLDER.match(name)) and p.is_dir():
        return "old", int(m["pid"])
    if _LEGACY_OLD.match(name) and p.is_dir() and (p / "zarr.json").is_file():
        return "old", None
    return None


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Clear what killed runs left in ``out_dir`` (this run holds the folder's lock, so no other
    run is writing there): only names the engine makes, never a user's ``notes.tmp`` or
    ``x.partial``; files whose pid is a live process other than this one are left alone (a
    ``wsiengine report`` writing there). A folder set aside by a swap that was killed before the
    new folder took its place (``.NAME.partial-old-*`` or ``NAME.zarr.old`` with no ``NAME``) is
    put back."""
    for p in sorted(out_dir.iterdir()):
        found = _engine_temporary(p)
        if found is None:
            continue
        kind, pid = found
        if pid is not None and pid != os.getpid() and _pid_alive(pid):
            continue
        if kind == "old":
            m = OLD_FOLDER.match(p.name) or _LEGACY_OLD.match(p.name)
            final = p.with_name(m["name"])
            if not final.exists():
                try:
                    os.replace(p, final)
                    logger.warning("restored '%s' from '%s', left by an interrupted run", final.name, p.name)
                    continue
                except OSError as exc:
                    logger.warning("could not restore '%s' from '%s': %s", final.name, p.name, exc)
                    continue
        logger.info("removing '%s', left by an interrupted run", p.name)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def local_workers(n_slides: int, workers: int | None, *, cap_by_slides: bool = True) -> int:
    """Local worker processes: ``workers`` or one per two physical cores (1 below 4 cores), never
    more than cores, and (in ``slides`` mode) never more than slides."""
    cores = physical_cores()
    if workers is None:
        workers = max(1, cores // 2) if cores >= 4 else 1
    limit = max(1, n_slides) if cap_by_slides else cores
    return max(1, min(int(workers), cores, limit))


def _share_threads(config: RunConfig, n_workers: int, distributed: bool) -> RunConfig:
    """Give each local worker its share of the cores (encoder and reader threads), unless set."""
    if distributed:
        return config
    share = max(1, physical_cores() // n_workers)
    changes = {}
    if config.encoder.threads == 0:
        changes["encoder.threads"] = share
    if config.stream.num_workers == 0:
        changes["stream.num_workers"] = share
    return config.replace(**changes) if changes else config


def _id_map_path(out: ResultsLocation, config: RunConfig) -> Path:
    """Where an anonymized run keeps its private id map: ``id_map``, else ``OUT/private/slide-ids.csv``."""
    if config.outputs.id_map:
        return Path(config.outputs.id_map).expanduser()
    if out.is_url:
        raise ConfigError(f"anonymize_ids with results at a URL ('{out}') needs id_map (--id-map), a local path "
                          "for the private file that maps anonymous ids to slides")
    return out.path / ID_MAP_NAME


_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def _log_file(out: ResultsLocation) -> Iterator[logging.Handler]:
    """Copy the run's log (INFO and above, whatever the console shows) to ``OUT/wsiengine.log``;
    for a URL target the log is kept in a local temporary file and uploaded at the end."""
    local = None if out.is_url else out.path / LOG_NAME
    if local is None:
        fd, name = tempfile.mkstemp(prefix="wsiengine-", suffix=".log")
        os.close(fd)
    handler = logging.FileHandler(local or name, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    handler.setLevel(logging.INFO)
    level = logger.level
    logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()
        if local is None:
            try:
                out.write_bytes(LOG_NAME, Path(name).read_bytes())
            except OSError as exc:
                logger.warning("could not upload %s to %s: %s", LOG_NAME, out, exc)
            finally:
                Path(name).unlink(missing_ok=True)


def run_batch(slides_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
              config: RunConfig | str | os.PathLike[str] | None = None, *, client: Any | None = None,
              progress: bool = False, on_row: Callable[[SummaryRow], None] | None = None,
              **settings: Any) -> BatchSummary:
    """Process every slide under ``slides_dir`` into ``out_dir``; see :mod:`wsiengine.batch`.

    Parameters
    ----------
    slides_dir : path
        A folder (searched recursively) or one slide file.
    out_dir : path or URL
        Results folder (created) or fsspec URL; every worker must be able to write it.
    config : RunConfig or path, optional
        The run's settings (a path is a TOML file); default :meth:`RunConfig.load`. Its
        ``batch`` section says how slides run: ``workers`` (local processes), ``scheduler`` (a
        ``dask.distributed`` address), ``parallel`` (``slides``, ``chunks`` or ``auto``),
        ``chunk_tiles``, ``retry_failed``; ``slide.mpp_csv`` gives slides without metadata their mpp.
    client : dask.distributed.Client, optional
        Run on this client's cluster.
    progress : bool
        A progress bar over slides.
    on_row : callable, optional
        Called with each slide's row as it is recorded.
    **settings
        Any setting by flat or dotted name (``workers=2``, ``mpp_csv="mpp.csv"``,
        ``min_tissue=0.5``), applied over ``config``.

    The log (INFO and above) is copied to ``out_dir/wsiengine.log`` (uploaded at the end for URLs).
    """
    started = time.perf_counter()
    base = config.replace(**settings) if isinstance(config, RunConfig) else RunConfig.load(config, **settings)
    out = ResultsLocation(out_dir)
    out.check_writable()
    lock = contextlib.nullcontext() if out.is_url else OutputLock(out.path)
    with lock, _log_file(out) as log:
        return _run_batch(slides_dir, out, base, client=client, progress=progress, on_row=on_row, started=started,
                          log=log)


def _write_rows(out: ResultsLocation, rows: list[SummaryRow], failures: dict[str, Any] | None = None) -> None:
    """Write ``summary.csv`` (and the failure record); a failed write stops the batch with an
    :class:`~wsiengine.errors.OutputError` (the results written so far stay and are resumed)."""
    try:
        if failures is not None:
            write_failures(out, failures)
        write_summary(out, rows)
    except OSError as exc:
        raise OutputError(f"cannot write summary.csv in '{out}': {exc.strerror or exc}; the batch stops here. "
                          "Free disk space or fix permissions, then rerun the same command to resume") from exc


def _run_batch(slides_dir: str | os.PathLike[str], out: ResultsLocation, base: RunConfig, *, client: Any | None,
               progress: bool, on_row: Callable[[SummaryRow], None] | None, started: float,
               log: logging.Handler | None = None) -> BatchSummary:
    from tqdm.auto import tqdm

    from ..resolution import read_mpp_csv

    batch = base.batch
    if not out.is_url:
        _remove_stale_temporaries(out.path)
    entries = discover_slides(slides_dir, exclude=[] if out.is_url else [out.path])
    if not entries:
        raise ConfigError(f"no slides found under '{slides_dir}' (looked for {', '.join(sorted(SLIDE_EXTENSIONS))} "
                          "and files that open as slides)")
    if base.outputs.anonymize_ids:
        entries = anonymize_entries(entries, _id_map_path(out, base))
        if log is not None:
            log.setFormatter(RedactingFormatter(_LOG_FORMAT, entries))
    mpp_table = read_mpp_csv(base.slide.mpp_csv) if base.slide.mpp_csv else {}
    mpps = {e.slide_id: configured_mpp(e.path, base.slide, mpp_table) for e in entries}
    previous = {r.slide_id: r for r in read_summary(out)}
    failures = read_failures(out)

    distributed = client is not None or batch.scheduler is not None
    if distributed and batch.workers is not None:
        logger.info("workers=%d ignored: the slides run on %s", batch.workers, batch.scheduler or "the given client")
    n_workers = 1 if distributed else local_workers(len(entries), batch.workers,
                                                    cap_by_slides=batch.parallel == "slides")
    # Loads the pipeline here too: fails fast on a bad encoder, head or VLM endpoint, and
    # resolves the configuration once; workers receive the resolved one.
    pipe = _pipeline(_share_threads(base, n_workers, distributed))
    resolved = pipe.config
    _PIPELINES.setdefault(resolved, pipe)
    key = resolved.key()

    rows: dict[str, SummaryRow] = {}
    todo: list[SlideEntry] = []
    for e in entries:
        done = _complete_result(out.join(f"{e.slide_id}.zarr"), key, e, mpps[e.slide_id], out)
        old = previous.get(e.slide_id)
        if done is not None and not _report_current(out, e.slide_id, pipe):
            done = _refresh_report(out, e, pipe, done)
        if done is not None:
            rows[e.slide_id] = done
        elif (old is not None and old.status == "failed" and not batch.retry_failed
              and failures.get(e.slide_id) == failure_inputs(e, key, mpps[e.slide_id])):
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
            failures[row.slide_id] = failure_inputs(by_id[row.slide_id], key, mpps[row.slide_id])
        else:
            failures.pop(row.slide_id, None)
        _write_rows(out, ordered(), failures)
        bar.update(1)
        if on_row is not None:
            on_row(row)

    _write_rows(out, ordered())
    with tqdm(total=len(todo), unit="slide", disable=not progress, desc="slides") as bar:
        if todo and (distributed or n_workers > 1):
            _run_dask(todo, out, resolved, mpps, record, client=client, workers=n_workers, progress=progress)
        else:
            for e in todo:
                record(process_slide(e, str(out), resolved, mpps[e.slide_id], progress))
    final = ordered()
    _write_rows(out, final)
    counts = {s: sum(r.status == s for r in final) for s in ("done", "failed", "skipped")}
    return BatchSummary(rows=final, out_dir=Path(out.target) if not out.is_url else out.target,
                        seconds=time.perf_counter() - started, workers=n_workers, counts=counts)


def _run_dask(todo: Sequence[SlideEntry], out: ResultsLocation, config: RunConfig, mpps: dict[str, Any],
              record: Callable[[SummaryRow], None], *, client: Any | None, workers: int, progress: bool = False) -> None:
    from dask.distributed import Client, LocalCluster, as_completed

    batch = config.batch
    own_cluster = own_client = None
    try:
        if client is None:
            if batch.scheduler is not None:
                client = own_client = Client(batch.scheduler)
            else:
                own_cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                           dashboard_address=None)
                client = own_client = Client(own_cluster)
        client.wait_for_workers(workers if own_cluster is not None else 1, timeout=120)
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        if batch.parallel == "chunks" or (batch.parallel == "auto" and len(todo) < n_workers):
            logger.info("%d slide(s) on %d workers: splitting each slide's tiles across the workers",
                        len(todo), n_workers)
            for e in todo:
                embed = chunked_embedder(client, config, e.path, mpps[e.slide_id], chunk_tiles=batch.chunk_tiles)
                record(process_slide(e, str(out), config, mpps[e.slide_id], progress, embed))
            return
        futures = [client.submit(process_slide, e, str(out), config, mpps[e.slide_id], pure=False,
                                 key=f"wsiengine-{e.slide_id}-{time.time_ns()}") for e in todo]
        by_key = {f.key: e for f, e in zip(futures, todo)}
        for future in as_completed(futures):
            entry = by_key[future.key]
            try:
                row = future.result()
            except Exception as exc:  # noqa: BLE001 - a worker died (out of memory, killed)
                row = SummaryRow(entry.slide_id, entry.shown_path, "failed",
                                 error=f"worker lost while processing the slide: {type(exc).__name__}: {exc}")
            record(row)
    finally:
        if own_client is not None:
            own_client.close()
        if own_cluster is not None:
            own_cluster.close()
