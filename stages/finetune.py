"""finetune: train the pruned network from its pruned weights.

Default lr: the lowest lr the upstream training schedule reached (the source notes:
"finetune at the lowest lr of the original schedule"; 0.001 after 0.1 x0.1 x0.1),
held constant unless the stage sets a schedule. Epochs as the notes: CIFAR 40 after
160, ImageNet 20 after 90.

Distillation (`distill: {from: pretrain, temperature, alpha}`): the teacher is the
model another (earlier) stage wrote, typically the unpruned one; it is wrapped in
`recipes.FrozenTeacher` (eval mode, no gradients, whatever calls `.train()`), so its
weights and BN statistics never change; loss = (1 - alpha) CE + alpha T^2 KL.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import Loader, opt
from pipeline.runspec import RunConfig
from pipeline.trainer import TrainConfig

from . import training
from .base import StageBase, StageContext
from .registry import register, stage_of, upstream_training_stage
from .training import TrainingStage


@dataclass
class Config(StageBase, TrainConfig):
    type: str = opt("finetune", "stage kind")


def lowest_lr_of(run: RunConfig, name: str | None) -> float:
    """The lowest lr of training stage `name`'s decay (what a finetune after it starts from)."""
    if name is None:
        raise ValueError("no upstream training stage")
    spec = run.stages[name]
    return stage_of(spec).schedule(spec, name, run).lowest_lr()


def finetune_default_problem(run: RunConfig, name: str) -> str | None:
    """Why stage `name` cannot default its lr to the lowest upstream lr, or None."""
    up = upstream_training_stage(run, name)
    if up is None:
        return "required: no training stage upstream to take the lowest lr from"
    if run.stages[up].epochs == 0:
        return (f"required: the upstream stage '{up}' trains no epochs (it passes "
                "model.pretrained on), so it has no lowest lr to take")
    sched = run.stages[up].schedule
    if sched.decays_to_zero:
        return (f"required: the upstream stage '{up}' decays to 0 ({sched.type}, min_lr 0), so "
                "its lowest lr is no finetune lr; set this lr or the upstream min_lr")
    return None


@register
class Finetune(TrainingStage):
    """Train the pruned network from its pruned weights, by default at the lowest lr the
    upstream training schedule reached."""

    kind = "finetune"
    Config = Config
    needs_input = True

    def base_lr(self, spec: Config, name: str, run: RunConfig) -> float:
        if spec.lr is not None:
            return spec.resolved_lr(0.0)
        return lowest_lr_of(run, upstream_training_stage(run, name))

    def lr_source(self, spec: Config, name: str, run: RunConfig) -> str:
        if spec.lr is None:
            return f"lowest lr of '{upstream_training_stage(run, name)}'"
        return super().lr_source(spec, name, run)

    def check(self, spec: Config, name: str, run: RunConfig, loader: Loader) -> None:
        super().check(spec, name, run, loader)
        if spec.lr is None and (problem := finetune_default_problem(run, name)):
            loader.fail(f"stages.{name}.lr", problem)

    def run(self, spec: Config, ctx: StageContext) -> dict:
        model, payload = ctx.load_input(spec.from_)
        lr = self.base_lr(spec, ctx.name, ctx.run)
        # training.train loads the `distill.from` stage's model as the frozen teacher
        return training.train(ctx, spec, model, payload["arch"], lr)
