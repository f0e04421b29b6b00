"""sensitivity: how much each layer tolerates pruning alone (Li et al. 2017, Fig. 2 and 6).

For every prunable group (the groups a prune stage with the same `policy`, `include`,
`skip` and `skip_downsample` would prune, named and numbered as there) and every ratio in
`ratios`, that group alone is pruned by the criterion on a copy of the input model and
evaluated, without training, on the validation split (`data.val_split`; the test set when
there is none, with a warning). Files:

  sensitivity.csv   group, layer_number, convs, ratio, width_before, width_after, macs
                    (the whole model's, with that group pruned), top1, top5, loss
  sensitivity.png   top-1 against ratio, one curve per layer (the L1 paper's figure)
  suggested.yaml    layer_ratios and skip: with `tolerance`, per group the largest swept
                    ratio whose top-1 drop (and that of every smaller ratio) stays within
                    it, groups that cannot keep even the smallest ratio skipped; with
                    `target_macs_reduction`, the least-sensitive allocation that reaches
                    it: the smallest tolerance whose allocation removes the share of MACs
                    (the MACs each group's ratio saves alone, added up)

A prune stage takes the result with `layer_ratios_from: <this stage>`. The sweep is
resumable per group: sensitivity.csv is rewritten after each group, and a restarted stage
skips the groups whose rows are all there. The stage hands its input model on unchanged.

Under torchrun the groups are shared out among the ranks (rank r sweeps every world-th
group), each rank pruning and evaluating its groups on the whole split, and the rows are
gathered after each round of groups; rank 0 alone reads the files a resume depends on
(sensitivity.csv, precision.json) and its view is broadcast.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml

from pipeline import distributed as D
from pipeline.atomic import atomic_copy, atomic_open, atomic_write_text
from pipeline.config import MAX_BATCH, ConfigError, Invalid, Loader, opt, parse_yaml, read_text
from pipeline.data import build_data
from pipeline.models import count_macs
from pipeline.precision import AUTO, Decision, decide_inference
from pipeline.provenance import record_stage_precision
from pipeline.pruning import PruneSpec, PruningError, build_graph, candidate_groups, prune_model
from pipeline.pruning.criteria import CRITERIA
from pipeline.pruning.spec import FPGMConfig
from pipeline.replay import PrefixReplay
from pipeline.rundir import MODEL_FILE
from pipeline.runspec import RunConfig
from pipeline.trainer import evaluate

from .base import Stage, StageBase, StageContext, tensor_core_round_to
from .registry import register, stage_of

log = logging.getLogger("pipeline")

CSV_FILE, PNG_FILE, SUGGESTED_FILE = "sensitivity.csv", "sensitivity.png", "suggested.yaml"
DECISION_FILE = "precision.json"  # what precision auto chose for the sweep (kept on resume)
FIELDS = ["group", "layer_number", "convs", "ratio", "width_before", "width_after", "macs",
          "top1", "top5", "loss"]
DEFAULT_RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


@dataclass
class Config(StageBase):
    type: str = opt("sensitivity", "stage kind")
    method: Literal[tuple(CRITERIA)] = opt(  # type: ignore[valid-type]
        "fpgm", f"criterion: {' | '.join(CRITERIA)}")
    ratios: list[float] = opt(list(DEFAULT_RATIOS), "ratios each group is pruned at, alone",
                              gt=0, lt=1)
    policy: Literal["block_internal", "all"] = opt(
        "block_internal", "which groups are swept, as the prune stage's policy")
    include: list[int | str] = opt([], "only sweep these layers (names, globs, numbers)")
    skip: list[int | str] = opt([], "never sweep these layers (names, globs, numbers)")
    skip_downsample: bool = opt(False, "leave out groups with a downsample/shortcut projection")
    round_to: int | None = opt(None, "the prune stage's round_to (unset: 8 on CUDA in "
                               "fp16/bf16, else none; 0: none)", min=0)
    round_mode: Literal["down", "nearest"] = opt("down", "the prune stage's round_mode")
    tolerance: float = opt(1.0, "suggested.yaml: the top-1 drop (points) a layer may cost at "
                           "its suggested ratio", min=0, max=100)
    target_macs_reduction: float | None = opt(
        None, "suggested.yaml: instead of the tolerance, the least-sensitive allocation that "
        "removes this share of the MACs", gt=0, lt=1)
    eval_batch_size: int = opt(256, "batch size of the evaluations", min=1,
                               limit=MAX_BATCH)
    channels_last: bool = opt(True, "evaluate in the NHWC memory format (faster convolutions "
                              "on CPUs)")
    replay_memory_gb: float = opt(
        2.0, "memory (GiB) the sweep may hold for the dense model's activations at the "
        "input of the block being swept, so that the layers before it are computed once per "
        "block instead of once per ratio (0: off; pipeline/replay.py)", min=0)
    seed: int | None = opt(None, "seed of the random criterion (default: the run's seed)",
                           min=0)

    def validate(self) -> None:
        if not self.ratios:
            raise Invalid("ratios", "give at least one ratio")
        self.ratios = sorted(set(float(r) for r in self.ratios))


def prune_spec(spec: Config, ratio: float, group: str | None = None,
               round_to: int | None = None) -> PruneSpec:
    """The prune spec that removes `ratio` of group `group` alone (all swept groups: None),
    `round_to` the spec's effective one (default: as set)."""
    return PruneSpec(method=spec.method, ratio=ratio, fpgm=FPGMConfig(), policy=spec.policy,
                     include=[group] if group else list(spec.include),
                     skip=[] if group else list(spec.skip),
                     skip_downsample=spec.skip_downsample,
                     round_to=spec.round_to if round_to is None else round_to,
                     round_mode=spec.round_mode, seed=spec.seed)


