"""Pruning to a measured time: build (or read) the latency table of the network's prunable
layers, choose the widths that keep the most importance within the budget, remove the
lowest-scored channels of each group, then run dense and pruned end to end in the
deployment runtime. A pruned model that misses the target, or meets it with much to spare,
is pruned again from the dense one toward a new aim read off the measured points (a
secant, bracketed once one model met the target; up to `max_iterations`); the model kept
is the least pruned one that met the target (else the fastest). The record says what was
measured each time and by how much the target was missed, if it was.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from ..criteria import CRITERIA
from ..groups import Group, candidate_groups, required
from ..prune import Batches, gradient_refresher
from ..selection import lowest
from ..spec import PruneSpec, PruningError
from ..surgery import (
    PruneReport,
    apply_selection,
    build_graph,
    forward_check,
    output_shape,
    pruning_report,
)
from .backends import prepare
from .config import LatencyConfig
from .search import kept_importance, normalized, search_widths
from .sites import find_sites
from .table import LatencyTable, Measure, TableCache, build_table, calibrate
from .timing import interleaved_ms

log = logging.getLogger(__name__)
CLOSE_ENOUGH = 0.9  # a model that meets the goal within 10% of its time ends the retries


@dataclass
class Target:
    """What the pruned model must reach: a speedup over the dense model or a latency."""

    speedup: float | None = None
    latency_ms: float | None = None

    def goal_ms(self, dense_ms: float) -> float:
        return self.latency_ms if self.latency_ms is not None else dense_ms / float(
            self.speedup or 1.0)

    def describe(self) -> str:
        return (f"speedup {self.speedup:g}x" if self.speedup is not None
                else f"latency {self.latency_ms:g} ms")


@dataclass
class LatencyResult:
    """What `prune_to_latency` did: the pruning report and latency.json's content."""

    report: PruneReport
    record: dict = field(default_factory=dict)


def end_to_end(models: dict[str, nn.Module], size: tuple[int, ...], cfg: LatencyConfig,
               runs: int | None = None) -> dict[str, dict]:
    """Each model prepared in cfg's runtime and timed on one random batch, side by side
    (interleaved rounds, warm-up discarded): name -> median and quartiles (ms)."""
    x = torch.randn((cfg.batch_size, *size), generator=torch.Generator().manual_seed(0))
    runners = {n: prepare(copy.deepcopy(m).eval(), x, cfg) for n, m in models.items()}
    return interleaved_ms(runners, runs or cfg.runs, cfg.warmup)


def group_scores(spec: PruneSpec, groups: list[Group], seed: int) -> list[np.ndarray]:
    """The criterion's score of every channel of every group, normalized per group."""
    criterion = CRITERIA[spec.method]
    return [normalized(criterion(g, seed + gi), criterion.normalize_global)
            for gi, g in enumerate(groups)]


def prune_widths(model: nn.Module, spec: PruneSpec, example: torch.Tensor,
                 widths: dict[str, int], scores: dict[str, np.ndarray] | None = None
                 ) -> PruneReport:
    """Prune `model` in place so that every named group keeps `widths[name]` channels: its
    highest-scored ones (`scores`: per group name, current numbering), or its first ones."""
    shape = output_shape(model, example)
    dg = build_graph(model, example)
    groups = candidate_groups(model, dg, spec)
    selection = {}
    for gi, g in enumerate(groups):
        keep = widths.get(g.name, g.channels)
        n = g.channels - keep
        if n <= 0:
            continue
        s = scores[g.name] if scores is not None else -np.arange(g.channels, dtype=float)
        selection[gi] = lowest(s, n, g.channel_groups)
    apply_selection(dg, groups, selection)
    forward_check(model, example, shape, spec.policy)
    return pruning_report(groups, 1)


def latency_table(model: nn.Module, spec: PruneSpec, example: torch.Tensor,
                  size: tuple[int, ...], cfg: LatencyConfig, cache: TableCache,
                  measure: Measure | None = None) -> tuple[LatencyTable, list[Group]]:
    """The latency table of `model`'s groups under `spec` (not calibrated), and the groups."""
    dg = build_graph(model, example)
    groups = required(candidate_groups(model, dg, spec), spec)
    sites = find_sites(model, groups, size)
    table = build_table(sites, groups, cfg, cache, spec.round_to, measure)
    return table, groups


def calibrated(table: LatencyTable, model: nn.Module, spec: PruneSpec, example: torch.Tensor,
               size: tuple[int, ...], cfg: LatencyConfig) -> float:
    """Measure the dense model and a half-width copy end to end and fit the table's
    prediction to them; returns the dense model's median ms."""
    half = [min(c, key=lambda w, d=d: abs(w - d / 2)) for c, d in zip(
        table.candidates, table.dense, strict=True)]
    narrow = copy.deepcopy(model)
    prune_widths(narrow, spec, example, dict(zip(table.names, half, strict=True)))
    t = end_to_end({"dense": model, "half": narrow}, size, cfg)
    calibrate(table, t["dense"]["median_ms"], t["half"]["median_ms"], half)
    return t["dense"]["median_ms"]


