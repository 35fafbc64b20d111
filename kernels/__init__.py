"""Numba kernels of wsiengine: colour transforms, Otsu, morphology, labelling, integral images, JPEG scans.

Imported as ``wsiengine.kernels``. Everything here depends only on numpy and numba; inner
loops are ``numba.njit(cache=True, nogil=True)``, single-threaded (no ``parallel=True``:
Numba's default threading layer must not be entered from several threads at once), so
callers may run them in parallel threads. Masks are ``(H, W)`` bool, images ``(H, W, 3)``
uint8 RGB (a fourth, alpha channel is ignored), sizes pixels. Every function equals a
NumPy / SciPy / scikit-image reference (``tests/_reference_tissue.py``).

A compiled kernel only calls kernels of its own module: Numba's on-disk cache notices edits
to the file a function is defined in, not to the files of the functions it calls.

The tissue pipeline is :func:`segment_tissue` with :class:`TissueSegmentParams`; its steps
are public on their own:

- colour: :func:`rgb_to_saturation`, :func:`rgb_to_optical_density`
- pixel classes: :func:`glass_mask`, :func:`pen_mask`
- threshold: :func:`histogram`, :func:`bin_centers`, :func:`threshold_otsu`
- morphology (disk footprint): :func:`binary_dilation`, :func:`binary_erosion`,
  :func:`binary_closing`, :func:`binary_opening`
- components: :func:`label_components`, :func:`remove_small_objects`, :func:`fill_holes`
- integral images: :func:`integral_image`, :func:`box_sum`, :func:`box_mean`
- outlines: :func:`trace_rings` (pixel-edge boundary rings of a mask, for tissue polygons)
- encoder input: :func:`normalise_to_nchw`

Slide reading has one kernel module, imported on its own (``wsiengine.kernels.jpeg_entropy``):
:func:`~wsiengine.kernels.jpeg_entropy.check_scan` walks a stored JPEG tile's entropy-coded scan
as libjpeg would, without the IDCT, to find damaged tiles before they are decoded.
"""

from .colour import rgb_to_optical_density, rgb_to_saturation
from .contours import trace_rings
from .integral import box_mean, box_sum, integral_image
from .labels import fill_holes, label_components, remove_small_objects
from .morphology import binary_closing, binary_dilation, binary_erosion, binary_opening, disk_half_widths
from .pixel_classes import glass_mask, pen_mask
from .preprocess import normalise_to_nchw
from .threshold import bin_centers, histogram, threshold_otsu
from .tissue_segment import TissueSegmentation, TissueSegmentParams, segment_tissue, segment_tissue_detailed

__all__ = [
    "rgb_to_saturation",
    "rgb_to_optical_density",
    "glass_mask",
    "pen_mask",
    "histogram",
    "bin_centers",
    "threshold_otsu",
    "binary_dilation",
    "binary_erosion",
    "binary_closing",
    "binary_opening",
    "disk_half_widths",
    "label_components",
    "trace_rings",
    "remove_small_objects",
    "fill_holes",
    "integral_image",
    "box_sum",
    "box_mean",
    "TissueSegmentParams",
    "TissueSegmentation",
    "segment_tissue",
    "segment_tissue_detailed",
    "normalise_to_nchw",
]
