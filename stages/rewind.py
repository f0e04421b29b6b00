"""rewind: recover a pruned network by replaying the upstream training schedule (Renda et
al. 2020, "Comparing Rewinding and Fine-tuning in Neural Network Pruning").

The upstream schedule is that of the nearest training stage up the `from` chain (the
pretrain), T epochs long:

  mode lr       learning-rate rewinding: the pruned weights are retrained for `epochs` (t)
                epochs with the upstream lr of its last t epochs, epoch T - t to T,
                replayed step by step (not the lowest constant lr a finetune uses);
  mode weights  weight rewinding: the kept filters' weights (and BN statistics) are taken
                from the upstream stage's snapshot after `rewind_epoch` (the pretrain
                stage saves it, `save_epochs`, because this stage asks), and trained for
                T - rewind_epoch epochs with the upstream lr of epoch rewind_epoch to T.

The replay maps positions, not steps: step s of the rewind takes the upstream lr at epoch
start + s / steps_per_epoch, so it holds at another batch size too. Everything else of the
training (optimizer, weight decay, batch size, recipe) is this stage's own config.
`--dry-run` shows the replayed lr at every epoch.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

import torch

from pipeline import checkpoint as ckpt
from pipeline import distributed as D
from pipeline.attention import remove_heads
from pipeline.config import MAX_EPOCHS, Loader, opt
from pipeline.data.sizes import steps_per_epoch
from pipeline.models import model_from_payload
from pipeline.pruning import PruningError, remove_filters
from pipeline.runspec import RunConfig
from pipeline.schedules import ReplaySchedule, Schedule
from pipeline.trainer import TrainConfig

from . import training
from .base import StageBase, StageContext, StageInputError
from .pretrain import snapshot_path
from .registry import register, stage_of, upstream_training_stage
from .training import TrainingStage

log = logging.getLogger("pipeline")


@dataclass
class Config(StageBase, TrainConfig):
    type: str = opt("rewind", "stage kind")
    mode: Literal["lr", "weights"] = opt(
        "lr", "lr: retrain the pruned weights with the upstream schedule's last `epochs` "
        "epochs replayed; weights: start from the upstream weights at rewind_epoch (kept "
        "filters) and replay the schedule from there")
    epochs: int | None = opt(  # type: ignore[assignment]
        None, "mode lr: epochs to retrain (the replayed tail's length; required); mode "
        "weights: upstream epochs - rewind_epoch (the default; another value is an error)",
        min=1, limit=MAX_EPOCHS)
    rewind_epoch: int | None = opt(None, "mode weights: the upstream epoch whose weights are "
                                   "restored (0: the initialization)", min=0,
                                   limit=MAX_EPOCHS)


def upstream_of(run: RunConfig, name: str) -> str | None:
    return upstream_training_stage(run, name)


def start_epoch(spec: Config, up_epochs: int) -> int:
    """The upstream epoch the replay starts at."""
    if spec.mode == "weights":
        return int(spec.rewind_epoch or 0)
    return up_epochs - int(spec.epochs or 0)


@register
class Rewind(TrainingStage):
    """Retrain the pruned network with the upstream schedule replayed (lr or weight
    rewinding)."""

    kind = "rewind"
    Config = Config
    needs_input = True

    def resolved(self, spec: Config, name: str, run: RunConfig) -> Config:
        """The spec with its epochs resolved (weights mode: upstream epochs - rewind_epoch)."""
        if spec.mode == "weights" and spec.epochs is None:
            up = run.stages[upstream_of(run, name)]
            return dataclasses.replace(spec, epochs=up.epochs - int(spec.rewind_epoch or 0))
        return spec

    def upstream_schedule(self, name: str, run: RunConfig) -> Schedule | ReplaySchedule:
        """The schedule of the training stage up the `from` chain of `name`."""
        up = upstream_of(run, name)
        spec = run.stages[up]
        return stage_of(spec).schedule(spec, up, run)

    def schedule(self, spec: Config, name: str, run: RunConfig) -> ReplaySchedule:
        spec = self.resolved(spec, name, run)
        up = self.upstream_schedule(name, run)
        return ReplaySchedule(up, start_epoch(spec, up.epochs), int(spec.epochs),
                              steps_per_epoch(run.data, spec.batch_size))

    def base_lr(self, spec: Config, name: str, run: RunConfig) -> float:
        return self.schedule(spec, name, run).lr(0)

    def lr_source(self, spec: Config, name: str, run: RunConfig) -> str:
        return f"the schedule of '{upstream_of(run, name)}' replayed"

    def snapshots_wanted(self, spec: Config, name: str, run: RunConfig) -> dict[str, list[int]]:
        up = upstream_of(run, name)
        if spec.mode != "weights" or up is None:
            return {}
        return {up: [int(spec.rewind_epoch or 0)]}

    def check(self, spec: Config, name: str, run: RunConfig, loader: Loader) -> None:
        key = f"stages.{name}"
        up = upstream_of(run, name)
        if up is None:
            loader.fail(f"{key}.from", "a rewind stage replays the schedule of a training "
                        "stage up its `from` chain; there is none")
        up_epochs = run.stages[up].epochs
        if up_epochs == 0:
            loader.fail(f"{key}.from", f"the upstream stage '{up}' trains no epochs (it passes "
                        "model.pretrained on): there is no schedule to replay")
        if spec.lr is not None or spec.schedule != type(spec.schedule)():
            loader.fail(f"{key}.lr", "a rewind stage replays the upstream schedule: leave lr "
                        "and schedule unset")
        if spec.mode == "lr":
            if spec.rewind_epoch is not None:
                loader.fail(f"{key}.rewind_epoch", "is for mode: weights")
            if spec.epochs is None:
                loader.fail(f"{key}.epochs", "required for mode: lr (the replayed tail)")
            if spec.epochs > up_epochs:
                loader.fail(f"{key}.epochs", f"{spec.epochs} exceeds the {up_epochs} epochs of "
                            f"'{up}' it replays")
            return
        if spec.rewind_epoch is None:
            loader.fail(f"{key}.rewind_epoch", "required for mode: weights")
        if spec.rewind_epoch >= up_epochs:
            loader.fail(f"{key}.rewind_epoch", f"{spec.rewind_epoch} must be below the "
                        f"{up_epochs} epochs of '{up}'")
        if spec.epochs is not None and spec.epochs != up_epochs - spec.rewind_epoch:
            loader.fail(f"{key}.epochs", f"mode weights retrains {up_epochs} - "
                        f"{spec.rewind_epoch} = {up_epochs - spec.rewind_epoch} epochs; leave it "
                        "unset")
        prunes = [n for n in _chain(run, name) if stage_of(run.stages[n]).prunes]
        if len(prunes) != 1 or run.stages[name].from_ != prunes[0]:
            loader.fail(f"{key}.from", "mode weights takes the kept filters from the prune "
                        "stage it follows directly (one prune stage between it and "
                        f"'{up}')")

    def plan_entry(self, spec: Config, name: str, run: RunConfig) -> dict:
        r = self.resolved(spec, name, run)
        entry = super().plan_entry(r, name, run)
        sched = self.schedule(spec, name, run)
        entry.update(mode=spec.mode, rewind_epoch=spec.rewind_epoch,
                     upstream=upstream_of(run, name), replay_start_epoch=sched.start_epoch,
                     replayed_lr=sched.lr_by_epoch())
        entry["schedule"] = {**entry["schedule"], "type": "replay",
                             "description": sched.describe()}
        return entry

    def plan_lines(self, entry: dict) -> list[str]:
        lines = super().plan_lines(entry)
        start = entry["replay_start_epoch"]
        what = (f"weights of '{entry['upstream']}' after epoch {entry['rewind_epoch']}"
                if entry["mode"] == "weights" else "the pruned weights")
        mode = "weight" if entry["mode"] == "weights" else "lr"
        lines.insert(0, f"    {mode} rewinding: {what}, upstream lr of epochs "
                        f"{start}..{start + entry['epochs']} replayed")
        lrs = entry["replayed_lr"]
        shown = [f"{start + e}: {lr:g}" for e, lr in enumerate(lrs)]
        if len(shown) > 24:
            shown = shown[:12] + ["..."] + shown[-8:]
        lines.append(f"    replayed lr by epoch (upstream epoch: lr): {', '.join(shown)}")
        return lines

    def run(self, spec: Config, ctx: StageContext) -> dict:
        return _run(self, spec, ctx)


def _chain(run: RunConfig, name: str) -> list[str]:
    out, cur = [], run.stages[name].from_
    while cur is not None and cur not in out:
        out.append(cur)
        cur = run.stages[cur].from_
    return out


def _run(stage: Rewind, spec: Config, ctx: StageContext) -> dict:
    r = stage.resolved(spec, ctx.name, ctx.run)
    pruned, payload = ctx.load_input(spec.from_)
    arch = payload["arch"]
    up = upstream_of(ctx.run, ctx.name)
    model = pruned
    if spec.mode == "weights":
        model = rewound_weights(ctx, up, int(spec.rewind_epoch or 0), pruned, payload)
    up_sched = stage.upstream_schedule(ctx.name, ctx.run)
    start = start_epoch(r, up_sched.epochs)

    def schedule(spe: int) -> ReplaySchedule:
        return ReplaySchedule(up_sched, start, int(r.epochs), spe)

    meta = {"mode": spec.mode, "rewind_epoch": spec.rewind_epoch, "replay_start_epoch": start,
            "upstream": up}
    result = training.train(ctx, r, model, arch, schedule(1).lr(0), meta=meta,
                            schedule=schedule)
    result.update(mode=spec.mode, rewind_epoch=spec.rewind_epoch, replay_start_epoch=start,
                  upstream=up)
    return result


def rewound_weights(ctx: StageContext, up: str, epoch: int, pruned: torch.nn.Module,
                    payload: dict) -> torch.nn.Module:
    """The upstream snapshot after `epoch`, with the attention heads and the filters the
    prune stage removed removed (its `heads` and `layers` records, dense numbering)."""
    path = snapshot_path(ctx.run_dir / up, epoch)
    if not D.decide(path.is_file):  # rank 0's view, on every rank
        raise StageInputError(
            f"stage '{ctx.name}' rewinds to the weights of '{up}' after epoch {epoch} "
            f"({path}), which were not kept: re-run that stage (`python -m pipeline run "
            f"{ctx.source} --restart --stage {up}`), which keeps them now")
    snap_payload = D.read_on_rank0(lambda: ckpt.load(path))
    model = model_from_payload(snap_payload, str(path))
    record = (payload.get("meta") or {}).get("layers")
    if record is None:
        src = ctx.run.stages[ctx.name].from_
        raise PruningError(f"stage '{ctx.name}': the input {ctx.input_path(src)} carries no "
                           "record of the removed filters")
    mods = dict(model.named_modules())
    for entry in (payload.get("meta") or {}).get("heads") or []:  # heads first, as pruned
        remove_heads(mods[entry["name"]], list(entry["removed"]))
    remove_filters(model, record, torch.zeros((1, *ctx.input_size)))
    want = {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want != got:
        bad = next(k for k in want if want[k] != got.get(k))
        raise PruningError(f"stage '{ctx.name}': the rewound weights do not match the pruned "
                           f"architecture ({bad}: {got.get(bad)} vs {want[bad]})")
    log.info("weight rewinding: '%s' after epoch %d, %d pruned group(s) applied", up, epoch,
             len(record))
    return model
