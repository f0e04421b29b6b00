"""Forward time of an exported file in the runtime that will run it."""

from __future__ import annotations

from pathlib import Path

import torch

from ..timing import median_ms, torch_threads
from .formats import FORMATS, read_metadata
from .source import ExportUsageError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def timing_input(meta: dict, batch: int, input_size: tuple[int, ...] | None = None,
                 precision: str | None = None) -> torch.Tensor:
    """A random batch of the shape, dtype and memory format the exported file was made for
    (from its metadata, or the arguments where the file has none)."""
    size = tuple(input_size or meta.get("input_size") or ())
    if not size:
        raise ExportUsageError("the exported file carries no input size (no metadata or "
                               "sidecar .json); pass input_size")
    fixed = meta.get("batch")
    if isinstance(fixed, int) and fixed != batch:
        raise ExportUsageError(f"the file was exported for batch {fixed}, not {batch}; export "
                               f"it with --batch {batch} or --dynamic-batch")
    x = torch.randn((batch, *size), dtype=DTYPES[precision or meta.get("precision", "fp32")])
    if meta.get("memory_format") == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def time_exported(path: str | Path, fmt: str, batch: int, threads: int | None = None,
                  input_size: tuple[int, ...] | None = None, precision: str | None = None,
                  min_seconds: float = 1.0, min_runs: int = 10, warmup: int = 3) -> float:
    """Median wall time (ms) of one forward pass of a random batch through the exported
    file at `path`, run by its own runtime (onnxruntime CPU, torch.jit, torch.export) on
    `threads` intra-op threads (None: the runtime's default). Input size, precision and
    memory format come from the file's metadata; `input_size`/`precision` override them."""
    meta = read_metadata(path, fmt)
    x = timing_input(meta, batch, input_size, precision)
    with torch_threads(threads):
        run = FORMATS[fmt].runner(Path(path), threads)
        return median_ms(lambda: run(x), min_runs, min_seconds, warmup)


__all__ = ["time_exported", "timing_input", "torch_threads"]
