"""Shared fixtures: where test data is found, and slides built in a temporary directory.

Test data is found in one place (:func:`data_file`), in this order:

1. ``$WSIENGINE_TEST_DATA``: a folder laid out like ``../shared/data`` (see tests/README.md);
2. ``../shared/data`` beside the checkout;
3. for the sample slide only, ``examples/data/cmu-1-small-region.svs``, which
   ``python examples/get_sample_slide.py`` fetches at set-up time (the README's test command
   runs it).

Everything on the core path (reading, tissue, tiling, stream, encode, MIL, store, heatmaps,
GeoJSON, batch, resume, report) runs from the sample slide and slides generated from it in a
temporary directory. Tests that need optional data (PCam, the TCGA and DICOM slides, the
CAMELYON16 annotations, the histolab pen images) skip, naming the file and where it comes from.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from wsiengine.testing.synthetic import SAMPLE_SLIDE, SAMPLE_SLIDE_FETCHED, find_data_file

#: What each optional data file (or folder, by prefix) is and its licence, for skip messages;
#: tests/README.md lists the same.
SOURCES: dict[str, str] = {
    SAMPLE_SLIDE: "CMU-1-Small-Region sample slide, CC0",
    "pcam/test": "PCam test split, CC0",
    "pcam/train": "PCam train split, CC0",
    "pcam/valid": "PCam validation split, CC0",
    "pcam": "PatchCamelyon patches, CC0",
    "histolab/tcga-cr-7395-01a-01-ts1.svs": "TCGA frozen section, JPEG 2000 SVS without mpp, TCGA open access",
    "histolab/kidney-48-5.tif": "histolab IHC kidney, plain TIFF, Apache-2.0",
    "histolab/pen-images": "histolab H&E thumbnails with pen marks, Apache-2.0",
    "histolab/tiles": "histolab tissue and background tiles, Apache-2.0",
    "ez-wsi-dicomweb": "CAMELYON DICOM WSI overview, CC0",
    "google-medical-imaging": "CAMELYON DICOM WSI overview (JPEG 2000), CC0",
    "highdicom": "highdicom DICOM WSI, MIT",
    "openslide-python": "OpenSlide test fixtures, LGPL-2.1",
    "pathml": "PathML DICOM no reader opens, GPL-2.0",
    "ncrf-camelyon16-annotations": "CAMELYON16 lesion annotations from NCRF, Apache-2.0",
    "tiatoolbox": "TIAToolbox H&E regions, BSD-3 / CC-BY 4.0",
    "stardist-wheel": "StarDist H&E image, BSD-3",
    "wsidicom-data": "wsidicom H&E tile, Apache-2.0",
    "skimage": "scikit-image IHC image, BSD-3",
}


def describe(relative: str) -> str:
    """What ``relative`` (a path as under ../shared/data) is, with its licence."""
    return next((v for k, v in SOURCES.items() if relative == k or relative.startswith(k + "/")), "real test data")


def where_from(relative: str) -> str:
    """Where ``relative`` comes from, for a skip message."""
    if relative == SAMPLE_SLIDE:
        return ("run `python examples/get_sample_slide.py` (puts it in examples/data/), or provide "
                "../shared/data or $WSIENGINE_TEST_DATA; see tests/README.md")
    return "from ../shared/data or $WSIENGINE_TEST_DATA; see tests/README.md"


def missing_reason(relative: str) -> str:
    """The skip message for an absent data file: which file, what it is, where it comes from."""
    return f"needs {relative} ({describe(relative)}, {where_from(relative)})"


def data_file(relative: str) -> Path | None:
    """``relative`` in the first data root that has it (see the module docstring), else None."""
    return find_data_file(relative)


def shared_file(relative: str) -> Path:
    """Path to a test-data file or folder (``relative`` as under ../shared/data), or skip naming it."""
    path = data_file(relative)
    if path is None:
        pytest.skip(missing_reason(relative))
    return path


def data_params(cases, relative=lambda case: case, ids=None) -> list:
    """``pytest.param`` for each case whose data file is present, plus one skipped case naming the
    absent files (not one skip per file): parametrize over optional data with this.

    ``cases`` are argument values (a tuple per case for several argnames); ``relative(case)`` is
    the case's data file as under ../shared/data; ``ids(case)`` its test id (default: the file's stem).
    """
    ids = ids or (lambda case: Path(relative(case)).stem)
    present, missing = [], []
    for case in cases:
        (present if data_file(relative(case)) is not None else missing).append(case)

    def values(case):
        return case if isinstance(case, tuple) else (case,)

    params = [pytest.param(*values(case), id=ids(case)) for case in present]
    if missing:
        files = sorted({relative(case) for case in missing})
        sources = "; ".join(sorted({describe(f) for f in files}))
        shown = ", ".join(files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
        cases = f"{len(missing)} case{'s' if len(missing) > 1 else ''}"
        where = where_from(SAMPLE_SLIDE if SAMPLE_SLIDE in files else files[0])
        reason = f"needs {shown} ({sources}, {where}): {cases} not run"
        params.append(pytest.param(*values(missing[0]), id="absent-data", marks=pytest.mark.skip(reason=reason)))
    return params


@pytest.fixture(scope="session")
def cmu_small() -> Path:
    """CMU-1-Small-Region: Aperio SVS, JPEG, 2220x2967, 0.499 µm/px (the shared copy, else
    examples/data/, where ``python examples/get_sample_slide.py`` puts it)."""
    return shared_file(SAMPLE_SLIDE)


def write_no_mpp_slide(source: Path, path: Path) -> Path:
    """Write the sample slide's level 0 as a tiled pyramidal TIFF without resolution metadata.

    Two levels (the second at downsample 2, area-averaged), JPEG tiles of 256 px, no
    XResolution/YResolution unit and no vendor description: OpenSlide (generic-tiff), tiffslide
    and tifffile open it, and none finds an mpp. The image is cropped to even height, so level 1
    is exactly half of level 0 (2220 x 2966 -> 1110 x 1483).
    """
    import tifffile

    from wsiengine import open_slide

    with open_slide(source) as slide:
        w, h = slide.dimensions
        image = slide.read_region((0, 0), 0, (w - w % 2, h - h % 2))
    half = image.reshape(image.shape[0] // 2, 2, image.shape[1] // 2, 2, 3).mean(axis=(1, 3))
    half = np.round(half).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tif:
        for level, pixels in enumerate((image, half)):
            tif.write(pixels, tile=(256, 256), photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                      subfiletype=0 if level == 0 else 1, metadata=None, software="wsiengine tests")
    return path


def write_coarse_slide(source: Path, path: Path, downsample: int = 8) -> Path:
    """Write the sample slide area-averaged by ``downsample`` as a tiled TIFF whose resolution
    tags say so (0.499 x 8 = 3.99 µm/px by default): a real slide too coarse for a 0.5 µm/px
    target, as a low-magnification overview is."""
    import tifffile

    from wsiengine import open_slide

    with open_slide(source) as slide:
        w, h = slide.dimensions
        w, h = w - w % downsample, h - h % downsample
        image = slide.read_region((0, 0), 0, (w, h))
        mpp = slide.mpp[0] * downsample
    small = image.reshape(h // downsample, downsample, w // downsample, downsample, 3).mean(axis=(1, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.round(small).astype(np.uint8), tile=(128, 128), photometric="rgb", compression="zlib",
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", metadata=None)
    return path


@pytest.fixture(scope="session")
def no_mpp_slide(tmp_path_factory, cmu_small) -> Path:
    """A real-tissue slide without mpp: the sample slide as a 2-level pyramidal TIFF (level 0
    2220 x 2966 px, level 1 downsample 2) with no resolution metadata, in a temporary folder."""
    return write_no_mpp_slide(cmu_small, tmp_path_factory.mktemp("no-mpp") / "no-mpp.tiff")


#: Real images cut from the sample slide (level 0 x, y, width, height; "thumbnail": the whole
#: slide area-averaged by 8, 277 x 370 px, tissue on glass with a little blue-green tissue dye).
SAMPLE_REGIONS: dict[str, tuple[int, int, int, int] | None] = {
    "sample-glass": (0, 1280, 512, 512),  # glass only
    "sample-tissue": (1024, 768, 512, 512),  # H&E tissue only (epidermis and dermis)
    "sample-tissue-2": (768, 2304, 512, 512),  # H&E tissue only (dermis)
    "sample-border": (1536, 1024, 512, 512),  # tissue edge on glass
    "sample-thumbnail": None,
}


@functools.lru_cache(maxsize=None)
def _sample_region(name: str) -> np.ndarray:
    from wsiengine import open_slide

    with open_slide(shared_file(SAMPLE_SLIDE)) as slide:
        box = SAMPLE_REGIONS[name]
        if box is not None:
            return slide.read_region(box[:2], 0, box[2:])
        w, h = slide.dimensions
        image = slide.read_region((0, 0), 0, (w - w % 8, h - h % 8))
    return np.round(image.reshape(h // 8, 8, w // 8, 8, 3).mean(axis=(1, 3))).astype(np.uint8)


def sample_region(name: str) -> np.ndarray:
    """A real RGB image cut from the sample slide (one of :data:`SAMPLE_REGIONS`), a fresh copy;
    skips naming the sample slide when it is absent."""
    return _sample_region(name).copy()


def record_read_sizes(slide) -> list[int]:
    """Record the pixel count of every backend read of ``slide`` (a spy on its backend)."""
    sizes: list[int] = []
    original = slide.backend.read_region

    def spy(x, y, level, w, h):
        sizes.append(w * h)
        return original(x, y, level, w, h)

    slide.backend.read_region = spy
    return sizes


def require_tissue_source() -> None:
    """Skip unless make_pyramidal_slide's default real-tissue texture is available (the sample
    slide from ../shared/data, $WSIENGINE_TEST_DATA or examples/data/)."""
    from wsiengine.testing import load_default_source

    try:
        load_default_source()
    except FileNotFoundError:
        pytest.skip(f"generated slides need a real H&E texture: {missing_reason(SAMPLE_SLIDE)}")


__all__ = ["SAMPLE_SLIDE", "SAMPLE_SLIDE_FETCHED", "data_file", "data_params", "describe", "missing_reason", "where_from", "record_read_sizes",
           "require_tissue_source", "sample_region", "shared_file", "write_coarse_slide", "write_no_mpp_slide", "VIEW_SLIDE"]


#: The slide of the viewer's results folder (:func:`view_results`).
VIEW_SLIDE = "cmu-1-small-region"


@pytest.fixture(scope="session")
def view_results(tmp_path_factory, cmu_small) -> Path:
    """A results folder of the sample slide with deposits (loose rules), staged as one patient,
    plus a failed slide's summary row."""
    root = tmp_path_factory.mktemp("view")
    slides = root / "slides"
    slides.mkdir()
    (slides / cmu_small.name).symlink_to(cmu_small)
    (slides / "broken.svs").write_bytes(b"not a slide")
    patients = root / "patients.csv"
    patients.write_text(f"patient_id,slide_id\npatient_a,{VIEW_SLIDE}\n")
    out = root / "results"
    from wsiengine.cli import main

    main(["-q", "run", str(slides), "-o", str(out), "--providers", "cpu", "--tile-threshold", "0.05",
          "--seed-threshold", "0.1", "--smoothing", "0", "--patients", str(patients)])
    assert (out / f"{VIEW_SLIDE}.zarr").is_dir() and (out / "patients" / "patient_a.patient.json").is_file()
    return out
