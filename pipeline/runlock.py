"""One `run` at a time per run directory: an advisory lock file, `<run dir>/run.lock`.

The holder keeps an exclusive `flock` on the file and writes its PID, host, start time
and command into it; a second `run` of the same run directory refuses at once, naming
them. The kernel drops the lock when the holder's process ends, however it ends, so a
lock file left by a dead process is stale: the next run takes it over (and says so).
The file is removed when the run ends. `compare`, `export` and `--dry-run` only read and
never take the lock.

On a file system without `flock` (some network mounts) the lock cannot be taken and the
run goes on with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from .errors import UsageError
from .safefs import refuse_link, remove_file

try:
    import fcntl
except ImportError:  # no flock here: runs are not locked
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("pipeline")

LOCK_FILE = "run.lock"


class RunLocked(UsageError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """The lock of one run directory; `acquire()` then `release()` (or `with`)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None
        self.stale: str | None = None  # what a stale lock taken over said

    def acquire(self) -> None:
        if fcntl is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = _open_lock(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise RunLocked(
                    f"{self.path.parent}: another run is using this run directory (PID "
                    f"{holder.get('pid', '?')} on {holder.get('host', '?')}, since "
                    f"{holder.get('started', '?')}); wait for it to end, or stop it (its lock "
                    f"file: {self.path})") from None
            except OSError as err:
                os.close(fd)
                log.warning("%s: cannot lock (%s); not guarding against a second run",
                            self.path, err.strerror)
                return
            # the file may have been removed by its previous holder between our open and
            # our lock: then we hold a lock on a file nobody else can see; open it again
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = _read(fd)
        if old.get("pid") is not None:
            self.stale = (f"{self.path}: took over the stale lock of PID {old.get('pid')} on "
                          f"{old.get('host')} (that process has ended)")
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:  # while still holding it: no one locks a file being removed
            remove_file(self.path.parent, self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _open_lock(path: Path) -> int:
    """The lock file, opened for reading and writing; a symbolic link planted in its place
    is refused (O_NOFOLLOW), never followed and truncated."""
    refuse_link(path, "the lock file")
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                       | getattr(os, "O_NONBLOCK", 0), 0o666)
    except OSError as err:
        refuse_link(path, "the lock file")  # planted between the check and the open
        raise OSError(err.errno, err.strerror, str(path)) from None


def _read(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


__all__ = ["LOCK_FILE", "RunLock", "RunLocked"]
