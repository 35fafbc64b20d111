"""Import boundaries from DESIGN.md, enforced with import-linter contracts in pyproject.toml:
stages never import pipeline, batch or cli; the engine core never imports torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    if shutil.which("lint-imports") is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    result = subprocess.run(["lint-imports"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kernels_import_only_numpy_numba_and_each_other():
    """The Numba kernels sit at the bottom of the data flow: no engine stage, no torch."""
    import ast

    allowed = {"numpy", "numba", "math", "dataclasses", "typing", "__future__", "collections", "functools"}
    for path in sorted((ROOT / "kernels").glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level > 0:  # relative: another kernel module
                    assert node.level == 1, f"{path.name} reaches outside kernels/"
                    continue
                names = [(node.module or "").split(".")[0]]
            else:
                continue
            for name in names:
                assert name in allowed, f"{path.name} imports {name}"


def test_importing_wsiengine_does_not_import_torch():
    code = "import sys, wsiengine, wsiengine.kernels; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_kernels_and_models_are_installed_inside_the_package():
    import wsiengine.kernels
    import wsiengine.models

    assert Path(wsiengine.kernels.__file__).parent.name == "kernels"
    assert Path(wsiengine.models.__file__).parent.name == "models"


def test_wheel_maps_kernels_and_models_into_the_package(tmp_path):
    """``pip install .`` ships wsiengine/kernels and wsiengine/models, and no top-level
    ``kernels`` or ``models`` package."""
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("wsiengine-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "wsiengine/kernels/__init__.py" in names
    assert "wsiengine/models/__init__.py" in names
    assert "wsiengine/models/weights/efficientnet_lite0.onnx" in names  # the shipped default encoder
    assert "wsiengine/models/architectures/vit.py" in names
    assert not [n for n in names if n.startswith(("kernels/", "models/"))]
