"""Soft filter pruning (SFP, He et al. 2018, as in FPGM's training loop): the selected
filters are zeroed during training instead of removed, and re-selected every epoch.

The model keeps its dense shapes; the last selection is kept as a record (see
`selection.selection_record`) that `surgery.remove_filters` later removes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ..config import Invalid, opt
from .criteria import CRITERIA
from .groups import Group, candidate_groups, required
from .selection import Selection, select, selection_record
from .spec import PruneSpec, PruningError, checked
from .surgery import build_graph


@dataclass
class SoftPruneSpec(PruneSpec):
    """`prune_during_training` of a training stage: the selection keys of a prune stage
    plus how often to re-select."""

    every_epochs: int = opt(1, "re-select and zero the filters every this many epochs (and "
                            "after the last one)", min=1)
    mask_gradients: bool = opt(False, "also zero the selected filters' gradients until the "
                               "next selection, as the official FPGM code's do_grad_mask "
                               "(default: SFP, zeroed filters keep training)")

    def validate(self) -> None:
        if self.target_macs_reduction is not None:
            raise Invalid("target_macs_reduction", "soft pruning needs a ratio (MACs only "
                          "fall when the filters are removed)")
        if self.heads is not None:
            raise Invalid("heads", "soft pruning zeroes filters during training; attention "
                          "heads are removed by a prune stage")
        if CRITERIA[self.method].needs_gradients:
            raise Invalid("method", f"{self.method!r} takes gradients of training batches "
                          "before it prunes: use it in a prune stage")
        super().validate()


@torch.no_grad()
def _zero_rows(conv: nn.Module, idxs: list[int]) -> None:
    """Zero the given output filters of a conv (weight rows and bias) in place."""
    index = torch.as_tensor(idxs, dtype=torch.long, device=conv.weight.device)
    conv.weight.index_fill_(0, index, 0.0)
    if conv.bias is not None:
        conv.bias.index_fill_(0, index, 0.0)


def zero_filters(model: nn.Module, record: list[dict]) -> int:
    """Zero the recorded filters (every conv of each group: weight rows and bias) in place;
    returns how many filters were zeroed. BN parameters are left alone, as in the official
    FPGM/SFP code."""
    mods = dict(model.named_modules())
    count = 0
    for entry in record:
        if entry["removed"]:
            for name in entry["convs"]:
                _zero_rows(mods[name], entry["removed"])
                count += len(entry["removed"])
    return count


def zero_pattern_record(groups: list[Group]) -> list[dict]:
    """The record of the channels whose filters are zero in every conv of their group (what
    soft pruning leaves behind), for when the selection itself was not kept."""
    selection = {}
    for gi, g in enumerate(groups):
        zero = np.ones(g.channels, dtype=bool)
        for w in g.weights():
            zero &= ~np.any(w != 0, axis=1)
        if zero.any():
            selection[gi] = np.flatnonzero(zero).tolist()
    return selection_record(groups, selection)


class SoftPruner:
    """Soft filter pruning of one model during its training.

    `step()` (after every epoch) scores the candidate filters on the current weights,
    zeroes the selected ones and keeps the selection as a record; the zeroed filters keep
    training (unless `mask_gradients`) and may be chosen differently next time. The groups
    are found once on the model given here; later calls may pass that model after it was
    moved to another device, and extra copies (an EMA) to zero by name.
    """

    def __init__(self, model: nn.Module, spec: PruneSpec, example: torch.Tensor,
                 seed: int = 0, mask_gradients: bool = False):
        spec = checked(spec)
        if spec.target_macs_reduction is not None:
            raise PruningError("soft pruning needs a ratio, not target_macs_reduction")
        self.spec = spec
        self.seed = spec.seed if spec.seed is not None else seed
        self.groups = required(candidate_groups(model, build_graph(model, example), spec),
                               spec)
        self.record: list[dict] = []
        self.masks: dict[str, torch.Tensor] = {}
        if mask_gradients:
            for g in self.groups:
                for name, m in zip(g.convs, g.modules, strict=True):
                    self.masks[name] = torch.ones(m.weight.shape[0])
                    m.weight.register_hook(self._grad_hook(name))

    def _grad_hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            mask = self.masks[name]
            if mask.device != grad.device or mask.dtype != grad.dtype:
                # moved once, to where the weight lives: no copy in every backward
                mask = self.masks[name] = mask.to(grad.device, grad.dtype)
            return grad * mask.view(-1, *([1] * (grad.dim() - 1)))
        return hook

    def step(self, *copies: nn.Module) -> list[dict]:
        """Select on the current weights of the model the groups were found on, zero the
        selection there and in `copies` (matched by name, e.g. an EMA); returns the record."""
        selection: Selection = select(self.spec, self.groups, self.seed)
        self.record = selection_record(self.groups, selection)
        for gi, idxs in selection.items():
            for m in self.groups[gi].modules:
                _zero_rows(m, idxs)
        for m in copies:
            zero_filters(m, self.record)
        for entry in self.record:
            for name in entry["convs"]:
                if name in self.masks:
                    mask = torch.ones_like(self.masks[name])
                    mask[entry["removed"]] = 0
                    self.masks[name] = mask
        return self.record


__all__ = ["SoftPruneSpec", "SoftPruner", "zero_filters", "zero_pattern_record"]
