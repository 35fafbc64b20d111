"""Tile values -> multiscale Zarr rasters and PNG overlays.

A per-tile value (attention, tile score, ...) becomes a raster on the tile grid's *stride
lattice*: raster pixel ``(row, col)`` is the level-0 box
``[origin + col * cell_x, origin + (col + 1) * cell_x) x [origin + row * cell_y, ...)`` with
``cell = grid.stride_level0``. A tile covers ``ceil(tile / stride)`` cells per axis; a cell
covered by several tiles (``overlap_px > 0``) holds their mean, a cell no tile covers is NaN.

Coordinate conventions
----------------------
* :meth:`HeatmapRaster.transform` is **pixel-corner** based, like the engine's level-0
  coordinates (``TileGrid.coords``, tissue polygons, GeoJSON): it maps raster coordinates
  ``(col, row)`` to the level-0 ``(x, y)`` of that pixel's *top-left corner*, so
  ``floor(inverse @ (x, y, 1))`` is the raster pixel holding level-0 point ``(x, y)``.
* The OME-NGFF ``coordinateTransformations`` are **pixel-centre** based, as NGFF viewers
  (napari) read them: array index ``i`` is the centre of pixel ``i`` and the output space is
  level-0 pixel *centres* (level-0 pixel ``j`` of the slide sits at ``j``, exactly where an
  NGFF viewer shows the slide's own level 0 with an identity transform). Level ``k`` has
  ``scale = cell * 2**k`` and ``translation = origin + scale / 2 - 0.5``, so a heatmap opened
  next to the slide in napari lies on it to the pixel.

Axes are ``y, x`` of type ``"space"``, in level-0 pixels (NGFF has no unit for pixels, so the
axes carry none); ``attrs["wsiengine"]["slide_mpp"]`` gives µm per level-0 pixel.

Modules: :mod:`.raster` (tiles -> lattice raster), :mod:`.ngff` (multiscale Zarr with OME-NGFF
metadata), :mod:`.render` (colour maps, overlays, PNG). Only numpy, zarr (v3) and Pillow: no
torch, no matplotlib.
"""

from .ngff import NGFF_VERSION, list_heatmaps, read_heatmap, write_heatmap
from .raster import HeatmapRaster, downsample_nanmean, tile_raster
from .render import COLORMAPS, _font, colormap, render_overlay, save_overlay_png  # noqa: F401 (_font: report.images)

__all__ = [
    "HeatmapRaster",
    "tile_raster",
    "downsample_nanmean",
    "write_heatmap",
    "read_heatmap",
    "list_heatmaps",
    "colormap",
    "COLORMAPS",
    "render_overlay",
    "save_overlay_png",
]
