"""Where a run's tiling comes from, and when two tilings are "the same".

One rule for both, used by the run resolver, the MIL head's mismatch warning, the encoder's note
and the report's ``tiling_mismatch`` QC flag:

- **Source**: each of ``target_mpp`` and ``tile_px`` is the explicit setting, else the MIL
  head's training tiling, else the encoder spec's, else 0.5 µm/px and 224 px.
- **Same tiling**: resolutions and tile sides within :data:`TILING_TOLERANCE` (10 %) of each
  other.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TILING_TOLERANCE", "ModelTiling", "tiling_differences", "tiling_mismatch_message"]

#: Relative difference of resolution (µm/px) or tile side (px) beyond which two tilings differ.
TILING_TOLERANCE = 0.10


@dataclass(frozen=True)
class ModelTiling:
    """The tiling a model expects: ``target_mpp`` µm/px, ``tile_px`` pixels (either may be
    unknown), and ``label`` saying which model (``MIL head 'default'``)."""

    target_mpp: float | None
    tile_px: int | None
    label: str


def tiling_differences(expected_mpp: float | None, expected_px: int | None, actual_mpp: float | None,
                       actual_px: int | None) -> list[str]:
    """How a tiling (``actual_mpp`` µm/px, ``actual_px`` px) differs from an expected one by more
    than :data:`TILING_TOLERANCE`, in words; empty when they agree or a value is unknown."""
    problems = []
    if expected_mpp and actual_mpp and abs(float(actual_mpp) / float(expected_mpp) - 1) > TILING_TOLERANCE:
        problems.append(f"{float(actual_mpp):.3g} µm/px instead of {float(expected_mpp):.3g}")
    if expected_px and actual_px and abs(int(actual_px) / int(expected_px) - 1) > TILING_TOLERANCE:
        problems.append(f"{int(actual_px)}-px tiles instead of {int(expected_px)}")
    return problems


def tiling_mismatch_message(model: ModelTiling, actual_mpp: float | None, actual_px: int | None) -> str | None:
    """The one warning for tiles unlike those a model was trained on; None when they agree."""
    problems = tiling_differences(model.target_mpp, model.tile_px, actual_mpp, actual_px)
    if not problems:
        return None
    trained = " at ".join(p for p in (f"{model.tile_px} px" if model.tile_px else "",
                                      f"{model.target_mpp:.3g} µm/px" if model.target_mpp else "") if p)
    flags = " ".join(p for p in (f"--target-mpp {model.target_mpp:.3g}" if model.target_mpp else "",
                                 f"--tile-px {model.tile_px}" if model.tile_px else "") if p)
    return (f"the {model.label} was trained on tiles of {trained}; these tiles are {' and '.join(problems)}, so its "
            f"output is out of distribution. Tile with {flags}, or leave the tiling unset to follow the model")
