"""Lesion-level FROC as in CAMELYON16 (wsiengine.evaluate)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from shapely.geometry import MultiPolygon, box

from wsiengine.evaluate import FROC_FP_RATES, detections_from_tiles, froc, lesion_set
from wsiengine.geojson import read_camelyon_annotations

from .conftest import shared_file
from .test_geojson import make_grid

MPP = 0.25  # µm/px: the 75 µm growth is 150 px each side, an ITC is < 275 µm = 1100 px grown


def constructed_case():
    """Three slides, three countable lesions and one ITC, with hand-placed detections."""
    lesions = {
        "A": MultiPolygon([box(1000, 1000, 3000, 3000), box(10000, 1000, 12000, 2000)]),  # L1, L2
        "B": MultiPolygon([box(5000, 5000, 7000, 6000), box(20000, 20000, 20200, 20200)]),  # L3, ITC (50 µm)
        "C": MultiPolygon(),  # normal
    }
    detections = {
        "A": np.array([
            [2000, 2000, 0.9],   # L1: its best hit
            [2500, 2500, 0.6],   # L1 again: neither TP nor FP
            [3100, 2000, 0.4],   # 100 px (25 µm) outside L1, inside the growth: L1
            [5000, 5000, 0.8],   # FP
        ]),
        "B": np.array([
            [6000, 5500, 0.7],    # L3
            [20100, 20100, 0.95],  # on the ITC: ignored
            [30000, 30000, 0.5],  # FP
        ]),
        "C": np.array([[100, 100, 0.85], [200, 200, 0.3]]),  # FPs
    }
    return detections, lesions


def test_froc_on_a_constructed_prediction_matches_the_hand_computed_curve():
    detections, lesions = constructed_case()
    r = froc(detections, lesions, MPP)
    assert (r.n_slides, r.n_lesions, r.n_itc) == (3, 3, 1)
    # FP probabilities 0.85, 0.8, 0.5, 0.3; lesion maxima L1 0.9, L3 0.7, L2 missed.
    np.testing.assert_allclose(r.thresholds, [np.inf, 0.9, 0.85, 0.8, 0.7, 0.5, 0.3])
    np.testing.assert_allclose(r.fp_per_slide, np.array([0, 0, 1, 2, 2, 3, 4]) / 3)
    np.testing.assert_allclose(r.sensitivity, np.array([0, 1, 1, 1, 2, 2, 2]) / 3)
    # 1/4 and 1/2 FP/slide fall between (1/3, 1/3) and (2/3, 1/3): 1/3; from 1 FP/slide on: 2/3.
    expected = {0.25: 1 / 3, 0.5: 1 / 3, 1.0: 2 / 3, 2.0: 2 / 3, 4.0: 2 / 3, 8.0: 2 / 3}
    assert r.operating_points == pytest.approx(expected)
    assert r.score == pytest.approx(5 / 9)
    np.testing.assert_allclose(r.lesion_probability["A"], [0.9, np.nan])
    assert sorted(r.false_positives["A"]) == [0.8]
    assert sorted(r.false_positives["B"]) == [0.5]  # the ITC hit (0.95) is not an FP
    assert sorted(r.false_positives["C"]) == [0.3, 0.85]


def test_linear_reading_follows_the_curve_and_step_takes_the_best_point_below():
    lesions = {"S": MultiPolygon([box(0, 0, 2000, 2000), box(10000, 0, 12000, 2000)])}
    detections = {"S": np.array([[1000, 1000, 0.9], [11000, 1000, 0.7], [50000, 50000, 0.7]])}
    # curve: (0, 0) -> (0, 1/2) at 0.9 -> (1, 1) at 0.7, where an FP and a lesion arrive together
    linear = froc(detections, lesions, MPP)
    step = froc(detections, lesions, MPP, interpolation="step")
    assert linear.operating_points[0.25] == pytest.approx(0.625)
    assert linear.operating_points[0.5] == pytest.approx(0.75)
    assert step.operating_points[0.25] == step.operating_points[0.5] == pytest.approx(0.5)
    assert linear.score == pytest.approx((0.625 + 0.75 + 4) / 6)
    assert step.score == pytest.approx((0.5 + 0.5 + 4) / 6)


def test_perfect_detector_scores_one_and_no_detections_score_zero():
    detections, lesions = constructed_case()
    perfect = {}
    for slide, geom in lesions.items():
        ls = lesion_set(geom, MPP)
        pts = [(p.representative_point().x, p.representative_point().y, 1.0)
               for p, itc in zip(ls.regions, ls.is_itc) if not itc]
        perfect[slide] = np.array(pts).reshape(-1, 3)
    r = froc(perfect, lesions, MPP)
    assert r.score == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in r.operating_points.values())
    none = froc({}, lesions, MPP)
    assert none.score == 0.0
    np.testing.assert_array_equal(none.fp_per_slide, [0.0])
    empty = froc({s: np.zeros((0, 3)) for s in lesions}, lesions, MPP)
    assert empty.score == 0.0


def test_detections_on_an_itc_are_neither_true_nor_false_positives():
    detections, lesions = constructed_case()
    base = froc(detections, lesions, MPP)
    more = dict(detections)
    more["B"] = np.vstack([detections["B"], [[20050, 20050, 0.99], [19900, 20100, 0.2]]])  # on the grown ITC
    r = froc(more, lesions, MPP)
    np.testing.assert_allclose(r.fp_per_slide, base.fp_per_slide)
    np.testing.assert_allclose(r.sensitivity, base.sensitivity)
    assert r.score == base.score
    # only-ITC ground truth: nothing to detect
    with pytest.raises(ValueError, match="no lesion to detect"):
        froc({"B": detections["B"]}, {"B": box(20000, 20000, 20200, 20200)}, MPP)


def test_itc_limit_and_growth_follow_the_challenge_in_micrometres():
    # 190 µm and 210 µm squares' sides: longest diameter is the diagonal, so size by diagonal
    side_itc = 190 / math.sqrt(2) / MPP  # diagonal 190 µm < 200 µm: ITC
    side_big = 210 / math.sqrt(2) / MPP  # diagonal 210 µm: counts
    ls = lesion_set(MultiPolygon([box(0, 0, side_itc, side_itc), box(20000, 0, 20000 + side_big, side_big)]), MPP)
    assert list(ls.is_itc) == [True, False]
    np.testing.assert_allclose(ls.diameter_um, [190 + 75, 210 + 75], rtol=2e-3)
    # lesions closer than 75 µm merge into one lesion (the challenge's labelled, grown mask)
    near = lesion_set(MultiPolygon([box(0, 0, 2000, 2000), box(2000 + 60 / MPP, 0, 4000 + 60 / MPP, 2000)]), MPP)
    far = lesion_set(MultiPolygon([box(0, 0, 2000, 2000), box(2000 + 90 / MPP, 0, 4000 + 90 / MPP, 2000)]), MPP)
    assert len(near) == 1 and len(far) == 2
    # a detection 30 µm outside a lesion hits it (within 37.5 µm); 45 µm outside is a false positive
    lesions = {"S": box(0, 0, 2000, 2000)}
    hit = froc({"S": np.array([[2000 + 30 / MPP, 1000, 0.9]])}, lesions, MPP)
    miss = froc({"S": np.array([[2000 + 45 / MPP, 1000, 0.9]])}, lesions, MPP)
    assert hit.score == 1.0 and miss.score == 0.0 and len(miss.false_positives["S"]) == 1
    # no growth: only points inside count
    assert froc({"S": np.array([[2000 + 30 / MPP, 1000, 0.9]])}, lesions, MPP, dilation_um=0).score == 0.0


def test_per_slide_mpp_and_bad_input():
    lesions = {"S": box(0, 0, 1000, 1000), "T": box(0, 0, 1000, 1000)}
    d = {"S": np.array([[1100, 500, 0.9]]), "T": np.array([[1100, 500, 0.9]])}
    # 100 px outside: 25 µm at 0.25 µm/px (hit), 50 µm at 0.5 µm/px (false positive)
    r = froc(d, lesions, {"S": 0.25, "T": 0.5})
    assert np.isfinite(r.lesion_probability["S"]).all() and not np.isfinite(r.lesion_probability["T"]).any()
    with pytest.raises(ValueError, match="without ground truth"):
        froc({"X": np.zeros((0, 3))}, lesions, 0.25)
    with pytest.raises(ValueError, match=r"\(K, 3\)"):
        froc({"S": np.zeros((4, 2))}, lesions, 0.25)
    with pytest.raises(ValueError, match="positive"):
        froc(d, lesions, 0.0)
    assert FROC_FP_RATES == (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def test_real_camelyon_lesions_detected_at_their_centres():
    """Tumor_098 (five outlines that merge into two lesions once grown, one an ITC), Tumor_001
    (two lesions, one outline self-intersecting) and Normal_001 (no lesion) at 0.243 µm/px."""
    names = {"tumor_098": "Tumor_098.json", "tumor_001": "Tumor_001.json", "normal_001": "Normal_001.json"}
    lesions = {k: read_camelyon_annotations(shared_file(f"ncrf-camelyon16-annotations/{v}")) for k, v in names.items()}
    mpp = 0.243
    t98 = lesion_set(lesions["tumor_098"], mpp)
    assert len(lesions["tumor_098"].geoms) == 5 and len(t98) == 2 and t98.is_itc.sum() == 1
    # a detection at a point inside every annotated polygon (its centroid when inside, else a
    # point on its surface), probability 0.9; one false positive on the normal slide at 0.5
    detections = {}
    for slide, geom in lesions.items():
        pts = []
        for p in geom.geoms:
            c = p.centroid if p.contains(p.centroid) else p.representative_point()
            pts.append((c.x, c.y, 0.9))
        detections[slide] = np.array(pts).reshape(-1, 3)
    detections["normal_001"] = np.array([[50000.0, 100000.0, 0.5]])
    r = froc(detections, lesions, mpp)
    assert (r.n_slides, r.n_lesions, r.n_itc) == (3, 3, 1)
    # all 3 lesions at 0.9 with no FP; the one FP (1/3 per slide) comes at 0.5
    assert r.operating_points == pytest.approx({rate: 1.0 for rate in FROC_FP_RATES})
    assert r.score == pytest.approx(1.0)
    np.testing.assert_allclose(r.fp_per_slide, [0, 0, 1 / 3])
    # without tumor_001's detections, 2 of the 3 lesions are missed
    r2 = froc({**detections, "tumor_001": np.zeros((0, 3))}, lesions, mpp)
    assert r2.score == pytest.approx(1 / 3)


def test_detections_from_tiles_centres_threshold_and_local_maxima():
    cells = [(r, c) for r in range(3) for c in range(4)]
    grid = make_grid(cells)
    scores = np.array([
        0.1, 0.6, 0.2, 0.7,
        0.3, 0.8, 0.1, 0.4,
        0.9, 0.2, 0.1, 0.55,
    ])
    d = detections_from_tiles(grid, scores, threshold=0.5)
    assert d.shape == (5, 3)
    np.testing.assert_allclose(d[:, 2], [0.9, 0.8, 0.7, 0.6, 0.55])  # by decreasing probability
    np.testing.assert_allclose(d[0, :2], [50, 250])  # the centre of tile (row 2, col 0)
    m = detections_from_tiles(grid, scores, threshold=0.5, local_maxima=True)
    # 0.9 at (2,0), 0.7 at (0,3) and 0.55 at (2,3) are maxima; 0.8 at (1,1) touches 0.9
    np.testing.assert_allclose(m[:, 2], [0.9, 0.7, 0.55])
    # plateau: equal neighbours keep only the first in row-major order
    flat = detections_from_tiles(make_grid([(0, 0), (0, 1)]), np.array([0.7, 0.7]), local_maxima=True)
    np.testing.assert_allclose(flat, [[50, 50, 0.7]])
    assert detections_from_tiles(grid, np.full(len(grid), np.nan)).shape == (0, 3)
