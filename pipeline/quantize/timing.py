"""Forward time of an int8 artifact in the runtime that runs it (onnxruntime's CPU
provider; for pt2e the program compiled by torch.compile, its deployment form)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from .backends import backend_of


def artifact_latency_ms(path: str | Path, backend: str, batch: int,
                        input_size: tuple[int, ...], threads: int | None = None,
                        min_seconds: float = 1.0, min_runs: int = 10, warmup: int = 3) -> float:
    """Median wall time (ms) of one forward pass of a random fp32 batch of `batch` through
    the artifact at `path`, on `threads` intra-op threads (default: torch's count)."""
    threads = threads or torch.get_num_threads()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run = backend_of(backend).runner(Path(path), threads, compiled=True)
        x = torch.randn((batch, *input_size), generator=torch.Generator().manual_seed(0))
        for _ in range(warmup):
            run(x)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < min_runs or (time.perf_counter() - start < min_seconds
                                        and len(times) < 1000):
            t0 = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)
    finally:
        torch.set_num_threads(before)


__all__ = ["artifact_latency_ms"]
