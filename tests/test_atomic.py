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
