"""Preemption: SIGTERM (a cluster taking the job back) and SIGUSR1 (SLURM's warning before
the end of a job, `--signal=USR1@120`) stop a run cleanly at a step boundary.

The signal handler only records the request, so a second signal while a checkpoint is
being written changes nothing. A single process checks it after every optimizer step;
under torchrun the request rides on the all-reduce of each log interval (`log_interval`
steps: no extra collective or host sync per step), so every rank stops at the same step,
at most log_interval - 1 steps after the signal. The trainer then
checkpoints that step atomically and raises `Preempted`. The CLI exits 143 (128 +
SIGTERM) after SIGTERM and 0 after SIGUSR1; the same command resumes bitwise where the
run stopped.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

import torch
import torch.distributed as tdist

from . import distributed as D
from .errors import PipelineError

log = logging.getLogger("pipeline")

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))
_requested: list[int] = []  # the signals received, in order


class Preempted(PipelineError):
    """The run stopped on a signal after checkpointing; the same command resumes it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        # SIGUSR1 is an announced end of the job: a clean exit; SIGTERM: 128 + 15
        self.exit_code = 0 if signum == getattr(signal, "SIGUSR1", None) else 128 + int(signum)


def _handler(signum, frame) -> None:
    if signum not in _requested:
        _requested.append(signum)


def request(signum: int) -> None:
    """Ask the run to stop at the next step boundary, as the signal `signum` does."""
    _handler(signum, None)


def clear() -> None:
    _requested.clear()


def pending() -> int | None:
    """The signal this process received (SIGTERM before SIGUSR1), or None; no collective."""
    if not _requested:
        return None
    term = getattr(signal, "SIGTERM", None)
    return term if term in _requested else _requested[0]


def as_flags(signum: int | None) -> tuple[float, float]:
    """(SIGTERM, SIGUSR1) as 0/1 flags, to be summed over ranks (`from_flags` reads them)."""
    if signum is None:
        return 0.0, 0.0
    return (1.0, 0.0) if signum == getattr(signal, "SIGTERM", None) else (0.0, 1.0)


def from_flags(term: float, usr1: float) -> int | None:
    """The job's request from flags summed over ranks: SIGTERM wins over SIGUSR1."""
    if term > 0:
        return int(signal.SIGTERM)
    if usr1 > 0:
        return int(signal.SIGUSR1)
    return None


def requested(device: torch.device | None = None) -> int | None:
    """The stop request of the whole job: under torchrun a collective (every rank calls it
    at the same point), so all ranks agree; SIGTERM wins over SIGUSR1. The trainer does not
    call it per step: it folds the flags into its log-interval sync."""
    mine = pending()
    if not tdist.is_initialized():
        return mine
    flags = torch.tensor(as_flags(mine), dtype=torch.float32, device=device)
    D.all_reduce_sum(flags)
    return from_flags(*flags.tolist())


def name(signum: int) -> str:
    return signal.Signals(signum).name


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Record SIGTERM/SIGUSR1 instead of dying, while the block runs (main thread only)."""
    clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        clear()


__all__ = ["Preempted", "SIGNALS", "as_flags", "clear", "from_flags", "handle_signals",
           "name", "pending", "request", "requested"]
