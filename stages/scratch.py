"""scratch: the pruned architecture re-initialized and trained from scratch.

Liu et al. 2019 ("Rethinking the Value of Network Pruning"): Scratch-E trains for the
same epochs as the dense model's pretraining; Scratch-B for the same computation
budget: epochs x (dense MACs / pruned MACs), with the milestones scaled with them
(ImageNet capped at 2x, as there).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch

from pipeline import checkpoint as ckpt
from pipeline.config import opt
from pipeline.models import build_model, count_macs, shrink_to, zero_init_last_bn
from pipeline.trainer import TrainConfig

from . import training
from .base import StageBase, StageContext, upstream_of_type

NEEDS_INPUT = True
DEFAULT_LR = 0.1


@dataclass
class Config(StageBase, TrainConfig):
    type: str = opt("scratch", "stage kind")
    budget: Literal["E", "B"] = opt("E", "E: the given epochs; B: epochs x MACs ratio")
    max_scale: float | None = opt(None, "cap of the Scratch-B epoch multiplier (ImageNet: 2)",
                                  min=1)
    zero_init_residual: bool | None = opt(None, "init each block's last BN gamma to 0")


def scaled(spec: Config, dense_macs: int, pruned_macs: int) -> tuple[Config, float]:
    """Scratch-B: epochs and milestones multiplied by the MACs ratio (capped)."""
    if spec.budget == "E":
        return spec, 1.0
    factor = dense_macs / max(pruned_macs, 1)
    if spec.max_scale:
        factor = min(factor, spec.max_scale)
    epochs = int(math.ceil(spec.epochs * factor - 1e-9))
    sched = spec.schedule
    milestones = [m if 0 < m < 1 else m * factor for m in sched.milestones]
    warm = sched.warmup
    new_sched = dataclasses.replace(sched, milestones=milestones,
                                    step_size=sched.step_size * factor, warmup=warm)
    return dataclasses.replace(spec, epochs=epochs, schedule=new_sched), factor


def run(spec: Config, ctx: StageContext) -> dict:
    pruned, payload = ctx.load_input(spec.from_)
    arch = payload["arch"]
    size = ctx.input_size
    dense_name = upstream_of_type(ctx.run, ctx.name, "prune")
    dense_macs = count_macs(build_model(arch), size)["total"]
    if dense_name is not None:
        prune_dir = ctx.run_dir / dense_name
        summary = _read_summary(prune_dir)
        dense_macs = summary.get("macs_before", dense_macs)
    pruned_macs = count_macs(pruned, size)["total"]
    eff, factor = scaled(spec, dense_macs, pruned_macs)
    torch.manual_seed(ctx.run.seed)
    model = build_model(arch)  # fresh initialization, then narrowed to the pruned widths
    shrink_to(model, payload["state_dict"])
    _reinit_like(model, payload["state_dict"], ctx.run.seed)
    zero = spec.zero_init_residual if spec.zero_init_residual is not None else \
        ctx.run.model.zero_init_residual
    if zero:
        zero_init_last_bn(model)
    result = training.train(ctx, eff, model, arch, eff.resolved_lr(DEFAULT_LR),
                            meta={"budget": spec.budget, "budget_factor": factor})
    result.update(budget=spec.budget, budget_factor=factor, epochs=eff.epochs)
    return result


def _read_summary(stage_dir) -> dict:
    import json

    try:
        return json.loads((stage_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def _reinit_like(model: torch.nn.Module, state_dict: dict, seed: int) -> None:
    """Initialize the narrowed model's layers the way the architecture initializes them."""
    import torch.nn as nn

    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            std = math.sqrt(2.0 / fan_in)
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
                if m.bias is not None:
                    m.bias.zero_()
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            m.reset_running_stats()
    # buffers that are not statistics (e.g. option-A channel maps) keep the stored values
    sd = model.state_dict()
    for k, v in state_dict.items():
        if k.endswith(("in_index", "out_index", "sizes")):
            sd[k].copy_(v)
    model.load_state_dict(sd, strict=True)


def base_lr(spec: Config, run, name: str) -> float:
    return spec.resolved_lr(DEFAULT_LR)
