"""Few-shot tile classification (wsiengine.fewshot): kNN and prototypes on L2-normalised embeddings.

Synthetic embeddings with hand-computable answers, the error messages, select_examples ordering,
bounded memory on 100,000 queries, and real PCam lymph-node patches embedded with the default
encoder, where both methods must beat chance by a wide margin.
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest

from wsiengine.errors import ConfigError, WsiEngineError
from wsiengine.fewshot import Examples, FewShotClassifier

from .conftest import shared_file

# Support set in 3-d: class "a" near +x, class "b" near +y, one "b" tile at +z.
SUPPORT = np.array(
    [
        [1.0, 0.0, 0.0],   # 0 a
        [2.0, 0.2, 0.0],   # 1 a (unnormalised on purpose)
        [0.9, 0.0, 0.3],   # 2 a
        [0.0, 1.0, 0.0],   # 3 b
        [0.1, 3.0, 0.0],   # 4 b
        [0.0, 0.0, 1.0],   # 5 b
    ]
)
LABELS = ["a", "a", "a", "b", "b", "b"]


def unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


# -- construction -------------------------------------------------------------------------
def test_support_is_l2_normalised_and_prototypes_are_renormalised_class_means():
    clf = FewShotClassifier(SUPPORT, LABELS, method="prototype")
    np.testing.assert_allclose(np.linalg.norm(clf.support_, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(clf.support_, unit(SUPPORT), rtol=1e-6)
    expected = unit(np.stack([unit(SUPPORT[:3]).mean(0), unit(SUPPORT[3:]).mean(0)]))
    np.testing.assert_allclose(clf.prototypes_, expected, rtol=1e-6)
    assert clf.classes_.tolist() == ["a", "b"]
    assert clf.counts_.tolist() == [3, 3]
    assert clf.dim == 3 and len(clf) == 6 and clf.n_classes == 2


def test_default_k_neighbors_is_smallest_class_capped_at_five():
    assert FewShotClassifier(SUPPORT, LABELS).k_neighbors == 3
    x = np.random.default_rng(0).normal(size=(30, 4))
    assert FewShotClassifier(x, [0] * 20 + [1] * 10).k_neighbors == 5
    assert FewShotClassifier(x[:2], [0, 1]).k_neighbors == 1


def test_integer_labels_come_back_as_integers_and_classes_order_sets_columns():
    clf = FewShotClassifier(SUPPORT, [7, 7, 7, 3, 3, 3], method="prototype")
    assert clf.classes_.tolist() == [3, 7]
    assert clf.predict(np.array([[1.0, 0, 0], [0, 1.0, 0]])).tolist() == [7, 3]
    ordered = FewShotClassifier(SUPPORT, LABELS, method="prototype", classes=["b", "a"])
    p = ordered.predict_proba(np.array([1.0, 0, 0]))
    assert ordered.classes_.tolist() == ["b", "a"] and p[1] > p[0]
    assert ordered.predict(np.array([1.0, 0, 0])) == "a"


# -- prediction ---------------------------------------------------------------------------
def test_prototype_probabilities_are_softmax_of_cosine_over_temperature():
    clf = FewShotClassifier(SUPPORT, LABELS, method="prototype", temperature=0.1)
    q = np.array([[3.0, 1.0, 0.0], [0.0, 0.5, 2.0]])
    sims = unit(q) @ clf.prototypes_.T.astype(np.float64)
    z = np.exp(sims / 0.1)
    np.testing.assert_allclose(clf.predict_proba(q), z / z.sum(1, keepdims=True), rtol=1e-5)
    assert clf.predict(q).tolist() == ["a", "b"]
    # the temperature changes probabilities, never the labels
    hot = FewShotClassifier(SUPPORT, LABELS, method="prototype", temperature=10.0)
    assert hot.predict(q).tolist() == ["a", "b"]
    assert hot.predict_proba(q).max() < clf.predict_proba(q).max()


def test_knn_uniform_vote_fractions_are_exact():
    clf = FewShotClassifier(SUPPORT, LABELS, method="knn", k_neighbors=3, vote="uniform")
    q = np.array([[1.0, 0.0, 0.1], [0.0, 0.0, 1.0], [1.0, 1.05, 0.0]])
    # row 0: a0, a1, a2 are the three nearest -> 3/3 a
    # row 1: b5 = 1, a2 = .316, then a0, a1, b3, b4 all exactly 0 -> the lowest index, a0 -> 2/3 a
    # row 2: cos a0=.6897, a1=.7548, a2=.6580, b3=.7241, b4=.7437, b5=0 -> a1, b4, b3 -> 1/3 a
    np.testing.assert_array_equal(clf.predict_proba(q), [[1.0, 0.0], [2 / 3, 1 / 3], [1 / 3, 2 / 3]])
    assert clf.predict(q).tolist() == ["a", "a", "b"]


def test_knn_similarity_vote_weights_neighbours_by_exp_similarity():
    clf = FewShotClassifier(SUPPORT, LABELS, method="knn", k_neighbors=3, temperature=0.05)
    q = np.array([1.0, 1.05, 0.0])
    s = unit(q) @ unit(SUPPORT).T
    top = np.argsort(-s)[:3]
    assert sorted(top.tolist()) == [1, 3, 4]
    w = np.exp(s[top] / 0.05)
    is_a = np.array([LABELS[i] == "a" for i in top])
    expected_a = w[is_a].sum() / w.sum()
    np.testing.assert_allclose(clf.predict_proba(q), [expected_a, 1 - expected_a], rtol=1e-5)


def test_knn_with_one_neighbour_is_nearest_neighbour():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 16))
    y = rng.integers(0, 4, size=40)
    y[:4] = [0, 1, 2, 3]
    q = rng.normal(size=(500, 16))
    clf = FewShotClassifier(x, y, method="knn", k_neighbors=1)
    nearest = np.argmax(unit(q) @ unit(x).T, axis=1)
    np.testing.assert_array_equal(clf.predict(q), y[nearest])
    assert set(np.unique(clf.predict_proba(q))) <= {0.0, 1.0}


def test_knn_ties_resolve_to_lowest_support_index_and_class_ties_to_first_class():
    # four identical support rows: every similarity ties; k=1 picks support row 0 ("b")
    x = np.ones((4, 2))
    clf = FewShotClassifier(x, ["b", "a", "a", "b"], method="knn", k_neighbors=1, vote="uniform")
    assert clf.predict(np.array([1.0, 0.0])) == "b"
    # k=2 picks rows 0 and 1: one vote each, a tie between classes -> first in classes_ ("a")
    clf2 = FewShotClassifier(x, ["b", "a", "a", "b"], method="knn", k_neighbors=2, vote="uniform")
    np.testing.assert_array_equal(clf2.predict_proba(np.array([1.0, 0.0])), [0.5, 0.5])
    assert clf2.predict(np.array([1.0, 0.0])) == "a"


def test_queries_are_scale_invariant_and_single_query_gives_scalar_shapes():
    clf = FewShotClassifier(SUPPORT, LABELS, method="knn")
    q = np.array([[0.3, 0.1, 0.0], [0.0, 0.2, 0.7]])
    np.testing.assert_allclose(clf.predict_proba(q), clf.predict_proba(q * 1000.0), rtol=1e-6)
    assert clf.predict_proba(q[0]).shape == (2,)
    assert clf.predict(q[0]).shape == ()
    assert clf.predict(np.zeros((0, 3))).shape == (0,)
    assert clf.predict_proba(np.zeros((0, 3))).shape == (0, 2)


def test_chunked_results_equal_unchunked():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 32)).astype(np.float32)
    y = rng.integers(0, 3, size=50)
    q = rng.normal(size=(1003, 32)).astype(np.float32)
    for method in ("knn", "prototype"):
        whole = FewShotClassifier(x, y, method=method, k_neighbors=4)
        small = FewShotClassifier(x, y, method=method, k_neighbors=4, chunk_size=7)
        # float32 similarities from different BLAS block shapes differ in the last bit
        np.testing.assert_allclose(small.predict_proba(q), whole.predict_proba(q), rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(small.predict(q), whole.predict(q))
    a = whole.select_examples(q, 2)
    b = small.select_examples(q, 2)
    for c in a:
        np.testing.assert_array_equal(a[c].indices, b[c].indices)


def test_hundred_thousand_queries_run_in_bounded_memory():
    rng = np.random.default_rng(3)
    m, n, d = 1000, 100_000, 16
    x = rng.normal(size=(m, d)).astype(np.float32)
    y = rng.integers(0, 2, size=m)
    q = rng.normal(size=(n, d)).astype(np.float32)
    clf = FewShotClassifier(x, y, method="knn", k_neighbors=5)
    tracemalloc.start()
    t0 = time.perf_counter()
    labels = clf.predict(q)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert labels.shape == (n,)
    full_matrix = n * m * 4  # 400 MB had it built the (N, M) similarity matrix at once
    print(f"100k queries x {m} support tiles: peak {peak / 1e6:.0f} MB traced, {seconds:.1f} s")
    assert peak < 80e6, f"peak {peak / 1e6:.0f} MB (a full matrix would be {full_matrix / 1e6:.0f} MB)"
    assert seconds < 60


# -- select_examples ----------------------------------------------------------------------
def test_select_examples_orders_each_class_by_similarity():
    clf = FewShotClassifier(SUPPORT, LABELS)
    q = np.array([1.0, 1.05, 0.0])
    ex = clf.select_examples(q, 2)
    assert list(ex) == ["a", "b"]
    assert isinstance(ex["a"], Examples)
    # cos: a0=.6897, a1=.7548, a2=.6580 ; b3=.7241, b4=.7437, b5=0
    assert ex["a"].indices.tolist() == [1, 0]
    assert ex["b"].indices.tolist() == [4, 3]
    np.testing.assert_allclose(ex["b"].similarities, unit(q) @ unit(SUPPORT[[4, 3]]).T, rtol=1e-5)
    idx, sim = ex["a"]  # unpacks as (indices, similarities)
    assert sim.dtype == np.float32 and np.all(np.diff(sim) <= 0)
    full = clf.select_examples(q, 3)
    assert full["a"].indices.tolist() == [1, 0, 2] and full["b"].indices.tolist() == [4, 3, 5]


def test_select_examples_batched_matches_single_and_breaks_ties_by_index():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(30, 8))
    y = np.repeat(["n", "t"], 15)
    q = rng.normal(size=(5, 8))
    clf = FewShotClassifier(x, y)
    batch = clf.select_examples(q, 4)
    assert batch["t"].indices.shape == (5, 4) and batch["t"].similarities.shape == (5, 4)
    for i in range(5):
        one = clf.select_examples(q[i], 4)
        for c in ("n", "t"):
            np.testing.assert_array_equal(batch[c].indices[i], one[c].indices)
            assert np.all(y[one[c].indices] == c)
            s = unit(q[i]) @ unit(x[y == c]).T
            np.testing.assert_allclose(one[c].similarities, np.sort(s)[::-1][:4], rtol=1e-5, atol=1e-6)
    same = FewShotClassifier(np.ones((4, 2)), [0, 1, 0, 1])
    ex = same.select_examples(np.array([1.0, 1.0]), 2)
    assert ex[0].indices.tolist() == [0, 2] and ex[1].indices.tolist() == [1, 3]


# -- errors -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "embeddings, labels, options, message",
    [
        (np.zeros((0, 3)), [], {}, "empty"),
        (np.ones(3), [0], {}, r"\(M, D\)"),
        (SUPPORT, LABELS[:5], {}, "one label per embedding"),
        (SUPPORT, ["a"] * 6, {}, "at least two classes"),
        (SUPPORT, LABELS, {"classes": ["a", "b", "c"]}, r"\['c'\] have no labelled example"),
        (SUPPORT, LABELS, {"classes": ["a"]}, r"\['b'\] are not among classes"),
        (SUPPORT, LABELS, {"method": "svm"}, "method='svm'"),
        (SUPPORT, LABELS, {"vote": "max"}, "vote='max'"),
        (SUPPORT, LABELS, {"k_neighbors": 7}, r"1\.\.6"),
        (SUPPORT, LABELS, {"k_neighbors": 0}, r"1\.\.6"),
        (SUPPORT, LABELS, {"temperature": 0}, "temperature"),
        (np.vstack([SUPPORT[:5], np.zeros(3)]), LABELS, {}, r"rows \[5\] are all zeros"),
        (np.vstack([SUPPORT[:5], [np.nan, 0, 0]]), LABELS, {}, "NaN"),
    ],
)
def test_bad_support_sets_raise_config_error(embeddings, labels, options, message):
    with pytest.raises(ConfigError, match=message):
        FewShotClassifier(embeddings, labels, **options)


def test_query_dimension_mismatch_and_bad_k_raise_config_error():
    clf = FewShotClassifier(SUPPORT, LABELS)
    with pytest.raises(ConfigError, match="4-d but the support set is 3-d"):
        clf.predict(np.ones((2, 4)))
    with pytest.raises(ConfigError, match="4-d but the support set is 3-d"):
        clf.select_examples(np.ones(4), 1)
    with pytest.raises(ConfigError, match=r"\(D,\) or \(N, D\)"):
        clf.predict_proba(np.ones((2, 2, 3)))
    with pytest.raises(ConfigError, match="NaN"):
        clf.predict(np.array([[np.nan, 1, 1]]))
    with pytest.raises(ConfigError, match=r"classes \{'a': 3, 'b': 3\} have fewer"):
        clf.select_examples(np.ones(3), 4)
    with pytest.raises(ConfigError, match="positive integer"):
        clf.select_examples(np.ones(3), 0)
    assert issubclass(ConfigError, WsiEngineError) and issubclass(ConfigError, ValueError)


# -- from_tiles ---------------------------------------------------------------------------
class _MeanColourEncoder:
    """A stand-in encoder: the mean RGB of each patch, recording batch sizes."""

    embed_dim = 3

    def __init__(self):
        self.batches = []

    def embed(self, images):
        assert images.dtype == np.uint8 and images.ndim == 4
        self.batches.append(len(images))
        return images.reshape(len(images), -1, 3).mean(1).astype(np.float32)


def test_from_tiles_embeds_patches_in_batches():
    red, blue = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)
    red[..., 0], blue[..., 2] = 200, 200
    images = [red, red, red, blue, blue]
    enc = _MeanColourEncoder()
    clf = FewShotClassifier.from_tiles(enc, images, ["red"] * 3 + ["blue"] * 2, batch_size=2, method="prototype")
    assert enc.batches == [2, 2, 1]
    assert clf.predict(enc.embed(np.stack([blue, red]))).tolist() == ["blue", "red"]
    with pytest.raises(ConfigError, match="empty"):
        FewShotClassifier.from_tiles(enc, [], [])


# -- real data: PCam lymph-node patches, default encoder ------------------------------------
SHOTS, QUERY_PER_CLASS, DRAWS, SEED = 10, 100, 5, 0


def _read(paths):
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return np.stack(out)


@pytest.fixture(scope="module")
def pcam_embedded():
    """Embeddings of DRAWS support sets (SHOTS per class, PCam train) and a balanced PCam test query."""
    from wsiengine import Encoder

    root = shared_file("pcam")
    for split in ("train", "test"):
        for label in ("0", "1"):
            shared_file(f"pcam/{split}/{label}")
    rng = np.random.default_rng(SEED)
    encoder = Encoder.load("default")
    query, query_labels = [], []
    for label in (0, 1):
        files = sorted((root / "test" / str(label)).glob("*.jpg"))
        pick = rng.choice(len(files), QUERY_PER_CLASS, replace=False)
        query.append(encoder.embed(_read([files[i] for i in pick])))
        query_labels += [label] * QUERY_PER_CLASS
    supports = []
    train = {label: sorted((root / "train" / str(label)).glob("*.jpg")) for label in (0, 1)}
    for _ in range(DRAWS):
        paths = [train[label][i] for label in (0, 1) for i in rng.choice(len(train[label]), SHOTS, replace=False)]
        supports.append((_read(paths), np.repeat([0, 1], SHOTS)))
    return encoder, supports, np.concatenate(query), np.asarray(query_labels)


@pytest.mark.parametrize("method", ["knn", "prototype"])
def test_few_shot_on_real_pcam_tiles_beats_chance_by_a_wide_margin(pcam_embedded, method):
    """10 labelled tiles per class (PCam train) classify 200 PCam test tiles well above 0.5.

    Averaged over DRAWS fixed-seed support sets, since one 10-shot draw varies by ~±0.06.
    """
    encoder, supports, query, query_labels = pcam_embedded
    accuracies = []
    for images, labels in supports:
        clf = FewShotClassifier.from_tiles(encoder, images, labels, method=method)
        accuracies.append(float(np.mean(clf.predict(query) == query_labels)))
        ex = clf.select_examples(query[:3], 2)
        assert ex[1].indices.shape == (3, 2) and np.all(labels[ex[1].indices] == 1)
    mean = float(np.mean(accuracies))
    print(f"{method}: PCam 10-shot accuracy per draw {np.round(accuracies, 3).tolist()}, mean {mean:.3f}")
    assert mean >= 0.65, f"{method} accuracy {accuracies} (mean {mean:.3f}) is too close to chance (0.5)"
    assert min(accuracies) > 0.5


def test_fewshot_imports_neither_torch_nor_sklearn():
    import subprocess
    import sys

    code = "import sys, wsiengine.fewshot; bad = {'torch', 'sklearn'} & set(sys.modules); assert not bad, bad"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