@register
class Sensitivity(Stage):
    """Prune each group alone at every ratio and evaluate on the validation split."""

    kind = "sensitivity"
    Config = Config
    needs_input = True
    suggests_layer_ratios = True  # a prune stage may read its suggested.yaml

    def plan_entry(self, spec: Config, name: str, run: RunConfig) -> dict:
        split = "val" if run.data.val_split else "test (no data.val_split)"
        return dict(method=spec.method, ratios=spec.ratios, policy=spec.policy,
                    tolerance=spec.tolerance, target_macs_reduction=spec.target_macs_reduction,
                    split=split)

    def plan_lines(self, entry: dict) -> list[str]:
        goal = (f"target MAC reduction {entry['target_macs_reduction']}"
                if entry["target_macs_reduction"] is not None
                else f"tolerance {entry['tolerance']:g} top-1 points")
        return [f"    {entry['method']} each group alone at ratios "
                f"{', '.join(f'{r:g}' for r in entry['ratios'])}, policy {entry['policy']}",
                f"    evaluated on {entry['split']}; suggested.yaml by {goal}"]

    def run(self, spec: Config, ctx: StageContext) -> dict:
        return _run(spec, ctx)


# --------------------------------------------------------------------------- the sweep


def _run(spec: Config, ctx: StageContext) -> dict:
    t0 = time.perf_counter()
    model, _ = ctx.load_input(spec.from_)
    size = ctx.input_size
    example = torch.zeros((1, *size))
    seed = ctx.run.seed if spec.seed is None else spec.seed
    round_to = tensor_core_round_to(spec.round_to, ctx.run, ctx.device.type == "cuda") or 0
    # the groups are shared out among the ranks, each evaluating on the whole split alone
    data = build_data(ctx.run.data, spec.eval_batch_size, spec.eval_batch_size, ctx.run.seed,
                      ctx.device, channels_last=spec.channels_last)
    if data.val is None and ctx.dist.is_main:
        log.warning("sensitivity: no data.val_split; evaluating on the test set")
    loader = data.select
    fmt = torch.channels_last if spec.channels_last else torch.contiguous_format

    def prepare(m: torch.nn.Module) -> torch.nn.Module:
        return m.to(ctx.device, memory_format=fmt)

    decision = _precision(ctx, model, loader, prepare)
    precision = decision.precision if decision else ctx.run.precision
    sweep = _Sweep(spec, model, example, seed, round_to, loader, ctx.device, precision,
                   prepare)
    base = sweep.score(model)
    dense_macs = count_macs(model, size)["total"]
    groups = candidate_groups(model, build_graph(model, example),
                              prune_spec(spec, 0.5, round_to=round_to))
    if not groups:
        raise PruningError(f"stage '{ctx.name}': no channel group passes policy "
                           f"{spec.policy!r} and the include/skip lists")
    names = [g.name for g in groups]
    rows = _resumed_rows(ctx, spec, names, len(groups))
    done = {r["group"] for r in rows}
    per_rank = _sweep_shared(ctx, sweep, [g for g in groups if g.name not in done], rows, names)
    rows = sorted(rows, key=lambda r: (names.index(r["group"]), r["ratio"]))
    suggested = suggest(rows, base["top1"], dense_macs, spec.tolerance, spec.target_macs_reduction)
    if ctx.dist.is_main:
        ctx.stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(ctx.stage_dir / SUGGESTED_FILE, suggested_yaml(suggested, spec, base))
        plot(rows, base["top1"], ctx.stage_dir / PNG_FILE, spec.method, loader_split(data))
        atomic_copy(ctx.input_path(spec.from_), ctx.stage_dir / MODEL_FILE)
    return {"top1": None, "top5": None, "base_top1": base["top1"], "base_top5": base["top5"],
            "split": loader_split(data), "split_images": loader.n, "macs": dense_macs,
            "groups": len(groups), "ratios": spec.ratios, "epochs": 0,
            "suggested": suggested, "replayed": sum(r for _, r in per_rank),
            "pairs_per_rank": [n for n, _ in per_rank], "precision": precision,
            "precision_decision": decision.as_dict() if decision else None,
            "stage_seconds": time.perf_counter() - t0}


