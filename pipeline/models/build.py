"""The network a config names: `ModelConfig`, its plain-data description (`arch_spec`) and
the dense network built from it (`build_model`, by the name's family)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn as nn

from ..config import opt
from .init import zero_init_last_bn
from .registry import check_arch, resolve


@dataclass
class ModelConfig:
    arch: str = opt(
        "resnet20", "network name: resnet20/32/44/56/110 (CIFAR), vgg11/13/16/19 (CIFAR, BN, one "
        "linear classifier), vgg16_l1 (CIFAR, the L1 paper's two-layer classifier), or any "
        "torchvision classification model (resnet18, resnet50, ...; `torchvision.NAME` where a "
        "CIFAR name shadows it, e.g. torchvision.vgg16)")
    shortcut: Literal["A", "B"] = opt(
        "A", "CIFAR ResNet shortcut: A = zero-padding identity (the papers'), B = 1x1 projection")
    pretrained: str | None = opt(
        None, "local file of weights (a state dict such as torchvision's .pth, or a pipeline "
        "checkpoint) loaded strictly into the dense model before pretraining")
    zero_init_residual: bool = opt(False, "init the last BN gamma of every residual block to 0")


def arch_spec(cfg: ModelConfig, num_classes: int) -> dict:
    """The plain-data description of the dense network that `build_model` rebuilds."""
    return {"name": cfg.arch, "num_classes": int(num_classes), "shortcut": cfg.shortcut}


def build_model(arch: dict, zero_init_residual: bool = False) -> nn.Module:
    """Dense network from its plain-data description (randomly initialized)."""
    name, nc = arch["name"], int(arch["num_classes"])
    found = resolve(name)
    if found is None:
        raise ValueError(check_arch(name))
    family, own_name = found
    model = family.build(own_name, nc, arch)
    if zero_init_residual:
        zero_init_last_bn(model)
    return model


__all__ = ["ModelConfig", "arch_spec", "build_model"]
