"""iterative: `rounds` prune-then-finetune cycles toward a final `ratio` or
`target_macs_reduction` (Zhu & Gupta 2017, "To prune, or not to prune").

The amount reached after round t of n is on the pruning `schedule`:

  linear   s_t = s_i + (s_f - s_i) t / n
  agp      s_t = s_f + (s_i - s_f) (1 - t / n)^3   (the automated gradual pruner: large
           steps first, small ones near the end)

with s_i = `initial_ratio` (0 by default) and s_f the final ratio (or MAC reduction). A
ratio is the share of each pruned group's dense width removed by then; a MAC reduction is
reached as the prune stage's `target_macs_reduction` search does, against the input's MACs.
Each round re-scores the criterion on the current (finetuned) weights, removes what the
round adds, and finetunes `finetune_epochs` at a constant `lr` (default: the lowest lr of
the upstream training stage). With `stop_below`, the run stops after the first round whose
validation top-1 falls more than that many points below the input's.

Files: round_N/ (the round's pruned.pt, its trainer checkpoints and model.pt, round.json),
rounds.csv (one row per round: widths, MACs, validation and test top-1) and model.pt, the
last round's. Exact resume: a completed round is never redone, an interrupted round
restarts from its pruned.pt and its trainer's last checkpoint (the step). Under torchrun
rank 0 reads state.json and decides whether a round resumes, and every rank continues each
round from the weights the round's model.pt holds (the EMA with `ema_decay`), so every
rank selects the same filters in the next round.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Literal

import torch

from pipeline import checkpoint as ckpt
from pipeline import distributed as D
from pipeline.atomic import atomic_copy, atomic_open, atomic_write_text
from pipeline.config import MAX_EPOCHS, Invalid, Loader, opt, to_plain
from pipeline.data import build_data
from pipeline.data.sizes import steps_per_epoch
from pipeline.models import count_macs, count_params, model_from_payload
from pipeline.pruning import PruneSpec, PruningError, build_graph, candidate_groups
from pipeline.pruning.criteria import CRITERIA
from pipeline.pruning.groups import required
from pipeline.pruning.latency.config import LatencyTargetKeys, validate_target
from pipeline.pruning.search import MacCounter
from pipeline.pruning.selection import select
from pipeline.pruning.spec import FPGMConfig
from pipeline.pruning.surgery import apply_selection, forward_check, output_shape
from pipeline.rundir import MODEL_FILE
from pipeline.runspec import RunConfig
from pipeline.safefs import ensure_dir
from pipeline.schedules import Schedule, ScheduleConfig
from pipeline.trainer import TrainConfig, evaluate_splits

from . import latency, training
from .base import Preflight, StageBase, StageContext, Trains, tensor_core_round_to
from .finetune import finetune_default_problem, lowest_lr_of
from .registry import register, upstream_training_stage

log = logging.getLogger("pipeline")

ROUNDS_FILE = "rounds.csv"
ROUND_FIELDS = ["round", "ratio", "target_macs_reduction", "macs", "mac_reduction", "params",
                "widths", "val_top1", "top1", "top5", "epochs", "time_share"]


@dataclass
class Config(StageBase, LatencyTargetKeys, TrainConfig):
    type: str = opt("iterative", "stage kind")
    epochs: int | None = opt(  # type: ignore[assignment]
        None, "leave unset: a round trains finetune_epochs", min=0, limit=MAX_EPOCHS)
    schedule: Literal["linear", "agp"] = opt(  # type: ignore[assignment]
        "agp", "the pruning schedule over the rounds: linear, or agp (Zhu & Gupta's cubic "
        "s_t = s_f + (s_i - s_f)(1 - t/n)^3)")
    rounds: int = opt(5, "prune-then-finetune cycles", min=1, limit=1000)
    finetune_epochs: int = opt(1, "finetune epochs after each round's pruning (constant lr)",
                               min=0, limit=MAX_EPOCHS)
    ratio: float | None = opt(None, "final share of each pruned group's filters (default 0.4 "
                              "unless target_macs_reduction is given)", gt=0, lt=1)
    target_macs_reduction: float | None = opt(
        None, "instead of a ratio: the final share of the input's MACs removed", gt=0, lt=1)
    initial_ratio: float = opt(0.0, "s_i: the amount the schedule starts from", min=0, lt=1)
    stop_below: float | None = opt(
        None, "stop after the first round whose validation top-1 is more than this many points "
        "below the input's (top-1 is a percentage: 0 to 100)", min=0, max=100)
    method: Literal[tuple(CRITERIA)] = opt(  # type: ignore[valid-type]
        "fpgm", f"criterion: {' | '.join(CRITERIA)}")
    policy: Literal["block_internal", "all"] = opt("block_internal", "as the prune stage's")
    include: list[int | str] = opt([], "only prune these layers (names, globs, numbers)")
    skip: list[int | str] = opt([], "never prune these layers (names, globs, numbers)")
    skip_downsample: bool = opt(False, "never prune groups with a downsample projection")
    round_to: int | Literal["auto"] | None = opt(
        None, "the prune stage's round_to (unset: 8 on CUDA in fp16/bf16, else none; 0: "
        "none; auto: the alignment measured for a latency target)", min=0)
    round_mode: Literal["down", "nearest"] = opt("down", "the prune stage's round_mode")
    target_step: float = opt(0.02, "target_macs_reduction: ratio added per search step",
                             gt=0, lt=1)
    seed: int | None = opt(None, "seed of the random criterion (default: the run's seed)",
                           min=0)

    def validate(self) -> None:
        validate_target(self.target_speedup, self.target_latency_ms, {
            "ratio": self.ratio, "target_macs_reduction": self.target_macs_reduction})
        if self.ratio is not None and self.target_macs_reduction is not None:
            raise Invalid("target_macs_reduction", "give either ratio or "
                          "target_macs_reduction, not both")
        if self.ratio is None and self.target_macs_reduction is None \
                and not self.has_latency_target:
            self.ratio = 0.4
        if self.round_to == "auto" and not self.has_latency_target:
            raise Invalid("round_to", "auto snaps to the stairs a latency target measures: "
                          "give target_speedup or target_latency_ms, or an integer")
        final = self.final
        if self.initial_ratio >= final:
            raise Invalid("initial_ratio", f"{self.initial_ratio:g} must be below the final "
                          f"amount {final:g}")

    @property
    def final(self) -> float:
        """The schedule's end: the ratio, the MAC reduction, or (a latency target) 1, all
        of the way from the input's time to the goal."""
        if self.has_latency_target:
            return 1.0
        return float(self.ratio if self.ratio is not None else self.target_macs_reduction)


