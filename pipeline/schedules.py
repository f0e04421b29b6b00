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
  onecycle  one cycle over the whole run (Smith and Topin 2017, the piecewise-linear lr of
            the fast CIFAR-10 recipes of Page 2018 and airbench): with P = peak_at x T,
              lr(s) = start + (peak - start) * s / P                  for s < P,
              then from the peak to `min_lr` at step T, linear (default) or cosine
              (`anneal`), start = peak * `start_factor`; its ramp replaces warmup.

Each schedule type is one `Decay` class registered in `DECAYS` under its name: its lr, the
steps worth showing, its one-line description and its warnings live together. `Schedule`
(a configured decay with warmup) and `ReplaySchedule` (rewinding) both satisfy
`LrSchedule`, what the trainer, the plan and the finetune default read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol, runtime_checkable

from .config import MAX_BATCH, MAX_EPOCHS, Invalid, opt


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
    type: Literal["constant", "step", "multistep", "cosine", "linear", "onecycle"] = opt(
        "multistep", "lr decay: constant | step | multistep (milestones counted from the run's "
        "start, warmup included) | cosine | linear (both decay over the steps after warmup) | "
        "onecycle (up from start_factor x lr to lr at peak_at, then down to min_lr; no warmup)")
    milestones: list[float] = opt(
        [], "multistep: epochs at which lr *= gamma; all values < 1 = fractions of the run, "
        "e.g. [0.5, 0.75]", min=0, limit=MAX_EPOCHS)
    gamma: float = opt(0.1, "multiplicative decay for step/multistep", gt=0, max=1)
    step_size: float = opt(30.0, "step: decay every this many epochs (always epochs)", gt=0,
                           limit=MAX_EPOCHS)
    min_lr: float = opt(0.0, "cosine/linear/onecycle: the floor, reached at the end of the run",
                        min=0)
    peak_at: float = opt(0.3, "onecycle: where the lr peaks, as a fraction of the run",
                         gt=0, lt=1)
    start_factor: float = opt(0.1, "onecycle: the lr at step 0 as a fraction of the peak",
                              min=0, max=1)
    anneal: Literal["linear", "cosine"] = opt(
        "linear", "onecycle: the shape of the descent from the peak to min_lr")
    warmup: WarmupConfig = opt(WarmupConfig, "warmup in front of the schedule")

    @property
    def decays_to_zero(self) -> bool:
        """A decay to a floor of 0: the lowest lr is ~0, useless as a finetune lr."""
        return DECAYS[self.type].ends_at_min_lr and self.min_lr == 0

    def validate(self) -> None:
        DECAYS[self.type].validate(self)
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


@runtime_checkable
class LrSchedule(Protocol):
    """What the trainer, the plan and a finetune's default lr read from a schedule: the lr
    as a pure function of the global step, and how to show it. `Schedule` and
    `ReplaySchedule` implement it."""

    epochs: int
    steps_per_epoch: int

    @property
    def total_steps(self) -> int: ...

    @property
    def base_lr(self) -> float: ...

    @property
    def warmup_steps(self) -> int: ...

    @property
    def decays_to_zero(self) -> bool: ...

    @property
    def decay_axis(self) -> str: ...

    def lr(self, step: int) -> float: ...

    def lowest_lr(self) -> float: ...

    def milestone_steps(self) -> list[int]: ...

    def epoch_changes(self) -> list[dict]: ...

    def key_steps(self) -> list[dict]: ...

    def describe(self) -> str: ...

    def warnings(self) -> list[str]: ...

    def plan_keys(self) -> dict: ...


