"""torchvision's Vision Transformers (vit_*) and Swin Transformers (swin_*).

Built with their attention swapped for the head-prunable modules of `pipeline.attention`
(same function, same state-dict keys: torchvision's weights load unchanged). After
pruning, ViT keeps its embedding width as an attribute (`hidden_dim`, used by its input
reshape), Swin's patch merging its input width (`dim`), and each attention module its
head count: all are set from the parameters' shapes.

Surgery: torch-pruning sees each attention module as one layer (`AttentionPruner`: its
inputs are the q/k/v projection's columns, its outputs the out-projection's rows; heads
are removed by `pruning.heads`). Swin's patch merging (the 2x2 neighbours' channels
concatenated, LayerNorm over the 4C, Linear 4C -> 2C) is likewise one layer with a pruner
of its own: torch-pruning's trace of its strided slices and concatenation maps a removed
input channel to one of its four copies only; here input channel i removes positions i,
C+i, 2C+i and 3C+i of the norm and of the reduction's columns, so `policy: all` can prune
Swin's stage widths. Both are traced as one autograd node each (`opaque_layers`), so their
inner crops and strided slices do not reach torch-pruning's index mapping.

Init from scratch: every layer's PyTorch default (no scheme of their own).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn as nn
import torch_pruning as tp
from torchvision.models.swin_transformer import PatchMerging
from torchvision.models.vision_transformer import VisionTransformer

from ..attention import ATTENTION_TYPES, SelfAttention, convert, fix_heads
from .family import TorchvisionFamily
from .registry import register


class _LinearOutPruner(tp.pruner.function.BasePruningFunc):
    """A layer torch-pruning sees whole whose outputs are the rows of one inner Linear
    (`_out`)."""

    @staticmethod
    def _out(layer: nn.Module) -> nn.Linear:  # every subclass names its Linear
        raise TypeError(f"no output Linear for {type(layer).__name__}")

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        lin = self._out(layer)
        keep = sorted(set(range(lin.out_features)) - set(int(i) for i in idxs))
        lin.weight = self._prune_parameter_and_grad(lin.weight, keep, 0)
        if lin.bias is not None:
            lin.bias = self._prune_parameter_and_grad(lin.bias, keep, 0)
        lin.out_features = len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return self._out(layer).out_features


class AttentionPruner(_LinearOutPruner):
    """The embedding width through an attention module (`attention.SelfAttention`,
    `attention.WindowAttention`): its inputs are the q/k/v projection's columns, its
    outputs the out-projection's rows; the heads and their width stay (heads are removed
    by `heads.prune_heads`). torch-pruning treats the module as one layer."""

    TARGET_MODULES = ATTENTION_TYPES

    @staticmethod
    def _out(layer: nn.Module) -> nn.Linear:
        return layer.out_proj if isinstance(layer, SelfAttention) else layer.proj

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(self.get_in_channels(layer))) - set(int(i) for i in idxs))
        if isinstance(layer, SelfAttention):
            layer.in_proj_weight = self._prune_parameter_and_grad(layer.in_proj_weight, keep, 1)
        else:
            layer.qkv.weight = self._prune_parameter_and_grad(layer.qkv.weight, keep, 1)
            layer.qkv.in_features = len(keep)
        return layer

    def get_in_channels(self, layer: nn.Module) -> int:
        w = layer.in_proj_weight if isinstance(layer, SelfAttention) else layer.qkv.weight
        return int(w.shape[1])


class PatchMergingPruner(_LinearOutPruner):
    """torchvision's Swin `PatchMerging` as one layer: C inputs, each present four times
    in the concatenated 4C (its norm's and reduction's positions i + kC); the outputs are
    the reduction's rows."""

    TARGET_MODULES = (PatchMerging,)

    @staticmethod
    def _out(layer: nn.Module) -> nn.Linear:
        return layer.reduction

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        c = self.get_in_channels(layer)
        gone = set(int(i) for i in idxs)
        kept = [i for i in range(c) if i not in gone]
        keep = [k * c + i for k in range(4) for i in kept]
        norm, lin = layer.norm, layer.reduction
        if getattr(norm, "weight", None) is not None:
            norm.weight = self._prune_parameter_and_grad(norm.weight, keep, 0)
        if getattr(norm, "bias", None) is not None:
            norm.bias = self._prune_parameter_and_grad(norm.bias, keep, 0)
        if isinstance(norm, nn.LayerNorm):
            norm.normalized_shape = (len(keep),)
        lin.weight = self._prune_parameter_and_grad(lin.weight, keep, 1)
        lin.in_features = len(keep)
        layer.dim = len(kept)
        return layer

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.reduction.in_features // 4


@register
class VisionTransformers(TorchvisionFamily):
    name = "vision_transformer"
    prefixes = ("vit_", "swin_")
    opaque_layers = (PatchMerging, *ATTENTION_TYPES)

    def build(self, name: str, num_classes: int, arch: dict[str, Any]) -> nn.Module:
        model = super().build(name, num_classes, arch)
        convert(model)  # head-prunable attention (swin_v2's attention stays torchvision's)
        return model

    def fix_widths(self, m: nn.Module) -> bool:
        if isinstance(m, ATTENTION_TYPES):
            fix_heads(m)
        elif isinstance(m, VisionTransformer):  # the embedding width its input reshape uses
            m.hidden_dim = int(m.class_token.shape[-1])
        elif isinstance(m, PatchMerging):  # C inputs, concatenated 4x before the reduction
            m.dim = int(m.reduction.weight.shape[1]) // 4
        else:
            return False
        return True

    def sync_widths(self, m: nn.Module) -> None:
        if isinstance(m, VisionTransformer):
            m.hidden_dim = int(m.class_token.shape[-1])

    def pruners(self) -> dict[type[nn.Module], Any]:
        attention = AttentionPruner()
        return {PatchMerging: PatchMergingPruner(), **{t: attention for t in ATTENTION_TYPES}}


__all__ = ["AttentionPruner", "PatchMergingPruner", "VisionTransformers"]