class _Sweep:
    """One rank's evaluations: a group pruned alone at every ratio, scored on the whole
    split without a collective (by replay where it can)."""

    def __init__(self, spec: Config, model: torch.nn.Module, example: torch.Tensor, seed: int,
                 round_to: int, loader, device: torch.device, precision: str, prepare):
        self.spec, self.model, self.example, self.seed = spec, model, example, seed
        self.round_to, self.loader, self.device = round_to, loader, device
        self.precision, self.prepare, self.replayed = precision, prepare, 0
        self.replay = PrefixReplay(model, loader, device, precision,
                                   spec.replay_memory_gb * 2**30, prepare, local=True) \
            if spec.replay_memory_gb > 0 else None

    def score(self, m: torch.nn.Module) -> dict:
        return evaluate(self.prepare(copy.deepcopy(m)), self.loader, self.device,
                        self.precision, reduce=False)

    def group_rows(self, g) -> list[dict]:
        size = tuple(self.example.shape[1:])
        new = []
        for ratio in self.spec.ratios:
            pruned = copy.deepcopy(self.model)
            report = prune_model(pruned, prune_spec(self.spec, ratio, g.name, self.round_to),
                                 self.example, seed=self.seed)
            (layer,) = [x for x in report.layers if x["name"] == g.name] or [None]
            after = layer["after"] if layer else g.channels
            m = self.replay.evaluate(pruned) if self.replay is not None else None
            self.replayed += m is not None
            m = m or self.score(pruned)
            new.append({"group": g.name, "layer_number": g.number, "convs": " ".join(g.convs),
                        "ratio": ratio, "width_before": g.channels, "width_after": after,
                        "macs": count_macs(pruned, size)["total"], "top1": m["top1"],
                        "top5": m["top5"], "loss": m["test_loss"]})
        return new


def _resumed_rows(ctx: StageContext, spec: Config, names: list[str], total: int) -> list[dict]:
    """The rows of the groups an interrupted sweep completed, as rank 0 reads them (a stale
    view on another node must not make the ranks sweep different groups)."""
    rows = D.decide(lambda: read_rows(ctx.stage_dir / CSV_FILE))
    done = {g for g in {r["group"] for r in rows}
            if {r["ratio"] for r in rows if r["group"] == g} == set(spec.ratios)}
    rows = [r for r in rows if r["group"] in done and r["group"] in names]
    if done:
        log.info("sensitivity: %d of %d group(s) already swept; resuming", len(done), total)
    return rows


