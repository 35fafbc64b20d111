"""QuPath-compatible GeoJSON export and import.

>>> from wsiengine.geojson import export_slide_geojson, read_geojson, annotations_to_geometry
>>> export_slide_geojson("x.geojson", tissue=mask, grid=grid, scores=pred.tile_scores, threshold=0.5, tiles=True,
...                      attention=pred.attention)
>>> roi = annotations_to_geometry(read_geojson("drawn_in_qupath.geojson"), "Tumor")
>>> grid = plan_tiles(slide, mask, include=roi)

Conventions (QuPath 0.4 and later, see ``qupath-core``'s ``PathObjectTypeAdapters``):

* a ``FeatureCollection`` in **level-0 pixel coordinates** (origin top-left of the full-resolution
  image), one ``Feature`` per object, with a UUID ``id``;
* ``properties.objectType`` is ``"annotation"`` (tissue, tumour regions) or ``"detection"`` (tiles);
* ``properties.classification`` is ``{"name": str, "color": [r, g, b]}`` (ints 0-255);
* ``properties.measurements`` is a JSON **object** mapping a name to a number, the form QuPath has
  written since 0.4.0 (it still reads the older ``[{"name", "value"}]`` list, and so does
  :func:`read_geojson`); non-finite values are left out, as JSON has no NaN;
* ``properties.color`` (``[r, g, b]``) colours one object, used for tiles coloured by score;
* ``isLocked`` is written only when true.

Every polygon written is valid (``shapely.is_valid``), snapped to a 0.01-px grid, exterior ring
counter-clockwise and holes clockwise (RFC 7946), rings closed.
"""

from .export import (
    CLASS_COLOURS,
    NON_TUMOR_CLASS,
    TILE_CLASS,
    TISSUE_CLASS,
    TUMOR_CLASS,
    deposit_features,
    export_slide_geojson,
    feature_collection,
    region_features,
    score_colours,
    slide_feature_collection,
    tile_features,
    tissue_features,
    write_geojson,
)
from .geometry import COORD_PRECISION_PX, make_valid_geometry, max_diameter
from .read import Annotation, annotations_to_geometry, read_camelyon_annotations, read_geojson
from .regions import RegionMeasurement, region_measurements, tumour_regions

__all__ = [
    "Annotation",
    "TISSUE_CLASS",
    "TUMOR_CLASS",
    "NON_TUMOR_CLASS",
    "TILE_CLASS",
    "CLASS_COLOURS",
    "make_valid_geometry",
    "RegionMeasurement",
    "region_measurements",
    "tissue_features",
    "tumour_regions",
    "region_features",
    "deposit_features",
    "tile_features",
    "feature_collection",
    "slide_feature_collection",
    "write_geojson",
    "export_slide_geojson",
    "read_geojson",
    "annotations_to_geometry",
    "read_camelyon_annotations",
    "max_diameter",
    "score_colours",
]
