"""QuPath GeoJSON export and import, CAMELYON16 annotation parsing (wsiengine.geojson)."""

from __future__ import annotations

import gzip
import json
import math
import os
import uuid

import numpy as np
import pytest
import shapely
from shapely.geometry import MultiPolygon, Point, Polygon, box

from .conftest import data_params, require_tissue_source, shared_file
from wsiengine.geojson import (
    Annotation,
    annotations_to_geometry,
    export_slide_geojson,
    feature_collection,
    make_valid_geometry,
    read_camelyon_annotations,
    read_geojson,
    region_features,
    slide_feature_collection,
    tile_features,
    tissue_features,
    tumour_regions,
    write_geojson,
)
from wsiengine.tiling import TileGrid

NCRF = "ncrf-camelyon16-annotations"
CAMELYON_FILES = ["Normal_001.json"] + [f"Tumor_{n:03d}.json" for n in (1, 17, 30, 73, 81, 86, 93, 98, 100)]


def make_grid(cells, *, tile: float = 100.0, origin_step: int | None = None, mpp: float = 0.5,
              shape: tuple[int, int] = (20, 20)) -> TileGrid:
    """A level-0 grid of ``tile``-px tiles at lattice (row, col) ``cells``; origins step by
    ``origin_step`` whole pixels (default ``tile``)."""
    step = int(origin_step if origin_step is not None else tile)
    gi = np.asarray(cells, np.int64).reshape(-1, 2)
    return TileGrid(
        coords=np.ascontiguousarray(gi[:, ::-1] * step),
        tissue_fraction=np.ones(len(gi), np.float32),
        grid_index=gi,
        grid_shape=shape,
        target_mpp=mpp,
        tile_px=int(round(tile)),
        overlap_px=0,
        read_level=0,
        read_size=(int(round(tile)), int(round(tile))),
        stride_level_px=(step, step),
        tile_size_level0=(float(tile), float(tile)),
        slide_dimensions=(shape[1] * step, shape[0] * step),
        slide_mpp=(mpp, mpp),
    )


def tissue_with_hole() -> MultiPolygon:
    """Two tissue pieces with non-integer vertices; the first has a hole."""
    outer = Point(500.37, 400.21).buffer(300.5, quad_segs=16)
    hole = Point(520.0, 410.0).buffer(80.25, quad_segs=16)
    second = Polygon([(1000.5, 100.25), (1300.75, 120.5), (1250.33, 500.66), (1020.1, 450.9)])
    return MultiPolygon([outer.difference(hole), second])


def assert_same_geometry(a, b, *, tol_px: float = 1.0) -> None:
    assert a.is_valid and b.is_valid
    assert abs(a.area - b.area) <= 1e-3 * max(a.area, 1.0)
    assert a.symmetric_difference(b).area <= 1e-3 * max(a.area, 1.0)
    assert shapely.hausdorff_distance(a, b) <= tol_px


# -- round trip -----------------------------------------------------------------------------------
@pytest.fixture()
def slide_outputs():
    cells = [(r, c) for r in range(6) for c in range(8)]
    grid = make_grid(cells)
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.0, 0.4, len(grid))
    block = [i for i, (r, c) in enumerate(cells) if 1 <= r <= 2 and 2 <= c <= 4]  # a 2x3 block
    scores[block] = 0.9
    scores[cells.index((5, 7))] = 0.75  # an isolated tile
    attention = rng.dirichlet(np.ones(len(grid)))
    return grid, scores, attention, tissue_with_hole()


