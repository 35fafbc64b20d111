"""Where a batch's results go: a local folder, or an fsspec URL."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from ..atomic import atomic_write
from ..errors import OutputError, OutputLockedError

__all__ = ["ResultsLocation", "OutputLock", "LOCK_NAME"]

logger = logging.getLogger("wsiengine")

#: the lock file a batch run holds in its local output folder
LOCK_NAME = ".wsiengine.lock"


class ResultsLocation:
    """Where results go: a local folder, or an fsspec URL (``s3://bucket/run``, ``file:///...``).

    Local files are written atomically by rename. On a URL, small files are written as whole
    objects, and a slide's outputs are made in a local staging folder and uploaded by
    :meth:`publish`: GeoJSON and PNG first, then the store with its root ``zarr.json`` (which
    says ``complete: true``) last, so a store that opens is a finished one.
    """

    def __init__(self, target: str | os.PathLike[str]) -> None:
        text = os.fspath(target)
        self.is_url = "://" in text
        if self.is_url:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(text)
            self.root = self.root.rstrip("/")
            self.target = text.rstrip("/")
            self.fs.makedirs(self.root, exist_ok=True)
        else:
            self.path = Path(text).expanduser()
            self.target = str(self.path)
            if self.path.exists() and not self.path.is_dir():
                raise OutputError(f"the output path '{self.path}' is a file, not a folder; "
                                  "give a folder (it is created if missing)")
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"cannot create the output folder '{self.path}': {exc.strerror or exc}; "
                                  "give a folder you can write to") from exc

    def check_writable(self) -> None:
        """Raise :class:`~wsiengine.errors.OutputError` unless a local output folder is writable."""
        if self.is_url:
            return
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise OutputError(f"the output folder '{self.path}' is not writable; "
                              "fix its permissions or give another folder")

    def __str__(self) -> str:
        return self.target

    def join(self, name: str) -> str:
        """The path or URL of ``name`` in the results."""
        return f"{self.target}/{name}" if self.is_url else str(self.path / name)

    def write_bytes(self, name: str, data: bytes) -> None:
        if self.is_url:
            self.fs.pipe_file(f"{self.root}/{name}", data)
        else:
            with atomic_write(self.path / name) as fh:
                fh.write(data)

    def read_bytes_size(self, name: str) -> int | None:
        """The size of ``name`` (bytes), or None when it is not a file there. ``name`` is one
        relative path under the results: an absolute path or ``..`` is never looked up."""
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return None
        try:
            if self.is_url:
                info = self.fs.info(f"{self.root}/{name}")
                return int(info["size"]) if info.get("type") == "file" else None
            p = self.path / name
            return p.stat().st_size if p.is_file() else None
        except (OSError, FileNotFoundError, KeyError):
            return None

    def read_text(self, name: str) -> str | None:
        try:
            if self.is_url:
                return self.fs.cat_file(f"{self.root}/{name}").decode("utf-8")
            return (self.path / name).read_text(encoding="utf-8")
        except (OSError, FileNotFoundError):
            return None

    def _put(self, local: Path, remote: str) -> None:
        parent = remote.rsplit("/", 1)[0]
        if parent not in self._made:
            self.fs.makedirs(parent, exist_ok=True)  # object stores: a no-op; file systems need folders
            self._made.add(parent)
        self.fs.put_file(str(local), remote)

    def publish(self, staging: Path, slide_id: str) -> None:
        """Upload one slide's outputs from ``staging`` (URL targets only)."""
        self._made: set[str] = set()
        assets = staging / f"{slide_id}.report"
        for f in sorted(p for p in assets.rglob("*") if p.is_file()) if assets.is_dir() else ():
            self._put(f, f"{self.root}/{slide_id}.report/{f.relative_to(assets).as_posix()}")
        for side in (f"{slide_id}.geojson", f"{slide_id}.heatmap.png", f"{slide_id}.report.md", f"{slide_id}.report.json"):
            if (staging / side).is_file():
                self._put(staging / side, f"{self.root}/{side}")
        store = staging / f"{slide_id}.zarr"
        remote = f"{self.root}/{slide_id}.zarr"
        if self.fs.exists(remote):
            self.fs.rm(remote, recursive=True)
        files = sorted(p for p in store.rglob("*") if p.is_file())
        root_meta = store / "zarr.json"
        for f in files:
            if f != root_meta:
                self._put(f, f"{remote}/{f.relative_to(store).as_posix()}")
        self._put(root_meta, f"{remote}/zarr.json")  # last: the store opens only once it is all there


def _pid_alive(pid: int) -> bool:
    """True when a process ``pid`` exists on this machine (signal 0; EPERM: it exists, not ours)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


class OutputLock:
    """An exclusive lock on a local output folder, held by one run for its whole length.

    The lock is the file ``OUT/.wsiengine.lock``, created with ``O_CREAT | O_EXCL`` and holding
    the owner's pid, host and start time (JSON). A second run finds it and stops with
    :class:`~wsiengine.errors.OutputLockedError` naming the owner. A lock left by a run that was
    killed (its pid no longer alive on this host) is stale: it is taken over, with a log line. A
    lock from another host is never taken over (its process cannot be checked from here): the
    message says to remove the file once that run is gone. :meth:`release` (or leaving the
    ``with`` block) removes the file.
    """

    def __init__(self, folder: str | os.PathLike[str], *, command: str = "run") -> None:
        self.path = Path(folder) / LOCK_NAME
        self.command = command
        self.info: dict[str, Any] = {}
        self._held = False

    def _read(self) -> dict[str, Any] | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            data = json.loads(text)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _create(self) -> bool:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": self.command}
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise OutputError(f"cannot write to the output folder '{self.path.parent}': {exc.strerror or exc}; "
                              "fix its permissions or give another folder") from exc
        try:
            os.write(fd, json.dumps(info).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self.info = info
        return True

    def acquire(self) -> "OutputLock":
        """Take the lock, taking over a stale one; :class:`OutputLockedError` when another run holds it."""
        for _ in range(5):
            if self._create():
                self._held = True
                return self
            holder = self._read()
            if holder is None:  # released between our two looks: try again
                continue
            pid, host = holder.get("pid"), holder.get("host")
            who = (f"`wsiengine {holder.get('command') or 'run'}`, process {pid} on host {host}"
                   + (f", started {holder['started']}" if holder.get("started") else "")
                   if pid else "an unknown process (the lock file is unreadable)")
            if not holder and time.time() - _mtime(self.path) < 10:
                time.sleep(0.2)  # another run is writing its lock this instant
                continue
            if holder and (host != socket.gethostname() or (isinstance(pid, int) and _pid_alive(pid))):
                raise OutputLockedError(
                    f"the output folder '{self.path.parent}' is in use by another wsiengine run ({who}); wait for it to "
                    f"finish or choose another output folder. If that run is gone, delete '{self.path}'.", holder)
            logger.warning("taking over a stale lock on '%s' left by %s, which is no longer running",
                           self.path.parent, who)
            stale = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
            try:
                os.replace(self.path, stale)  # one taker wins; the others find the new lock on their next look
            except FileNotFoundError:
                continue
            try:
                moved = json.loads(stale.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                moved = {}
            if moved and moved != holder:  # another run took it over first: give its lock back
                with contextlib.suppress(OSError):
                    os.link(stale, self.path)
            stale.unlink(missing_ok=True)
        raise OutputLockedError(f"could not lock the output folder '{self.path.parent}' ({self.path} keeps "
                                "changing); is another run starting there?", self._read() or {})

    def release(self) -> None:
        """Remove the lock file if this process still holds it."""
        if not self._held:
            return
        self._held = False
        holder = self._read()
        if holder and holder.get("pid") == self.info.get("pid") and holder.get("host") == self.info.get("host"):
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
