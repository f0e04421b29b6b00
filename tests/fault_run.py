"""`python tests/fault_run.py STAGE:EVENT:K ARGS...`: the CLI (`python -m pipeline ARGS...`)
killed with SIGKILL at an exact point, so nothing gets the chance to clean up.

EVENT `step`: right after optimizer step K of stage STAGE, before any checkpoint of it;
EVENT `checkpoint`: right after the checkpoint holding step K is written. Used by the
exact-resume tests, through a trainer hook (`pipeline.trainer.HookBase`).

The signal events send a signal instead of killing: EVENT `term` / `usr1` sends SIGTERM /
SIGUSR1 to the process right after step K; `term2` does the same and sends a second
SIGTERM from inside every checkpoint write after it; `term_rank1` sends SIGTERM to rank 1
of a torchrun job only; `termpg` sends SIGTERM to the whole process group (the DataLoader
workers too, as SLURM does; the preemption tests). The hooks reach the trainer through
the CLI's `hooks` argument.
"""

from __future__ import annotations

import os
import signal
import sys

from pipeline import checkpoint
from pipeline.cli import main
from pipeline.trainer import CallbackHook, HookBase


def kill_self() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def hook_for(fault: str) -> HookBase:
    """The trainer hook that injects the fault `fault` (STAGE:EVENT:K)."""
    stage, event, k = fault.split(":")
    step = int(k)
    if event == "step":
        return CallbackHook(
            after_step=lambda t: kill_self() if t.stage == stage and t.global_step == step
            else None)
    if event == "checkpoint":
        return CallbackHook(
            after_checkpoint=lambda t: kill_self() if t.stage == stage and t.saved_step == step
            else None)
    if event not in ("term", "usr1", "term2", "term_rank1", "termpg"):
        raise SystemExit(f"fault_run.py: unknown event {event!r} (step, checkpoint, term, "
                         "usr1, term2, term_rank1 or termpg)")
    signum = signal.SIGUSR1 if event == "usr1" else signal.SIGTERM
    sent: list[int] = []
    rank_ok = event != "term_rank1" or os.environ.get("RANK") == "1"

    def send(t) -> None:
        if rank_ok and t.stage == stage and t.global_step == step and not sent:
            sent.append(signum)
            if event == "termpg":  # the whole process group, DataLoader workers included
                os.killpg(os.getpgid(0), signum)
            else:
                os.kill(os.getpid(), signum)

    if event == "term2":
        save = checkpoint.atomic_save

        def save_under_fire(obj, path):
            if sent:
                os.kill(os.getpid(), signal.SIGTERM)  # a second signal while saving
            save(obj, path)

        checkpoint.atomic_save = save_under_fire
    return CallbackHook(after_step=send)


if __name__ == "__main__":
    sys.exit(main(sys.argv[2:], hooks=[hook_for(sys.argv[1])]))
