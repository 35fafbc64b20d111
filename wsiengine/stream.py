"""Dask-parallel patch reading with bounded memory -> PatchBatch iterator.

The grid is cut into chunks of ``batch_size`` consecutive tiles; each chunk is one Dask task
that reads its patches and hands back one :class:`PatchBatch`.

- **Local** (default): Dask's threaded scheduler runs the tasks (OpenSlide and tiffslide
  release the GIL while decoding). Each task puts its batch on a queue of ``max_in_flight``
  slots and waits while the queue is full, and the threaded scheduler runs at most
  ``num_workers`` tasks at once. So at most ``num_workers + max_in_flight + 1`` batches (the
  +1 is the one the caller holds) exist at any moment:
  memory <= (num_workers + max_in_flight + 1) x batch_size x (tile_px² x 3 bytes + one read buffer),
  whatever the slide size.
- **Distributed**: with ``client=`` (a ``dask.distributed.Client``) the same task runs on the
  cluster's workers, each reopening the slide once per process; at most
  ``num_workers + max_in_flight`` futures are pending at once, with the same bound.

Batches arrive in **completion order** by default (``batch.index`` says which grid rows they
hold); ``ordered=True`` yields them in grid order, holding early finishers until their turn.

Adjacent tiles of a chunk that share a grid row are read as one strip and cut into patches,
so a stored tile is decoded once per strip rather than once per patch. Each patch is resampled
at most once, from the read level straight to ``tile_px``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import dask
import dask.threaded  # noqa: F401 - imported up front, not on the first batch
import numpy as np

from .config import StreamConfig
from .slide import Slide, resize_area
from .tiling import TileGrid

__all__ = ["PatchBatch", "stream_patches", "read_patches", "iter_chunks", "bounded_as_completed"]

T = TypeVar("T")

logger = logging.getLogger("wsiengine")

#: widest strip read in one backend call, in read-level pixels
MAX_STRIP_PX = 4096


@dataclass(frozen=True, eq=False)
class PatchBatch:
    """A batch of patches.

    Attributes
    ----------
    images : numpy.ndarray
        ``(B, tile_px, tile_px, 3)`` uint8 RGB at the grid's ``target_mpp``.
    index : numpy.ndarray
        ``(B,)`` int64 rows of ``grid.coords`` these patches come from.
    """

    images: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes + self.index.nbytes)


def iter_chunks(n_tiles: int, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive index ranges ``[0, batch_size), [batch_size, 2 batch_size), ...``."""
    for start in range(0, n_tiles, batch_size):
        yield np.arange(start, min(start + batch_size, n_tiles), dtype=np.int64)


