"""SHA-256 of files, read in blocks: the provenance hashes of model files and result stores.

Standard library only, so any module (runtime or export) can use it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import Any

__all__ = ["sha256_file", "sha256_files", "update_digest"]

#: bytes read at a time
_BLOCK_BYTES = 4 << 20


def update_digest(digest: Any, path: str | os.PathLike[str], *, sample_bytes: int | None = None) -> Any:
    """Feed the bytes of file ``path`` into ``digest`` (a ``hashlib`` object) and return it.

    With ``sample_bytes``, only the first ``sample_bytes`` bytes and then the bytes from
    ``max(sample_bytes, size - sample_bytes)`` to the end are fed (the head and tail of a large
    file, never overlapping); otherwise the whole file, in 4 MiB blocks.
    """
    with open(path, "rb") as fh:
        if sample_bytes is None:
            for block in iter(lambda: fh.read(_BLOCK_BYTES), b""):
                digest.update(block)
            return digest
        size = os.fstat(fh.fileno()).st_size
        digest.update(fh.read(sample_bytes))
        if size > sample_bytes:
            fh.seek(max(sample_bytes, size - sample_bytes))
            digest.update(fh.read())
    return digest


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of file ``path`` as 64 lowercase hex digits (read in 4 MiB blocks)."""
    return update_digest(hashlib.sha256(), path).hexdigest()


def sha256_files(paths: Iterable[str | os.PathLike[str]]) -> str:
    """The SHA-256 of the files ``paths`` concatenated in order (e.g. an ONNX model and its external
    data file), as 64 lowercase hex digits."""
    digest = hashlib.sha256()
    for path in paths:
        update_digest(digest, path)
    return digest.hexdigest()
