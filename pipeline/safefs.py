"""File operations confined to a run directory: what a config names never reaches outside it.

A config's `name` and stage names become folders, so they must be plain names
(`check_name`). Every delete or replace the pipeline does in a run directory goes through
`remove_tree` / `remove_file` / `replace`, which resolve the target and refuse anything not
strictly inside the folder given as its root. Files the pipeline appends to (log.txt,
provenance.log.jsonl, metrics.csv, run.lock) are opened with `O_NOFOLLOW`, and the folders
it writes into are refused when they are symbolic links (`ensure_dir`), so a link planted in
a run directory cannot carry a write outside it. Atomic writes (atomic.py) replace a planted
link instead of following it.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import IO

from .errors import UsageError, show_value

NAME_MAX = 100  # characters of a run or stage name
NAME_CHARS = "letters, digits, '_', '-' and '.', not starting with '.'"


class UnsafePathError(UsageError):
    """A write or delete that would leave the run directory, or go through a symbolic link."""


def check_name(name: object) -> str | None:
    """Why `name` cannot be a folder of a run (a run's or a stage's name), or None: it must
    be a plain name of letters, digits, '_', '-' and '.', not start with '.', and have at
    most NAME_MAX characters (so no separators, NUL or control characters, '.' or '..')."""
    if not isinstance(name, str):
        return f"expected a string, got {show_value(name)}"
    if not name:
        return "is empty"
    if len(name) > NAME_MAX:
        return f"has {len(name)} characters (at most {NAME_MAX})"
    if name.startswith("."):
        return f"{show_value(name)} starts with '.' ({NAME_CHARS})"
    bad = next((c for c in name if not (c.isascii() and c.isalnum()) and c not in "_-."), None)
    if bad is not None:
        return f"{show_value(name)} holds {show_value(bad)} ({NAME_CHARS})"
    return None


def _real_parent(path: Path) -> Path:
    """`path` with its folder resolved (symlinks followed) but its last part kept as is."""
    path = Path(os.path.abspath(path))
    return Path(os.path.realpath(path.parent)) / path.name


def confined(root: str | Path, path: str | Path) -> Path:
    """`path` (its folder resolved), refusing anything not strictly inside `root`."""
    root_real = Path(os.path.realpath(root))
    real = _real_parent(Path(path))
    if real.name in ("", ".", "..") or real == root_real or root_real not in real.parents:
        raise UnsafePathError(f"{path}: refused: not inside {root} (the pipeline only "
                              "writes and deletes inside its run directory)")
    return real


def remove_tree(root: str | Path, path: str | Path) -> None:
    """Delete the folder `path` (strictly inside `root`); a symbolic link is refused."""
    real = confined(root, path)
    if real.is_symlink():
        raise UnsafePathError(f"{path}: refused: a symbolic link, not a folder of the run")
    shutil.rmtree(real)


def remove_file(root: str | Path, path: str | Path) -> None:
    """Delete the file (or link) `path`, strictly inside `root`."""
    os.unlink(confined(root, path))


def replace(root: str | Path, src: str | Path, dst: str | Path) -> None:
    """`os.replace(src, dst)`, both strictly inside `root` (a link is moved, not followed)."""
    os.replace(confined(root, src), confined(root, dst))


def refuse_link(path: str | Path, what: str = "") -> None:
    """Raise UnsafePathError when `path` is a symbolic link (a planted one would carry the
    pipeline's writes outside the run directory)."""
    path = Path(path)
    if path.is_symlink():
        target = os.readlink(path)
        raise UnsafePathError(f"{path}: refused: {what or 'it'} is a symbolic link (to "
                              f"{show_value(target)}); the pipeline does not write through "
                              "links, remove it")


def ensure_dir(path: str | Path) -> Path:
    """`mkdir -p path`, refusing a folder that is a symbolic link."""
    path = Path(path)
    refuse_link(path, "the folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_append(path: str | Path, mode: str = "a", **kwargs) -> IO:
    """`open(path, "a")` that refuses a symbolic link at `path` (O_NOFOLLOW) and anything
    that is not a regular file, with one line naming the file."""
    flags = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
             | getattr(os, "O_NONBLOCK", 0))  # a planted FIFO: an error, not a hang
    refuse_link(path, "the file")
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        if Path(path).is_symlink():
            refuse_link(path, "the file")
        raise OSError(err.errno, err.strerror, str(path)) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePathError(f"{path}: refused: not a regular file")
    return os.fdopen(fd, mode, **kwargs)


__all__ = ["NAME_MAX", "UnsafePathError", "check_name", "confined", "remove_tree",
           "remove_file", "replace", "refuse_link", "ensure_dir", "open_append"]