def _strips(grid: TileGrid, index: np.ndarray) -> list[np.ndarray]:
    """Split ``index`` into runs of horizontally adjacent tiles on one grid row."""
    if len(index) == 0:
        return []
    rows = grid.grid_index[index, 0]
    cols = grid.grid_index[index, 1]
    max_tiles = max(1, (MAX_STRIP_PX - grid.read_size[0]) // grid.stride_level_px[0] + 1)
    breaks = np.flatnonzero((np.diff(rows) != 0) | (np.diff(cols) != 1)) + 1
    runs: list[np.ndarray] = []
    for run in np.split(index, breaks):
        for start in range(0, len(run), max_tiles):
            runs.append(run[start : start + max_tiles])
    return runs


def read_patches(slide: Slide, grid: TileGrid, index: np.ndarray) -> PatchBatch:
    """Read the patches ``grid.coords[index]`` into one :class:`PatchBatch` (the Dask task body)."""
    index = np.asarray(index, dtype=np.int64)
    tile = grid.tile_px
    images = np.empty((len(index), tile, tile, 3), dtype=np.uint8)
    read_w, read_h = grid.read_size
    downsample = slide.level_downsamples[grid.read_level]
    # An exact integer shrink can be applied to a whole strip at once: tile origins inside a
    # strip are multiples of the stride, itself a multiple of the factor, so each output pixel
    # averages exactly the block it would if the patch were shrunk on its own.
    factor = read_w // tile if read_w == read_h and read_w % tile == 0 else 0
    position = {int(i): k for k, i in enumerate(index)}
    for run in _strips(grid, index):
        x0, y0 = grid.coords[run[0]]
        # Origins inside the strip, in read-level pixels; the last tile may have been clamped
        # against the slide edge, so use real coordinates, not the nominal stride.
        offsets = [int(round((grid.coords[i, 0] - x0) / downsample)) for i in run]
        strip = slide.read_region((int(x0), int(y0)), grid.read_level, (offsets[-1] + read_w, read_h))
        exact = factor > 1 and all(off % factor == 0 for off in offsets) and strip.shape[1] % factor == 0
        if exact:
            strip = resize_area(strip, (strip.shape[1] // factor, tile))
        for i, off in zip(run, offsets):
            if exact:
                images[position[int(i)]] = strip[:, off // factor : off // factor + tile]
            elif grid.resamples:
                images[position[int(i)]] = resize_area(np.ascontiguousarray(strip[:, off : off + read_w]), (tile, tile))
            else:
                images[position[int(i)]] = strip[:, off : off + read_w]
    return PatchBatch(images=images, index=index)


def stream_patches(
    slide: Slide,
    grid: TileGrid,
    batch_size: int | None = None,
    *,
    num_workers: int | None = None,
    max_in_flight: int | None = None,
    ordered: bool | None = None,
    client: Any | None = None,
    config: StreamConfig | None = None,
) -> Iterator[PatchBatch]:
    """Stream the grid's patches in batches, reading in parallel with bounded memory.

    Parameters
    ----------
    slide : Slide
    grid : TileGrid
        From :func:`~wsiengine.tiling.plan_tiles` on the same slide.
    batch_size : int
        Most patches per batch (default 64). A grid with fewer than ``batch_size x workers``
        tiles is cut into ``ceil(N / workers)``-tile batches so that every worker reads.
    num_workers : int
        Reader threads for the local threaded scheduler (default: one per core).
    max_in_flight : int
        Finished batches that may wait for the consumer (default 4). See the module docstring
        for the memory bound.
    ordered : bool
        Yield in grid order instead of completion order.
    client : dask.distributed.Client, optional
        Run the reads on a Dask cluster instead of local threads.
    config : StreamConfig, optional
        Defaults for the arguments above; explicit arguments win.

    Yields
    ------
    PatchBatch
    """
    config = StreamConfig.given(config, batch_size=batch_size, num_workers=num_workers, max_in_flight=max_in_flight,
                                ordered=ordered)
    if len(grid) == 0:
        return iter(())
    # Small grids are cut finer so every worker has a share (batches then hold fewer patches).
    workers = config.workers if client is None else max(1, sum(client.nthreads().values()))
    chunk = max(1, min(config.batch_size, -(-len(grid) // workers)))
    chunks = list(iter_chunks(len(grid), chunk))
    if client is not None:
        source = _stream_distributed(client, slide, grid, chunks, config)
    else:
        source = _stream_threaded(slide, grid, chunks, config)
    return _in_grid_order(source, chunks) if config.ordered else source


def _in_grid_order(source: Iterator[PatchBatch], chunks: list[np.ndarray]) -> Iterator[PatchBatch]:
    waiting: dict[int, PatchBatch] = {}
    first_of = {int(c[0]): k for k, c in enumerate(chunks)}
    next_chunk = 0
    for batch in source:
        waiting[first_of[int(batch.index[0])]] = batch
        while next_chunk in waiting:
            yield waiting.pop(next_chunk)
            next_chunk += 1


_DONE = object()


def _stream_threaded(slide: Slide, grid: TileGrid, chunks: list[np.ndarray], config: StreamConfig) -> Iterator[PatchBatch]:
    results: queue.Queue = queue.Queue(maxsize=config.max_in_flight)
    cancelled = threading.Event()

    def deliver(index: np.ndarray) -> None:
        if cancelled.is_set():
            return
        batch = read_patches(slide, grid, index)
        while not cancelled.is_set():
            try:
                results.put(batch, timeout=0.1)
                return
            except queue.Full:
                continue

    tasks = [dask.delayed(deliver, pure=False)(c, dask_key_name=("read-patches", k)) for k, c in enumerate(chunks)]

    def run() -> None:
        try:
            dask.compute(*tasks, scheduler="threads", num_workers=config.workers, optimize_graph=False)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            _put_until_cancelled(results, exc, cancelled)
            return
        _put_until_cancelled(results, _DONE, cancelled)

    thread = threading.Thread(target=run, name="wsiengine-stream", daemon=True)
    thread.start()
    try:
        while True:
            item = results.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancelled.set()
        while thread.is_alive():  # unblock tasks waiting on a full queue, then let them finish
            try:
                results.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


def _put_until_cancelled(results: queue.Queue, item: object, cancelled: threading.Event) -> None:
    while not cancelled.is_set():
        try:
            results.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def bounded_as_completed(client: Any, submit: Callable[[T], Any], items: Iterable[T], limit: int
                         ) -> Iterator[tuple[T, Any]]:
    """Run ``submit(item)`` (which returns a Dask future) for each of ``items`` with at most
    ``limit`` futures outstanding; yield ``(item, finished future)`` in completion order.
    Memory is bounded by ``limit`` results whatever the number of items; futures still
    pending when the consumer stops are cancelled."""
    from distributed import as_completed

    pending = iter(items)
    futures = as_completed()
    items_by_key: dict[str, T] = {}

    def add(item: T) -> None:
        future = submit(item)
        items_by_key[future.key] = item
        futures.add(future)

    for item in pending:
        add(item)
        if futures.count() >= limit:
            break
    try:
        for future in futures:
            item = items_by_key.pop(future.key)
            nxt = next(pending, None)
            if nxt is not None:
                add(nxt)
            yield item, future
    finally:
        for future in list(futures.futures):
            future.cancel()


def _stream_distributed(client: Any, slide: Slide, grid: TileGrid, chunks: list[np.ndarray], config: StreamConfig) -> Iterator[PatchBatch]:
    limit = config.max_in_flight + max(1, sum(client.nthreads().values()))
    slide_future = client.scatter(slide, broadcast=True, hash=False)
    grid_future = client.scatter(grid, broadcast=True, hash=False)
    submit = lambda chunk: client.submit(read_patches, slide_future, grid_future, chunk, pure=False)  # noqa: E731
    for _, future in bounded_as_completed(client, submit, chunks, limit):
        batch = future.result()
        future.release()
        yield batch
