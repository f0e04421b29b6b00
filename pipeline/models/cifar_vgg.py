"""CIFAR VGGs with BN (vgg11/13/16/19), as in Li et al. 2017 and Liu et al. 2019
(Rethinking): plain `vggN` has one linear classifier (network slimming's and Rethinking's
CIFAR VGGs); `vggN_l1` has the L1 paper's two-layer classifier, Linear(512, 512) + BN +
ReLU + Linear(512, classes) (Rethinking's l1-norm-pruning code).

Init from scratch (the constructor's, as the Rethinking code): conv kaiming_normal_
(fan_out, relu), BN2d 0.5/0 (BN1d 1/0), linear N(0, 0.01)/0.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .family import Family
from .init import init_conv_fan_out, init_linear_small
from .registry import register

CIFAR_VGG = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512],
}
# the same features with the classifier of Li et al. 2017
CIFAR_VGG_L1 = {f"{k}_l1": v for k, v in CIFAR_VGG.items()}


class CifarVGG(nn.Module):
    """VGG with BN for 32x32 inputs, as in Li et al. 2017 and Liu et al. 2019 (Rethinking)."""

    def __init__(self, cfg: list, num_classes: int = 10, two_layer_classifier: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1, bias=False), nn.BatchNorm2d(v),
                           nn.ReLU(inplace=True)]
                in_ch = v
        self.features = nn.Sequential(*layers)
        self.classifier: nn.Module = nn.Linear(in_ch, num_classes)
        if two_layer_classifier:  # Li et al. 2017
            self.classifier = nn.Sequential(nn.Linear(in_ch, 512), nn.BatchNorm1d(512),
                                            nn.ReLU(inplace=True), nn.Linear(512, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 0.5)  # as in the Rethinking code (BN1d keeps 1)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


@register
class CifarVGGs(Family):
    name = "cifar_vgg"
    init_scheme = "cifar_vgg"

    def names(self) -> list[str]:
        return sorted(CIFAR_VGG) + sorted(CIFAR_VGG_L1)

    def build(self, name: str, num_classes: int, arch: dict[str, Any]) -> nn.Module:
        if name in CIFAR_VGG_L1:
            return CifarVGG(CIFAR_VGG_L1[name], num_classes, two_layer_classifier=True)
        return CifarVGG(CIFAR_VGG[name], num_classes)

    def label(self, name: str) -> str:
        depth, _, suffix = name.removeprefix("vgg").partition("_")
        return f"VGG-{depth}{'_' + suffix if suffix else ''}"

    def init_conv(self, m: nn.Conv2d) -> None:
        init_conv_fan_out(m)

    def init_linear(self, m: nn.Linear) -> None:
        init_linear_small(m)

    def bn_weight(self, m: nn.modules.batchnorm._BatchNorm) -> float:
        return 0.5 if isinstance(m, nn.BatchNorm2d) else 1.0


__all__ = ["CIFAR_VGG", "CIFAR_VGG_L1", "CifarVGG", "CifarVGGs"]
