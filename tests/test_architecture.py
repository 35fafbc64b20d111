"""Import boundaries from DESIGN.md, enforced with the import-linter contracts in pyproject.toml:
data flows one way (cli -> batch -> pipeline -> stages -> kernels), and the runtime never imports
torch or the training code in ``wsiengine.models.training``.

The contracts run against an installed copy of the package (a wheel built from a copy of the
source tree, unpacked into a temporary folder), because ``kernels/`` and ``models/`` become
``wsiengine.kernels`` and ``wsiengine.models`` only through setuptools' ``package-dir``, which
grimp does not follow: on the source tree it would see neither. The tests below also prove that
the contracts bite: a copy of the tree with one forbidden import added must fail them, naming it.

``python tests/test_architecture.py`` runs the contracts the same way and prints import-linter's
report.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"

RUNTIME_TORCH = "The runtime never imports torch or training code"
ROOTS_TORCH = "import wsiengine and import wsiengine.models never import torch or training code"
LAYERS = "Data flows one way"


def _setuptools_config(pyproject: Path = PYPROJECT) -> dict:
    return tomllib.loads(pyproject.read_text())["tool"]["setuptools"]


def _contracts(pyproject: Path = PYPROJECT) -> list[dict]:
    return tomllib.loads(pyproject.read_text())["tool"]["importlinter"]["contracts"]


def copy_source_tree(dest: Path, root: Path = ROOT, *, weights: bool = True) -> Path:
    """Copy what a build reads (pyproject.toml, README.md and every ``package-dir`` folder) to
    ``dest``, without caches or a stale ``build/``, so that a wheel of the copy is a wheel of the
    working tree as it is now. ``weights=False`` leaves out the shipped model files (no code)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(root / name, dest / name)
    patterns = ["__pycache__", "*.pyc", "*.egg-info", ".import_linter_cache"] + ([] if weights else ["*.onnx", "*.npz"])
    ignore = shutil.ignore_patterns(*patterns)
    for folder in sorted(set(_setuptools_config(root / "pyproject.toml")["package-dir"].values())):
        shutil.copytree(root / folder, dest / folder, ignore=ignore)
    return dest