def amounts(schedule: str, rounds: int, final: float, initial: float = 0.0) -> list[float]:
    """The amount reached after each round 1..n (see the module docstring)."""
    out = []
    for t in range(1, rounds + 1):
        if schedule == "agp":
            s = final + (initial - final) * (1 - t / rounds) ** 3
        else:
            s = initial + (final - initial) * t / rounds
        out.append(round(s, 10))
    return out


def prune_spec(spec: Config) -> PruneSpec:
    return PruneSpec(method=spec.method, ratio=0.5, fpgm=FPGMConfig(), policy=spec.policy,
                     include=list(spec.include), skip=list(spec.skip),
                     skip_downsample=spec.skip_downsample, round_to=spec.round_to,
                     round_mode=spec.round_mode, target_step=spec.target_step, seed=spec.seed)


@register
class Iterative(Trains):
    """Prune-then-finetune rounds on a linear or AGP schedule."""

    kind = "iterative"
    Config = Config
    needs_input = True
    prunes = True

    def base_lr(self, spec: Config, name: str, run: RunConfig) -> float:
        if spec.lr is not None:
            return spec.resolved_lr(0.0)
        return lowest_lr_of(run, upstream_training_stage(run, name))

    def schedule(self, spec: Config, name: str, run: RunConfig) -> Schedule:
        """The lr of a round's finetune: constant."""
        return Schedule(ScheduleConfig(type="constant"), self.base_lr(spec, name, run),
                        spec.finetune_epochs, steps_per_epoch(run.data, spec.batch_size))

    def check(self, spec: Config, name: str, run: RunConfig, loader: Loader) -> None:
        if spec.epochs is not None:
            loader.fail(f"stages.{name}.epochs", "an iterative stage trains finetune_epochs "
                        "per round: leave epochs unset")
        if spec.lr is None and spec.finetune_epochs and (
                problem := finetune_default_problem(run, name)):
            loader.fail(f"stages.{name}.lr", problem)

    def plan_entry(self, spec: Config, name: str, run: RunConfig) -> dict:
        lr = self.base_lr(spec, name, run) if (spec.lr is not None or spec.finetune_epochs) \
            else None
        return dict(method=spec.method, policy=spec.policy, rounds=spec.rounds,
                    pruning_schedule=spec.schedule, ratio=spec.ratio,
                    target_macs_reduction=spec.target_macs_reduction,
                    initial_ratio=spec.initial_ratio,
                    amounts=amounts(spec.schedule, spec.rounds, spec.final, spec.initial_ratio),
                    finetune_epochs=spec.finetune_epochs, epochs=spec.rounds *
                    spec.finetune_epochs, batch_size=spec.batch_size,
                    lr=lr, lr_source="config" if spec.lr is not None else
                    f"lowest lr of '{upstream_training_stage(run, name)}'",
                    stop_below=spec.stop_below,
                    **({"target_speedup": spec.target_speedup,
                        "target_latency_ms": spec.target_latency_ms,
                        "latency": to_plain(spec.latency_config())}
                       if spec.has_latency_target else {}))

    def preflight(self, spec: Config, name: str, pf: Preflight):
        """The runtime of a latency target must be there; the output is the input model
        (its widths are decided round by round)."""
        latency.check_backend(spec, name, pf)
        return pf.input_model(spec), {}

    def report_rows(self, summary: dict) -> list[dict]:
        return [{"stage": f"round_{r['round']}", "top1": r["top1"], "top5": r["top5"],
                 "val_top1": r.get("val_top1"),
                 "macs": r["macs"], "params": r["params"], "epochs": r["epochs"],
                 "ratio": r["ratio"] if r["ratio"] is not None
                 else f"MACs -{100 * r['target_macs_reduction']:.3g}%"
                 if r.get("target_macs_reduction") is not None
                 else f"time {100 * r['time_share']:.3g}% of the way"}
                for r in summary.get("rounds") or []]

    def plan_lines(self, entry: dict) -> list[str]:
        what = ("ratio" if entry["ratio"] is not None else "MAC reduction"
                if entry["target_macs_reduction"] is not None else "share of the time to the "
                "latency target")
        final = entry["ratio"] if entry["ratio"] is not None else \
            entry["target_macs_reduction"] or 1.0
        lines = [f"    {entry['rounds']} rounds of {entry['method']} toward {what} {final:g} "
                 f"({entry['pruning_schedule']}), policy {entry['policy']}",
                 f"    {what} after each round: "
                 f"{', '.join(f'{a:.4g}' for a in entry['amounts'])}"]
        lr = "n/a" if entry["lr"] is None else f"{entry['lr']:g}"
        lines.append(f"    finetune {entry['finetune_epochs']} epoch(s) per round at constant lr "
                     f"{lr} ({entry['lr_source']}), batch {entry['batch_size']}")
        if entry["stop_below"] is not None:
            lines.append(f"    stop when validation top-1 falls more than "
                         f"{entry['stop_below']:g} below the input's")
        return lines + latency.plan_lines(entry)

    def run(self, spec: Config, ctx: StageContext) -> dict:
        return _run(self, spec, ctx)


