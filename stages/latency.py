"""Latency targets in the stages that prune (prune, iterative): the keys' checks before any
work, the plan's predicted latency, the measured pruning and its record (`latency.json`).

The work itself is `pipeline.pruning.latency`; this module connects it to a stage: which
cache folder it may use, which rank measures, and what the summary and plan show."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pipeline import distributed as D
from pipeline.atomic import atomic_write_text
from pipeline.pruning import PruneSpec, PruningError, build_graph, candidate_groups
from pipeline.pruning.latency import (
    LatencyConfig,
    TableCache,
    Target,
    backend_problem,
    end_to_end,
    latency_table,
    prune_to_latency,
    prune_widths,
    search_widths,
    user_cache_dir,
)
from pipeline.pruning.latency.prune import (
    calibrated,
    group_scores,
    prune_round_to_latency,
)
from pipeline.pruning.latency.search import check_reachable, kept_importance
from pipeline.pruning.prune import gradient_refresher

from .base import Preflight, StageContext

log = logging.getLogger("pipeline")

LATENCY_FILE = "latency.json"
CACHE_FOLDER = "latency_cache"  # in the run directory (latency.cache: run)


def measured(spec: Any) -> bool:
    """Whether the stage's widths come from measured times (a latency target or
    round_to: auto)."""
    return spec.has_latency_target or getattr(spec, "round_to", None) == "auto"


def target_of(spec: Any) -> Target:
    return Target(speedup=spec.target_speedup, latency_ms=spec.target_latency_ms)


def check_backend(spec: Any, name: str, pf: Preflight) -> None:
    """A runtime that cannot run here (no tensorrt, no CUDA provider, no GPU) is a config
    error naming the `latency` key at fault."""
    if not measured(spec):
        return
    problem = backend_problem(spec.latency_config())
    if problem:
        field = problem.split()[0].rstrip(":")
        field = field if field in ("backend", "device", "precision", "channels_last") \
            else "backend"
        pf.fail(f"stages.{name}.latency.{field}", problem)


def table_cache(cfg: LatencyConfig, run_dir: Path, write: bool = True) -> TableCache:
    """Where measured entries are kept: <run dir>/latency_cache (`cache: run`), the user's
    cache folder (`user`) or nowhere (`none`); a dry run writes no run directory."""
    if cfg.cache == "none":
        return TableCache(None, cfg)
    if cfg.cache == "user":
        return TableCache(user_cache_dir(), cfg)
    return TableCache(run_dir / CACHE_FOLDER, cfg, write=write)


def predict(spec: Any, name: str, pf: Preflight, model: nn.Module) -> tuple[nn.Module, dict]:
    """The plan's prediction for a latency target: the table (measured now, or read from
    the cache), the widths the search picks on the model's (random) weights with the cheap
    l1 scores, and their predicted time next to the dense model's measured one."""
    cfg = spec.latency_config()
    size = tuple(pf.input_size)
    example = torch.zeros((1, *size))
    pspec = _prune_spec(spec, "l1")
    try:
        table, groups = latency_table(model, pspec, example, size, cfg,
                                      table_cache(cfg, pf.run.run_dir, write=False))
        dense_ms = calibrated(table, model, pspec, example, size, cfg)
        widths = table.dense
        if spec.has_latency_target:
            goal = target_of(spec).goal_ms(dense_ms)
            scores = group_scores(pspec, groups, pf.run.seed)
            kept = [kept_importance(s, c) for s, c in zip(scores, table.candidates,
                                                          strict=True)]
            widths = search_widths(table, kept, table.sum_for(goal))
    except PruningError as err:
        pf.fail(f"stages.{name}.{err.key or 'target_speedup'}", err.problem)
    pruned = copy.deepcopy(model)
    prune_widths(pruned, pspec, example, dict(zip(table.names, widths, strict=True)))
    ms = table.predict_ms(widths)
    return pruned, {"predicted_latency": {
        "backend": cfg.backend, "batch_size": cfg.batch_size, "device": cfg.device,
        "dense_ms": dense_ms, "ms": ms, "speedup": dense_ms / ms,
        "target_speedup": spec.target_speedup, "target_latency_ms": spec.target_latency_ms,
        "alignment": table.alignment, "table_seconds": round(table.build_seconds, 1),
        "widths": dict(zip(table.names, widths, strict=True)),
        "dense_widths": dict(zip(table.names, table.dense, strict=True))}}


