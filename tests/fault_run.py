"""`python tests/fault_run.py STAGE:EVENT:K ARGS...`: the CLI (`python -m pipeline ARGS...`)
killed with SIGKILL at an exact point, so nothing gets the chance to clean up.

EVENT `step`: right after optimizer step K of stage STAGE, before any checkpoint of it;
EVENT `checkpoint`: right after the checkpoint holding step K is written. Used by the
exact-resume tests, through the trainer's step and checkpoint hooks.

The signal events send a signal instead of killing: EVENT `term` / `usr1` sends SIGTERM /
SIGUSR1 to the process right after step K; `term2` does the same and sends a second
SIGTERM from inside every checkpoint write after it; `term_rank1` sends SIGTERM to rank 1
of a torchrun job only (the preemption tests).
"""

from __future__ import annotations

import os
import signal
import sys

from pipeline import checkpoint, trainer
from pipeline.cli import main


def kill_self() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def install(fault: str) -> None:
    """Hook a kill at the point `fault` (STAGE:EVENT:K) names."""
    stage, event, k = fault.split(":")
    step = int(k)
    if event == "step":
        trainer.add_step_hook(
            lambda t: kill_self() if t.stage == stage and t.global_step == step else None)
    elif event in ("term", "usr1", "term2", "term_rank1"):
        signum = signal.SIGUSR1 if event == "usr1" else signal.SIGTERM
        sent: list[int] = []
        rank_ok = event != "term_rank1" or os.environ.get("RANK") == "1"

        def send(t) -> None:
            if rank_ok and t.stage == stage and t.global_step == step:
                sent.append(signum)
                os.kill(os.getpid(), signum)

        trainer.add_step_hook(send)
        if event == "term2":
            save = checkpoint.atomic_save

            def save_under_fire(obj, path):
                if sent:
                    os.kill(os.getpid(), signal.SIGTERM)  # a second signal while saving
                save(obj, path)

            checkpoint.atomic_save = save_under_fire
    elif event == "checkpoint":
        trainer.add_checkpoint_hook(
            lambda t: kill_self() if t.stage == stage and t.saved_step == step else None)
    else:
        raise SystemExit(f"fault_run.py: unknown event {event!r} (step or checkpoint)")


if __name__ == "__main__":
    install(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
