"""atomic_write: a file appears whole or not at all."""

from __future__ import annotations

import pytest

from wsiengine.atomic import atomic_write


def test_atomic_write_publishes_on_success_and_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "sub" / "x.bin"
    with atomic_write(target) as fh:
        fh.write(b"first")
    assert target.read_bytes() == b"first"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as fh:
            fh.write(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"first"
    assert [p.name for p in target.parent.iterdir()] == ["x.bin"]  # no temporary left behind


def test_replace_directory_swaps_in_the_new_folder_and_leaves_nothing_behind(tmp_path):
    from wsiengine.atomic import replace_directory

    final = tmp_path / "out.zarr"
    for version in ("one", "two"):
        partial = tmp_path / "out.zarr.partial"
        (partial / "sub").mkdir(parents=True)
        (partial / "sub" / "v.txt").write_text(version)
        assert replace_directory(partial, final) == final
        assert (final / "sub" / "v.txt").read_text() == version
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]


def test_replace_directory_keeps_the_old_folder_when_the_new_one_is_missing(tmp_path):
    from wsiengine.atomic import replace_directory

    final = tmp_path / "out"
    final.mkdir()
    (final / "v.txt").write_text("old")
    with pytest.raises(FileNotFoundError):
        replace_directory(tmp_path / "missing.partial", final)
    assert (final / "v.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
