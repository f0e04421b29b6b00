"""CIFAR ResNets (He et al. 2016, sec. 4.2): resnet8 ... resnet1202, depth = 6n + 2.

Option-A shortcuts (`PadShortcut`: subsample, then place the input channels among zero
channels) are the papers'; option B is a 1x1 projection + BN named `shortcut`. The
option-A shortcut is a layer torch-pruning cannot trace, so it has a pruner of its own
(`PadShortcutPruner`) that keeps its channel maps consistent: pruning its output channels
drops the matching entries of the map (and renumbers the rest); pruning its input channels
drops those inputs. The residual stream before and after a stage boundary can then be
pruned independently, which is what `policy: all` needs.

Init from scratch (the constructor's): conv and linear kaiming_normal_ (fan_in), BN 1/0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from .family import Family
from .registry import register

CIFAR_RESNET_DEPTHS = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet32": 32,
                       "resnet44": 44, "resnet56": 56, "resnet110": 110, "resnet1202": 1202}


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially and place input channels among zero channels.

    Input channel `in_index[k]` goes to output channel `out_index[k]`; every other
    output channel is zero. The maps and sizes are buffers, so a pruned shortcut (fewer
    input or output channels) is stored and rebuilt as data.

    Where every input channel lands, in order, in one contiguous block of output channels
    (the unpruned shortcut, and any pruning that keeps the residual widths), the forward
    pass is a constant zero-padding of the channel axis (ONNX `Pad`): exported graphs then
    carry no scatter of the maps, which costs onnxruntime 5-15% of a ResNet-20's time and
    breaks its int8 layout chain (BENCHMARKS.md#quantize). Other maps use `index_copy`.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        pad = (out_planes - in_planes) // 2
        self.stride = stride
        self.in_channels, self.out_channels = in_planes, out_planes
        self.register_buffer("in_index", torch.arange(in_planes))
        self.register_buffer("out_index", torch.arange(in_planes) + pad)
        self.register_buffer("sizes", torch.tensor([in_planes, out_planes]))
        self._find_block(list(range(in_planes)), list(range(pad, pad + in_planes)))

    def _find_block(self, ins: list[int] | None = None, outs: list[int] | None = None) -> None:
        """`self.block`: (zero channels before, zero channels after) when the maps (given,
        or read from the buffers) are the identity into one contiguous block of output
        channels, else None. Maps on the meta device have no values: None."""
        if ins is None or outs is None:
            if self.in_index.is_meta or self.out_index.is_meta:
                self.block = None
                return
            ins, outs = self.in_index.tolist(), self.out_index.tolist()
        n, first = len(ins), (outs[0] if outs else 0)
        contiguous = n > 0 and n == self.in_channels and ins == list(range(n)) and \
            outs == list(range(first, first + n)) and first + n <= self.out_channels
        self.block = (first, self.out_channels - first - n) if contiguous else None

    def set_maps(self, pairs: list[tuple[int, int]], in_channels: int, out_channels: int) -> None:
        """Replace the channel maps (used by the pruner)."""
        dev = self.in_index.device
        self.in_index = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=dev)
        self.out_index = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=dev)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.sizes = torch.tensor([in_channels, out_channels], device=dev)
        self._find_block([p[0] for p in pairs], [p[1] for p in pairs])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x[:, :, :: self.stride, :: self.stride]
        if self.block is not None:
            return F.pad(xs, (0, 0, 0, 0, *self.block))
        if self.in_index.numel() != x.shape[1]:
            xs = xs.index_select(1, self.in_index)
        out = xs.new_zeros(xs.shape[0], self.out_channels, xs.shape[2], xs.shape[3])
        return out.index_copy(1, self.out_index, xs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.in_channels, self.out_channels = (int(v) for v in self.sizes.tolist())
        self._find_block()

    def extra_repr(self) -> str:
        return f"in={self.in_channels}, out={self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = PadShortcut(in_planes, planes, stride)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs (He et al. 2016, sec. 4.2): depth = 6n + 2."""

    def __init__(self, depth: int, num_classes: int = 10, shortcut: str = "A"):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, shortcut))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


# --------------------------------------------------------------------------- surgery


def _pairs(layer: PadShortcut) -> list[tuple[int, int]]:
    """(input channel, output channel) of every channel the shortcut carries."""
    return list(zip(layer.in_index.tolist(), layer.out_index.tolist(), strict=True))


class PadShortcutPruner(tp.pruner.function.BasePruningFunc):
    TARGET_MODULES = (PadShortcut,)

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        removed = set(int(i) for i in idxs)
        keep = [c for c in range(layer.out_channels) if c not in removed]
        new_pos = {old: new for new, old in enumerate(keep)}
        pairs = [(int(i), new_pos[int(o)]) for i, o in _pairs(layer) if int(o) in new_pos]
        layer.set_maps(pairs, layer.in_channels, len(keep))
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        removed = set(int(i) for i in idxs)
        keep = [c for c in range(layer.in_channels) if c not in removed]
        new_id = {old: new for new, old in enumerate(keep)}
        pairs = [(new_id[int(i)], int(o)) for i, o in _pairs(layer) if int(i) in new_id]
        layer.set_maps(pairs, len(keep), layer.out_channels)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.in_channels


# --------------------------------------------------------------------------- the family


@register
class CifarResNets(Family):
    name = "cifar_resnet"
    init_scheme = "cifar_resnet"
    projections = ("shortcut",)  # option B's 1x1 projection
    residual_layers = (PadShortcut,)

    def names(self) -> list[str]:
        return sorted(CIFAR_RESNET_DEPTHS, key=CIFAR_RESNET_DEPTHS.get)

    def build(self, name: str, num_classes: int, arch: dict[str, Any]) -> nn.Module:
        return CifarResNet(CIFAR_RESNET_DEPTHS[name], num_classes, arch.get("shortcut", "A"))

    def label(self, name: str) -> str:
        return f"ResNet-{CIFAR_RESNET_DEPTHS[name]}"

    def init_module(self, m: nn.Module) -> bool:
        return isinstance(m, PadShortcut)  # channel maps are structure, not weights

    def init_conv(self, m: nn.Conv2d) -> None:
        nn.init.kaiming_normal_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)

    def init_linear(self, m: nn.Linear) -> None:
        m.reset_parameters()
        nn.init.kaiming_normal_(m.weight)

    def residual_bn(self, m: nn.Module) -> nn.Module | None:
        return m.bn2 if isinstance(m, BasicBlock) else None

    def fix_widths(self, m: nn.Module) -> bool:
        if not isinstance(m, PadShortcut):
            return False
        m.in_channels = m.out_channels = -1  # set from the `sizes` buffer on load
        return True

    def pruners(self) -> dict[type[nn.Module], Any]:
        return {PadShortcut: PadShortcutPruner()}


__all__ = ["CIFAR_RESNET_DEPTHS", "BasicBlock", "CifarResNet", "CifarResNets", "PadShortcut",
           "PadShortcutPruner"]
