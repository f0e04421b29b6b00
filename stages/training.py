"""The part every training stage shares: data, trainer, final model and summary."""

from __future__ import annotations

import time

import torch.nn as nn

from pipeline import checkpoint as ckpt
from pipeline.data import build_data
from pipeline.models import count_macs, count_params
from pipeline.recipes import FrozenTeacher
from pipeline.trainer import RunSettings, TrainConfig, Trainer

from .base import MODEL_FILE, StageContext


def precision_of(spec: TrainConfig, ctx: StageContext) -> str:
    return spec.precision or ctx.run.precision


def eval_batch(spec: TrainConfig) -> int:
    return spec.eval_batch_size or max(spec.batch_size, 256)


def train(ctx: StageContext, spec: TrainConfig, model: nn.Module, arch: dict, base_lr: float,
          teacher: nn.Module | None = None, meta: dict | None = None,
          epoch_end_hooks: list | None = None) -> dict:
    """Train `model` under `spec` in ctx.stage_dir; write model.pt; return the summary."""
    t0 = time.perf_counter()
    if teacher is None and getattr(spec, "distill", None) is not None:
        teacher, _ = ctx.load_input(spec.distill.from_)  # pretrain/scratch distill too
    if teacher is not None:
        teacher = FrozenTeacher(teacher)  # eval mode and no_grad, whatever calls .train()
    data = ctx.extra.get("data_override") or build_data(
        ctx.run.data, spec.batch_size, eval_batch(spec), ctx.run.seed, ctx.device,
        ctx.dist.rank, ctx.dist.world_size, spec.channels_last)
    run = RunSettings(device=ctx.device, dist=ctx.dist, seed=ctx.run.seed,
                      precision=ctx.run.precision, show_progress=ctx.show_progress,
                      tensorboard=ctx.run.logging.tensorboard)
    trainer = Trainer(model, spec, data, ctx.stage_dir, run=run, arch=arch, base_lr=base_lr,
                      teacher=teacher, meta={"stage": ctx.name, **(meta or {})},
                      epoch_end_hooks=epoch_end_hooks)
    result = trainer.fit()
    final = trainer.final_model()
    if ctx.dist.is_main:
        ckpt.save_model(ctx.stage_dir / MODEL_FILE, final, arch,
                        {"stage": ctx.name, **(meta or {})})
    macs = count_macs(final, data.input_size)
    return {**result, "params": count_params(final), "macs": macs["total"],
            "conv_macs": macs["conv"], "lr": base_lr, "batch_size": spec.batch_size,
            "steps_per_epoch": trainer.steps_per_epoch, "train_seconds": time.perf_counter() - t0}
