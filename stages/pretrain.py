"""pretrain: train the dense network from initialization (or from local pretrained weights)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline import checkpoint as ckpt
from pipeline.config import opt
from pipeline.models import arch_spec, build_model
from pipeline.trainer import TrainConfig

from . import training
from .base import StageBase, StageContext

DEFAULT_LR = 0.1
NEEDS_INPUT = False


@dataclass
class Config(StageBase, TrainConfig):
    type: str = opt("pretrain", "stage kind")
    zero_init_residual: bool | None = opt(
        None, "init each residual block's last BN gamma to 0 (default: model.zero_init_residual)")


def base_lr(spec: Config, ctx_run, name: str) -> float:
    return spec.resolved_lr(DEFAULT_LR)


def dense_model(ctx: StageContext, zero_init: bool) -> tuple[torch.nn.Module, dict]:
    arch = arch_spec(ctx.run.model, ctx.extra["num_classes"])
    torch.manual_seed(ctx.run.seed)
    model = build_model(arch, zero_init_residual=zero_init)
    if ctx.run.model.pretrained:
        state = ckpt.load_weights_file(ctx.run.model.pretrained)
        model.load_state_dict(state, strict=True)
    return model, arch


def run(spec: Config, ctx: StageContext) -> dict:
    zero = spec.zero_init_residual
    if zero is None:
        zero = ctx.run.model.zero_init_residual
    model, arch = dense_model(ctx, zero)
    return training.train(ctx, spec, model, arch, base_lr(spec, ctx.run, ctx.name))