class Decay:
    """One schedule type: the lr without warmup, and how the plan shows it.

    A subclass sets `name` (the `schedule.type` it implements) and registers itself with
    `@register`; `Schedule` asks it, so adding a type touches this class alone (and the
    `type` Literal of ScheduleConfig, which lists the names a config may use).
    """

    name: ClassVar[str]
    after_warmup: ClassVar[bool] = False  # decays over the steps after warmup (else absolute)
    ends_at_min_lr: ClassVar[bool] = False  # reaches `min_lr` at the end of the run

    def lr(self, s: Schedule, step: int) -> float:
        """The decay alone (no warmup) at `step`."""
        raise NotImplementedError

    def decay_start(self, s: Schedule) -> int:
        """The first step whose lr the network is trained at, not ramped to (lowest_lr)."""
        return s.warmup_steps

    def milestone_steps(self, s: Schedule) -> list[int]:
        return []

    def mark(self, s: Schedule, marks: dict[int, str], max_decays: int) -> None:
        """Add the steps where this decay changes to `marks` ({step: what})."""

    def describe(self, s: Schedule) -> str:
        raise NotImplementedError

    def warnings(self, s: Schedule) -> list[str]:
        return []

    def validate(self, c: ScheduleConfig) -> None:
        """Raise `Invalid` for settings this type cannot use."""

    def plan(self, s: Schedule) -> dict:
        """Keys this type adds to the plan's schedule entry."""
        return {}


DECAYS: dict[str, Decay] = {}


def register(cls: type[Decay]) -> type[Decay]:
    """Class decorator: make `cls` the implementation of `schedule.type: cls.name`."""
    DECAYS[cls.name] = cls()
    return cls


def _from_start(n: int) -> str:
    return " counted from the start of the run" + (", warmup included" if n else "")


@register
class Constant(Decay):
    name = "constant"

    def lr(self, s: Schedule, step: int) -> float:
        return s.base_lr

    def describe(self, s: Schedule) -> str:
        return f"constant {s.base_lr:g}"


@register
class Step(Decay):
    name = "step"

    def size(self, s: Schedule) -> int:
        return max(int(round(s.cfg.step_size * s.steps_per_epoch)), 1)

    def lr(self, s: Schedule, step: int) -> float:
        return s.base_lr * s.cfg.gamma ** (step // self.size(s))

    def mark(self, s: Schedule, marks: dict[int, str], max_decays: int) -> None:
        size, spe = self.size(s), s.steps_per_epoch
        for b in range(size, max(s.total_steps, 1), size)[:max_decays]:
            marks.setdefault(b - 1, f"before decay at epoch {b / spe:g}")
            marks[b] = f"decay at epoch {b / spe:g}"

    def describe(self, s: Schedule) -> str:
        c = s.cfg
        return f"x{c.gamma:g} every {c.step_size:g} epochs" + _from_start(s.warmup_steps)


@register
class MultiStep(Decay):
    name = "multistep"

    def milestone_steps(self, s: Schedule) -> list[int]:
        return [s.steps(m) for m in s.cfg.milestones]

    def lr(self, s: Schedule, step: int) -> float:
        passed = sum(1 for m in self.milestone_steps(s) if step >= m)
        return s.base_lr * s.cfg.gamma**passed

    def mark(self, s: Schedule, marks: dict[int, str], max_decays: int) -> None:
        for m, b in zip(s.cfg.milestones, self.milestone_steps(s), strict=True):
            name = f"milestone {m:g}" + (f" (epoch {b / s.steps_per_epoch:g})"
                                         if 0 < m < 1 else "")
            marks.setdefault(max(b - 1, 0), f"before {name}")
            marks[b] = name

    def describe(self, s: Schedule) -> str:
        c, spe = s.cfg, max(s.steps_per_epoch, 1)
        if not c.milestones:
            return f"constant {s.base_lr:g} (no milestones)"
        at = ", ".join(f"{b / spe:g}" for b in self.milestone_steps(s))
        return f"x{c.gamma:g} at epochs {at}" + _from_start(s.warmup_steps)

    def warnings(self, s: Schedule) -> list[str]:
        out, n = [], s.warmup_steps
        for m, b in zip(s.cfg.milestones, self.milestone_steps(s), strict=True):
            if b >= s.total_steps:
                out.append(f"milestone {m:g} is at or past the end ({s.epochs} epochs): "
                           "it never fires")
            elif n and b < n:
                out.append(f"milestone {m:g} falls inside warmup: warmup ramps to the "
                           "decayed lr")
        return out


class AfterWarmup(Decay):
    """A decay from the peak at the end of warmup to `min_lr` at step T (u in [0, 1])."""

    after_warmup = True
    ends_at_min_lr = True

    def shape(self, peak: float, floor: float, u: float) -> float:
        raise NotImplementedError

    def lr(self, s: Schedule, step: int) -> float:
        n = s.warmup_steps
        span = max(s.total_steps - n, 1)
        u = min(max(step - n, 0), span) / span
        return s.base_lr if u == 0 else self.shape(s.base_lr, s.cfg.min_lr, u)

    def mark(self, s: Schedule, marks: dict[int, str], max_decays: int) -> None:
        n = s.warmup_steps
        marks.setdefault(n + (max(s.total_steps, 1) - n) // 2, "middle of the decay")

    def describe(self, s: Schedule) -> str:
        n, spe = s.warmup_steps, max(s.steps_per_epoch, 1)
        rest = (s.total_steps - n) / spe
        return (f"{self.name} decay from {s.base_lr:g} to {s.cfg.min_lr:g} over the "
                f"{'remaining ' if n else ''}{rest:g} epochs ({s.total_steps - n} steps"
                + (", starting after warmup" if n else "") + ")")


def cosine_between(peak: float, floor: float, u: float) -> float:
    """Half a cosine from `peak` (u = 0) to `floor` (u = 1)."""
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * u))


