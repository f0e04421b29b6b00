"""torchvision's ResNets, ResNeXts and Wide ResNets (ImageNet).

Residual blocks end in `bn2` (BasicBlock) or `bn3` (Bottleneck); the shortcut projection
is `downsample` (not numbered as a layer; kept by `skip_downsample`). Grouped
convolutions (ResNeXt) are pruned group-consistently by the pruner's own conv pruner.

Init from scratch (the constructor's): conv kaiming_normal_ (fan_out, relu), BN 1/0,
linear PyTorch's default.
"""

from __future__ import annotations

import re

import torch.nn as nn
import torchvision.models.resnet as tvr

from .family import TorchvisionFamily
from .init import init_conv_fan_out
from .registry import register


@register
class TorchvisionResNets(TorchvisionFamily):
    name = "tv_resnet"
    init_scheme = "tv_resnet"
    prefixes = ("resnet", "resnext", "wide_resnet")
    projections = ("downsample",)

    def label(self, name: str) -> str:
        m = re.fullmatch(r"resnet(\d+)", name)
        return name if m is None else f"ResNet-{m[1]}"

    def init_conv(self, m: nn.Conv2d) -> None:
        init_conv_fan_out(m)

    def residual_bn(self, m: nn.Module) -> nn.Module | None:
        if isinstance(m, tvr.BasicBlock):
            return m.bn2
        return m.bn3 if isinstance(m, tvr.Bottleneck) else None


__all__ = ["TorchvisionResNets"]
