"""Learning-rate schedules as pure functions of the global step.

A schedule is resolved once per stage (epochs and steps per epoch known) into a
`Schedule` whose `lr(step)` is a closed form: resume needs only the step, and the
dry-run plan, the finetune default ("lowest lr upstream") and the trainer all read
the same function. Milestones, step sizes and warmup lengths are written in epochs
(milestones may be fractions of the run: all values below 1.0 means fractions) and
converted to iterations, so decays and warmup act per iteration, not per epoch.

The step axis (T = epochs x steps_per_epoch steps, W = warmup steps):

  warmup    steps [0, W) when `warmup.type` is not none (Goyal et al. 2017):
              gradual   lr(s) = start + (target - start) * s / W, linear per iteration,
                        equal to `target` exactly at s = W (the first step after warmup);
              constant  lr(s) = start for s < W, then the schedule;
            start = `warmup.start_lr`, else target * `warmup.start_factor` (Goyal's lr/k is
            start_factor 1/k); target = the decay schedule's value at step W.
  constant, step, multistep
            decay on the absolute step axis: milestones and `step_size` count from the
            start of the run, warmup included. This is Goyal et al.'s ImageNet recipe
            (5-epoch warmup, x0.1 at epochs 30/60/80), and it keeps a milestone at the same
            epoch whether or not warmup is on.
  cosine, linear
            decay over the steps after warmup (He et al. 2019, "Bag of Tricks": the cosine
            ignores the warmup stage): with u = (s - W) / (T - W),
              cosine  lr(s) = floor + (peak - floor) * (1 + cos(pi * u)) / 2
              linear  lr(s) = peak + (floor - peak) * u
            so the peak is reached exactly at the end of warmup and `min_lr` (the floor) at
            step T, one past the last step. Without warmup these are CosineAnnealingLR
            (T_max = T) and a linear decay over the whole run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .config import MAX_BATCH, MAX_EPOCHS, Invalid, opt

AFTER_WARMUP = ("cosine", "linear")  # decays over the steps after warmup


@dataclass
class LinearScaling:
    """Linear scaling rule (Goyal et al.): lr = base * batch_size / per_batch."""

    base: float = opt(0.1, "lr at the reference batch size", gt=0)
    per_batch: int = opt(256, "reference batch size of `base`", min=1, limit=MAX_BATCH)

    def resolve(self, batch_size: int) -> float:
        """The lr for a global batch of `batch_size` images."""
        return self.base * batch_size / self.per_batch


@dataclass
class WarmupConfig:
    type: Literal["none", "gradual", "constant"] = opt(
        "none", "none | gradual (linear per iteration from the start lr to the target) | "
        "constant (the start lr for the warmup epochs, then the target)")
    epochs: float = opt(0.0, "warmup length in epochs (always epochs, never a fraction of the "
                        "run; may be fractional, e.g. 0.5)", min=0, limit=MAX_EPOCHS)
    start_lr: float | None = opt(None, "lr at the start of warmup (overrides start_factor)", min=0)
    start_factor: float = opt(0.1, "start lr as a fraction of the target lr (1/k for Goyal's "
                              "lr/k)", min=0, max=1)

    def validate(self) -> None:
        if self.type != "none" and self.epochs <= 0:
            raise Invalid("epochs", f"a {self.type} warmup needs epochs > 0, got {self.epochs}")
        if self.type == "none" and self.epochs > 0:
            raise Invalid("type", f"is 'none', so warmup.epochs {self.epochs:g} has no effect; "
                          "set type: gradual or constant, or epochs: 0")


@dataclass
class ScheduleConfig:
    type: Literal["constant", "step", "multistep", "cosine", "linear"] = opt(
        "multistep", "lr decay: constant | step | multistep (milestones counted from the run's "
        "start, warmup included) | cosine | linear (both decay over the steps after warmup)")
    milestones: list[float] = opt(
        [], "multistep: epochs at which lr *= gamma; all values < 1 = fractions of the run, "
        "e.g. [0.5, 0.75]", min=0, limit=MAX_EPOCHS)
    gamma: float = opt(0.1, "multiplicative decay for step/multistep", gt=0, max=1)
    step_size: float = opt(30.0, "step: decay every this many epochs (always epochs)", gt=0,
                           limit=MAX_EPOCHS)
    min_lr: float = opt(0.0, "cosine/linear: the floor, reached at the end of the run", min=0)
    warmup: WarmupConfig = opt(WarmupConfig, "warmup in front of the schedule")

    @property
    def decays_to_zero(self) -> bool:
        """cosine/linear with floor 0: the lowest lr is ~0, useless as a finetune lr."""
        return self.type in AFTER_WARMUP and self.min_lr == 0

    def validate(self) -> None:
        ms = list(self.milestones)
        if sorted(ms) != ms:
            raise Invalid("milestones", f"must be increasing, got {ms}")
        fractions = [m for m in ms if 0 < m < 1]
        if fractions and len(fractions) != len(ms):
            raise Invalid("milestones", f"mixes fractions of the run (< 1) and epochs: {ms}; "
                          "write all as epochs or all as fractions")


def epochs_to_steps(value: float, epochs: int, steps_per_epoch: int) -> int:
    """Epoch count (or a fraction of the run when 0 < value < 1) -> iteration index."""
    e = value * epochs if 0 < value < 1 else value
    return int(round(e * steps_per_epoch))


@dataclass(frozen=True)
class Schedule:
    """A resolved schedule: `lr(step)` for step in [0, total_steps); see the module doc."""

    cfg: ScheduleConfig
    base_lr: float
    epochs: int
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def steps(self, epochs: float) -> int:
        """Epochs (or a fraction of the run) -> steps."""
        return epochs_to_steps(epochs, self.epochs, self.steps_per_epoch)

    @property
    def warmup_steps(self) -> int:
        w = self.cfg.warmup
        return 0 if w.type == "none" else int(round(w.epochs * self.steps_per_epoch))

    def milestone_steps(self) -> list[int]:
        """multistep: the step of each milestone (those >= total_steps never fire)."""
        return [self.steps(m) for m in self.cfg.milestones]

    def decay_lr(self, step: int) -> float:
        """The decay schedule alone (no warmup) at `step`."""
        c, lr0 = self.cfg, self.base_lr
        if c.type == "constant":
            return lr0
        if c.type == "step":
            size = max(int(round(c.step_size * self.steps_per_epoch)), 1)
            return lr0 * c.gamma ** (step // size)
        if c.type == "multistep":
            passed = sum(1 for m in self.milestone_steps() if step >= m)
            return lr0 * c.gamma**passed
        n = self.warmup_steps
        span = max(self.total_steps - n, 1)
        u = min(max(step - n, 0), span) / span
        if c.type == "cosine":
            if u == 0:
                return lr0  # exact peak at the end of warmup
            return c.min_lr + (lr0 - c.min_lr) * 0.5 * (1 + math.cos(math.pi * u))
        if c.type == "linear":
            return lr0 + (c.min_lr - lr0) * u
        raise ValueError(f"unknown schedule type {c.type!r}")

    def warmup_target(self) -> float:
        """The lr warmup ends at: the decay schedule's value at the first post-warmup step."""
        return self.decay_lr(self.warmup_steps)

    def warmup_start(self) -> float:
        w = self.cfg.warmup
        return w.start_lr if w.start_lr is not None else self.warmup_target() * w.start_factor

    def lr(self, step: int) -> float:
        """The lr of global step `step` (0-based): a pure function, so resume is exact."""
        n = self.warmup_steps
        if n > 0 and step < n:
            start = self.warmup_start()
            if self.cfg.warmup.type == "constant":
                return start
            return start + (self.warmup_target() - start) * step / n
        return self.decay_lr(step)

    def lowest_lr(self) -> float:
        """The lowest lr of the decay after warmup, over the steps the run takes.

        What a finetune stage starts from by default ("the lowest lr of the original
        schedule"). Warmup is left out: its start is a ramp, not a level the network was
        trained to. Every decay here is monotone, so the minimum is at either end.
        """
        last = max(self.total_steps - 1, 0)
        first = min(self.warmup_steps, last)
        return min(self.lr(first), self.lr(last))

    @property
    def decays_to_zero(self) -> bool:
        return self.cfg.decays_to_zero

    def epoch_changes(self) -> list[dict]:
        """[{epoch, lr}] at the start of every epoch where the lr differs from the last."""
        out: list[dict] = []
        for e in range(self.epochs):
            lr = self.lr(e * self.steps_per_epoch)
            if not out or not math.isclose(lr, out[-1]["lr"], rel_tol=1e-9, abs_tol=1e-15):
                out.append({"epoch": e, "lr": round_lr(lr)})
        return out

    def key_steps(self, max_decays: int = 20) -> list[dict]:
        """[{step, what}] where the lr is worth showing: start, warmup end, each decay, end."""
        total = max(self.total_steps, 1)
        marks: dict[int, str] = {0: "start"}
        n = self.warmup_steps
        if n:
            marks.setdefault(n - 1, "last warmup step")
            marks.setdefault(n, "end of warmup (target)")
        c = self.cfg
        if c.type == "multistep":
            for m, s in zip(c.milestones, self.milestone_steps(), strict=True):
                name = f"milestone {m:g}" + (f" (epoch {s / self.steps_per_epoch:g})"
                                             if 0 < m < 1 else "")
                marks.setdefault(max(s - 1, 0), f"before {name}")
                marks[s] = name
        elif c.type == "step":
            size = max(int(round(c.step_size * self.steps_per_epoch)), 1)
            for s in range(size, total, size)[:max_decays]:
                marks.setdefault(s - 1, f"before decay at epoch {s / self.steps_per_epoch:g}")
                marks[s] = f"decay at epoch {s / self.steps_per_epoch:g}"
        elif c.type in AFTER_WARMUP:
            marks.setdefault(n + (total - n) // 2, "middle of the decay")
        marks[total - 1] = "last step"
        return [{"step": s, "what": w} for s, w in sorted(marks.items()) if 0 <= s < total]

    def describe(self) -> str:
        """One line that says what the schedule does on the step axis."""
        c, n, spe = self.cfg, self.warmup_steps, max(self.steps_per_epoch, 1)
        parts = []
        if n:
            w = c.warmup
            how = ("linear per iteration" if w.type == "gradual" else "held")
            parts.append(f"{w.type} warmup {w.epochs:g} epoch{'' if w.epochs == 1 else 's'} "
                         f"({n} steps) from "
                         f"{self.warmup_start():g} to {self.warmup_target():g} ({how})")
        if c.type == "constant":
            parts.append(f"constant {self.base_lr:g}")
        elif c.type == "step":
            parts.append(f"x{c.gamma:g} every {c.step_size:g} epochs counted from the start of "
                         "the run" + (", warmup included" if n else ""))
        elif c.type == "multistep":
            if c.milestones:
                at = ", ".join(f"{s / spe:g}" for s in self.milestone_steps())
                parts.append(f"x{c.gamma:g} at epochs {at} counted from the start of the run"
                             + (", warmup included" if n else ""))
            else:
                parts.append(f"constant {self.base_lr:g} (no milestones)")
        else:
            rest = (self.total_steps - n) / spe
            parts.append(f"{c.type} decay from {self.base_lr:g} to {c.min_lr:g} over the "
                         f"{'remaining ' if n else ''}{rest:g} epochs "
                         f"({self.total_steps - n} steps"
                         + (", starting after warmup" if n else "") + ")")
        return "; then ".join(parts)

    def warnings(self) -> list[str]:
        """Settings that are legal but probably not meant (shown by the dry-run)."""
        out, c, n, total = [], self.cfg, self.warmup_steps, self.total_steps
        if n >= total and n:
            out.append(f"warmup ({n} steps) is not shorter than the run ({total} steps): the "
                       "target lr is never reached")
        if c.type == "multistep":
            for m, s in zip(c.milestones, self.milestone_steps(), strict=True):
                if s >= total:
                    out.append(f"milestone {m:g} is at or past the end ({self.epochs} epochs): "
                               "it never fires")
                elif n and s < n:
                    out.append(f"milestone {m:g} falls inside warmup: warmup ramps to the "
                               "decayed lr")
        return out


@dataclass(frozen=True)
class ReplaySchedule:
    """The tail of an upstream schedule replayed (Renda et al. 2020's rewinding): step s of
    a run of `epochs` x `steps_per_epoch` steps takes the upstream lr at the same position,
    epoch `start_epoch` + s / steps_per_epoch of the upstream run (so a different batch size
    replays the same lr per epoch position). A pure function of the step, like `Schedule`."""

    upstream: Schedule
    start_epoch: int
    epochs: int
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def base_lr(self) -> float:
        return self.lr(0)

    warmup_steps = 0

    def upstream_step(self, step: int) -> int:
        up = self.upstream.steps_per_epoch
        return self.start_epoch * up + (step * up) // max(self.steps_per_epoch, 1)

    def lr(self, step: int) -> float:
        return self.upstream.lr(self.upstream_step(step))

    def milestone_steps(self) -> list[int]:
        return []

    def lowest_lr(self) -> float:
        return min(self.lr(0), self.lr(max(self.total_steps - 1, 0)))

    @property
    def decays_to_zero(self) -> bool:
        return self.upstream.decays_to_zero

    def lr_by_epoch(self) -> list[float]:
        """The lr at the start of every epoch of the replay."""
        return [round_lr(self.lr(e * self.steps_per_epoch)) for e in range(self.epochs)]

    def epoch_changes(self) -> list[dict]:
        out: list[dict] = []
        for e, lr in enumerate(self.lr_by_epoch()):
            if not out or not math.isclose(lr, out[-1]["lr"], rel_tol=1e-9, abs_tol=1e-15):
                out.append({"epoch": e, "lr": lr})
        return out

    def key_steps(self) -> list[dict]:
        total = max(self.total_steps, 1)
        marks = {0: "start"}
        for ch in self.epoch_changes()[1:]:
            marks[ch["epoch"] * self.steps_per_epoch] = f"upstream lr change (epoch {ch['epoch']})"
        marks[total - 1] = "last step"
        return [{"step": s, "what": w} for s, w in sorted(marks.items()) if 0 <= s < total]

    def describe(self) -> str:
        end = self.start_epoch + self.epochs
        return (f"replay of the upstream schedule's epochs {self.start_epoch}..{end} "
                f"({self.upstream.describe()})")

    def warnings(self) -> list[str]:
        return []


def round_lr(x: float) -> float:
    """An lr for display: 10 significant digits (drops 0.0010000000000000002 noise)."""
    return float(f"{x:.10g}")