def install(source: Path, site: Path) -> Path:
    """Build a wheel of ``source`` (no dependencies, no build isolation) and unpack it into
    ``site``: the package as ``pip install .`` lays it out. Returns the wheel."""
    wheels = site.parent / f"{site.name}-wheel"
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(wheels), str(source)], capture_output=True, text=True)
    assert result.returncode == 0, f"building a wheel of {source} failed:\n{result.stdout}{result.stderr}"
    (wheel,) = wheels.glob("wsiengine-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    return wheel


def _lint_imports() -> str:
    beside = Path(sys.executable).with_name("lint-imports")
    found = str(beside) if beside.is_file() else shutil.which("lint-imports")
    if found is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    return found


def lint(site: Path, config: Path = PYPROJECT) -> subprocess.CompletedProcess:
    """Run the contracts of ``config`` against the package installed in ``site`` (first on
    ``PYTHONPATH``, so it shadows the editable install)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.run([_lint_imports(), str(config), "--no-cache", "--no-logo"], cwd=site.parent, env=env,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(site folder, wheel) of the working tree as it is now."""
    tmp = tmp_path_factory.mktemp("installed")
    site = tmp / "site"
    wheel = install(copy_source_tree(tmp / "src"), site)
    return site, wheel


def test_import_contracts_hold_on_the_installed_package(installed):
    site, _ = installed
    assert (site / "wsiengine" / "kernels" / "__init__.py").is_file()
    assert (site / "wsiengine" / "models" / "training" / "__init__.py").is_file()
    result = lint(site)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout, result.stdout


def test_installed_package_holds_every_source_module(installed):
    """Every .py file of every package-dir folder is installed: a package missing from
    ``[tool.setuptools] packages`` would be missing from ``pip install .`` and hidden from the
    contracts (its imports would resolve to the root package)."""
    site, _ = installed
    missing = []
    for package, folder in _setuptools_config()["package-dir"].items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            rel = path.relative_to(ROOT / folder)
            if not (site / Path(*package.split(".")) / rel).is_file():
                missing.append(f"{folder}/{rel.as_posix()}")
    assert not missing, f"not installed (add the package to [tool.setuptools] packages): {missing}"


def test_every_runtime_module_is_a_source_of_the_torch_contract(installed):
    """A new module of the engine must be listed in the "runtime never imports torch" contract
    (import-linter has no "every module except" form); training scripts (``models/train_*.py``)
    are training code, which the contract forbids the runtime to import."""
    site, _ = installed

    def children(package: str) -> set[str]:
        folder = site / Path(*package.split("."))
        names = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
        names |= {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}
        return {f"{package}.{n}" for n in names}

    training = {"wsiengine.models.training"} | {m for m in children("wsiengine.models") if m.startswith("wsiengine.models.train_")}
    runtime = (children("wsiengine") - {"wsiengine.models"}) | (children("wsiengine.models") - training)
    (contract,) = [c for c in _contracts() if c["name"] == RUNTIME_TORCH]
    unlisted = sorted(runtime - set(contract["source_modules"]))
    assert not unlisted, f"add {unlisted} to the source_modules of {RUNTIME_TORCH!r} in pyproject.toml"
    assert contract["ignore_imports"] == ["wsiengine.train_cli -> wsiengine.models.training"]


def test_every_engine_module_has_a_place_in_the_data_flow(installed):
    """Each top-level module of the engine is a layer (or one of a layer's modules) of the data-flow
    contract, so a new stage says where it sits; the entry point and the test helpers excepted."""
    site, _ = installed
    folder = site / "wsiengine"
    modules = {f"wsiengine.{p.stem}" for p in folder.glob("*.py") if p.stem != "__init__"}
    modules |= {f"wsiengine.{p.name}" for p in folder.iterdir() if (p / "__init__.py").is_file()}
    (contract,) = [c for c in _contracts() if c["name"].startswith(LAYERS)]
    placed = {m.strip().strip("()") for layer in contract["layers"] for m in layer.replace(":", "|").split("|")}
    unplaced = sorted(modules - placed - {"wsiengine.__main__", "wsiengine.testing", "wsiengine.models"})
    assert not unplaced, f"give {unplaced} a layer in the {LAYERS!r} contract in pyproject.toml"
    assert {"wsiengine.models.registry", "wsiengine.models.specs", "wsiengine.models.training"} <= placed


# Each edit alone must break the contracts, and the report must name the module it was made in.
# They cover the three folders that package-dir maps (wsiengine/, kernels/, models/).
BREAKS = {
    "stage imports torch": ("wsiengine/tiling.py", "import torch", RUNTIME_TORCH, "wsiengine.tiling -> torch"),
    "stage imports training": ("wsiengine/tiling.py", "from wsiengine.models.training import mil_train",
                               RUNTIME_TORCH, "wsiengine.tiling -> wsiengine.models.training.mil_train"),
    "kernel imports torch": ("kernels/threshold.py", "import torch", RUNTIME_TORCH, "wsiengine.kernels.threshold -> torch"),
    "registry imports training": ("models/registry.py", "from .training import build", RUNTIME_TORCH,
                                  "wsiengine.models.registry -> wsiengine.models.training.build"),
    "cli imports training eagerly": ("wsiengine/train_cli.py", "from .models.training import mil_train", RUNTIME_TORCH,
                                     "wsiengine.train_cli -> wsiengine.models.training.mil_train"),
    "package root imports training": ("wsiengine/__init__.py", "from .models.training import mil_export", ROOTS_TORCH,
                                      "wsiengine -> wsiengine.models.training.mil_export"),
    "stage imports pipeline": ("wsiengine/tiling.py", "from . import pipeline", LAYERS, "wsiengine.tiling -> wsiengine.pipeline"),
    "kernel imports a stage": ("kernels/threshold.py", "from ..errors import ConfigError", LAYERS,
                               "wsiengine.kernels.threshold -> wsiengine.errors"),
}


@pytest.mark.parametrize("edit", list(BREAKS))
def test_contracts_fail_when_a_forbidden_import_is_added(tmp_path, edit):
    relpath, line, contract, chain = BREAKS[edit]
    source = copy_source_tree(tmp_path / "src", weights=False)
    target = source / relpath
    target.write_text(target.read_text() + f"\n{line}  # added by test_architecture\n")
    install(source, tmp_path / "site")
    result = lint(tmp_path / "site", source / "pyproject.toml")
    report = result.stdout + result.stderr
    assert result.returncode != 0, report
    assert f"{contract}" in report and "BROKEN" in report, report
    broken = report[report.index("Broken contracts"):]
    assert contract in broken, report
    assert chain in broken, report


def test_kernels_import_only_numpy_numba_and_each_other():
    """The Numba kernels sit at the bottom of the data flow: no engine stage, no torch."""
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


def test_the_runtime_path_imports_no_torch_and_no_training_code():
    """What a run loads (the package, the default encoder and head, a pipeline, the command line)
    pulls in neither torch nor wsiengine.models.training."""
    code = ("import sys, wsiengine, wsiengine.kernels, wsiengine.cli, wsiengine.train_cli\n"
            "from wsiengine import Encoder, MILHead, Pipeline\n"
            "Encoder.load('default'); MILHead.load('default'); wsiengine.cli.build_parser()\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'wsiengine.models.training'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_kernels_and_models_are_installed_inside_the_package():
    import wsiengine.kernels
    import wsiengine.models

    assert Path(wsiengine.kernels.__file__).parent.name == "kernels"
    assert Path(wsiengine.models.__file__).parent.name == "models"


def test_wheel_maps_kernels_and_models_into_the_package(installed):
    """``pip install .`` ships wsiengine/kernels and wsiengine/models (training code in
    wsiengine/models/training), and no top-level ``kernels`` or ``models`` package."""
    _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert "wsiengine/kernels/__init__.py" in names
    assert "wsiengine/models/__init__.py" in names
    assert "wsiengine/models/weights/efficientnet_lite0.onnx" in names  # the shipped default encoder
    assert "wsiengine/models/weights/mil-default/model.onnx" in names  # the shipped default head
    assert "wsiengine/models/cards/mil-default.md" in names
    assert "wsiengine/models/training/__init__.py" in names
    assert "wsiengine/models/training/architectures/vit.py" in names
    assert not [n for n in names if n.startswith(("kernels/", "models/"))]


if __name__ == "__main__":  # python tests/test_architecture.py: the contracts, as import-linter reports them
    import tempfile

    with tempfile.TemporaryDirectory(prefix="wsiengine-contracts-") as tmp:
        site = Path(tmp) / "site"
        install(copy_source_tree(Path(tmp) / "src"), site)
        outcome = lint(site)
        print(outcome.stdout + outcome.stderr, end="")
    sys.exit(outcome.returncode)
