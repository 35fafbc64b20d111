"""A folder of slides: discovery, resume, fault isolation, and Dask-parallel processing.

>>> summary = run_batch("slides/", "results/")                       # local, sized to the machine
>>> summary = run_batch("slides/", "results/", scheduler="tcp://host:8786")   # an existing cluster
>>> summary = run_batch("slides/", "results/", RunConfig.load("run.toml"), workers=2)
>>> [row.status for row in summary.rows]                             # done / failed / skipped

Each slide goes through :class:`~wsiengine.pipeline.Pipeline` (tissue, tiles, embeddings, MIL,
heatmaps, GeoJSON, overlay) into ``RESULTS_DIR/SLIDE_ID.*``. ``RESULTS_DIR/summary.csv`` has one
row per slide (``slide_id, path, status, label, probability, n_tiles, seconds, error``) and is
rewritten atomically after every slide, so it is always readable.

- **Resume.** A slide whose complete store exists with the same slide fingerprint and the
  same resume key (:meth:`RunConfig.key` of the resolved configuration) is ``skipped``; a changed
  configuration, encoder or head redoes it. Failures stay ``failed`` on a rerun unless
  ``retry_failed``.
- **Fault isolation.** Any error of one slide (unreadable file, missing mpp, ...) becomes a
  ``failed`` row with its message; the batch goes on. A killed run leaves only temporary
  names (removed by the next run) and stores that are not marked complete.
- **Parallelism.** Without a scheduler, slides run in a local ``dask.distributed`` cluster of
  ``workers`` processes with ``cores // workers`` encoder threads each (never more threads
  than cores); ``workers=1`` runs in this process. With ``scheduler`` (an address) or
  ``client``, the same tasks run on that cluster; each worker process loads the pipeline
  once, from the resolved configuration, and reuses it. Results go to ``out_dir``, which every
  worker must see.

Modules: :mod:`~wsiengine.batch.discovery` (which files are slides, their ids),
:mod:`~wsiengine.batch.location` (a folder or an fsspec URL), :mod:`~wsiengine.batch.summary`
(``summary.csv`` and failure records), :mod:`~wsiengine.batch.run` (what to redo, where each
slide runs).
"""


from .discovery import SLIDE_EXTENSIONS, SlideEntry, discover_slides
from .location import ResultsLocation
from .run import LOG_NAME, chunked_embedder, process_slide, run_batch
from .summary import SUMMARY_NAME, BatchSummary, SummaryRow, read_summary

__all__ = ["SLIDE_EXTENSIONS", "SlideEntry", "SummaryRow", "BatchSummary", "ResultsLocation", "discover_slides",
           "run_batch", "process_slide", "chunked_embedder", "read_summary", "SUMMARY_NAME", "LOG_NAME"]