def _prune_spec(spec: Any, method: str | None = None) -> PruneSpec:
    """The selection keys of a latency-targeted stage as a PruneSpec (no amount: the
    search decides the widths; round_to kept, "auto" included)."""
    return PruneSpec(method=method or spec.method, ratio=None, policy=spec.policy,
                     include=list(spec.include), skip=list(spec.skip),
                     skip_downsample=spec.skip_downsample, round_to=spec.round_to,
                     seed=spec.seed)


def prune(spec: Any, model: nn.Module, ctx: StageContext, seed: int,
          batches=None) -> tuple[nn.Module, Any, dict]:
    """Prune `model` to the stage's latency target: rank 0 measures and chooses the widths,
    every rank applies them to the same scores (identical models). Returns the pruned
    model, the pruning report and the record (latency.json)."""
    cfg = spec.latency_config()
    size = ctx.input_size
    example = torch.zeros((1, *size), device=next(model.parameters()).device)
    pspec = _prune_spec(spec)
    record = None
    if ctx.dist.is_main:
        cache = table_cache(cfg, ctx.run_dir)
        pruned, result = prune_to_latency(model, pspec, example, size, cfg, target_of(spec),
                                          cache, seed, batches)
        record = result.record
    record = D.broadcast_object(record) if ctx.dist.world_size > 1 else record
    if not ctx.dist.is_main:
        pruned = copy.deepcopy(model)
        dg_scores = _scores_by_name(pspec, pruned, example, seed, batches)
        result_report = prune_widths(pruned, pspec, example, record["widths"], dg_scores)
        return pruned, result_report, record
    return pruned, result.report, record


def _scores_by_name(pspec: PruneSpec, model: nn.Module, example: torch.Tensor, seed: int,
                    batches=None) -> dict:
    groups = candidate_groups(model, build_graph(model, example), pspec)
    gradient_refresher(model, pspec, groups, batches)()
    return {g.name: s for g, s in zip(groups, group_scores(pspec, groups, seed), strict=True)}


def aligned_round_to(spec: Any, model: nn.Module, ctx: StageContext) -> tuple[int, dict]:
    """round_to: auto with a ratio: the alignment the staircases show (rank 0 measures,
    every rank uses it), and the record of the table."""
    cfg = spec.latency_config()
    size = ctx.input_size
    record = None
    if ctx.dist.is_main:
        table, _ = latency_table(model, _prune_spec(spec, "l1"), torch.zeros((1, *size)),
                                 size, cfg, table_cache(cfg, ctx.run_dir))
        record = {"round_to": table.alignment, **_where(cfg), "table": table.describe()}
    record = D.broadcast_object(record) if ctx.dist.world_size > 1 else record
    return int(record["round_to"]), record


def measure_pair(spec: Any, dense: nn.Module, pruned: nn.Module, size: tuple[int, ...],
                 record: dict) -> dict:
    """Dense and pruned timed end to end side by side, added to `record`."""
    t = end_to_end({"dense": dense, "pruned": pruned}, size, spec.latency_config())
    d, p = t["dense"]["median_ms"], t["pruned"]["median_ms"]
    record.update(dense_ms=d, pruned_ms=p, speedup=d / p)
    return record


def write_record(ctx: StageContext, record: dict) -> None:
    """latency.json in the stage directory (rank 0)."""
    if ctx.dist.is_main:
        ctx.stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(ctx.stage_dir / LATENCY_FILE, json.dumps(record, indent=1) + "\n")


def summary_fields(record: dict) -> dict:
    """What the stage's summary (and so `compare`) keeps of the record."""
    target = record.get("target") or {}
    return {"latency": {
        "backend": record.get("backend"), "batch_size": record.get("batch_size"),
        "device": record.get("device"), "dense_ms": record.get("dense_ms"),
        "ms": record.get("pruned_ms"), "speedup": record.get("speedup"),
        "target_speedup": target.get("speedup"), "target_latency_ms": target.get("latency_ms"),
        "met": record.get("met"), "missed_by": record.get("missed_by"),
        "round_to": record.get("round_to")}}


def report_miss(name: str, record: dict) -> None:
    """A warning saying by how much a missed target was missed."""
    if record.get("met") is False:
        miss = record["missed_by"]
        tries = len(record.get("iterations") or []) or 1
        log.warning("stage '%s': latency target missed after %d iteration(s): %.4g ms "
                    "measured against %.4g ms (%.1f%% over%s)", name, tries,
                    record["pruned_ms"], record["goal_ms"],
                    100 * miss["share"], f", speedup {record['speedup']:.3f}x" if
                    "speedup" in miss else "")