@pytest.mark.parametrize("name", ["slide.geojson", "slide.geojson.gz"])
def test_round_trip_keeps_geometry_within_one_pixel(tmp_path, slide_outputs, name):
    grid, scores, attention, tissue = slide_outputs
    path = export_slide_geojson(tmp_path / name, tissue=tissue, grid=grid, scores=scores, threshold=0.5,
                                tiles=True, attention=attention, slide_id="s1")
    assert path == tmp_path / name
    raw = path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == name.endswith(".gz")

    annotations = read_geojson(path)
    by_class: dict[str, list[Annotation]] = {}
    for a in annotations:
        by_class.setdefault(a.classification, []).append(a)
    assert len(by_class["Tissue"]) == 2
    assert_same_geometry(annotations_to_geometry(annotations, "Tissue"), tissue)

    expected_regions = tumour_regions(grid, scores, 0.5)
    regions = [a for a in annotations if a.object_type == "annotation" and a.classification == "Tumor"]
    assert len(regions) == len(expected_regions.geoms) == 2
    assert_same_geometry(annotations_to_geometry(regions), expected_regions)

    tiles = [a for a in annotations if a.object_type == "detection"]
    assert len(tiles) == len(grid)
    for a, b, s, att in zip(tiles, grid.boxes(), scores, attention):
        assert_same_geometry(a.geometry, box(*b))
        assert a.measurements["tile score"] == pytest.approx(s, rel=1e-5)
        assert a.measurements["attention"] == pytest.approx(att, rel=1e-5)
        assert a.classification == ("Tumor" if s >= 0.5 else "Non-tumor")


def test_plain_and_gzip_files_hold_the_same_collection(tmp_path, slide_outputs):
    grid, scores, attention, tissue = slide_outputs
    collection = slide_feature_collection(tissue=tissue, grid=grid, scores=scores, tiles=True, attention=attention,
                                          slide_id="s1")
    plain = write_geojson(tmp_path / "a.geojson", collection)
    packed = write_geojson(tmp_path / "a.geojson.gz", collection)
    forced = write_geojson(tmp_path / "b.json", collection, gzip=True)
    assert json.loads(plain.read_text()) == json.loads(gzip.decompress(packed.read_bytes()))
    assert forced.read_bytes()[:2] == b"\x1f\x8b"
    assert packed.stat().st_size < plain.stat().st_size
    assert b"\n" not in plain.read_bytes() and b", " not in plain.read_bytes()  # compact
    # deterministic ids with a slide id: the same input writes the same bytes
    again = write_geojson(tmp_path / "c.geojson", slide_feature_collection(
        tissue=tissue, grid=grid, scores=scores, tiles=True, attention=attention, slide_id="s1"))
    assert again.read_bytes() == plain.read_bytes()


# -- QuPath conventions ---------------------------------------------------------------------------
def test_every_feature_carries_the_properties_qupath_reads(tmp_path, slide_outputs):
    grid, scores, attention, tissue = slide_outputs
    path = export_slide_geojson(tmp_path / "x.geojson", tissue=tissue, grid=grid, scores=scores, tiles=True,
                                attention=attention)
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection"
    types = set()
    for f in data["features"]:
        assert f["type"] == "Feature"
        uuid.UUID(f["id"])  # QuPath 0.4+ reads the id as the object's UUID
        geom = f["geometry"]
        assert geom["type"] in ("Polygon", "MultiPolygon")
        polygons = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        for rings in polygons:
            for ring in rings:
                assert ring[0] == ring[-1] and len(ring) >= 4  # closed
                for x, y in ring:
                    assert isinstance(x, (int, float)) and isinstance(y, (int, float))
                    assert round(x, 2) == x and round(y, 2) == y  # 0.01-px grid
        assert shapely.geometry.shape(geom).is_valid
        props = f["properties"]
        assert props["objectType"] in ("annotation", "detection")
        types.add(props["objectType"])
        cls = props["classification"]
        assert isinstance(cls["name"], str) and cls["name"]
        assert isinstance(cls["color"], list) and len(cls["color"]) == 3
        assert all(isinstance(c, int) and 0 <= c <= 255 for c in cls["color"])
        # QuPath >= 0.4 writes measurements as a JSON object of name -> number
        meas = props["measurements"]
        assert isinstance(meas, dict) and meas
        assert all(isinstance(k, str) and isinstance(v, (int, float)) and math.isfinite(v) for k, v in meas.items())
        if props["objectType"] == "detection":
            assert isinstance(props["color"], list) and len(props["color"]) == 3
    assert types == {"annotation", "detection"}
    tumour = [f for f in data["features"] if f["properties"]["classification"]["name"] == "Tumor"
              and f["properties"]["objectType"] == "annotation"]
    assert tumour and all(f["properties"]["classification"]["color"] == [200, 0, 0] for f in tumour)
    assert all({"Area mm^2", "Max diameter mm"} <= set(f["properties"]["measurements"]) for f in tumour)