def prune_to_latency(model: nn.Module, spec: PruneSpec, example: torch.Tensor,
                     size: tuple[int, ...], cfg: LatencyConfig, target: Target,
                     cache: TableCache, seed: int = 0, batches: Batches | None = None,
                     measure: Measure | None = None) -> tuple[nn.Module, LatencyResult]:
    """The pruned copy of `model` that meets `target` in cfg's runtime (see the module
    docstring), and the record; `model` itself is left dense. `batches`: training batches
    for a criterion that takes gradients (taylor)."""
    t0 = time.perf_counter()
    table, groups = latency_table(model, spec, example, size, cfg, cache, measure)
    dense_ms = calibrated(table, model, spec, example, size, cfg)
    goal = target.goal_ms(dense_ms)
    gradient_refresher(model, spec, groups, batches)()
    scores = group_scores(spec, groups, seed)
    kept = [kept_importance(s, c) for s, c in zip(scores, table.candidates, strict=True)]
    by_name = {g.name: s for g, s in zip(groups, scores, strict=True)}
    aim, attempts, best, tried = goal, [], None, set()
    for it in range(1, cfg.max_iterations + 1):
        widths = _search(table, kept, aim, best is None)
        for _ in range(6):  # inside a bracket, an aim within a tried model's stair: move on
            if tuple(widths) not in tried or not any(a["met"] for a in attempts):
                break
            aim = _toward_miss(table, attempts, aim)
            widths = _search(table, kept, aim, False)
        if tuple(widths) in tried:  # the aim moved within one stair: nothing new to measure
            if not attempts[-1]["met"]:
                log.warning("latency target: no narrower widths left to try")
            break
        tried.add(tuple(widths))
        pruned = copy.deepcopy(model)
        report = prune_widths(pruned, spec, example, dict(zip(table.names, widths,
                                                               strict=True)), by_name)
        attempt = _attempt(it, aim, table, widths, target,
                           end_to_end({"dense": model, "pruned": pruned}, size, cfg))
        attempts.append(attempt)
        log.info("latency target %s: iteration %d, predicted %.4g ms, measured %.4g ms "
                 "(dense %.4g ms, %.3fx)", target.describe(), it, attempt["predicted_ms"],
                 attempt["pruned_ms"], attempt["dense_ms"], attempt["speedup"])
        share = attempt["pruned_ms"] / attempt["goal_ms"]
        # met first; among the models that meet it the slowest (the widest: the least
        # pruned), among those that miss the fastest
        score = (attempt["met"], share if attempt["met"] else -share)
        if best is None or score > best[0]:
            best = (score, attempt, pruned, report)
        if attempt["met"] and share >= CLOSE_ENOUGH:
            break
        aim = _next_aim(table, attempts, aim)
    _, attempt, pruned, report = best  # type: ignore[misc]
    record = {"target": {"speedup": target.speedup, "latency_ms": target.latency_ms},
              "backend": cfg.backend, "batch_size": cfg.batch_size, "device": cfg.device,
              "threads": cfg.threads, "precision": cfg.precision,
              "channels_last": cfg.channels_last, "runs": cfg.runs, "warmup": cfg.warmup,
              "dense_ms": attempt["dense_ms"], "pruned_ms": attempt["pruned_ms"],
              "speedup": attempt["speedup"], "goal_ms": attempt["goal_ms"],
              "predicted_ms": attempt["predicted_ms"], "met": attempt["met"],
              "missed_by": None if attempt["met"] else _missed_by(attempt, target),
              "iterations": attempts, "widths": attempt["widths"], "table": table.describe(),
              "seconds": round(time.perf_counter() - t0, 2)}
    return pruned, LatencyResult(report=report, record=record)


def _search(table: LatencyTable, kept: list[dict[int, float]], aim: float, first: bool
            ) -> list[int]:
    """The widths for `aim`; after the first attempt an aim below the narrowest widths'
    prediction (rounding at a clamp) takes the narrowest."""
    try:
        return search_widths(table, kept, table.sum_for(aim))
    except PruningError:
        if first:
            raise
        return [c[0] for c in table.candidates]


def _toward_miss(table: LatencyTable, attempts: list[dict], aim: float) -> float:
    """Halfway from `aim` to the prediction of the narrowest model that missed the goal (the
    dense one when none did): the next aim inside a bracket whose secant fell in a stair."""
    misses = [a["predicted_ms"] for a in attempts if not a["met"]]
    top = min(misses) if misses else table.predict_ms(table.dense)
    return (aim + top) / 2


