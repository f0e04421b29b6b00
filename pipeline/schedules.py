"""Learning-rate schedules as pure functions of the global step.

A schedule is resolved once per stage (epochs and steps per epoch known) into a
`Schedule` whose `lr(step)` is a closed form: resume needs only the step, and the
dry-run plan, the finetune default ("lowest lr upstream") and the trainer all read
the same function. Milestones, step sizes and warmup lengths are written in epochs
(fractions of the run allowed: a milestone below 1.0 is a fraction of the epochs)
and converted to iterations, so decays and warmup are per iteration, not per epoch.

Warmup (Goyal et al. 2017, "Accurate, Large Minibatch SGD"):
  gradual   lr ramps linearly per iteration from `start_lr` (or lr * start_factor)
            to the target over `epochs`, reaching it exactly at the end of warmup;
  constant  a low lr (`start_lr` or lr * start_factor) for `epochs`, then the target.
The main schedule runs on the whole step axis (warmup overrides its start), as in
Goyal et al., where the x0.1 milestones stay at epochs 30/60/80 with or without warmup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .config import Invalid, opt


@dataclass
class LinearScaling:
    """Linear scaling rule: lr = base * batch_size / per_batch (Goyal et al.)."""

    base: float = opt(0.1, "lr at the reference batch size", gt=0)
    per_batch: int = opt(256, "reference batch size of `base`", min=1)

    def resolve(self, batch_size: int) -> float:
        return self.base * batch_size / self.per_batch


@dataclass
class WarmupConfig:
    type: Literal["none", "gradual", "constant"] = opt("none", "warmup kind")
    epochs: float = opt(0.0, "warmup length in epochs (always epochs; may be fractional)", min=0)
    start_lr: float | None = opt(None, "lr at the start of warmup (overrides start_factor)", min=0)
    start_factor: float = opt(0.1, "start lr as a fraction of the target lr", min=0, max=1)


@dataclass
class ScheduleConfig:
    type: Literal["constant", "step", "multistep", "cosine", "linear"] = opt(
        "multistep", "lr decay after warmup"
    )
    milestones: list[float] = opt(
        [], "multistep: epochs at which lr *= gamma (values < 1 are fractions of the run)", min=0
    )
    gamma: float = opt(0.1, "multiplicative decay for step/multistep", gt=0, max=1)
    step_size: float = opt(30.0, "step: decay every this many epochs (always epochs)", gt=0)
    min_lr: float = opt(0.0, "cosine/linear: the floor reached at the end", min=0)
    warmup: WarmupConfig = opt(WarmupConfig, "warmup in front of the schedule")

    def validate(self) -> None:
        if sorted(self.milestones) != list(self.milestones):
            raise Invalid("milestones", f"must be increasing, got {self.milestones}")


def _epochs_to_steps(value: float, epochs: int, steps_per_epoch: int) -> int:
    """Epoch count (or a fraction of the run when value < 1) -> iteration index."""
    e = value * epochs if 0 < value < 1 else value
    return int(round(e * steps_per_epoch))


@dataclass(frozen=True)
class Schedule:
    """A resolved schedule: `lr(step)` for step in [0, total_steps)."""

    cfg: ScheduleConfig
    base_lr: float
    epochs: int
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def _steps(self, epochs: float) -> int:
        return _epochs_to_steps(epochs, self.epochs, self.steps_per_epoch)

    def main_lr(self, step: int) -> float:
        c, lr0, total = self.cfg, self.base_lr, max(self.total_steps, 1)
        if c.type == "constant":
            return lr0
        if c.type == "step":
            size = max(int(round(c.step_size * self.steps_per_epoch)), 1)
            return lr0 * c.gamma ** (step // size)
        if c.type == "multistep":
            passed = sum(1 for m in c.milestones if step >= self._steps(m))
            return lr0 * c.gamma**passed
        if c.type == "cosine":
            t = min(step, total) / total
            return c.min_lr + (lr0 - c.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
        if c.type == "linear":
            t = min(step, total) / total
            return lr0 + (c.min_lr - lr0) * t
        raise ValueError(f"unknown schedule type {c.type!r}")

    @property
    def warmup_steps(self) -> int:
        w = self.cfg.warmup
        return 0 if w.type == "none" else int(round(w.epochs * self.steps_per_epoch))

    def warmup_start(self) -> float:
        w = self.cfg.warmup
        return w.start_lr if w.start_lr is not None else self.base_lr * w.start_factor

    def lr(self, step: int) -> float:
        w, n = self.cfg.warmup, self.warmup_steps
        if n > 0 and step < n:
            start = self.warmup_start()
            if w.type == "constant":
                return start
            target = self.main_lr(n)
            return start + (target - start) * step / n
        return self.main_lr(step)

    def lowest_lr(self) -> float:
        """The lowest lr the schedule reaches (checked at every epoch start and the end)."""
        c = self.cfg
        candidates = [self.lr(s) for s in range(0, self.total_steps, max(self.steps_per_epoch, 1))]
        candidates.append(self.lr(max(self.total_steps - 1, 0)))
        if c.type == "multistep" and c.milestones:
            # milestones at or beyond the end never fire; the others all do
            fired = sum(1 for m in c.milestones if self._steps(m) < self.total_steps)
            candidates.append(self.base_lr * c.gamma**fired)
        return min(candidates)

    def epoch_changes(self) -> list[dict]:
        """[{epoch, lr}] at the start of every epoch where the lr differs from the last."""
        out: list[dict] = []
        for e in range(self.epochs):
            lr = self.lr(e * self.steps_per_epoch)
            if not out or not math.isclose(lr, out[-1]["lr"], rel_tol=1e-9, abs_tol=1e-15):
                out.append({"epoch": e, "lr": _round(lr)})
        return out


def _round(x: float) -> float:
    return float(f"{x:.10g}")
