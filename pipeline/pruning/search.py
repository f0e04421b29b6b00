"""The `target_macs_reduction` search: prune in small steps until the MACs fall enough.

Every pruned group's ratio grows by `target_step` per step, the criterion re-scored on the
current weights each step; within the last step groups are pruned in module order until
the MACs (conv + linear) have fallen by the target share.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch_pruning as tp

from ..attention import ATTENTION_TYPES
from .groups import Group
from .selection import select
from .spec import PruneSpec, PruningError
from .surgery import apply_selection, output_shape


class MacCounter:
    """MACs (as `models.count_macs` counts them: conv, linear, attention) from the layers' current
    widths and the output positions recorded once: no forward pass per query. With
    `size` (C, H, W) the positions are those of images of that size, recorded on a
    meta-device copy (shapes only), whatever size `example` has."""

    def __init__(self, model: nn.Module, example: torch.Tensor,
                 size: tuple[int, ...] | None = None):
        self.layers: list[tuple[nn.Module, int]] = []  # (conv or linear, output positions)
        self.attention: list[tuple[nn.Module, torch.Size]] = []  # (module, input shape)
        hooks = []
        traced, x = model, example
        if size is not None:
            memo: dict = {id(t): t.to("meta") for t in [*model.parameters(), *model.buffers()]}
            traced = copy.deepcopy(model, memo)
            x = torch.zeros((1, *size), device="meta")
        original = dict(zip((m for _, m in traced.named_modules()),
                            (m for _, m in model.named_modules()), strict=True))

        def hook(m, inp, out):
            channels = m.out_channels if isinstance(m, nn.modules.conv._ConvNd) \
                else m.out_features
            self.layers.append((original[m], int(out[0].numel() // channels)))

        def attention_hook(m, inp, out):
            self.attention.append((original[m], inp[0].shape))

        for m in traced.modules():
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                hooks.append(m.register_forward_hook(hook))
            elif isinstance(m, ATTENTION_TYPES):
                hooks.append(m.register_forward_hook(attention_hook))
        try:
            output_shape(traced, x)
        finally:
            for h in hooks:
                h.remove()

    def total(self) -> int:
        return sum(int(m.weight.numel()) * positions for m, positions in self.layers) + sum(
            sum(m.macs(shape).values()) for m, shape in self.attention)


def prune_to_target(model: nn.Module, spec: PruneSpec, example: torch.Tensor,
                    dg: tp.DependencyGraph, groups: list[Group], seed: int,
                    before_select: Callable[[], None] = lambda: None,
                    mac_size: tuple[int, ...] | None = None) -> int:
    """Grow every group's ratio by target_step (criterion re-scored on the current weights
    each step) until the MACs fall by target_macs_reduction. Within a step the groups are
    pruned in module order and the search stops at the first group that reaches the
    target, so the result overshoots by at most one group's step. `before_select` runs
    before each step's scoring (taylor: gradients on the current weights). `mac_size`:
    measure the MACs of images of that size instead of `example`'s. Returns the steps."""
    macs = MacCounter(model, example, mac_size)
    base = macs.total()
    target = float(spec.target_macs_reduction or 0.0)
    reduction, step = 0.0, 0
    max_steps = int(math.ceil(1.0 / spec.target_step)) + 1
    while reduction + 1e-12 < target:
        step += 1
        if step > max_steps:
            raise PruningError(f"{target:g} is out of reach with policy {spec.policy!r}: "
                               f"{reduction:.3f} with every pruned layer at its minimum width",
                               "target_macs_reduction")
        ratio = min(step * spec.target_step, 1.0)
        before_select()
        selection = select(spec, groups, seed + 7919 * step, ratio_scale=ratio)
        for gi in sorted(selection):
            apply_selection(dg, groups, {gi: selection[gi]})
            reduction = 1 - macs.total() / base
            if reduction + 1e-12 >= target:
                break
    return step


__all__ = ["MacCounter", "prune_to_target"]
