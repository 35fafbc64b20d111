"""Atomic publication: a file is written to a temporary sibling, fsynced, then renamed over the
final name; a folder built under a temporary name replaces the final one by renames."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "replace_directory", "TEMP_FILE", "OLD_FOLDER"]

#: names of :func:`atomic_write`'s temporaries: ``.NAME.PID.HEX8.tmp``
TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
#: names of the folders :func:`replace_directory` sets aside: ``.NAME.partial-old-PID-HEX8``
OLD_FOLDER = re.compile(r"^\.(?P<name>.+)\.partial-old-(?P<pid>\d+)-[0-9a-f]{8}$")


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


def replace_directory(partial: str | os.PathLike[str], final: str | os.PathLike[str]) -> Path:
    """Move the finished folder ``partial`` to ``final``, replacing any folder already there.

    An existing ``final`` is first renamed aside to a hidden sibling (``.NAME.partial-old-PID-XXXX``,
    which batch runs clear as a stale temporary), then ``partial`` is renamed to ``final`` and the
    old folder is deleted. Each rename is atomic on one file system, so ``final`` is always either
    the old folder or the new one; if the second rename fails, the old folder is put back. Both
    paths must be on the same file system. Returns ``final``.
    """
    partial, final = Path(os.fspath(partial)), Path(os.fspath(final))
    if not final.exists():
        os.replace(partial, final)
        return final
    old = final.with_name(f".{final.name}.partial-old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.replace(final, old)
    try:
        os.replace(partial, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final
