"""torchvision's ConvNeXts (Liu et al. 2022).

Each block's `layer_scale` (C, 1, 1) is a per-channel parameter outside any layer: it is
given to torch-pruning's graph as an unwrapped parameter pruned along dim 0, so it shrinks
with the residual stream it scales. The MLPs' Linears are applied per position, so the
pruner treats them as 1x1 convolutions (see `pruning.groups`).

Init from scratch (torchvision's constructors): conv and linear truncated normal (std
0.02)/0, LayerNorm 1/0, every block's layer_scale 1e-6.
"""

from __future__ import annotations

import torch.nn as nn
from torchvision.models.convnext import CNBlock

from .family import TorchvisionFamily
from .registry import register

CONVNEXT_LAYER_SCALE = 1e-6  # torchvision's ConvNeXt constructors (convnext_tiny ... large)


@register
class ConvNeXts(TorchvisionFamily):
    name = "tv_convnext"
    init_scheme = "tv_convnext"
    prefixes = ("convnext",)

    def init_module(self, m: nn.Module) -> bool:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            return True
        if isinstance(m, CNBlock):
            m.layer_scale.fill_(CONVNEXT_LAYER_SCALE)
            return True
        return False

    def unwrapped_parameters(self, m: nn.Module) -> list[tuple[nn.Parameter, int]]:
        return [(m.layer_scale, 0)] if isinstance(m, CNBlock) else []


__all__ = ["CONVNEXT_LAYER_SCALE", "ConvNeXts"]
