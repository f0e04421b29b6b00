"""Wall-time measurement shared by every runtime the project times (exported files, int8
artifacts, the latency table and the end-to-end check of a latency target): warm-up runs
discarded, the median kept; several runners timed side by side in interleaved rounds, so
that a change of the machine's load hits them all alike."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Mapping

import torch

Runner = Callable[[], object]


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set inside the block (None: unchanged), restored
    after it."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def median_ms(run: Runner, min_runs: int = 10, min_seconds: float = 0.0, warmup: int = 1,
              max_runs: int = 1000) -> float:
    """Median wall time (ms) of `run()`: `warmup` untimed calls, then at least `min_runs`
    timed ones, more while under `min_seconds` (at most `max_runs`)."""
    for _ in range(warmup):
        run()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < min_seconds
                                    and len(times) < max_runs):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def interleaved_ms(runners: Mapping[str, Runner], runs: int, warmup: int = 1) -> dict[str, dict]:
    """Per runner: {"median_ms", "q1_ms", "q3_ms", "runs"} over `runs` interleaved rounds
    (each runner once per round, in turn), after `warmup` untimed runs of each."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(runs):
        for k, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[k].append(1000 * (time.perf_counter() - t0))
    return {k: summary(v) for k, v in times.items()}


def summary(ms: list[float]) -> dict:
    """Median and quartiles of a list of times (ms)."""
    qs = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "q1_ms": qs[0], "q3_ms": qs[2], "runs": len(ms)}


__all__ = ["Runner", "interleaved_ms", "median_ms", "summary", "torch_threads"]
