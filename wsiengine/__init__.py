"""wsiengine: gigapixel whole-slide image inference.

>>> import wsiengine as we
>>> slide = we.open_slide("x.svs")
>>> mask = we.detect_tissue(slide)
>>> grid = we.plan_tiles(slide, mask, target_mpp=0.5, tile_px=224)
>>> for batch in we.stream_patches(slide, grid, batch_size=64):
...     batch.images, batch.index
>>> enc = we.Encoder.load("default")                 # ONNX Runtime, no torch
>>> for index, feats in enc.stream(slide, grid): ...
>>> res = we.Pipeline().run("x.svs", out="results/")   # store, heatmaps, GeoJSON, report
>>> we.Pipeline(we.RunConfig.load("run.toml"), target_mpp=0.5).config.tiling
>>> we.make_report("results/x.zarr").findings["category"]["code"]
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import errors
from .batch import run_batch
from .config import (
    BatchConfig,
    EncoderConfig,
    MILConfig,
    OutputsConfig,
    ReportConfig,
    RunConfig,
    SlideConfig,
    StreamConfig,
    TilingConfig,
    TissueConfig,
    VLMConfig,
    set_defaults,
)
from .aggregate import MILHead, SlidePrediction
from .encode import Encoder
from .evaluate import froc
from .fewshot import FewShotClassifier
from .geojson import annotations_to_geometry, export_slide_geojson, read_camelyon_annotations, read_geojson
from .models import EncoderSpec, get_encoder_spec, list_encoders
from .ood import EmbeddingReference
from .pipeline import Pipeline, SlideResult, embed_slide
from .report import Report, TileBank, make_report, validate_report
from .resolution import read_mpp_csv
from .slide import Slide, open_slide
from .store import ResultStore, open_result, open_store, read_features
from .stream import PatchBatch, stream_patches
from .tiling import TileGrid, plan_tiles
from .tissue import TissueMask, detect_tissue

try:
    __version__ = version("wsiengine")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__",
    "errors",
    "open_slide",
    "Slide",
    "read_mpp_csv",
    "detect_tissue",
    "TissueMask",
    "plan_tiles",
    "TileGrid",
    "stream_patches",
    "PatchBatch",
    "Encoder",
    "EncoderSpec",
    "get_encoder_spec",
    "list_encoders",
    "embed_slide",
    "Pipeline",
    "SlideResult",
    "run_batch",
    "FewShotClassifier",
    "read_geojson",
    "annotations_to_geometry",
    "read_camelyon_annotations",
    "export_slide_geojson",
    "froc",
    "MILHead",
    "SlidePrediction",
    "EmbeddingReference",
    "make_report",
    "Report",
    "validate_report",
    "TileBank",
    "open_store",
    "open_result",
    "ResultStore",
    "read_features",
    "RunConfig",
    "SlideConfig",
    "TissueConfig",
    "TilingConfig",
    "EncoderConfig",
    "MILConfig",
    "OutputsConfig",
    "BatchConfig",
    "StreamConfig",
    "ReportConfig",
    "VLMConfig",
    "set_defaults",
]
