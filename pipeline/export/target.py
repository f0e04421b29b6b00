"""Where an export may write, and whether its batch fits in memory: checked before any work.

An existing file is replaced only with `--force`. A run directory's own files (model.pt,
the checkpoints, summary.json, config.yaml, the logs, ..., and a `.json` sidecar of any of
them) are never replaced, even with `--force`: inside a run directory an export may only
replace an earlier export (a name ending in a format's suffix, or its sidecar).
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

import torch
import torch.nn as nn

from ..rundir import is_run_dir
from .formats import FORMATS
from .source import ExportUsageError

MAX_FIXED_BATCH = 4096  # a fixed batch beyond this is refused (--dynamic-batch takes any)
# files of a run directory an export never writes over (their sidecars neither)
RUN_FILES = ("model.pt", "last*.pt", ".last*.pt*", "best.pt", "summary.json", "config.yaml",
             "metrics.csv", "train_log.csv", "provenance.json", "provenance.log.jsonl",
             "log.txt", "layers.json", "run.lock", "restart.json", "rounds.csv", "round.json",
             "suggested.yaml", "pruned.pt", "epoch_*.pt", "*.corrupt")


def _enclosing_run(folder: Path) -> Path | None:
    """The run directory `folder` is, or lies in (a stage folder, a round folder)."""
    for candidate in (folder, *list(folder.parents)[:2]):
        if is_run_dir(candidate):
            return candidate
    return None


def _is_export_name(name: str) -> bool:
    suffixes = tuple(f.suffix for f in FORMATS.values())
    return name.endswith(suffixes) or name.endswith(tuple(s + ".json" for s in suffixes))


def run_file(path: Path) -> Path | None:
    """The run directory whose own file `path` is (as given, and with links resolved), or
    None when an export may write there."""
    for p in {Path(os.path.abspath(path)), Path(os.path.realpath(path))}:
        run = _enclosing_run(p.parent)
        if run is None:
            continue
        names = {p.name, p.name.removesuffix(".json")}
        if any(fnmatch.fnmatch(n, pat) for n in names for pat in RUN_FILES):
            return run
        if (p.exists() or p.is_symlink()) and not _is_export_name(p.name):
            return run
    return None


def check_target(path: Path, force: bool, flag: str = "--out") -> None:
    """Refuse to write `path` when it is a run directory's own file, or exists without
    `force` (ExportUsageError, exit 2, naming the file)."""
    run = run_file(path)
    if run is not None:
        raise ExportUsageError(f"{flag} {path}: a file of the run directory {run}; export "
                               "never replaces it, even with --force: choose another --out")
    if (path.exists() or path.is_symlink()) and not force:
        raise ExportUsageError(f"{flag} {path}: exists; give --force to replace it")


def check_batch(batch: int | None) -> None:
    """A fixed batch is at most MAX_FIXED_BATCH (exit 2)."""
    if batch is not None and batch > MAX_FIXED_BATCH:
        raise ExportUsageError(f"--batch {batch}: at most {MAX_FIXED_BATCH}; use "
                               "--dynamic-batch for a file that takes any batch")


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux's MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def bytes_per_image(model: nn.Module, example: torch.Tensor) -> int:
    """What one image of the batch costs an export and its checks, near enough: the input
    and the largest activation, three times (the traced, the reference and the runtime's
    forward pass each hold a batch)."""
    largest = [0]

    def note(module, inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            largest[0] = max(largest[0], output.numel() * output.element_size())

    hooks = [m.register_forward_hook(note) for m in model.modules()]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return 3 * (example[:1].numel() * example.element_size() + 2 * largest[0])


def check_memory(model: nn.Module, example: torch.Tensor, batch: int | None) -> None:
    """Refuse a fixed batch whose export would not fit in the memory available (exit 2)."""
    if batch is None or batch <= 1:
        return
    free = available_memory()
    if free is None:
        return
    need = batch * bytes_per_image(model, example)
    if need > free:
        raise ExportUsageError(f"--batch {batch}: exporting and checking it needs about "
                               f"{need / 2**30:.1f} GiB of memory, {free / 2**30:.1f} GiB are "
                               "available; use a smaller batch or --dynamic-batch")


__all__ = ["MAX_FIXED_BATCH", "RUN_FILES", "run_file", "check_target", "check_batch",
           "check_memory", "available_memory"]
