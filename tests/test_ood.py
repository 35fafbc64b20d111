"""Out-of-distribution check (wsiengine.ood.EmbeddingReference): calibrated on Gaussian
embeddings, shifted or rescaled embeddings are flagged, the file round-trips and damaged files
are explained, streaming equals fitting on the whole; with the shipped default head, real H&E
tiles are in distribution and featureless images are not."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from wsiengine.aggregate import REFERENCE_NAME, MILHead, default_head_path
from wsiengine.errors import ConfigError, ModelError
from wsiengine.ood import REFERENCE_FORMAT, EmbeddingReference

from .conftest import shared_file

D, RANK = 64, 6


def gaussian_embeddings(n: int, seed: int, *, loadings_seed: int = 0) -> np.ndarray:
    """``(n, D)`` float32 from a fixed rank-6 factor model plus isotropic noise, around an offset mean."""
    model = np.random.default_rng(loadings_seed)
    loadings = model.normal(0.0, 2.0, (RANK, D))
    mean = model.uniform(3.0, 6.0, D)
    rng = np.random.default_rng(seed)
    return (mean + rng.normal(size=(n, RANK)) @ loadings + rng.normal(0.0, 0.5, (n, D))).astype(np.float32)


@pytest.fixture(scope="module")
def reference() -> EmbeddingReference:
    return EmbeddingReference.fit(gaussian_embeddings(20_000, seed=1), n_components=8, encoder="toy", source="test")


# -- the statistics ----------------------------------------------------------------------------

@pytest.mark.parametrize("quantile", [0.9, 0.99, 0.999])
def test_fresh_in_distribution_tiles_exceed_a_quantile_at_its_rate(reference, quantile):
    fresh = gaussian_embeddings(40_000, seed=2)
    fraction = reference.outlier_fraction(fresh, quantile)
    assert fraction == pytest.approx(1 - quantile, abs=max(0.25 * (1 - quantile), 0.002))


def test_distances_are_about_one_for_typical_tiles_and_thresholds_increase(reference):
    d = reference.distance(gaussian_embeddings(5_000, seed=3))
    assert d.dtype == np.float32 and d.shape == (5_000,)
    assert 0.8 < float(np.median(d)) < 1.2  # the sqrt(D) normalisation
    levels = [0.0, 0.5, 0.9, 0.99, 0.999, 1.0]
    thresholds = [reference.threshold(q) for q in levels]
    assert thresholds == sorted(thresholds) and thresholds[0] > 0
    assert reference.threshold(0.5) == pytest.approx(float(np.median(d)), rel=0.05)
    with pytest.raises(ConfigError, match="quantile"):
        reference.threshold(1.5)


def test_shifted_embeddings_are_flagged(reference):
    x = gaussian_embeddings(2_000, seed=4)
    assert reference.outlier_fraction(x) < 0.03
    shift = np.random.default_rng(5).normal(0.0, 2.0, D).astype(np.float32)  # 4 noise sd per dimension
    assert reference.outlier_fraction(x + shift) > 0.98
    other_model = gaussian_embeddings(2_000, seed=4, loadings_seed=1)  # another "encoder" of the same D
    assert reference.outlier_fraction(other_model) > 0.98
    assert reference.outlier_fraction(np.abs(np.random.default_rng(6).normal(0, 5, (500, D)))) > 0.98


def test_unit_length_is_the_default_and_can_be_switched_off(reference):
    """Normalised (the default), an embedding and its multiples score the same; raw, rescaled
    embeddings are flagged, whether multiplied or spread about the mean."""
    x = gaussian_embeddings(2_000, seed=7)
    assert reference.normalise
    np.testing.assert_allclose(reference.distance(2.5 * x), reference.distance(x), rtol=1e-5)
    train = gaussian_embeddings(20_000, seed=1)
    raw = EmbeddingReference.fit(train, n_components=8, normalise=False)
    assert not raw.normalise and "normalise=False" in repr(raw)
    assert raw.outlier_fraction(x) < 0.03
    assert raw.outlier_fraction(1.5 * x) > 0.98
    mean = train.mean(axis=0)
    assert raw.outlier_fraction(mean + 3 * (x - mean)) > 0.98


def test_non_finite_tiles_score_infinite_and_empty_input_is_refused(reference):
    x = gaussian_embeddings(10, seed=8)
    x[3, 5] = np.nan
    x[7] = 0.0  # no direction
    d = reference.distance(x)
    assert np.isinf(d[3]) and np.isinf(d[7]) and np.isfinite(np.delete(d, [3, 7])).all()
    assert reference.distance(np.zeros((0, D), np.float32)).shape == (0,)
    with pytest.raises(ConfigError, match="0 tiles"):
        reference.outlier_fraction(np.zeros((0, D), np.float32))


# -- fitting -----------------------------------------------------------------------------------

def test_streaming_over_chunks_equals_fitting_the_concatenation():
    x = gaussian_embeddings(9_000, seed=9)
    whole = EmbeddingReference.fit(x, n_components=8)
    sizes = [1, 700, 4096, 3000, 1203]
    chunks = np.split(x, np.cumsum(sizes)[:-1])
    streamed = EmbeddingReference.fit((c for c in chunks), n_components=8)  # a one-shot generator
    for name in ("mean", "components", "variances", "quantiles"):
        np.testing.assert_array_equal(getattr(streamed, name), getattr(whole, name), err_msg=name)
    assert streamed.n_tiles == streamed.n_seen == 9_000


def test_max_tiles_takes_a_seeded_uniform_subsample_whatever_the_chunking():
    first, second = gaussian_embeddings(6_000, seed=10), gaussian_embeddings(6_000, seed=11) + 4.0
    x = np.concatenate([first, second])  # a stream whose halves differ by 4 in every dimension
    options = dict(n_components=8, normalise=False)
    sub = EmbeddingReference.fit(x, **options, max_tiles=3_000, seed=3)
    chunked = EmbeddingReference.fit(np.array_split(x, 17), **options, max_tiles=3_000, seed=3)
    assert (sub.n_tiles, sub.n_seen) == (3_000, 12_000) and "3,000 of 12,000" in repr(sub)
    np.testing.assert_array_equal(sub.mean, chunked.mean)
    np.testing.assert_array_equal(sub.components, chunked.components)
    np.testing.assert_array_equal(sub.quantiles, chunked.quantiles)
    # uniform over the whole stream, not its first 3,000 tiles: the mean sits between the halves
    np.testing.assert_allclose(sub.mean, x.mean(axis=0), atol=0.6)  # 5 standard errors
    assert abs(float(np.mean(sub.mean - first.mean(axis=0))) - 2.0) < 0.2
    other = EmbeddingReference.fit(x, **options, max_tiles=3_000, seed=4)
    assert not np.array_equal(other.mean, sub.mean)


def test_fit_refuses_bad_input():
    x = gaussian_embeddings(100, seed=12)
    with pytest.raises(ConfigError, match="differ in D"):
        EmbeddingReference.fit([x, x[:, :32]])
    with pytest.raises(ConfigError, match="at least 2 tiles"):
        EmbeddingReference.fit(x[:1])
    with pytest.raises(ConfigError, match="empty"):
        EmbeddingReference.fit([])
    with pytest.raises(ConfigError, match=r"\(N, D\)"):
        EmbeddingReference.fit(x[0])
    with pytest.raises(ConfigError, match="NaN"):
        EmbeddingReference.fit(np.where(np.arange(D) == 3, np.nan, x))
    with pytest.raises(ConfigError, match="all zeros"):
        EmbeddingReference.fit(np.vstack([x, np.zeros((1, D), np.float32)]))
    with pytest.raises(ConfigError, match="n_components"):
        EmbeddingReference.fit(x, n_components=0)
    few = EmbeddingReference.fit(x[:10], n_components=32)  # fewer tiles than components: capped
    assert few.n_components == 9 and few.dim == D


def test_wrong_embedding_size_is_explained(reference):
    with pytest.raises(ConfigError, match="D=64 embeddings of encoder 'toy'; got D=32"):
        reference.distance(np.zeros((5, 32), np.float32))
    with pytest.raises(ConfigError, match="D=64"):
        reference.outlier_fraction(np.zeros((5, 1280), np.float32))
    with pytest.raises(ConfigError, match=r"\(N, D\)"):
        reference.distance(np.zeros(D, np.float32))


# -- files -------------------------------------------------------------------------------------

def test_save_load_round_trip(reference, tmp_path):
    path = reference.save(tmp_path / "sub" / "reference.npz")
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))  # written atomically, no leftovers
    loaded = EmbeddingReference.load(path)
    for name in ("mean", "components", "variances", "quantile_levels", "quantiles"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(reference, name), err_msg=name)
    for name in ("residual_variance", "normalise", "n_tiles", "n_seen", "encoder", "encoder_sha256", "source",
                 "seed", "created", "dim", "n_components"):
        assert getattr(loaded, name) == getattr(reference, name), name
    x = gaussian_embeddings(500, seed=13)
    np.testing.assert_array_equal(loaded.distance(x), reference.distance(x))
    assert repr(loaded) == repr(reference)
    with np.load(path) as npz:
        assert str(npz["format"]) == REFERENCE_FORMAT and int(npz["dim"]) == D and int(npz["n_tiles"]) == 20_000
        assert str(npz["encoder"]) == "toy" and str(npz["source"]) == "test"


def test_missing_corrupt_and_foreign_files_are_explained(reference, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        EmbeddingReference.load(tmp_path / "nope.npz")
    good = reference.save(tmp_path / "good.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelError, match="damaged or not an .npz"):
        EmbeddingReference.load(tmp_path / "truncated.npz")
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ModelError, match="damaged or not an .npz"):
        EmbeddingReference.load(tmp_path / "text.npz")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ModelError, match="not an embedding reference"):
        EmbeddingReference.load(tmp_path / "other.npz")
    with np.load(tmp_path / "good.npz") as npz:
        arrays = dict(npz)
    np.savez(tmp_path / "newer.npz", **(arrays | {"format_version": np.array(99)}))
    with pytest.raises(ModelError, match="upgrade wsiengine"):
        EmbeddingReference.load(tmp_path / "newer.npz")
    np.savez(tmp_path / "shapes.npz", **(arrays | {"components": arrays["components"][:, :10]}))
    with pytest.raises(ModelError, match="components must be"):
        EmbeddingReference.load(tmp_path / "shapes.npz")
    np.savez(tmp_path / "nan.npz", **(arrays | {"mean": np.full(D, np.nan, np.float32)}))
    with pytest.raises(ModelError, match="NaN"):
        EmbeddingReference.load(tmp_path / "nan.npz")


# -- the head's reference ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_reference_path() -> Path:
    path = default_head_path() / REFERENCE_NAME
    if not path.is_file():
        pytest.skip(f"the shipped default head has no {REFERENCE_NAME} ('{path}'); "
                    "write it with python -m wsiengine.models.training.train_default_mil --work WORK --reference-only")
    return path


def test_default_head_ships_a_small_reference_of_its_training_tiles(default_reference_path):
    head = MILHead.load("default")
    ref = head.reference
    assert isinstance(ref, EmbeddingReference) and head.reference is ref  # read once
    assert ref.dim == head.in_dim == 1280 and ref.encoder == head.encoder == "lymphnode-lite0" and ref.normalise
    assert ref.n_components == 32 and ref.n_tiles > 20_000 and "training slides" in ref.source
    assert len(ref.encoder_sha256 or "") == 64
    assert default_reference_path.stat().st_size < 300 * 1024  # well under 1 MB
    assert 0.5 < ref.threshold(0.5) < ref.threshold(0.99) < 5


def test_head_reference_missing_damaged_or_of_another_size(default_reference_path, tmp_path):
    root = Path(shutil.copytree(default_head_path(), tmp_path / "head"))
    (root / REFERENCE_NAME).unlink()
    assert MILHead.load(root).reference is None
    (root / REFERENCE_NAME).write_bytes(b"PK\x03\x04 damaged")
    head = MILHead.load(root)  # loading the head does not need the reference
    with pytest.raises(ModelError, match=r"reference\.npz.*damaged"):
        head.reference
    EmbeddingReference.fit(gaussian_embeddings(200, seed=14)).save(root / REFERENCE_NAME)
    with pytest.raises(ModelError, match="D=64 embeddings but the head takes in_dim=1280"):
        MILHead.load(root).reference


@pytest.fixture(scope="module")
def pcam_embeddings() -> np.ndarray:
    """Default-encoder embeddings of 200 PCam test patches (100 per label) that are mostly stained,
    as the default head's training mosaics are (glass-dominated patches are left out of those)."""
    from PIL import Image

    from wsiengine import Encoder
    from wsiengine.testing.synthetic import _stained

    patches = []
    for label in ("0", "1"):
        paths = sorted(shared_file(f"pcam/test/{label}").glob("*.jpg"))
        kept = 0
        for path in paths:
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"))
            if _stained(image).mean() >= 0.5:
                patches.append(image)
                kept += 1
            if kept == 100:
                break
    return Encoder.load("default").embed(np.stack(patches))