def _next_aim(table: LatencyTable, attempts: list[dict], aim: float) -> float:
    """The predicted time to aim at next. Each measured point is (predicted, measured), each
    as a share of its dense time (the dense time drifts between measurements); the dense
    model is the first point, a miss. With a point that met the goal and one that missed,
    the secant between the two closest to the goal on either side (kept inside that
    bracket, away from its ends); before any point meets it, the secant through the two
    narrowest misses, cutting the aim by at most the square of the last miss's ratio
    (goal / measured; that ratio alone where the points give no usable slope), below the
    last prediction (a retry measures narrower widths: candidates are stairs, and a small
    cut of the aim can choose the same widths) and not below the narrowest widths'
    prediction, which is tried last."""
    dense_pred = table.predict_ms(table.dense)
    last = attempts[-1]
    goal = last["goal_ms"] / last["dense_ms"]
    points = [(1.0, 1.0, False)] + [
        (a["predicted_ms"] / dense_pred, a["pruned_ms"] / a["dense_ms"], a["met"])
        for a in attempts]
    misses = sorted((p for p in points if not p[2]), key=lambda p: p[0])
    met = [p for p in points if p[2]]
    if met:  # bracketed: between the widest model that met and the narrowest that missed
        lo, hi = max(met, key=lambda p: p[0]), misses[0]
        slope = (hi[1] - lo[1]) / (hi[0] - lo[0]) if hi[0] - lo[0] > 1e-9 else 0.0
        q = hi[0] + (goal - hi[1]) / slope if slope > 1e-3 else (lo[0] + hi[0]) / 2
        margin = 0.1 * (hi[0] - lo[0])
        return min(max(q, lo[0] + margin), hi[0] - margin) * dense_pred
    (q0, r0, _), (q1, r1, _) = (misses[1], misses[0]) if len(misses) > 1 else (
        misses[0], misses[0])
    cut = aim * last["goal_ms"] / last["pruned_ms"]
    slope = (r1 - r0) / (q1 - q0) if abs(q1 - q0) > 1e-9 else 0.0
    # a step at most twice the miss's, in ratio: a flat measured curve (fixed costs) must
    # not send the aim to the narrowest widths at once
    floor = aim * (last["goal_ms"] / last["pruned_ms"]) ** 2
    new = max((q1 + (goal - r1) / slope) * dense_pred, floor) if slope > 1e-3 else cut
    below = last["predicted_ms"] * (1 - 1e-6) - 1e-12
    narrowest = table.predict_ms([c[0] for c in table.candidates])
    return max(min(new, below), min(narrowest, below))


def _attempt(it: int, aim: float, table: LatencyTable, widths: list[int], target: Target,
             t: dict[str, dict]) -> dict:
    """One iteration's record: what was aimed at and predicted, what was measured."""
    d, p = t["dense"]["median_ms"], t["pruned"]["median_ms"]
    goal = target.goal_ms(d)  # against the dense time of this side-by-side measurement
    return {"iteration": it, "aimed_ms": round(aim, 5),
            "predicted_ms": table.predict_ms(widths), "dense_ms": d,
            "pruned_ms": p, "speedup": d / p, "goal_ms": goal, "met": p <= goal,
            "widths": dict(zip(table.names, widths, strict=True)),
            "dense_quartiles_ms": [t["dense"]["q1_ms"], t["dense"]["q3_ms"]],
            "pruned_quartiles_ms": [t["pruned"]["q1_ms"], t["pruned"]["q3_ms"]]}


def _missed_by(attempt: dict, target: Target) -> dict:
    """How far the measured model is from the target."""
    out = {"ms": attempt["pruned_ms"] - attempt["goal_ms"],
           "share": attempt["pruned_ms"] / attempt["goal_ms"] - 1}
    if target.speedup is not None:
        out["speedup"] = target.speedup - attempt["speedup"]
    return out




def prune_round_to_latency(model: nn.Module, spec: PruneSpec, example: torch.Tensor,
                           table: LatencyTable, goal_ms: float, dense_ids: dict[str, list[int]],
                           seed: int = 0) -> list[int]:
    """One round of iterative pruning toward a time: each group narrowed (never widened) to
    the widths that keep the most importance, scored on the current weights, within the
    predicted `goal_ms`. `dense_ids` (group name -> the dense indices of its current
    channels) is updated. Returns the widths by group index of the table."""
    shape = output_shape(model, example)
    dg = build_graph(model, example)
    groups = {g.name: g for g in required(candidate_groups(model, dg, spec), spec)}
    ordered = [groups[n] for n in table.names]
    for g in ordered:
        g.dense_ids = list(dense_ids.get(g.name, range(g.channels)))
    current = [g.channels for g in ordered]
    scores = group_scores(spec, ordered, seed)
    kept = [kept_importance(s, [w for w in c if w <= cur] or [cur])
            for s, c, cur in zip(scores, table.candidates, current, strict=True)]
    for k, cur in zip(kept, current, strict=True):
        k.setdefault(cur, max(k.values()))
    widths = search_widths(table, kept, table.sum_for(goal_ms), upper=current)
    selection = {gi: lowest(s, cur - w, g.channel_groups)
                 for gi, (g, s, cur, w) in enumerate(zip(ordered, scores, current, widths,
                                                         strict=True)) if w < cur}
    apply_selection(dg, ordered, selection)
    forward_check(model, example, shape, spec.policy)
    for g in ordered:
        dense_ids[g.name] = list(g.dense_ids)
    return widths


__all__ = ["LatencyResult", "Target", "calibrated", "end_to_end", "group_scores",
           "latency_table", "prune_round_to_latency", "prune_to_latency", "prune_widths"]