def test_nan_measurements_are_left_out_not_written_as_invalid_json(tmp_path):
    grid = make_grid([(0, 0), (0, 1)])
    features = tile_features(grid, {"tile score": np.array([0.2, np.nan]), "attention": np.array([0.5, 0.5])})
    assert "tile score" not in features[1]["properties"]["measurements"]
    path = write_geojson(tmp_path / "t.geojson", feature_collection(features))
    json.loads(path.read_text())  # strict JSON: no NaN tokens
    assert "NaN" not in path.read_text()


# -- geometry repair ------------------------------------------------------------------------------
def test_bow_tie_is_repaired_into_its_two_lobes():
    bow_tie = Polygon([(0, 0), (10, 10), (10, 0), (0, 10), (0, 0)])
    assert not bow_tie.is_valid
    fixed = make_valid_geometry(bow_tie)
    assert fixed.is_valid and isinstance(fixed, MultiPolygon)
    assert len(fixed.geoms) == 2
    assert fixed.area == pytest.approx(50.0)  # buffer(0) alone would keep one lobe (25)


def test_duplicated_points_and_collapsed_rings_are_cleaned():
    dup = Polygon([(0, 0), (0, 0), (10, 0), (10, 0), (10, 10), (0, 10), (0, 10)])
    fixed = make_valid_geometry(dup)
    assert fixed.is_valid and fixed.area == pytest.approx(100.0)
    coords = shapely.get_coordinates(fixed)
    assert len(coords) == 5  # 4 corners + closing point
    # a spike collapses to a line: only the polygonal part is kept
    spike = Polygon([(0, 0), (10, 0), (10, 10), (10, 20), (10, 10), (0, 10)])
    fixed = make_valid_geometry(spike)
    assert fixed.is_valid and fixed.area == pytest.approx(100.0)
    assert make_valid_geometry(None).is_empty and make_valid_geometry(Polygon()).is_empty