# --------------------------------------------------------------------------- one round


def prune_round(model: torch.nn.Module, pspec: PruneSpec, example: torch.Tensor,
                groups_done: GroupState, amount: float, by_macs: bool, dense_macs: int,
                seed: int) -> None:
    """Prune `model` in place up to `amount`: every group to that share of its dense width
    (`groups_done`: each group's dense width and the dense ids of its current channels,
    updated), or, `by_macs`, until the MACs have fallen by that share of `dense_macs`
    (ratio grown by target_step, re-scored each step, groups in module order within the
    last step)."""
    shape = output_shape(model, example)
    dg = build_graph(model, example)
    groups = required(candidate_groups(model, dg, pspec), pspec)
    for g in groups:
        if g.name not in groups_done.ids:
            raise PruningError(f"iterative: group {g.name} is not among the input's groups")
        g.dense_ids = list(groups_done.ids[g.name])
        g.width = groups_done.widths[g.name]
    if not by_macs:
        apply_selection(dg, groups, select(pspec, groups, seed, ratio_scale=amount))
    else:
        macs = MacCounter(model, example)
        ratio = max(1 - g.channels / g.width for g in groups)
        for step in range(1, int(math.ceil(1.0 / pspec.target_step)) + 2):
            if 1 - macs.total() / dense_macs + 1e-12 >= amount:
                break
            ratio = min(ratio + pspec.target_step, 1.0)
            selection = select(pspec, groups, seed + 7919 * step, ratio_scale=ratio)
            for gi in sorted(selection):
                apply_selection(dg, groups, {gi: selection[gi]})
                if 1 - macs.total() / dense_macs + 1e-12 >= amount:
                    break
        else:
            raise PruningError(f"target_macs_reduction {amount:g} is out of reach with policy "
                               f"{pspec.policy!r}")
    forward_check(model, example, shape, pspec.policy)
    for g in groups:
        groups_done.ids[g.name] = list(g.dense_ids)


