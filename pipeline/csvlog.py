"""Append-only CSV logs (a stage's metrics.csv and train_log.csv) that a resumed run trims
back to its checkpoint, so no row appears twice."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from pathlib import Path

from .atomic import atomic_open
from .errors import first_line
from .safefs import open_append, refuse_link, replace

log = logging.getLogger("pipeline")


class CsvLog:
    """Rows with the columns `fields` in `path`; the header is written with the first row."""

    def __init__(self, path: Path, fields: list[str]):
        self.path, self.fields = Path(path), fields

    def append(self, row: dict) -> None:
        new = not self.path.exists()
        with open_append(self.path, newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)

    def trim(self, keep: Callable[[dict], bool]) -> None:
        """Keep only the rows `keep(row)` accepts (rewritten atomically); a half-written
        line of a killed run is dropped. A symbolic link planted at the file is refused. A
        file that is not CSV text (binary, NUL bytes, not UTF-8) is set aside as
        `<name>.damaged[.N]` with a warning, and the log starts afresh: a damaged log must
        not stop a resume, nor be lost."""
        refuse_link(self.path, "the log file")
        if not self.path.exists():
            return
        rows = []
        try:
            with open(self.path, newline="", encoding="utf-8") as f:
                for r in csv.DictReader(f):
                    try:
                        if keep(r):
                            rows.append(r)
                    except (KeyError, ValueError, TypeError):
                        continue
        except (UnicodeDecodeError, csv.Error) as err:
            kept = self._set_aside()
            log.warning("%s: not a readable CSV log (%s); kept as %s, the log starts afresh",
                        self.path, first_line(err)[:80], kept.name)
            return
        with atomic_open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def _set_aside(self) -> Path:
        """Rename the file beside itself to the first free `<name>.damaged[.N]`."""
        for n in range(1000):
            target = self.path.with_name(f"{self.path.name}.damaged" + (f".{n}" if n else ""))
            if not target.exists() and not target.is_symlink():
                replace(self.path.parent, self.path, target)  # never over a file
                return target
        raise OSError(f"{self.path}: cannot set the damaged log aside (1000 copies exist)")


__all__ = ["CsvLog"]
