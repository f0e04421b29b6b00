"""torchvision's other classification networks: VGG, MobileNet and RegNet (each with its
constructor's init), and every model no other family claims (the catch-all).

Init from scratch, VGG / MobileNet / RegNet (their constructors'): conv kaiming_normal_
(fan_out, relu), BN 1/0, linear N(0, 0.01)/0. Any other model: every layer's
`reset_parameters()` (PyTorch's default), with a warning.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .family import TorchvisionFamily
from .init import init_conv_fan_out, init_linear_small
from .registry import register


class _ConstructorInit(TorchvisionFamily):
    """The conv and linear init the VGG, MobileNet and RegNet constructors share."""

    def init_conv(self, m: nn.Conv2d) -> None:
        init_conv_fan_out(m)

    def init_linear(self, m: nn.Linear) -> None:
        init_linear_small(m)


@register
class TorchvisionVGGs(_ConstructorInit):
    name = "tv_vgg"
    init_scheme = "tv_vgg"
    prefixes = ("vgg",)  # vgg11 ... vgg19 are the CIFAR ones: `torchvision.vgg16` reaches these


@register
class MobileNets(_ConstructorInit):
    name = "tv_mobilenet"
    init_scheme = "tv_mobilenet"
    prefixes = ("mobilenet",)


@register
class RegNets(_ConstructorInit):
    name = "tv_regnet"
    init_scheme = "tv_regnet"
    prefixes = ("regnet",)


@register
class TorchvisionOthers(TorchvisionFamily):
    """Every torchvision model no other family claims."""

    name = "torchvision"
    catch_all = True

    def build_args(self, name: str) -> dict[str, Any]:
        if name in ("googlenet", "inception_v3"):  # a plain logits output, like the rest
            return {"aux_logits": False, "init_weights": True}
        return {}


__all__ = ["MobileNets", "RegNets", "TorchvisionOthers", "TorchvisionVGGs"]
