"""scratch: the pruned architecture re-initialized and trained from scratch.

Liu et al. 2019 ("Rethinking the Value of Network Pruning"): Scratch-E trains for the
given epochs (set them to the dense model's pretraining epochs); Scratch-B for the same
computation budget: epochs x (dense MACs / pruned MACs), rounded down as their code does
(`int(epochs * ratio)`), with the milestones (and a step schedule's step size) scaled by
the same factor; milestones written as fractions of the run scale by themselves. Their
ImageNet code caps the factor at 2 (`max_scale: 2`). Warmup is not scaled.

The re-initialization is the architecture's own scheme applied at the pruned widths
(what constructing the narrow network with its constructor would do; see `reinitialize`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from torchvision.models.convnext import CNBlock

from pipeline.config import opt
from pipeline.models import (
    CIFAR_RESNET_DEPTHS,
    CIFAR_VGG,
    CIFAR_VGG_L1,
    TORCHVISION_PREFIX,
    PadShortcut,
    build_model,
    count_macs,
    shrink_to,
    zero_init_last_bn,
)
from pipeline.rundir import read_summary
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

    def plan_entry(self, spec: Config, name: str, run) -> dict:
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


@torch.no_grad()
def reinitialize(model: nn.Module, arch_name: str, seed: int) -> str:
    """Fresh weights by the architecture's own init scheme at the current (pruned) widths;
    BN running statistics reset; buffers that describe the structure (option-A channel
    maps) kept. Returns the scheme's name.

      cifar_resnet  conv and linear kaiming_normal_ (fan_in), BN 1/0 (models.CifarResNet)
      cifar_vgg     conv kaiming_normal_ (fan_out, relu), BN2d 0.5/0 (BN1d 1/0), linear
                    N(0, 0.01)/0 (models.CifarVGG)
      torchvision   resnet/resnext/wide_resnet, vgg, mobilenet, regnet: conv
                    kaiming_normal_ (fan_out, relu), BN 1/0; linear PyTorch's default
                    (resnet family) or N(0, 0.01)/0 (the others), as their constructors do;
                    convnext: conv and linear truncated normal (std 0.02)/0, LayerNorm 1/0,
                    every block's layer_scale 1e-6 (torchvision's ConvNeXt);
                    any other model: every layer's reset_parameters() (PyTorch's
                    default), with a warning
    """
    torch.manual_seed(seed)
    scheme = _scheme(arch_name)
    for m in model.modules():
        if scheme == "tv_convnext" and isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif scheme == "tv_convnext" and isinstance(m, CNBlock):
            m.layer_scale.fill_(CONVNEXT_LAYER_SCALE)
        elif isinstance(m, nn.Conv2d):
            if scheme == "cifar_resnet":
                nn.init.kaiming_normal_(m.weight)
            elif scheme == "default":
                m.reset_parameters()
            else:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None and scheme != "default":
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            if m.affine:
                vgg_bn = scheme == "cifar_vgg" and isinstance(m, nn.BatchNorm2d)
                nn.init.constant_(m.weight, 0.5 if vgg_bn else 1.0)
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            m.reset_parameters()  # PyTorch's default, then the scheme's weight init
            if scheme == "cifar_resnet":
                nn.init.kaiming_normal_(m.weight)
            elif scheme in ("cifar_vgg", "tv_vgg", "tv_mobilenet", "tv_regnet"):
                nn.init.normal_(m.weight, 0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        elif isinstance(m, PadShortcut):
            pass  # channel maps are structure, not weights
        elif hasattr(m, "reset_parameters") and not list(m.children()):
            m.reset_parameters()
    if scheme == "default":
        log.warning("scratch: no known init scheme for %r; layers re-initialized with "
                    "PyTorch's defaults", arch_name)
    return scheme


CONVNEXT_LAYER_SCALE = 1e-6  # torchvision's ConvNeXt constructors (convnext_tiny ... large)


def _scheme(name: str) -> str:
    if name in CIFAR_RESNET_DEPTHS:
        return "cifar_resnet"
    if name in CIFAR_VGG or name in CIFAR_VGG_L1:
        return "cifar_vgg"
    name = name.removeprefix(TORCHVISION_PREFIX)
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        return "tv_resnet"
    if name.startswith("regnet"):
        return "tv_regnet"
    if name.startswith("vgg"):
        return "tv_vgg"
    if name.startswith("mobilenet"):
        return "tv_mobilenet"
    if name.startswith("convnext"):
        return "tv_convnext"
    return "default"