class IterativeTarget:
    """An iterative stage's latency target: the table of its input model (built once, rank 0
    measures, every rank gets it), the dense time, and per round the time to reach: the
    share a_t of the schedule of the way from the dense time to the goal."""

    def __init__(self, spec: Any, ctx: StageContext, model: nn.Module):
        self.spec, self.cfg, self.size = spec, spec.latency_config(), ctx.input_size
        self.pspec = _prune_spec(spec)
        example = torch.zeros((1, *self.size))
        table = dense_ms = None
        if ctx.dist.is_main:
            table, _ = latency_table(model, self.pspec, example, self.size, self.cfg,
                                     table_cache(self.cfg, ctx.run_dir))
            dense_ms = calibrated(table, model, self.pspec, example, self.size, self.cfg)
        if ctx.dist.world_size > 1:
            table, dense_ms = D.broadcast_object((table, dense_ms))
        self.table, self.dense_ms = table, dense_ms
        self.goal_ms = target_of(spec).goal_ms(dense_ms)
        # out of reach is said before the first round trains, not at the last round
        check_reachable(table, table.sum_for(self.goal_ms))

    def round_goal(self, share: float) -> float:
        """The predicted time a round ends at: `share` of the way to the goal."""
        return self.dense_ms - share * (self.dense_ms - self.goal_ms)

    def prune_round(self, model: nn.Module, dense_ids: dict, share: float, seed: int) -> float:
        """Prune one round in place (see `prune_round_to_latency`); the predicted ms."""
        widths = prune_round_to_latency(model, self.pspec, torch.zeros((1, *self.size)),
                                        self.table, self.round_goal(share), dense_ids, seed)
        return self.table.predict_ms(widths)

    def finish(self, ctx: StageContext, dense: nn.Module, pruned: nn.Module) -> dict:
        """The last round's model against the input, end to end (rank 0), in latency.json;
        returns the summary fields (a miss is logged with its size)."""
        record = None
        if ctx.dist.is_main:
            t = end_to_end({"dense": dense, "pruned": pruned}, self.size, self.cfg)
            d, p = t["dense"]["median_ms"], t["pruned"]["median_ms"]
            goal = target_of(self.spec).goal_ms(d)
            record = {"target": {"speedup": self.spec.target_speedup,
                                 "latency_ms": self.spec.target_latency_ms},
                      **_where(self.cfg), "dense_ms": d, "pruned_ms": p, "speedup": d / p,
                      "goal_ms": goal, "met": p <= goal, "iterations": [],
                      "missed_by": None if p <= goal else {
                          "ms": p - goal, "share": p / goal - 1,
                          **({"speedup": self.spec.target_speedup - d / p}
                             if self.spec.target_speedup else {})},
                      "table": self.table.describe()}
            write_record(ctx, record)
            report_miss(ctx.name, record)
        if ctx.dist.world_size > 1:
            record = D.broadcast_object(record)
        return summary_fields(record)


def _where(cfg: LatencyConfig) -> dict:
    return {"backend": cfg.backend, "batch_size": cfg.batch_size, "device": cfg.device,
            "threads": cfg.threads, "precision": cfg.precision,
            "channels_last": cfg.channels_last, "runs": cfg.runs, "warmup": cfg.warmup}


def plan_lines(entry: dict) -> list[str]:
    """The plan's lines for a latency target: the runtime and the prediction."""
    lines = []
    lat = entry.get("latency")
    if entry.get("target_speedup") is not None or entry.get("target_latency_ms") is not None:
        goal = (f"speedup {entry['target_speedup']:g}x" if entry.get("target_speedup")
                else f"latency {entry['target_latency_ms']:g} ms")
        lines.append(f"    latency target: {goal} on {lat['backend']} ({lat['device']}, batch "
                     f"{lat['batch_size']}{_threads(lat)}), widths chosen from the measured "
                     "staircases")
    p = entry.get("predicted_latency")
    if p:
        lines.append(f"    predicted latency: {p['dense_ms']:.4g} ms -> {p['ms']:.4g} ms "
                     f"({p['speedup']:.2f}x; table built or read in {p['table_seconds']:g} "
                     f"s, measured alignment {p['alignment']})")
    elif lat and entry.get("measured"):
        lines.append("    latency: the table is measured when the stage runs (--dry-run "
                     "predicts it)")
    return lines


def _threads(lat: dict) -> str:
    return f", {lat['threads']} thread(s)" if lat.get("threads") else ""


__all__ = ["CACHE_FOLDER", "IterativeTarget", "LATENCY_FILE", "aligned_round_to", "check_backend",
           "measure_pair", "measured", "plan_lines", "predict", "prune", "report_miss",
           "summary_fields", "table_cache", "target_of", "write_record"]
