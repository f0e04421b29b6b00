"""torch-pruning handlers for our own layers.

torch-pruning cannot trace through the option-A shortcut (subsample, then place the
input channels among zero channels), so it is registered as a layer of its own with a
pruner that keeps its channel maps consistent: pruning its output channels drops the
matching entries of the map (and renumbers the rest); pruning its input channels drops
those inputs. The residual stream before and after a stage boundary can then be pruned
independently, which is what `policy: all` needs on an option-A ResNet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
import torch_pruning as tp

from .models import PadShortcut


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


def customized_pruners() -> dict:
    """The custom pruners to pass to torch-pruning's DependencyGraph."""
    return {PadShortcut: PadShortcutPruner()}


__all__ = ["PadShortcutPruner", "customized_pruners"]
