"""Streaming patches: completeness, pixels, order, bounded memory, cancellation, Dask distributed."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import wsiengine.stream as stream_module
from wsiengine import errors, open_slide, plan_tiles, stream_patches


@pytest.fixture(scope="module")
def cmu(cmu_small):
    return open_slide(cmu_small)


@pytest.fixture(scope="module")
def cmu_grid(cmu):
    return plan_tiles(cmu, None, target_mpp=0.5, tile_px=224, min_tissue=0)


def test_every_tile_arrives_once_with_its_pixels(cmu, cmu_grid):
    seen = []
    for batch in stream_patches(cmu, cmu_grid, batch_size=7):
        assert batch.images.shape == (len(batch), 224, 224, 3) and batch.images.dtype == np.uint8
        for image, i in zip(batch.images, batch.index):
            x, y = cmu_grid.coords[i]
            np.testing.assert_array_equal(image, cmu.read_region((int(x), int(y)), 0, (224, 224)))
        seen.extend(batch.index.tolist())
    assert sorted(seen) == list(range(len(cmu_grid)))


@pytest.mark.parametrize(
    ("target_mpp", "overlap_px"),
    [(1.3, 16), (0.998, 0), (0.998, 32)],  # a fractional shrink; an exact 2x shrink, whole strips at once
)
def test_resampled_patches_equal_single_reads(cmu, target_mpp, overlap_px):
    grid = plan_tiles(cmu, None, target_mpp=target_mpp, tile_px=96, overlap_px=overlap_px, min_tissue=0)
    assert grid.resamples
    for batch in stream_patches(cmu, grid, batch_size=16, ordered=True):
        for image, i in zip(batch.images, batch.index):
            x, y = grid.coords[i]
            np.testing.assert_array_equal(image, cmu.read_at_mpp((int(x), int(y)), (96, 96), target_mpp))


def test_ordered_stream_is_in_grid_order(cmu, cmu_grid):
    indices = np.concatenate([b.index for b in stream_patches(cmu, cmu_grid, batch_size=5, ordered=True, num_workers=2)])
    np.testing.assert_array_equal(indices, np.arange(len(cmu_grid)))


def test_batches_in_flight_stay_bounded(cmu, cmu_grid, monkeypatch):
    produced = 0
    lock = threading.Lock()
    real = stream_module.read_patches

    def counting(*args, **kwargs):
        nonlocal produced
        batch = real(*args, **kwargs)
        with lock:
            produced += 1
        return batch

    monkeypatch.setattr(stream_module, "read_patches", counting)
    consumed, worst = 0, 0
    workers, in_flight = 2, 2
    for _ in stream_patches(cmu, cmu_grid, batch_size=2, num_workers=workers, max_in_flight=in_flight):
        threading.Event().wait(0.01)  # a slow consumer
        consumed += 1
        worst = max(worst, produced - consumed)
    assert consumed == -(-len(cmu_grid) // 2)
    assert worst <= workers + in_flight + 1


def test_breaking_early_stops_the_readers(cmu, cmu_grid):
    before = {t.name for t in threading.enumerate()}
    for k, _ in enumerate(stream_patches(cmu, cmu_grid, batch_size=2, max_in_flight=1)):
        if k == 2:
            break
    threading.Event().wait(0.2)
    alive = [t for t in threading.enumerate() if t.name == "wsiengine-stream" and t.name not in before]
    assert not alive


def test_read_errors_reach_the_consumer(cmu, cmu_grid, monkeypatch):
    def broken(x, y, level, w, h):
        raise OSError("simulated damaged tile")

    slide = open_slide(cmu.path)
    monkeypatch.setattr(slide.backend, "read_region", broken)
    with pytest.raises(errors.SlideReadError, match="simulated damaged tile"):
        for _ in stream_patches(slide, cmu_grid, batch_size=4):
            pass


def test_empty_grid_streams_nothing(cmu, cmu_grid):
    assert list(stream_patches(cmu, cmu_grid.subset(np.zeros(len(cmu_grid), bool)))) == []


def test_distributed_client_gives_the_same_patches(cmu, cmu_grid):
    distributed = pytest.importorskip("distributed")
    local = {int(i): img for b in stream_patches(cmu, cmu_grid, batch_size=9) for i, img in zip(b.index, b.images)}
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            remote = {}
            for batch in stream_patches(cmu, cmu_grid, batch_size=9, client=client, max_in_flight=2):
                remote.update({int(i): img for i, img in zip(batch.index, batch.images)})
    assert remote.keys() == local.keys()
    for i in local:
        np.testing.assert_array_equal(remote[i], local[i])
