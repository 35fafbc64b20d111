"""Atomic file writes: write a temporary sibling, fsync, then rename over the final name."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a binary file that appears at ``path`` only if the ``with`` block succeeds.

    The data go to a hidden temporary file in the same folder (created if needed), which is
    flushed, fsynced and renamed onto ``path`` (``os.replace``, atomic on one file system). On
    any error the temporary file is removed and an existing ``path`` is left untouched.
    """
    final = Path(os.fspath(path))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
