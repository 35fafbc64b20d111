"""Seeded, bounded fuzzing: byte mutations of the real sample slide and JSON mutations of a real
result store, each run by the command line in a subprocess under a memory ceiling and a time
limit. Every case must end in a result or a clean ``error: <WsiEngineError>`` line: never a
traceback, a crash, a hang or a blown memory limit."""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

#: Address-space ceiling of each case (bytes): generous for numba/onnxruntime, far below a bomb.
MEMORY_LIMIT = 2_500 * 2**20
TIME_LIMIT_S = 120
SLIDE_CASES = 10
STORE_CASES = 12


def _limit_memory() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _wsiengine(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSIENGINE_")}
    return subprocess.run([sys.executable, "-m", "wsiengine", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=TIME_LIMIT_S, preexec_fn=_limit_memory, env=env)


def _assert_clean(result: subprocess.CompletedProcess, case: str, *, batch: bool = False) -> None:
    """No traceback; a failure exits 2 with an ``error:`` line (``run``: exit 1 means slides
    failed, each with its row in summary.csv)."""
    assert "Traceback" not in result.stderr, f"{case}: traceback\n{result.stderr[-3000:]}"
    if batch and result.returncode == 1:
        return
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert lines, f"{case}: exit {result.returncode} without an error line\n{result.stderr[-3000:]}"
        assert result.returncode in (1, 2), f"{case}: exit {result.returncode} (killed?)\n{result.stderr[-2000:]}"


def _mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    buf = bytearray(data)
    kind = rng.choice(["flip", "zero", "truncate", "header", "splice"])
    if kind == "flip":
        for _ in range(rng.randint(1, 64)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif kind == "zero":
        start = rng.randrange(len(buf))
        buf[start:start + rng.randint(16, 65536)] = bytes(min(len(buf) - start, rng.randint(16, 65536)))
    elif kind == "truncate":
        del buf[rng.randrange(8, len(buf)):]
    elif kind == "header":  # the TIFF header and first directory: offsets, counts, sizes
        for _ in range(rng.randint(1, 16)):
            buf[rng.randrange(min(len(buf), 4096))] = rng.randrange(256)
    else:
        start, length = rng.randrange(len(buf)), rng.randint(64, 4096)
        src = rng.randrange(len(buf))
        buf[start:start + length] = buf[src:src + length]
    return bytes(buf), kind


@pytest.mark.parametrize("seed", range(SLIDE_CASES))
def test_mutated_slides_give_a_result_or_a_clean_error(cmu_small, tmp_path, seed):
    rng = random.Random(seed)
    data, kind = _mutate_bytes(Path(cmu_small).read_bytes(), rng)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "mutant.svs").write_bytes(data)
    case = f"seed {seed} ({kind})"
    _assert_clean(_wsiengine("info", str(folder / "mutant.svs"), "--json", cwd=tmp_path), case + " info")
    run = _wsiengine("-q", "run", str(folder), "-o", str(tmp_path / "out"), "--no-report", cwd=tmp_path)
    _assert_clean(run, case + " run", batch=True)
    summary = (tmp_path / "out" / "summary.csv").read_text()
    assert "mutant" in summary and (",done," in summary or ",failed," in summary), summary


def _json_mutations(rng: random.Random, attrs: dict) -> tuple[dict, str]:
    doc = json.loads(json.dumps(attrs))
    paths = []

    def walk(node, trail):
        if isinstance(node, dict):
            for k, v in node.items():
                paths.append((*trail, k))
                walk(v, (*trail, k))

    walk(doc, ())
    target = rng.choice(paths)
    parent = doc
    for key in target[:-1]:
        parent = parent[key]
    action = rng.choice(["delete", "string", "huge", "negative", "list", "null", "nested", "path"])
    value = {"string": "x" * rng.randint(1, 300), "huge": 10**30, "negative": -7, "list": [1, [2, {"a": None}]],
             "null": None, "nested": {"a": {"b": {"c": [{}]}}}, "path": "/etc/../../tmp/evil"}.get(action)
    if action == "delete":
        del parent[target[-1]]
    else:
        parent[target[-1]] = value
    return doc, f"{'.'.join(map(str, target))} -> {action}"


@pytest.fixture(scope="module")
def result_store(tmp_path_factory, cmu_small) -> Path:
    import wsiengine as we

    out = tmp_path_factory.mktemp("fuzz-store")
    return we.Pipeline(report=False).run(cmu_small, out=out).store


@pytest.mark.parametrize("seed", range(STORE_CASES))
def test_mutated_store_metadata_gives_a_report_or_a_clean_error(result_store, tmp_path, seed):
    rng = random.Random(1000 + seed)
    store = tmp_path / "received.zarr"
    shutil.copytree(result_store, store)
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"], case = _json_mutations(rng, meta["attributes"])
    (store / "zarr.json").write_text(json.dumps(meta))
    for command in (["report", str(store), "-o", str(tmp_path / "rep"), "--format", "none"],
                    ["predict", str(store), "--json"],
                    ["geojson", str(store), "-o", str(tmp_path / "x.geojson")]):
        result = _wsiengine(*command, cwd=tmp_path)
        _assert_clean(result, f"seed {seed}: {case}: {command[0]}")
    escaped = [p for p in tmp_path.parent.iterdir() if p.name.startswith("evil")]
    assert not escaped, f"seed {seed}: {case}: wrote outside the output folder: {escaped}"


@pytest.mark.parametrize("path, value", [
    (("grid", "slide_mpp"), -7), (("encoder", "spec"), "x"), (("prediction", "probability"), "high"),
    (("grid", "tile_px"), None), (("slide", "mpp"), [float("nan"), 1.0]), (("n_tiles",), "73"),
])
def test_damaged_store_metadata_is_a_store_error_before_it_is_used(result_store, tmp_path, path, value):
    import wsiengine as we

    store = tmp_path / "received.zarr"
    shutil.copytree(result_store, store)
    meta = json.loads((store / "zarr.json").read_text())
    node = meta["attributes"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    (store / "zarr.json").write_text(json.dumps(meta, allow_nan=True))
    with pytest.raises(we.errors.StoreError, match="damaged metadata"):
        we.open_result(store)