def test_real_he_tiles_are_in_distribution(default_reference_path, pcam_embeddings):
    ref = MILHead.load("default").reference
    assert len(pcam_embeddings) == 200
    assert ref.outlier_fraction(pcam_embeddings, 0.99) < 0.1  # measured 0.050 (lymphnode-lite0), 0.010 (imagenet-lite0)


@pytest.mark.xfail(strict=True, reason="known limit of lymphnode-lite0: its fine-tuned embedding maps featureless "
                   "images among the training tiles (distance ~1), so the default head's reference no longer flags "
                   "them; the ImageNet encoder's did (1.0). A fix must make this pass (strict).")
def test_featureless_images_are_out_of_distribution(default_reference_path, pcam_embeddings):
    from wsiengine import Encoder

    ref = MILHead.load("default").reference
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (16, 1, 1, 3), dtype=np.uint8)
    featureless = np.concatenate([
        np.broadcast_to(colours, (16, 96, 96, 3)),                          # solid colours
        rng.integers(0, 256, (16, 96, 96, 3), dtype=np.uint8),              # uniform colour noise
        np.full((2, 96, 96, 3), (255, 255, 255), np.uint8),                 # glass
        np.full((2, 96, 96, 3), (230, 170, 200), np.uint8),                 # an H&E-pink wash
    ])
    odd = Encoder.load("default").embed(featureless)
    assert ref.outlier_fraction(odd, 0.99) > 0.95  # measured 0.0 with lymphnode-lite0 (1.0 with imagenet-lite0)
    assert float(np.median(ref.distance(odd))) > float(np.median(ref.distance(pcam_embeddings))) + 1.0