def _sweep_shared(ctx: StageContext, sweep: _Sweep, todo: list, rows: list[dict],
                  names: list[str]) -> list[tuple[int, int]]:
    """Sweep the groups `todo`, rank r taking the r-th of every `world` in a row, gathering
    each such chunk's rows on every rank (appended to `rows`; rank 0 rewrites the CSV after
    each: a restart skips what is there). Returns per rank (pairs swept, replayed)."""
    world, rank = ctx.dist.world_size, ctx.dist.rank
    swept = 0
    for k in range(0, len(todo), world):
        chunk = todo[k:k + world]
        mine = sweep.group_rows(chunk[rank]) if rank < len(chunk) else []
        swept += len(mine)
        for g, new in zip(chunk, D.all_gather_object(mine), strict=False):
            rows += new
            worst = min(r["top1"] for r in new)
            log.info("sensitivity: %s (layer %s): top-1 %.2f at %g .. %.2f at %g", g.name,
                     g.number, new[0]["top1"], new[0]["ratio"], worst, new[-1]["ratio"])
        if ctx.dist.is_main:
            write_rows(ctx.stage_dir / CSV_FILE,
                       sorted(rows, key=lambda r: (names.index(r["group"]), r["ratio"])))
    return D.all_gather_object((swept, sweep.replayed))


def _precision(ctx: StageContext, model: torch.nn.Module, loader,
               prepare) -> Decision | None:
    """The sweep's precision under a run-level `precision: auto` (None: the run's own): the
    faster of fp32 and bf16 forward passes on the first evaluation batch
    (`decide_inference`), kept in the stage folder so that a resumed sweep evaluates its
    remaining groups in the same precision. Rank 0 alone reads or writes that file and
    decides; every rank takes its decision (a broadcast every rank always joins)."""
    if ctx.run.precision != AUTO:
        return None
    decision = None
    if ctx.dist.is_main:
        path = ctx.stage_dir / DECISION_FILE
        decision = _stored_decision(path, ctx.name)
        if decision is None:
            x = next(iter(loader), (None,))[0]
            decision = decide_inference(prepare(copy.deepcopy(model)), x, ctx.device)
            log.info("stage %s: %s", ctx.name, decision.describe())
            ctx.stage_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(decision.as_dict()))
            record_stage_precision(ctx.run_dir, ctx.name, decision.as_dict())
    return Decision.from_dict(D.broadcast_object(decision.as_dict() if decision else None))


def _stored_decision(path: Path, stage: str) -> Decision | None:
    """The decision a sweep that started before took (None: none, or unreadable)."""
    if not path.is_file():
        return None
    try:
        decision = Decision.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError):
        return None  # unreadable: decide afresh
    log.info("stage %s: precision %s (decided when the sweep started)", stage, decision.label)
    return decision


def loader_split(data) -> str:
    return data.select_split


def read_rows(path: Path) -> list[dict]:
    """The rows of a sensitivity.csv (numbers parsed; [] when absent or unreadable)."""
    if not path.is_file():
        return []
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            try:
                out.append({"group": r["group"],
                            "layer_number": int(r["layer_number"]) if r["layer_number"] else None,
                            "convs": r["convs"], "ratio": float(r["ratio"]),
                            "width_before": int(r["width_before"]),
                            "width_after": int(r["width_after"]), "macs": int(r["macs"]),
                            "top1": float(r["top1"]), "top5": float(r["top5"]),
                            "loss": float(r["loss"])})
            except (KeyError, ValueError, TypeError):
                continue  # a half-written row
    return out


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})


# --------------------------------------------------------------------------- the suggestion


def allowed_ratio(curve: list[tuple[float, float]], base_top1: float, tol: float) -> float | None:
    """The largest ratio of `curve` ((ratio, top1), sorted by ratio) such that it and every
    smaller ratio lose at most `tol` top-1 points against `base_top1`; None when even the
    smallest loses more."""
    best = None
    for ratio, top1 in curve:
        if base_top1 - top1 > tol + 1e-9:
            break
        best = ratio
    return best