@register
class Cosine(AfterWarmup):
    name = "cosine"

    def shape(self, peak: float, floor: float, u: float) -> float:
        return cosine_between(peak, floor, u)


@register
class Linear(AfterWarmup):
    name = "linear"

    def shape(self, peak: float, floor: float, u: float) -> float:
        return peak + (floor - peak) * u


@register
class OneCycle(Decay):
    """Up linearly from start_factor x lr to lr at `peak_at` of the run, then down to
    `min_lr` at step T (linear or cosine: `anneal`)."""

    name = "onecycle"
    ends_at_min_lr = True

    def peak_step(self, s: Schedule) -> int:
        return int(round(s.cfg.peak_at * s.total_steps))

    def start(self, s: Schedule) -> float:
        return s.base_lr * s.cfg.start_factor

    def lr(self, s: Schedule, step: int) -> float:
        c, p, total = s.cfg, self.peak_step(s), s.total_steps
        if step < p:
            return self.start(s) + (s.base_lr - self.start(s)) * step / p
        span = max(total - p, 1)
        u = min(step - p, span) / span
        if c.anneal == "cosine":
            return cosine_between(s.base_lr, c.min_lr, u)
        return s.base_lr + (c.min_lr - s.base_lr) * u

    def decay_start(self, s: Schedule) -> int:
        return self.peak_step(s)

    def mark(self, s: Schedule, marks: dict[int, str], max_decays: int) -> None:
        p, total = self.peak_step(s), max(s.total_steps, 1)
        if p > 0:
            marks.setdefault(p - 1, "last step of the ramp")
        marks.setdefault(p, "peak")
        marks.setdefault(p + (total - p) // 2, "middle of the descent")

    def describe(self, s: Schedule) -> str:
        c, p, spe = s.cfg, self.peak_step(s), max(s.steps_per_epoch, 1)
        rest = s.total_steps - p
        return (f"one cycle: linear from {self.start(s):g} to {s.base_lr:g} over the first "
                f"{p / spe:g} epochs ({p} steps), then {c.anneal} down to {c.min_lr:g} over "
                f"the remaining {rest / spe:g} epochs ({rest} steps)")

    def warnings(self, s: Schedule) -> list[str]:
        p = self.peak_step(s)
        if 0 < p < s.total_steps:
            return []
        return [f"peak_at {s.cfg.peak_at:g} of {s.total_steps} steps is step {p}: the run has "
                "too few steps for a ramp and a descent"]

    def validate(self, c: ScheduleConfig) -> None:
        if c.warmup.type != "none":
            raise Invalid("warmup.type", "onecycle ramps up on its own (peak_at, "
                          "start_factor); set warmup.type: none")

    def plan(self, s: Schedule) -> dict:
        c = s.cfg
        return {"peak_at": c.peak_at, "peak_step": self.peak_step(s),
                "start_factor": c.start_factor, "anneal": c.anneal}


@dataclass(frozen=True)
class Schedule:
    """A resolved schedule: `lr(step)` for step in [0, total_steps); see the module doc."""

    cfg: ScheduleConfig
    base_lr: float
    epochs: int
    steps_per_epoch: int

    @property
    def decay(self) -> Decay:
        """The implementation of `cfg.type`."""
        return DECAYS[self.cfg.type]

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
        return self.decay.milestone_steps(self)

    def decay_lr(self, step: int) -> float:
        """The decay schedule alone (no warmup) at `step`."""
        return self.decay.lr(self, step)

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
        schedule"). Warmup (and a one-cycle ramp) is left out: its start is a ramp, not a
        level the network was trained to. Every decay here is monotone after that, so the
        minimum is at either end.
        """
        last = max(self.total_steps - 1, 0)
        first = min(self.decay.decay_start(self), last)
        return min(self.lr(first), self.lr(last))

    @property
    def decays_to_zero(self) -> bool:
        return self.cfg.decays_to_zero

    @property
    def decay_axis(self) -> str:
        """Where the decay's step axis starts, in words (the plan shows it)."""
        return "after warmup" if self.decay.after_warmup else "from the start of the run"

    def plan_keys(self) -> dict:
        """What the schedule type adds to the plan's schedule entry."""
        return self.decay.plan(self)

    def epoch_changes(self) -> list[dict]:
        """[{epoch, lr}] at the start of every epoch where the lr differs from the last."""
        return _changes(self.lr(e * self.steps_per_epoch) for e in range(self.epochs))

    def key_steps(self, max_decays: int = 20) -> list[dict]:
        """[{step, what}] where the lr is worth showing: start, warmup end, each decay, end."""
        total = max(self.total_steps, 1)
        marks: dict[int, str] = {0: "start"}
        n = self.warmup_steps
        if n:
            marks.setdefault(n - 1, "last warmup step")
            marks.setdefault(n, "end of warmup (target)")
        self.decay.mark(self, marks, max_decays)
        marks[total - 1] = "last step"
        return [{"step": s, "what": w} for s, w in sorted(marks.items()) if 0 <= s < total]

    def describe(self) -> str:
        """One line that says what the schedule does on the step axis."""
        parts = []
        n = self.warmup_steps
        if n:
            w = self.cfg.warmup
            how = ("linear per iteration" if w.type == "gradual" else "held")
            parts.append(f"{w.type} warmup {w.epochs:g} epoch{'' if w.epochs == 1 else 's'} "
                         f"({n} steps) from "
                         f"{self.warmup_start():g} to {self.warmup_target():g} ({how})")
        parts.append(self.decay.describe(self))
        return "; then ".join(parts)

    def warnings(self) -> list[str]:
        """Settings that are legal but probably not meant (shown by the dry-run)."""
        out, n, total = [], self.warmup_steps, self.total_steps
        if n >= total and n:
            out.append(f"warmup ({n} steps) is not shorter than the run ({total} steps): the "
                       "target lr is never reached")
        return out + self.decay.warnings(self)


def _changes(lrs) -> list[dict]:
    """[{epoch, lr}] where a per-epoch lr sequence changes (rounded for display)."""
    out: list[dict] = []
    for e, lr in enumerate(lrs):
        if not out or not math.isclose(lr, out[-1]["lr"], rel_tol=1e-9, abs_tol=1e-15):
            out.append({"epoch": e, "lr": round_lr(lr)})
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

    # the replayed positions count from the start of the upstream run
    decay_axis = "from the start of the run"

    def plan_keys(self) -> dict:
        return {}

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
