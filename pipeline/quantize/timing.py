"""Forward time of an int8 artifact in the runtime that runs it (onnxruntime's CPU
provider; for pt2e the program compiled by torch.compile, its deployment form)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..timing import median_ms, torch_threads
from .backends import backend_of


def artifact_latency_ms(path: str | Path, backend: str, batch: int,
                        input_size: tuple[int, ...], threads: int | None = None,
                        min_seconds: float = 1.0, min_runs: int = 10, warmup: int = 3) -> float:
    """Median wall time (ms) of one forward pass of a random fp32 batch of `batch` through
    the artifact at `path`, on `threads` intra-op threads (default: torch's count)."""
    with torch_threads(threads or torch.get_num_threads()):
        run = backend_of(backend).runner(Path(path), threads or torch.get_num_threads(),
                                         compiled=True)
        x = torch.randn((batch, *input_size), generator=torch.Generator().manual_seed(0))
        return median_ms(lambda: run(x), min_runs, min_seconds, warmup)


__all__ = ["artifact_latency_ms"]
