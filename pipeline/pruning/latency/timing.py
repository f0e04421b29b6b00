"""Wall time of prepared runners, measured side by side: warm-up runs discarded, then rounds
in which every runner runs once in turn (a change of the machine's load hits all alike),
the median kept."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

from .backends import Runner


def interleaved_ms(runners: Mapping[str, Runner], runs: int, warmup: int = 1) -> dict[str, dict]:
    """Per runner: {"median_ms", "q1_ms", "q3_ms", "runs"} over `runs` interleaved rounds,
    after `warmup` untimed runs of each."""
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


def median_ms(run: Runner, runs: int, warmup: int = 1) -> float:
    """Median ms of one runner (warm-up discarded)."""
    return interleaved_ms({"x": run}, runs, warmup)["x"]["median_ms"]


__all__ = ["interleaved_ms", "median_ms", "summary"]
