"""Runs on one output folder under hostile and faulty conditions (issue 13): two runs at once, a
lock left by a killed run, temporaries left by killed runs beside a user's own files, a store
marked complete that is damaged, an output path that is a file or unwritable, a full disk, and
Ctrl-C. Real runs on the sample slide."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import wsiengine
from wsiengine.batch import read_summary
from wsiengine.batch.location import LOCK_NAME, OutputLock
from wsiengine.cli import main
from wsiengine.errors import OutputError, OutputLockedError, StoreError
from wsiengine.store import open_result


@pytest.fixture()
def slides(tmp_path, cmu_small) -> Path:
    """A folder with the sample slide as ``a.svs``."""
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(cmu_small, folder / "a.svs")
    return folder


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _assert_complete(store: Path) -> None:
    result = open_result(store)  # verifies the arrays the schema requires
    assert result.coords.shape == (result.n_tiles, 2) and result.features.shape[0] == result.n_tiles > 0


def _strip_to_metadata(store: Path) -> None:
    """What two runs on one folder left: a store marked complete holding only its zarr.json."""
    for child in store.iterdir():
        if child.name != "zarr.json":
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def test_two_runs_on_one_folder_one_is_refused_and_the_results_are_complete(slides, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wsiengine", "run", str(slides), "-o", str(out), "--workers", "1", "--no-report", "--quiet"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    second = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = [(p.pid, p.wait(timeout=600), p.communicate()[1]) for p in (first, second)]
    codes = sorted(rc for _, rc, _ in results)
    assert codes == [0, 2], results
    (winner, _, _), = [r for r in results if r[1] == 0]
    (_, _, refused), = [r for r in results if r[1] == 2]
    assert "OutputLockedError" in refused and f"process {winner}" in refused
    _assert_complete(out / "a.zarr")
    assert [r.status for r in read_summary(out)] == ["done"]
    assert not (out / LOCK_NAME).exists()


def test_a_run_on_a_folder_another_process_holds_names_that_process(slides, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom wsiengine.batch.location import OutputLock\n"
        f"with OutputLock({str(out)!r}):\n    print('locked', flush=True)\n    time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError, match=f"process {holder.pid} on host") as info:
            wsiengine.run_batch(slides, out, workers=1, report=False)
        assert info.value.holder["pid"] == holder.pid
        assert not (out / "a.zarr").exists() and not (out / "summary.csv").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_from_a_killed_run_is_taken_over(slides, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(),
                                             "started": "2026-01-01T00:00:00+0000"}))
    with caplog.at_level(logging.INFO, logger="wsiengine"):
        summary = wsiengine.run_batch(slides, out, workers=1, report=False)
    assert [r.status for r in summary.rows] == ["done"]
    assert "taking over a stale lock" in caplog.text
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_a_lock_held_on_another_host_is_not_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "some-other-node", "started": "x"}))
    with pytest.raises(OutputLockedError, match="some-other-node"):
        OutputLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).exists()


def test_start_up_clears_only_the_engines_temporaries_and_restores_an_interrupted_swap(slides, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = _dead_pid()
    user = {"notes.tmp": "mine", "x.partial": "mine", ".notes.tmp": "mine", ".cache.partial": "mine",
            "draft.partial.md": "mine"}
    for name, text in user.items():
        (out / name).write_text(text)
    (out / "scans.partial").mkdir()  # a user's folder
    engine_files = [".a.partial.geojson", ".a.heatmap.partial.png", f".summary.csv.{dead}.0123abcd.tmp"]
    for name in engine_files:
        (out / name).write_text("left by a killed run")
    engine_dirs = ["b.zarr.partial", f".b.report.partial-{dead}"]
    for name in engine_dirs:
        (out / name).mkdir()
    # a swap killed between its two renames: the set-aside store is the only copy
    (out / f".c.zarr.partial-old-{dead}-89abcdef").mkdir()
    (out / f".c.zarr.partial-old-{dead}-89abcdef" / "zarr.json").write_text("{}")
    # a swap that finished but was killed before deleting the old folder, and an older version's leftover
    (out / "d.zarr").mkdir()
    (out / f".d.zarr.partial-old-{dead}-00ff00ff").mkdir()
    (out / "e.zarr").mkdir()
    (out / "e.zarr.old").mkdir()
    (out / "e.zarr.old" / "zarr.json").write_text("{}")

    wsiengine.run_batch(slides, out, workers=1, report=False)

    for name, text in user.items():
        assert (out / name).read_text() == text, name
    assert (out / "scans.partial").is_dir()
    for name in engine_files + engine_dirs + [f".d.zarr.partial-old-{dead}-00ff00ff", "e.zarr.old"]:
        assert not (out / name).exists(), name
    assert (out / "c.zarr" / "zarr.json").is_file() and not any(p.name.startswith(".c.zarr") for p in out.iterdir())
    _assert_complete(out / "a.zarr")


def test_a_store_marked_complete_holding_only_metadata_is_refused_and_redone(slides, tmp_path, capsys):
    out = tmp_path / "out"
    wsiengine.run_batch(slides, out, workers=1, report=False)
    store = out / "a.zarr"
    _strip_to_metadata(store)
    with pytest.raises(StoreError, match="marked complete but is damaged.*tiles/coords is missing"):
        open_result(store)
    with pytest.raises(StoreError):
        wsiengine.read_features(store)
    capsys.readouterr()
    assert main(["predict", str(store)]) == 2
    err = capsys.readouterr().err
    assert "StoreError" in err and "KeyError" not in err
    assert main(["report", str(store), "-o", str(tmp_path / "reports")]) != 0
    assert "StoreError" in capsys.readouterr().err

    summary = wsiengine.run_batch(slides, out, workers=1, report=False, retry_failed=True)
    assert [r.status for r in summary.rows] == ["done"]  # redone, not "skipped"
    _assert_complete(store)


def test_a_store_whose_features_do_not_match_its_tiles_is_refused(slides, tmp_path):
    import zarr

    out = tmp_path / "out"
    wsiengine.run_batch(slides, out, workers=1, report=False)
    group = zarr.open_group(str(out / "a.zarr"), mode="r+")
    n, d = group["features"].shape
    group.create_array("features", shape=(n - 1, d), dtype="float32", overwrite=True)
    with pytest.raises(StoreError, match=rf"features has shape \({n - 1}, {d}\), expected \({n}, {d}\)"):
        open_result(out / "a.zarr")


def test_an_output_path_that_is_a_file_fails_at_start(slides, tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("a file")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        wsiengine.run_batch(slides, target, workers=1, report=False)
    assert main(["run", str(slides), "-o", str(target / "sub"), "--quiet"]) == 2
    assert "OutputError" in capsys.readouterr().err
    assert target.read_text() == "a file"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores file permissions")
def test_an_unwritable_output_folder_fails_at_start(slides, tmp_path):
    out = tmp_path / "readonly"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="not writable"):
            wsiengine.run_batch(slides, out, workers=1, report=False)
    finally:
        out.chmod(0o755)


def _folder_nobody_may_write() -> Path | None:
    """An existing folder this process cannot create files in, even as root (sysfs), or None."""
    for candidate in (Path("/sys/kernel"), Path("/proc/sys")):
        if not candidate.is_dir():
            continue
        try:
            (candidate / ".wsiengine-probe").open("x").close()
        except OSError:
            return candidate
        (candidate / ".wsiengine-probe").unlink()
    return None


def test_an_existing_folder_that_cannot_be_written_fails_at_start_with_a_clear_error(slides, capsys):
    """The root-proof variant of the case above (CI and containers run as root): a sysfs folder."""
    folder = _folder_nobody_may_write()
    if folder is None:
        pytest.skip("no folder here that even root cannot write (/sys/kernel, /proc/sys)")
    assert main(["run", str(slides), "-o", str(folder), "--no-report", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "OutputError" in err and str(folder) in err and "Traceback" not in err
    assert not (folder / LOCK_NAME).exists()


def test_a_full_disk_while_writing_one_slide_fails_that_slide_and_the_batch_goes_on(slides, tmp_path, monkeypatch):
    import wsiengine.store as store_module

    shutil.copy(slides / "a.svs", slides / "b.svs")
    real = store_module.replace_directory

    def full_once(partial, final):
        if Path(final).name == "a.zarr":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(final))
        return real(partial, final)

    monkeypatch.setattr(store_module, "replace_directory", full_once)
    out = tmp_path / "out"
    summary = wsiengine.run_batch(slides, out, workers=1, report=False)
    rows = {r.slide_id: r for r in summary.rows}
    assert rows["a"].status == "failed" and rows["b"].status == "done"
    assert rows["a"].error.startswith("OutputError: cannot write the slide's results")
    assert "No space left on device" in rows["a"].error and "unexpected" not in rows["a"].error
    assert [r.status for r in read_summary(out)] == ["failed", "done"]
    _assert_complete(out / "b.zarr")


def test_a_summary_that_cannot_be_written_stops_the_batch_with_a_clear_error(slides, tmp_path, monkeypatch):
    import wsiengine.batch.run as run_module

    def full(out, rows):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(run_module, "write_summary", full)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="cannot write summary.csv.*No space left on device.*rerun"):
        wsiengine.run_batch(slides, out, workers=1, report=False)
    assert not (out / LOCK_NAME).exists()  # released on the way out


def test_ctrl_c_says_how_to_resume(slides, tmp_path, monkeypatch, capsys):
    import wsiengine.batch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(wsiengine.batch, "run_batch", interrupted)
    assert main(["run", str(slides), "-o", str(tmp_path / "out")]) == 130
    assert "interrupted; rerun the same command to resume" in capsys.readouterr().err


def test_a_slide_past_its_time_budget_fails_and_the_batch_goes_on(tmp_path, cmu_small):
    """A per-slide budget (slide_timeout_s): the slow slide fails with SlideTimeoutError, nothing
    of it is published, and the next slide is processed."""
    import shutil

    import wsiengine as we

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(cmu_small, folder / "a.svs")
    shutil.copy(cmu_small, folder / "b.svs")
    out = tmp_path / "out"
    summary = we.run_batch(folder, out, workers=1, report=False, slide_timeout_s=1e-6)
    assert [r.status for r in summary.rows] == ["failed", "failed"]
    assert all(r.error.startswith("SlideTimeoutError: the slide took more than") for r in summary.rows)
    assert not list(out.glob("*.zarr")) and not list(out.glob("*.geojson")) and not list(out.glob("*.png"))
    again = we.run_batch(folder, out, workers=1, report=False, slide_timeout_s=600, retry_failed=True)
    assert [r.status for r in again.rows] == ["done", "done"]


def test_a_rerun_restores_deleted_side_outputs_and_report_images(tmp_path, cmu_small):
    import shutil

    import wsiengine as we

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(cmu_small, folder / "a.svs")
    out = tmp_path / "out"
    assert we.run_batch(folder, out, workers=1).counts["done"] == 1
    assert we.open_result(out / "a.zarr").attrs["outputs"] == ["a.geojson", "a.heatmap.png"]
    (out / "a.geojson").unlink()
    again = we.run_batch(folder, out, workers=1)
    assert again.counts["done"] == 1 and (out / "a.geojson").is_file()  # redone: the store lists it
    (out / "a.report" / "evidence-03.png").unlink()  # e.g. a run killed while the folder was swapped
    stamp = (out / "a.zarr" / "zarr.json").stat().st_mtime_ns
    third = we.run_batch(folder, out, workers=1)
    assert third.counts["skipped"] == 1 and (out / "a.report" / "evidence-03.png").is_file()
    assert (out / "a.zarr" / "zarr.json").stat().st_mtime_ns == stamp  # the report was rewritten from the store


def test_symlinked_folders_are_followed_once(tmp_path, cmu_small):
    import shutil

    from wsiengine.batch import discover_slides

    real = tmp_path / "elsewhere" / "cases"
    real.mkdir(parents=True)
    shutil.copy(cmu_small, real / "b.svs")
    root = tmp_path / "slides"
    root.mkdir()
    (root / "linked").symlink_to(real, target_is_directory=True)
    (real / "loop").symlink_to(real, target_is_directory=True)  # a cycle
    assert [e.slide_id for e in discover_slides(root)] == ["linked__b"]


def test_a_failing_report_leaves_nothing_of_the_slide(tmp_path, cmu_small, monkeypatch):
    import wsiengine as we
    from wsiengine.errors import ReportError

    pipe = we.Pipeline()

    def broken(*args, **kwargs):
        raise ReportError("simulated")

    monkeypatch.setattr(pipe, "write_report", broken)
    with pytest.raises(ReportError):
        pipe.run(cmu_small, out=tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_report_and_embed_refuse_a_folder_a_run_is_writing(slides, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(slides), "-o", str(out), "--quiet", "--no-report"]) == 0
    with OutputLock(out, command="run"):  # a run is going on there
        assert main(["report", str(out / "a.zarr"), "--quiet"]) == 1
        err = capsys.readouterr().err
        assert "OutputLockedError" in err and "`wsiengine run`" in err and f"process {os.getpid()}" in err
        assert not (out / "a.report.json").exists()
        assert main(["embed", str(slides / "a.svs"), "-o", str(out / "b.zarr"), "--quiet"]) == 2
        assert "OutputLockedError" in capsys.readouterr().err and not (out / "b.zarr").exists()
    assert main(["report", str(out / "a.zarr"), "--quiet"]) == 0  # free again
    assert (out / "a.report.json").is_file() and not (out / LOCK_NAME).exists()
