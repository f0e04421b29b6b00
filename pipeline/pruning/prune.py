"""The two entry points: `prune_model` removes what a spec selects (one shot or by the
MAC target search); `select_filters` only tells which filters that would be."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from .criteria import CRITERIA, gradient_products
from .groups import Group, candidate_groups, required
from .heads import prune_heads
from .search import prune_to_target
from .selection import select, selection_record
from .spec import PruneSpec, PruningError, checked
from .surgery import (
    PruneReport,
    apply_selection,
    build_graph,
    forward_check,
    output_shape,
    pruning_report,
)

log = logging.getLogger(__name__)

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def gradient_refresher(model: nn.Module, spec: PruneSpec, groups: list[Group],
                       batches: Batches | None) -> Callable[[], None]:
    """What to run before every selection: for a criterion that needs gradients (taylor),
    take them on `spec.batches` of the training batches `batches()` yields, on the current
    weights; for the others nothing."""
    if not CRITERIA[spec.method].needs_gradients:
        return lambda: None
    if batches is None:
        raise PruningError(f"method {spec.method!r} needs training batches to take "
                           "gradients on (none were given)")

    def refresh() -> None:
        taken = []
        for i, batch in enumerate(batches()):
            if i >= spec.batches:
                break
            taken.append(batch)
        device = next(model.parameters()).device
        products = gradient_products(model, ((x.to(device), y.to(device)) for x, y in taken))
        for g in groups:
            g.products = products
    return refresh


def prune_model(model: nn.Module, spec: PruneSpec, example: torch.Tensor,
                seed: int = 0, batches: Batches | None = None,
                mac_size: tuple[int, ...] | None = None) -> PruneReport:
    """Prune `model` in place according to `spec`; returns the pruned groups' widths.

    `batches()` yields training batches (x, y), for criteria that need gradients
    (taylor: the first `spec.batches` of them, re-taken before every selection step).
    `mac_size` (C, H, W): the MAC target counts the MACs of images of that size (the
    widths do not depend on it otherwise), so `example` may be smaller than the real
    images.
    `spec.heads` first removes that share of every attention module's heads
    (`heads.prune_heads`); the filters (`ratio`, `target_macs_reduction`) are then pruned
    on the result, or none when neither is given.
    The forward output shape is checked to be unchanged; any failure is a PruningError.
    """
    spec = checked(spec)
    _no_measurement(spec)
    seed = spec.seed if spec.seed is not None else seed
    shape = output_shape(model, example)
    heads = prune_heads(model, spec, seed, batches) if spec.heads is not None else []
    if spec.ratio is None and spec.target_macs_reduction is None:  # heads only
        forward_check(model, example, shape, spec.policy)
        return PruneReport(heads=heads)
    dg = build_graph(model, example)
    groups = required(candidate_groups(model, dg, spec), spec)
    refresh = gradient_refresher(model, spec, groups, batches)
    if spec.target_macs_reduction is not None:
        steps = prune_to_target(model, spec, example, dg, groups, seed, refresh, mac_size)
    else:
        refresh()
        apply_selection(dg, groups, select(spec, groups, seed))
        steps = 1
    forward_check(model, example, shape, spec.policy)
    report = pruning_report(groups, steps)
    report.heads = heads
    log.info("pruned %d channel group(s) in %d step(s)", len(report.layers), steps)
    return report


def _no_measurement(spec: PruneSpec) -> None:
    """A spec whose widths need measured times is pruned by `latency.prune_to_latency`."""
    if isinstance(spec.round_to, str):
        raise PruningError(f"round_to {spec.round_to!r} is found by measurement: give the "
                           "measured alignment (pipeline.pruning.latency)", "round_to")
    if getattr(spec, "has_latency_target", False):
        raise PruningError("a latency target is pruned by "
                           "pipeline.pruning.latency.prune_to_latency", "target_speedup")


def select_filters(model: nn.Module, spec: PruneSpec, example: torch.Tensor,
                   seed: int = 0, batches: Batches | None = None) -> list[dict]:
    """The filters `spec` would remove, without removing them: one record entry per group
    ({"name", "convs", "removed", ...}); none for a spec of heads only (those:
    `heads.select_heads`)."""
    spec = checked(spec)
    if spec.target_macs_reduction is not None:
        raise PruningError("target_macs_reduction needs the actual removal (MACs are measured "
                           "between steps); give a ratio")
    if spec.ratio is None:
        return []
    seed = spec.seed if spec.seed is not None else seed
    groups = candidate_groups(model, build_graph(model, example), spec)
    gradient_refresher(model, spec, groups, batches)()
    return selection_record(groups, select(spec, groups, seed))


__all__ = ["Batches", "gradient_refresher", "prune_model", "select_filters"]
