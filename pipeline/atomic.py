"""Atomic file writes: a temporary file in the same folder, fsync, then `os.replace`, so a
crash leaves either the old file or the new one, never half of one.

The file gets the mode a plain `open()` would give it (0666 less the umask), not
mkstemp's 0600, so a run's files can be read by whoever can read its log. A symbolic link
at the target is replaced, never followed."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .safefs import remove_file, replace


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit it replaces `path`, on an
    exception it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        replace(path.parent, tmp, path)  # a link at `path` is replaced, never followed
    except BaseException:
        with contextlib.suppress(OSError):
            remove_file(path.parent, tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    """Copy the file `src` to `dst` atomically (a link at `dst` is replaced, not followed)."""
    with open(src, "rb") as fin, atomic_open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)


def current_umask() -> int:
    """The process's umask, read without changing it where /proc tells it (os.umask can
    only be read by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["atomic_open", "atomic_write_text", "atomic_copy", "current_umask", "fsync_dir"]
