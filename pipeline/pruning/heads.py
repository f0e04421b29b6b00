"""Attention-head pruning (`heads` of a prune spec): whole heads removed from every
attention module of a ViT or Swin as `models.build_model` makes them
(`attention.SelfAttention`, `attention.WindowAttention`).

Per module, floor(heads x num_heads) heads are removed (at least one is kept: 3 of ViT-B's
12 at 0.25; 0/1/3/6 of Swin-T's 3/6/12/24). Each head is scored by the spec's criterion
(`Criterion.score_heads`) on the weights before any removal, the lowest go; its q, k and
v rows, out-projection columns and (Swin) relative-position-bias column are removed
together and `num_heads` falls, so the residual stream keeps its width. The removal is
module surgery of its own: no dependency graph is needed, since a head's parameters
touch nothing outside its module.
"""

from __future__ import annotations

import logging

import numpy as np
import torch.nn as nn

from ..attention import (
    attention_modules,
    head_all_parameters,
    head_vectors,
    remove_heads,
    removed_count,
)
from .criteria import CRITERIA, PruningError, head_gradient_terms
from .selection import lowest
from .spec import PruneSpec

log = logging.getLogger(__name__)


class HeadSet:
    """The heads of one attention module, as the criteria read them (`ScoredHeads`)."""

    def __init__(self, name: str, module: nn.Module, products: np.ndarray | None = None):
        self.name, self.module, self.products = name, module, products
        self.size = int(module.num_heads)

    def vectors(self) -> np.ndarray:
        return head_vectors(self.module)

    def all_parameters(self) -> np.ndarray:
        return head_all_parameters(self.module)

    def taylor_terms(self) -> np.ndarray:
        if self.products is None:
            raise PruningError(f"taylor: no gradients were taken for {self.name} (the "
                               "criterion needs training batches)", "heads")
        return self.products


def head_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention modules `heads` prunes, or a PruningError naming the key."""
    mods = attention_modules(model)
    if not mods:
        raise PruningError("this model has no attention heads to remove: only the ViT "
                           "(vit_*) and Swin (swin_t/s/b) models have them", "heads")
    return mods


def select_heads(model: nn.Module, spec: PruneSpec, seed: int = 0,
                 batches=None) -> list[dict]:
    """Which heads `spec.heads` removes, per attention module (one record entry each:
    {"name", "kind": "heads", "before", "after", "removed"}); nothing is removed.
    `batches()` yields training batches for taylor (its first `spec.batches`)."""
    mods = head_modules(model)
    criterion = CRITERIA[spec.method]
    products: dict = {}
    if criterion.needs_gradients:
        if batches is None:
            raise PruningError(f"method {spec.method!r} needs training batches to take "
                               "gradients on (none were given)", "heads")
        taken = []
        for i, batch in enumerate(batches()):
            if i >= spec.batches:
                break
            taken.append(batch)
        device = next(model.parameters()).device
        products = head_gradient_terms(model, [m for _, m in mods],
                                       ((x.to(device), y.to(device)) for x, y in taken))
    record = []
    for i, (name, m) in enumerate(mods):
        n = removed_count(m.num_heads, float(spec.heads or 0.0))
        idxs = lowest(criterion.score_heads(HeadSet(name, m, products.get(m)), seed + i), n) \
            if n else []
        record.append({"name": name, "kind": "heads", "before": m.num_heads,
                       "after": m.num_heads - len(idxs), "removed": [int(j) for j in idxs]})
    return record


def apply_heads(model: nn.Module, record: list[dict]) -> list[dict]:
    """Remove the recorded heads; returns the entries that removed any, with their share."""
    mods = dict(model.named_modules())
    done = []
    for e in record:
        if e["removed"]:
            remove_heads(mods[e["name"]], e["removed"])
            done.append({**e, "share": round(len(e["removed"]) / e["before"], 6)})
    log.info("removed %d attention head(s) from %d module(s)",
             sum(len(e["removed"]) for e in done), len(done))
    return done


def prune_heads(model: nn.Module, spec: PruneSpec, seed: int = 0, batches=None) -> list[dict]:
    """Select and remove `spec.heads` of the heads of every attention module in place."""
    return apply_heads(model, select_heads(model, spec, seed, batches))


__all__ = ["HeadSet", "apply_heads", "head_modules", "prune_heads", "select_heads"]