def _allocation(curves: dict[str, list], base_top1: float, tol: float) -> dict[str, float | None]:
    return {g: allowed_ratio([(r["ratio"], r["top1"]) for r in c], base_top1, tol)
            for g, c in curves.items()}


def _saved(curves: dict[str, list], alloc: dict[str, float | None], dense_macs: int) -> int:
    return sum(dense_macs - next(r["macs"] for r in curves[g] if r["ratio"] == ratio)
               for g, ratio in alloc.items() if ratio is not None)


def suggest(rows: list[dict], base_top1: float, dense_macs: int, tolerance: float,
            target_macs_reduction: float | None = None) -> dict:
    """suggested.yaml's content from the sweep (see the module docstring):
    {"layer_ratios": {group: ratio}, "skip": [group], "tolerance", "predicted_mac_reduction",
    "reached"}. With a target, the tolerance is the smallest top-1 drop in the sweep whose
    allocation saves the target share of `dense_macs` (single-layer savings added up);
    when none does, the allocation of the largest drop, `reached` false."""
    curves: dict[str, list] = {}
    for r in sorted(rows, key=lambda r: r["ratio"]):
        curves.setdefault(r["group"], []).append(r)
    tol = tolerance
    reached = None
    if target_macs_reduction is not None:
        drops = sorted({max(0.0, base_top1 - r["top1"]) for r in rows} | {0.0})
        want = target_macs_reduction * dense_macs
        tol, reached = drops[-1], False
        for d in drops:
            if _saved(curves, _allocation(curves, base_top1, d), dense_macs) + 1e-6 >= want:
                tol, reached = d, True
                break
    alloc = _allocation(curves, base_top1, tol)
    saved = _saved(curves, alloc, dense_macs)
    return {"layer_ratios": {g: r for g, r in alloc.items() if r is not None},
            "skip": [g for g, r in alloc.items() if r is None],
            "tolerance": round(float(tol), 6),
            "predicted_mac_reduction": round(saved / max(dense_macs, 1), 6),
            "target_macs_reduction": target_macs_reduction, "reached": reached}


def suggested_yaml(s: dict, spec: Config, base: dict) -> str:
    how = (f"the least-sensitive allocation reaching a {spec.target_macs_reduction:g} MAC "
           f"reduction (tolerance {s['tolerance']:g})" if spec.target_macs_reduction is not None
           else f"a top-1 drop of at most {s['tolerance']:g} points per layer")
    head = (f"# suggested by a {spec.method} sensitivity sweep (base top-1 {base['top1']:.2f}): "
            f"{how};\n# predicted MAC reduction {s['predicted_mac_reduction']:.3f} (layers' "
            "savings added up). Use with a prune stage's layer_ratios_from.\n")
    body = {"policy": spec.policy, "layer_ratios": s["layer_ratios"], "skip": s["skip"],
            "tolerance": s["tolerance"], "predicted_mac_reduction": s["predicted_mac_reduction"]}
    if spec.target_macs_reduction is not None:
        body.update(target_macs_reduction=spec.target_macs_reduction, reached=s["reached"])
    return head + yaml.safe_dump(body, sort_keys=False)


@dataclass
class Suggested:
    """suggested.yaml as a prune stage's `layer_ratios_from` reads it (strictly: the file
    may have been edited by hand)."""

    policy: Literal["block_internal", "all"] | None = opt(None, "the sweep's policy")
    layer_ratios: dict[str, float] = opt({}, "ratio per swept group, each in (0, 1)")
    skip: list[int | str] = opt([], "groups left unpruned (names, globs or layer numbers)")
    tolerance: float | None = opt(None, "the top-1 drop allowed per layer", min=0, max=100)
    predicted_mac_reduction: float | None = opt(None, "the sweep's prediction", min=0, max=1)
    target_macs_reduction: float | None = opt(None, "the sweep's target", gt=0, lt=1)
    reached: bool | None = opt(None, "whether the target was reached")

    def validate(self) -> None:
        for group, ratio in self.layer_ratios.items():
            if not 0 < ratio < 1:
                raise Invalid(f"layer_ratios.{group}", f"expected a number in (0, 1), got "
                              f"{ratio:g}")
        for item in self.skip:
            if isinstance(item, int) and item < 1:
                raise Invalid("skip", f"layer numbers start at 1, got {item}")


