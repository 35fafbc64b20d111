"""One frozen, nested run configuration, resolved once.

>>> from wsiengine.config import RunConfig, set_defaults
>>> config = RunConfig.load()                         # defaults -> TOML file -> WSIENGINE_* -> code
>>> with set_defaults(target_mpp=0.25):               # like dask.config.set
...     RunConfig.load().tiling.target_mpp
0.25

- :mod:`~wsiengine.config.sections`: one dataclass per stage (tissue, tiling, stream, encoder,
  MIL, outputs, report, VLM, slide, batch), units in the names.
- :mod:`~wsiengine.config.sources`: the layers (defaults, TOML, environment, code, command
  line), value parsing and each value's source.
- :mod:`~wsiengine.config.tiling`: where the tiling comes from and the one "same tiling" rule.
- :mod:`~wsiengine.config.run`: :class:`RunConfig`, its resume key and its stored form.
"""

from .run import DEFAULT_SOURCE, RunConfig
from .sections import (
    DEFAULT_TARGET_MPP,
    DEFAULT_TILE_PX,
    HEATMAP_VALUES,
    BatchConfig,
    EncoderConfig,
    MILConfig,
    MILTrainConfig,
    OutputsConfig,
    ReportConfig,
    SlideConfig,
    StreamConfig,
    TilingConfig,
    TissueConfig,
    VLMConfig,
    physical_cores,
)
from .sources import CONFIG_FILE_ENV, ENV_PREFIX, set_defaults
from .tiling import TILING_TOLERANCE, ModelTiling, tiling_differences, tiling_mismatch_message

__all__ = ["RunConfig", "TissueConfig", "TilingConfig", "StreamConfig", "EncoderConfig", "MILConfig", "OutputsConfig",
           "ReportConfig", "VLMConfig", "SlideConfig", "BatchConfig", "MILTrainConfig", "set_defaults", "ENV_PREFIX",
           "CONFIG_FILE_ENV", "DEFAULT_SOURCE", "DEFAULT_TARGET_MPP", "DEFAULT_TILE_PX", "HEATMAP_VALUES",
           "TILING_TOLERANCE", "ModelTiling", "tiling_differences", "tiling_mismatch_message", "physical_cores"]
