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

from pipeline.config import opt
from pipeline.trainer import TrainConfig

from . import training
from .base import StageBase, StageContext, upstream_training_stage

NEEDS_INPUT = True


@dataclass
class Config(StageBase, TrainConfig):
    type: str = opt("finetune", "stage kind")


def check(spec: Config, name: str, run, loader) -> None:
    from pipeline.plan import finetune_default_problem

    if spec.lr is None and (problem := finetune_default_problem(run, name)):
        loader.fail(f"stages.{name}.lr", problem)
    if spec.distill is not None and spec.distill.from_ not in list(run.stages)[
            :list(run.stages).index(name)]:
        loader.fail(f"stages.{name}.distill.from",
                    f"{spec.distill.from_!r} names no earlier stage")


def base_lr(spec: Config, run, name: str) -> float:
    from pipeline.plan import lowest_lr_of

    if spec.lr is not None:
        return spec.resolved_lr(0.0)
    return lowest_lr_of(run, upstream_training_stage(run, name))


def run(spec: Config, ctx: StageContext) -> dict:
    model, payload = ctx.load_input(spec.from_)
    lr = base_lr(spec, ctx.run, ctx.name)
    # training.train loads the `distill.from` stage's model as the frozen teacher
    return training.train(ctx, spec, model, payload["arch"], lr)