def read_suggested(stage_dir: Path) -> dict:
    """A completed sensitivity stage's suggested.yaml ({} when absent); a malformed one
    (bad YAML, not a mapping, a ratio that is not a number in (0, 1), a `skip` that is not
    a list) is a ConfigError naming the file and the key."""
    path = Path(stage_dir) / SUGGESTED_FILE
    if not path.is_file():
        return {}
    data = parse_yaml(read_text(path, SUGGESTED_FILE), path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: (top level): expected a mapping with layer_ratios and "
                          f"skip, got {type(data).__name__}")
    return dataclasses.asdict(Loader(str(path)).load(Suggested, data, ""))


# --------------------------------------------------------------------------- the figure


def plot(rows: list[dict], base_top1: float, path: Path, method: str, split: str) -> None:
    import matplotlib  # lazy: only this stage draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list] = {}
    for r in rows:
        curves.setdefault(r["group"], []).append(r)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    cmap = plt.get_cmap("viridis")
    for i, (g, c) in enumerate(curves.items()):
        c = sorted(c, key=lambda r: r["ratio"])
        label = f"{c[0]['layer_number']}: {g}" if c[0]["layer_number"] else g
        ax.plot([0.0] + [r["ratio"] for r in c], [base_top1] + [r["top1"] for r in c],
                marker="o", ms=3, lw=1, color=cmap(i / max(len(curves) - 1, 1)), label=label)
    ax.axhline(base_top1, color="gray", ls=":", lw=1)
    ax.set_xlabel("share of the layer's filters pruned (that layer alone)")
    ax.set_ylabel(f"top-1 on {split} (%), no retraining")
    ax.set_title(f"pruning sensitivity ({method})")
    ax.legend(fontsize=6, ncol=2 if len(curves) > 14 else 1, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)


def check_layer_ratios_from(spec, name: str, run: RunConfig, loader: Loader) -> None:
    """A prune (or iterative) stage's `layer_ratios_from`: an earlier sensitivity stage, with
    the same policy, and no conflicting keys."""
    src = getattr(spec, "layer_ratios_from", None)
    if src is None:
        return
    names = list(run.stages)
    key = f"stages.{name}.layer_ratios_from"
    if src not in names[:names.index(name)]:
        loader.fail(key, f"{src!r} names no earlier stage")
    other = run.stages[src]
    if not getattr(stage_of(other), "suggests_layer_ratios", False):
        loader.fail(key, f"stage {src!r} is a {other.type} stage; expected a sensitivity stage")
    if spec.layer_ratios or getattr(spec, "target_macs_reduction", None) is not None \
            or getattr(spec, "global_ranking", False):
        loader.fail(key, "takes the ratios from the sensitivity stage: leave layer_ratios, "
                    "target_macs_reduction and global_ranking unset")
    if spec.policy != other.policy:
        loader.fail(key, f"policy {spec.policy!r} differs from stage {src!r}'s "
                    f"{other.policy!r} (the suggested ratios name its groups)")


def with_suggested(spec, ctx: StageContext):
    """`spec` with layer_ratios and skip from its `layer_ratios_from` stage's suggested.yaml."""
    src = getattr(spec, "layer_ratios_from", None)
    if src is None:
        return spec
    s = D.decide(lambda: read_suggested(ctx.run_dir / src))  # rank 0's reading, everywhere
    if not s:
        raise PruningError(f"stage '{ctx.name}': layer_ratios_from {src!r} has no "
                           f"{SUGGESTED_FILE} ({ctx.run_dir / src}): run `python -m pipeline "
                           f"run {ctx.source} --stage {src}` first")
    ratios = dict(s["layer_ratios"])
    if not ratios:
        raise PruningError(f"stage '{ctx.name}': {ctx.run_dir / src / SUGGESTED_FILE} prunes "
                           "no layer (every layer exceeds the tolerance)")
    # only the swept groups with a suggested ratio are pruned (the others keep their width)
    return dataclasses.replace(spec, layer_ratios=ratios, include=list(ratios),
                               skip=list(spec.skip) + list(s["skip"]))
