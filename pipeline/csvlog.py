"""Append-only CSV logs (a stage's metrics.csv and train_log.csv) that a resumed run trims
back to its checkpoint, so no row appears twice."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

from .atomic import atomic_open
from .safefs import open_append, refuse_link


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
        line of a killed run is dropped. A symbolic link planted at the file is refused."""
        refuse_link(self.path, "the log file")
        if not self.path.exists():
            return
        rows = []
        with open(self.path, newline="") as f:
            for r in csv.DictReader(f):
                try:
                    if keep(r):
                        rows.append(r)
                except (KeyError, ValueError, TypeError):
                    continue
        with atomic_open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)


__all__ = ["CsvLog"]
