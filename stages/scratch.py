"""scratch: the pruned architecture re-initialized and trained from scratch.

Liu et al. 2019 ("Rethinking the Value of Network Pruning"): Scratch-E trains for the
given epochs (set them to the dense model's pretraining epochs); Scratch-B for the same
computation budget: epochs x (dense MACs / pruned MACs), rounded down as their code does
(`int(epochs * ratio)`), with the milestones (and a step schedule's step size) scaled by
the same factor; milestones written as fractions of the run scale by themselves. Their
ImageNet code caps the factor at 2 (`max_scale: 2`). Warmup is not scaled.

The re-initialization is the architecture's own scheme applied at the pruned widths
(what constructing the narrow network with its constructor would do; each family in
`pipeline.models` states its own, see `pipeline.models.reinitialize`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

from pipeline.config import opt
from pipeline.models import build_model, count_macs, reinitialize, shrink_to, zero_init_last_bn
from pipeline.rundir import read_summary
from pipeline.runspec import RunConfig
from pipeline.trainer import TrainConfig

from . import training
from .base import StageBase, StageContext
from .registry import register, upstream
from .training import TrainingStage

log = logging.getLogger("pipeline")


@dataclass
class Config(StageBase, TrainConfig):
    type: str = opt("scratch", "stage kind")
    budget: Literal["E", "B"] = opt(
        "E", "E: the given epochs; B: epochs x (dense MACs / pruned MACs), milestones scaled")
    max_scale: float | None = opt(None, "cap of the Scratch-B multiplier (Rethinking's "
                                  "ImageNet code: 2)", min=1)
    zero_init_residual: bool | None = opt(None, "init each block's last BN gamma to 0 "
                                          "(default: model.zero_init_residual)")


def budget_factor(spec: Config, dense_macs: int, pruned_macs: int) -> float:
    """Scratch-B's multiplier: dense / pruned MACs, capped at max_scale; 1 for Scratch-E."""
    if spec.budget == "E":
        return 1.0
    factor = dense_macs / max(pruned_macs, 1)
    if spec.max_scale:
        factor = min(factor, spec.max_scale)
    return max(factor, 1.0)


def scaled(spec: Config, dense_macs: int, pruned_macs: int) -> tuple[Config, float]:
    """The stage's training config under its budget, and the factor applied."""
    factor = budget_factor(spec, dense_macs, pruned_macs)
    if factor == 1.0:
        return spec, 1.0
    epochs = max(1, int(spec.epochs * factor + 1e-9))
    sched = spec.schedule
    milestones = [m if 0 < m < 1 else m * factor for m in sched.milestones]
    new_sched = dataclasses.replace(sched, milestones=milestones,
                                    step_size=sched.step_size * factor)
    return dataclasses.replace(spec, epochs=epochs, schedule=new_sched), factor


def dense_macs_of(ctx: StageContext, arch: dict) -> int:
    """The unpruned network's MACs: the upstream prune stage's `macs_before`, else the
    dense architecture's count."""
    prune_name = upstream(ctx.run, ctx.name, lambda stage, spec: stage.prunes)
    if prune_name is not None:
        s = read_summary(ctx.run_dir / prune_name) or {}
        if s.get("macs_before"):
            return int(s["macs_before"])
    return count_macs(build_model(arch), ctx.input_size)["total"]


@register
class Scratch(TrainingStage):
    """The pruned architecture re-initialized and trained (Scratch-E / Scratch-B)."""

    kind = "scratch"
    Config = Config
    needs_input = True

    def plan_entry(self, spec: Config, name: str, run: RunConfig) -> dict:
        entry = {**super().plan_entry(spec, name, run), "budget": spec.budget}
        if spec.budget == "B":
            entry["note"] = ("Scratch-B: epochs and milestones are multiplied by the MACs ratio "
                             "measured after pruning")
        return entry

    def run(self, spec: Config, ctx: StageContext) -> dict:
        return _run(self, spec, ctx)


def _run(stage: Scratch, spec: Config, ctx: StageContext) -> dict:
    pruned, payload = ctx.load_input(spec.from_)
    arch = payload["arch"]
    dense_macs = dense_macs_of(ctx, arch)
    pruned_macs = count_macs(pruned, ctx.input_size)["total"]
    eff, factor = scaled(spec, dense_macs, pruned_macs)
    if spec.budget == "B":
        log.info("Scratch-B: MACs ratio %.3f -> factor %.3f: %d epochs, milestones %s",
                 dense_macs / max(pruned_macs, 1), factor, eff.epochs, eff.schedule.milestones)
    model = build_model(arch)
    shrink_to(model, payload["state_dict"])
    model.load_state_dict(payload["state_dict"], strict=True)  # widths and channel maps
    reinitialize(model, arch["name"], ctx.run.seed)
    zero = spec.zero_init_residual if spec.zero_init_residual is not None else \
        ctx.run.model.zero_init_residual
    if zero:
        zero_init_last_bn(model)
    meta = {"budget": spec.budget, "budget_factor": factor, "dense_macs": dense_macs}
    result = training.train(ctx, eff, model, arch, eff.resolved_lr(stage.default_lr), meta=meta)
    result.update(budget=spec.budget, budget_factor=factor, epochs=eff.epochs,
                  milestones=list(eff.schedule.milestones), dense_macs=dense_macs)
    return result


__all__ = ["Config", "Scratch", "budget_factor", "reinitialize", "scaled"]