def test_invalid_input_is_written_valid_and_read_back_valid(tmp_path):
    bow_tie = Polygon([(0, 0), (100, 100), (100, 0), (0, 100), (0, 0)])
    features = tissue_features(bow_tie, mpp=(0.5, 0.5))
    assert len(features) == 2
    for f in features:
        assert shapely.geometry.shape(f["geometry"]).is_valid
    assert sum(f["properties"]["measurements"]["Area mm^2"] for f in features) == pytest.approx(5000 * 0.25 / 1e6)
    # an invalid feature drawn elsewhere is repaired on import
    feature = {"type": "Feature", "geometry": shapely.geometry.mapping(bow_tie),
               "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}}
    (a,) = read_geojson(write_geojson(tmp_path / "bad.geojson", feature_collection([feature])))
    assert a.geometry.is_valid and a.geometry.area == pytest.approx(5000.0)


def test_holes_are_kept_on_export_and_import(tmp_path):
    tissue = tissue_with_hole()
    features = tissue_features(tissue)
    rings = features[0]["geometry"]["coordinates"]
    assert len(rings) == 2  # exterior, then the hole
    exterior, hole = Polygon(rings[0]), Polygon(rings[1])
    assert exterior.exterior.is_ccw and not hole.exterior.is_ccw  # RFC 7946 winding
    assert hole.area == pytest.approx(Polygon(tissue.geoms[0].interiors[0]).area, rel=1e-3)
    (a, b) = read_geojson(write_geojson(tmp_path / "t.geojson", feature_collection(features)))
    assert len(a.geometry.geoms[0].interiors) == 1
    assert not a.geometry.contains(Point(520.0, 410.0))  # the hole's centre
    assert a.geometry.contains(Point(500.37 + 200, 400.21))


# -- tumour regions -------------------------------------------------------------------------------
def test_adjacent_tiles_merge_into_one_region_with_exact_measurements():
    # a 3x2 block (3 columns, 2 rows) of 100-px tiles at 0.5 µm/px, plus one far tile
    cells = [(r, c) for r in (3, 4) for c in (2, 3, 4)] + [(10, 10)]
    grid = make_grid(cells)
    scores = np.array([0.6, 0.7, 0.8, 0.9, 0.95, 0.5, 0.99])
    regions = tumour_regions(grid, scores, 0.5)
    assert regions.is_valid and len(regions.geoms) == 2
    block = regions.geoms[0]  # regions run top to bottom
    assert block.equals(box(200, 300, 500, 500))
    assert len(block.exterior.coords) == 5  # collinear tile corners removed

    features = region_features(regions, (0.5, 0.5), grid=grid, scores=scores)
    m = features[0]["properties"]["measurements"]
    # 300 x 200 px at 0.5 µm/px = 150 x 100 µm = 15,000 µm² = 0.015 mm²
    assert m["Area mm^2"] == pytest.approx(0.015, rel=1e-6)
    # longest chord: the diagonal, sqrt(150² + 100²) µm = 180.2776 µm
    assert m["Max diameter mm"] == pytest.approx(math.hypot(150, 100) / 1000, rel=1e-5)
    assert m["Tiles"] == 6
    assert m["Mean tile score"] == pytest.approx(np.mean(scores[:6]), rel=1e-5)
    assert m["Max tile score"] == pytest.approx(0.95, rel=1e-5)
    single = features[1]["properties"]["measurements"]
    assert single["Area mm^2"] == pytest.approx(0.0025) and single["Tiles"] == 1

    assert len(tumour_regions(grid, scores, 0.5, min_tiles=2).geoms) == 1
    assert len(tumour_regions(grid, scores, 0.55).geoms) == 2  # threshold is inclusive; 0.5 drops out
    assert tumour_regions(grid, np.full(len(grid), np.nan), 0.5).is_empty
    with pytest.raises(ValueError, match="one score per tile"):
        tumour_regions(grid, scores[:3], 0.5)


def test_anisotropic_mpp_scales_area_and_diameter_per_axis():
    grid = make_grid([(0, 0), (0, 1), (0, 2)])  # 300 x 100 px
    (f,) = region_features(tumour_regions(grid, np.ones(3), 0.5), (0.5, 0.25))
    m = f["properties"]["measurements"]
    assert m["Area mm^2"] == pytest.approx(300 * 0.5 * 100 * 0.25 / 1e6)
    assert m["Max diameter mm"] == pytest.approx(math.hypot(150, 25) / 1000, rel=1e-5)


def test_tiles_with_sub_pixel_gaps_still_merge():
    # whole-pixel origins every 100 px but tiles only 99.6 px wide (a fractional downsample)
    grid = make_grid([(r, c) for r in range(2) for c in range(3)], tile=99.6, origin_step=100)
    regions = tumour_regions(grid, np.ones(len(grid)), 0.5)
    assert len(regions.geoms) == 1 and regions.is_valid
    assert regions.area == pytest.approx(299.6 * 199.6, rel=1e-3)


# -- atomic writes --------------------------------------------------------------------------------
def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "x.geojson"
    target.write_text('{"type":"FeatureCollection","features":[]}')
    before = target.read_bytes()
    grid = make_grid([(r, c) for r in range(20) for c in range(20)])
    big = tile_features(grid, {"tile score": np.linspace(0, 1, len(grid))}) * 20  # > 1 MiB before the bad value
    collection = feature_collection(big + [{"type": "Feature", "geometry": None, "properties": {"bad": object()}}])
    with pytest.raises(TypeError):
        write_geojson(target, collection)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.geojson"]
    with pytest.raises(ValueError):  # NaN is not JSON
        write_geojson(tmp_path / "new.geojson.gz", {"type": "FeatureCollection", "features": [], "x": float("nan")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.geojson"]


# -- import ---------------------------------------------------------------------------------------
def test_read_accepts_feature_lists_single_features_and_legacy_measurements(tmp_path):
    square = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}
    legacy = {"type": "Feature", "id": "PathAnnotationObject", "geometry": square,
              "properties": {"classification": {"name": "Tumor", "colorRGB": -3670016},
                             "measurements": [{"name": "Area", "value": 100.0}], "isLocked": False}}
    derived = {"type": "Feature", "geometry": square,
               "properties": {"objectType": "detection", "classification": {"names": ["Tumor", "Positive"], "color": [1, 2, 3]},
                              "measurements": {"score": 0.5}}}
    (tmp_path / "list.json").write_text(json.dumps([legacy, derived]))
    a, b = read_geojson(tmp_path / "list.json")
    assert a.object_type == "annotation" and a.classification == "Tumor" and a.measurements == {"Area": 100.0}
    assert b.object_type == "detection" and b.classification == "Tumor: Positive" and b.measurements == {"score": 0.5}
    (tmp_path / "one.geojson.gz").write_bytes(gzip.compress(json.dumps(derived).encode()))
    (c,) = read_geojson(tmp_path / "one.geojson.gz")
    assert c.geometry.area == 100.0
    (d,) = read_geojson(square)
    assert d.object_type == "annotation" and d.classification is None
    (tmp_path / "junk.json").write_text("not json")
    with pytest.raises(ValueError, match="not JSON"):
        read_geojson(tmp_path / "junk.json")
    assert annotations_to_geometry([a, b], "tumor").area == 100.0  # class names match case-insensitively
    assert annotations_to_geometry([a, b], "Tumor: Positive", object_type="detection").area == 100.0
    assert annotations_to_geometry([a, b], "Tumor", object_type="detection").is_empty
    assert annotations_to_geometry([a, b], "Stroma").is_empty


def test_roi_from_geojson_restricts_tiling(tmp_path):
    from wsiengine import open_slide, plan_tiles
    from wsiengine.testing import make_pyramidal_slide

    require_tissue_source()
    made = make_pyramidal_slide(tmp_path / "s.tiff", width=2048, height=1536, mpp=0.5, levels=(1, 4), compression="zlib")
    slide = open_slide(made.path)
    roi = Polygon([(300.5, 200.0), (1400.0, 250.0), (1300.0, 1100.0), (350.0, 1000.0)])
    exclusion = box(700, 500, 900, 700)
    collection = feature_collection(
        tissue_features(roi, classification="Region*") + tissue_features(exclusion, classification="Ignore*"))
    annotations = read_geojson(write_geojson(tmp_path / "roi.geojson", collection))
    include = annotations_to_geometry(annotations, "Region*")
    exclude = annotations_to_geometry(annotations, "Ignore*")

    everything = plan_tiles(slide, None, target_mpp=0.5, tile_px=128, min_tissue=0)
    inside = plan_tiles(slide, None, target_mpp=0.5, tile_px=128, min_tissue=0, include=include)
    carved = plan_tiles(slide, None, target_mpp=0.5, tile_px=128, min_tissue=0, include=include, exclude=exclude)
    c_all, c_in, c_carved = everything.centres(), inside.centres(), carved.centres()
    expected = shapely.contains_xy(roi, c_all[:, 0], c_all[:, 1])
    assert 0 < len(inside) == int(expected.sum()) < len(everything)
    assert shapely.contains_xy(roi, c_in[:, 0], c_in[:, 1]).all()
    assert 0 < len(carved) < len(inside)
    assert not shapely.contains_xy(exclusion, c_carved[:, 0], c_carved[:, 1]).any()


# -- CAMELYON16 (NCRF JSON) -----------------------------------------------------------------------
def _ncrf(name: str) -> dict:
    return json.loads(shared_file(f"{NCRF}/{name}").read_text())


@pytest.mark.parametrize("name", data_params(CAMELYON_FILES, relative=lambda name: f"{NCRF}/{name}", ids=str))
def test_camelyon_annotations_parse_to_valid_lesions(name):
    path = shared_file(f"{NCRF}/{name}")
    raw = _ncrf(name)
    lesions = read_camelyon_annotations(path)
    assert isinstance(lesions, MultiPolygon) and lesions.is_valid
    if not raw["positive"]:
        assert lesions.is_empty
        return
    positives = [make_valid_geometry(Polygon(p["vertices"])) for p in raw["positive"]]
    negatives = [make_valid_geometry(Polygon(p["vertices"])) for p in raw["negative"]]
    expected = shapely.union_all(positives)
    if negatives:
        expected = expected.difference(shapely.union_all(negatives))
    assert lesions.symmetric_difference(expected).area <= 1e-6 * expected.area
    # one polygon per positive entry when the (valid) entries are pairwise disjoint
    simple = all(len(p.geoms) == 1 for p in positives)
    disjoint = all(not a.intersects(b) for i, a in enumerate(positives) for b in positives[i + 1:])
    if simple and disjoint and not negatives:
        assert len(lesions.geoms) == len(raw["positive"])
    # level-0 pixels of a CAMELYON16 slide (at most ~220,000 px a side at 0.243 µm/px)
    x0, y0, x1, y1 = lesions.bounds
    assert 0 <= x0 < x1 < 250_000 and 0 <= y0 < y1 < 250_000
    # lesions are sub-millimetre to centimetre sized: 10 µm² .. 1 cm² at 0.243 µm/px
    assert 10 < lesions.area * 0.243**2 < 1e8
    for p in lesions.geoms:
        assert p.area > 0


def test_camelyon_tumor_001_repairs_its_self_intersecting_outline():
    raw = _ncrf("Tumor_001.json")
    invalid = [p["name"] for p in raw["positive"] if not Polygon(p["vertices"]).is_valid]
    assert invalid, "Tumor_001 was expected to hold a self-intersecting polygon"
    lesions = read_camelyon_annotations(shared_file(f"{NCRF}/Tumor_001.json"))
    assert lesions.is_valid and len(lesions.geoms) == 2


def test_camelyon_normal_001_has_only_negative_regions():
    # Normal_001.json holds 4 "negative" outlines and no lesion: positive minus negative is empty.
    raw = _ncrf("Normal_001.json")
    assert raw["positive"] == [] and len(raw["negative"]) == 4
    assert read_camelyon_annotations(shared_file(f"{NCRF}/Normal_001.json")).is_empty


def test_camelyon_negative_regions_are_subtracted(tmp_path):
    data = {"positive": [{"name": "t", "vertices": [[0, 0], [1000, 0], [1000, 1000], [0, 1000]]}],
            "negative": [{"name": "n", "vertices": [[200, 200], [400, 200], [400, 400], [200, 400]]},
                         {"name": "n2", "vertices": [[900, -50], [1100, -50], [1100, 1050], [900, 1050]]}]}
    (tmp_path / "t.json").write_text(json.dumps(data))
    lesions = read_camelyon_annotations(tmp_path / "t.json")
    assert lesions.is_valid and lesions.area == pytest.approx(900 * 1000 - 200 * 200)
    assert len(lesions.geoms[0].interiors) == 1


def test_camelyon_xml_groups_are_read(tmp_path):
    xml = """<?xml version="1.0"?><ASAP_Annotations><Annotations>
    <Annotation Name="_0" Type="Polygon" PartOfGroup="_0"><Coordinates>
      <Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="100" Y="0"/>
      <Coordinate Order="2" X="100" Y="100"/><Coordinate Order="3" X="0" Y="100"/></Coordinates></Annotation>
    <Annotation Name="_1" Type="Polygon" PartOfGroup="_2"><Coordinates>
      <Coordinate Order="0" X="10" Y="10"/><Coordinate Order="1" X="20" Y="10"/>
      <Coordinate Order="2" X="20" Y="20"/><Coordinate Order="3" X="10" Y="20"/></Coordinates></Annotation>
    </Annotations></ASAP_Annotations>"""
    (tmp_path / "tumor_x.xml").write_text(xml)
    assert read_camelyon_annotations(tmp_path / "tumor_x.xml").area == pytest.approx(100 * 100 - 10 * 10)


def test_camelyon_lesions_round_trip_through_qupath_geojson(tmp_path):
    lesions = read_camelyon_annotations(shared_file(f"{NCRF}/Tumor_098.json"))
    path = write_geojson(tmp_path / "t.geojson", feature_collection(region_features(lesions, 0.243)))
    back = annotations_to_geometry(read_geojson(path), "Tumor")
    assert_same_geometry(back, lesions)
    assert os.path.getsize(path) > 0


def test_tissue_mask_exports_with_its_area(tmp_path):
    from wsiengine import detect_tissue, open_slide
    from wsiengine.testing import make_pyramidal_slide

    require_tissue_source()
    made = make_pyramidal_slide(tmp_path / "s.tiff", width=2048, height=1536, mpp=0.5, levels=(1, 4), compression="zlib")
    mask = detect_tissue(open_slide(made.path))
    features = tissue_features(mask)  # mpp from the mask: mask_mpp / level0_per_mask_px
    assert len(features) == len(mask.polygons.geoms) > 0
    assert sum(f["properties"]["measurements"]["Area mm^2"] for f in features) == pytest.approx(mask.area_mm2, rel=1e-3)
    back = annotations_to_geometry(read_geojson(write_geojson(tmp_path / "t.geojson", feature_collection(features))), "Tissue")
    assert_same_geometry(back, mask.polygons)