WIDTH = "__width__"  # key prefix of a group's dense width in the stored form of GroupState


@dataclass
class GroupState:
    """The pruned groups so far: per group (by name, in module order) the dense ids of its
    remaining channels and its dense width. Stored (state.json, each round's pruned.pt) as
    one dict: name -> ids, followed by WIDTH + name -> [width]."""

    ids: dict[str, list[int]]
    widths: dict[str, int]

    @classmethod
    def dense(cls, groups) -> GroupState:
        """Every channel of every group kept."""
        return cls({g.name: list(range(g.channels)) for g in groups},
                   {g.name: g.channels for g in groups})

    @classmethod
    def from_stored(cls, stored: dict[str, list[int]]) -> GroupState:
        return cls({k: list(v) for k, v in stored.items() if not k.startswith(WIDTH)},
                   {k[len(WIDTH):]: int(v[0]) for k, v in stored.items()
                    if k.startswith(WIDTH)})

    def stored(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for name, ids in self.ids.items():
            out[name] = list(ids)
            out[WIDTH + name] = [self.widths[name]]
        return out

    def kept(self) -> dict[str, int]:
        """Each group's current width."""
        return {name: len(ids) for name, ids in self.ids.items()}


# --------------------------------------------------------------------------- the stage


@dataclass
class _Job:
    """What every round of one execution of the stage shares."""

    spec: Config
    ctx: StageContext
    arch: dict
    example: torch.Tensor
    pspec: PruneSpec
    plan: list[float]  # the amount reached after each round
    by_macs: bool
    seed: int
    lr: float
    timed: latency.IterativeTarget | None  # a latency target's table and goal


def _run(stage: Iterative, spec: Config, ctx: StageContext) -> dict:
    t0 = time.perf_counter()
    model, payload = ctx.load_input(spec.from_)
    pspec = prune_spec(spec)
    if (aligned := pspec.round_to is None and tensor_core_round_to(
            None, ctx.run, ctx.device.type == "cuda")):
        pspec = dataclasses.replace(pspec, round_to=aligned)
        log.info("iterative: kept filters rounded down to a multiple of %d (default on CUDA "
                 "with fp16/bf16; set round_to to override)", aligned)
    job = _Job(spec=spec, ctx=ctx, arch=payload["arch"],
               example=torch.zeros((1, *ctx.input_size)), pspec=pspec,
               plan=amounts(spec.schedule, spec.rounds, spec.final, spec.initial_ratio),
               by_macs=spec.target_macs_reduction is not None,
               seed=ctx.run.seed if spec.seed is None else spec.seed,
               lr=stage.base_lr(spec, ctx.name, ctx.run),
               timed=latency.IterativeTarget(spec, ctx, model)
               if spec.has_latency_target else None)
    state_path = ctx.stage_dir / "state.json"
    # rank 0 reads what a resume depends on; every rank takes its view
    state = D.decide(lambda: json.loads(state_path.read_text()) if state_path.is_file()
                     else None) or _start(job, model, state_path)
    rows: list[dict] = state["rows"]
    done = GroupState.from_stored(state["dense"])
    base_sel = state["input_val_top1"] if state["split"] == "val" else state["input_top1"]
    stopped = None
    for r in rows:  # a stop decided before an interruption stands
        if _falls(spec, r, base_sel, state["split"]):
            stopped = r["round"]
    if rows:
        last = rows[-1]["round"]
        model = _load_model(ctx.stage_dir / f"round_{last}" / MODEL_FILE)
        log.info("iterative: %d of %d round(s) done; resuming", last, spec.rounds)
    while len(rows) < spec.rounds and stopped is None:
        t = len(rows) + 1
        model, done = _pruned(job, model, done, t, state["dense_macs"])
        model, row = _recover(job, model, t, done, state["dense_macs"])
        rows.append(row)
        state["dense"] = done.stored()
        if ctx.dist.is_main:
            atomic_write_text(ctx.stage_dir / f"round_{t}" / "round.json", json.dumps(row))
            atomic_write_text(state_path, json.dumps(state))
            write_rounds(ctx.stage_dir / ROUNDS_FILE, rows)
        _log_round(job, row, state["split"])
        if _falls(spec, row, base_sel, state["split"]):
            stopped = t
            log.info("iterative: stopping after round %d (more than %g below the input's "
                     "%s top-1 %.2f)", t, spec.stop_below, state["split"], base_sel)
    if ctx.dist.is_main:
        atomic_copy(ctx.stage_dir / f"round_{rows[-1]['round']}" / MODEL_FILE,
                    ctx.stage_dir / MODEL_FILE)
    timing = {}
    if job.timed is not None:  # the input, reloaded: round 1 pruned it in place
        timing = job.timed.finish(ctx, ctx.load_input(spec.from_)[0], model)
    return {**timing, **_summary(spec, state, rows, stopped, job.lr),
            "stage_seconds": time.perf_counter() - t0}


def _evaluate(job: _Job, model: torch.nn.Module) -> tuple[dict, str]:
    """The model's metrics (test, and validation with `data.val_split`) and the split that
    selects (`val` or `test`)."""
    ctx, batch = job.ctx, training.eval_batch(job.spec)
    data = build_data(ctx.run.data, batch, batch, ctx.run.seed, ctx.device, ctx.dist.rank,
                      ctx.dist.world_size)
    metrics = evaluate_splits(model.to(ctx.device), data, ctx.device,
                              training.precision_of(job.spec, ctx))
    model.cpu()
    return metrics, data.select_split


def _start(job: _Job, model: torch.nn.Module, state_path) -> dict:
    """A first execution: the input's metrics, its groups at full width and MACs, kept in
    state.json."""
    m, split = _evaluate(job, model)
    groups = candidate_groups(model, build_graph(model, job.example), job.pspec)
    state = {"input_top1": m["top1"], "input_val_top1": m.get("val_top1"), "split": split,
             "dense_macs": count_macs(model, job.ctx.input_size)["total"],
             "dense": GroupState.dense(groups).stored(), "rows": []}
    if job.ctx.dist.is_main:
        job.ctx.stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(state_path, json.dumps(state))
    return state


def _pruned(job: _Job, model: torch.nn.Module, done: GroupState, t: int,
            dense_macs: int) -> tuple[torch.nn.Module, GroupState]:
    """Round t's pruned network: pruned now and saved as round_t/pruned.pt, or, when an
    interruption came while finetuning it, the saved one."""
    ctx, rdir = job.ctx, job.ctx.stage_dir / f"round_{t}"
    pruned_path = rdir / "pruned.pt"
    if D.decide(pruned_path.is_file):  # interrupted while finetuning: the same network
        saved = D.read_on_rank0(functools.partial(ckpt.load, pruned_path))
        return model_from_payload(saved), GroupState.from_stored(saved["meta"]["dense"])
    if job.timed is not None:  # toward the round's share of the way to the time
        job.timed.prune_round(model, done.ids, job.plan[t - 1], job.seed + 104729 * t)
    else:
        prune_round(model, job.pspec, job.example, done, job.plan[t - 1], job.by_macs,
                    dense_macs, job.seed + 104729 * t)
    if ctx.dist.is_main:
        ensure_dir(rdir)
        ckpt.save_model(pruned_path, model, job.arch, {"stage": ctx.name, "round": t,
                                                       "dense": done.stored()})
    return model, done


def _recover(job: _Job, model: torch.nn.Module, t: int, done: GroupState,
             dense_macs: int) -> tuple[torch.nn.Module, dict]:
    """Round t after its pruning: finetuned `finetune_epochs` at the constant lr (or only
    evaluated with 0), saved as round_t/model.pt; returns it and the round's row."""
    spec, ctx, rdir = job.spec, job.ctx, job.ctx.stage_dir / f"round_{t}"
    if spec.finetune_epochs:
        round_spec = dataclasses.replace(spec, epochs=spec.finetune_epochs)
        rctx = dataclasses.replace(ctx, stage_dir=rdir, name=f"{ctx.name}/round_{t}")
        _fresh_compile(spec, t)
        res, final = training.train_model(
            rctx, round_spec, model, job.arch, job.lr, meta={"round": t},
            schedule=lambda spe: stage_const(job.lr, spe, spec))
        # every rank goes on from the weights model.pt holds (the EMA with ema_decay),
        # rebuilt as a load would: the next round selects the same filters everywhere
        model = model_from_payload(ckpt.model_payload(final.cpu(), job.arch, {}))
    else:
        res, _ = _evaluate(job, model)
        if ctx.dist.is_main:
            ckpt.save_model(rdir / MODEL_FILE, model, job.arch, {"stage": ctx.name, "round": t})
    macs = count_macs(model, ctx.input_size)["total"]
    amount = job.plan[t - 1]
    timed = job.timed is not None
    row = {"round": t, "ratio": amount if not job.by_macs and not timed else None,
           "target_macs_reduction": amount if job.by_macs else None,
           "time_share": amount if timed else None,
           "macs": macs, "mac_reduction": round(1 - macs / dense_macs, 6),
           "params": count_params(model), "widths": done.kept(),
           "val_top1": res.get("val_top1"), "top1": res["top1"], "top5": res["top5"],
           "epochs": spec.finetune_epochs}
    return model, row


def _log_round(job: _Job, row: dict, split: str) -> None:
    val = f"val top-1 {_f(row['val_top1'])}, " if split == "val" else ""
    log.info("iterative round %d/%d: %s %.4g, MACs %.4g (%.1f%% fewer), %stest top-1 %.2f",
             row["round"], job.spec.rounds,
             "MAC target" if job.by_macs else "time share" if job.timed else "ratio",
             job.plan[row["round"] - 1], row["macs"], 100 * row["mac_reduction"], val,
             row["top1"])


def _summary(spec: Config, state: dict, rows: list[dict], stopped: int | None,
             lr: float) -> dict:
    """The stage's summary: the last round's numbers, every round, and the input's."""
    last = rows[-1]
    return {"top1": last["top1"], "top5": last["top5"], "val_top1": last["val_top1"],
            "params": last["params"], "macs": last["macs"], "macs_before": state["dense_macs"],
            "mac_reduction": last["mac_reduction"], "epochs": spec.finetune_epochs * len(rows),
            "rounds": rows, "rounds_done": len(rows), "stopped_after": stopped,
            "input_top1": state["input_top1"], "input_val_top1": state["input_val_top1"],
            "split": state["split"], "method": spec.method, "ratio": spec.ratio,
            "policy": spec.policy, "target_macs_reduction": spec.target_macs_reduction,
            "pruning_schedule": spec.schedule, "lr": lr}


def _load_model(path) -> torch.nn.Module:
    """A model file as rank 0 reads it, on every rank."""
    return model_from_payload(D.read_on_rank0(lambda: ckpt.load(path)), str(path))


def _fresh_compile(spec: Config, t: int) -> None:
    """Each round trains new widths: under torch.compile, start from empty dynamo caches
    instead of piling recompilations up until dynamo's limit silently runs later rounds
    eager."""
    if spec.compile and t > 1:
        torch._dynamo.reset()
        log.info("iterative round %d: new widths, torch.compile caches reset (compiled "
                 "afresh)", t)


def stage_const(lr: float, spe: int, spec: Config) -> Schedule:
    return Schedule(ScheduleConfig(type="constant"), lr, spec.finetune_epochs, spe)


def _falls(spec: Config, row: dict, base: float | None, split: str) -> bool:
    if spec.stop_below is None or base is None:
        return False
    got = row["val_top1"] if split == "val" else row["top1"]
    return got is not None and got < base - spec.stop_below


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def write_rounds(path, rows: list[dict]) -> None:
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ROUND_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({**{k: (round(v, 6) if isinstance(v, float) else v)
                           for k, v in r.items()}, "widths": json.dumps(r["widths"])})


__all__ = ["Config", "Iterative", "amounts", "prune_round"]
