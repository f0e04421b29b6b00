"""pretrain: train the dense network from initialization (or from local pretrained weights).

With `prune_during_training` the stage does soft filter pruning the FPGM/SFP way:
after every epoch (every `every_epochs`, and after the last) the criterion selects
filters on the current weights and they are zeroed; the zeroed filters keep training
and the selection is redone next time. The output model.pt keeps the dense shapes, with
the last selection zeroed and recorded in its meta (`soft_pruning`); the hard removal
happens in the downstream prune stage, which removes exactly those filters (so the MAC
and accuracy-before-recovery bookkeeping lives in one place for both ways of pruning).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import checkpoint as ckpt
from pipeline import distributed as D
from pipeline.config import MAX_EPOCHS, Loader, opt, to_plain
from pipeline.data import build_data
from pipeline.errors import PipelineError, UsageError, first_line
from pipeline.models import (
    arch_spec,
    build_model,
    count_macs,
    count_params,
    load_pretrained,
    model_from_payload,
)
from pipeline.pruning import (
    PruningError,
    SoftPruner,
    SoftPruneSpec,
    build_graph,
    candidate_groups,
    zero_pattern_record,
)
from pipeline.rundir import MODEL_FILE
from pipeline.runspec import RunConfig
from pipeline.safefs import ensure_dir
from pipeline.trainer import CallbackHook, TrainConfig, evaluate_splits

from . import training
from .base import Preflight, StageBase, StageContext
from .registry import register, stage_of
from .training import TrainingStage

log = logging.getLogger("pipeline")


@dataclass
class Config(StageBase, TrainConfig):
    type: str = opt("pretrain", "stage kind")
    zero_init_residual: bool | None = opt(
        None, "init each residual block's last BN gamma to 0 (default: model.zero_init_residual)")
    save_epochs: list[int] = opt([], "also keep the weights after these epochs (0: the "
                                 "initialization) in snapshots/epoch_N.pt, for weight rewinding; "
                                 "epochs a downstream rewind stage asks for are added", min=0,
                                 limit=MAX_EPOCHS)
    prune_during_training: SoftPruneSpec | None = opt(
        None, "soft filter pruning (FPGM/SFP): after every epoch zero the filters the criterion "
        "selects and re-select next time; a downstream prune stage removes them")


SNAPSHOT_DIR = "snapshots"


def snapshot_path(stage_dir, epoch: int):
    """Where a training stage keeps its weights after `epoch` epochs (`save_epochs`)."""
    return stage_dir / SNAPSHOT_DIR / f"epoch_{epoch}.pt"


def snapshot_epochs(spec: Config, name: str, run: RunConfig) -> list[int]:
    """`save_epochs` and every epoch a downstream stage asks this stage for."""
    wanted = set(spec.save_epochs)
    for other, s in run.stages.items():
        wanted |= set(stage_of(s).snapshots_wanted(s, other, run).get(name, []))
    return sorted(wanted)


def dense_model(ctx: StageContext, zero_init: bool) -> tuple[torch.nn.Module, dict]:
    arch = arch_spec(ctx.run.model, ctx.extra["num_classes"])
    torch.manual_seed(ctx.run.seed)
    model = build_model(arch, zero_init_residual=zero_init)
    if ctx.run.model.pretrained:
        load_pretrained(model, ctx.run.model.pretrained)  # strict; one-line CheckpointError
    return model, arch


def shaped_model(arch: dict) -> torch.nn.Module:
    """The dense network with the right shapes and constant weights, built without the
    random initialization (seconds saved on an ImageNet network): what the preflight needs.
    The weights are zeros and the BatchNorm statistics the identity, so the forward pass is
    finite; the pruned widths do not depend on the values."""
    with torch.device("meta"):
        model = build_model(arch)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.zero_()
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.fill_(1.0)
                if m.running_var is not None:
                    m.running_var.fill_(1.0)
    return model


@register
class Pretrain(TrainingStage):
    """Train the dense network (0 epochs: pass model.pretrained on)."""

    kind = "pretrain"
    Config = Config
    zero_epochs = True

    def run(self, spec: Config, ctx: StageContext) -> dict:
        return _run(self, spec, ctx)

    def check(self, spec: Config, name: str, run, loader: Loader) -> None:
        """Weight snapshots (`save_epochs`, and those a downstream stage asks for) fall
        inside the stage's training: after epoch 0 (the initialization) to epochs - 1 (the
        weights after the last epoch are model.pt)."""
        super().check(spec, name, run, loader)
        late = [e for e in spec.save_epochs if e >= spec.epochs]
        if late:
            span = (f"after epochs 0 to {spec.epochs - 1}" if spec.epochs else
                    "none: it trains no epochs")
            loader.fail(f"stages.{name}.save_epochs", f"epoch {late[0]} is not before the end "
                        f"of training: the stage trains {spec.epochs} epoch(s), so the "
                        f"snapshots it can keep are {span} (its final weights are model.pt)")

    def preflight(self, spec: Config, name: str, pf: Preflight):
        """The dense network, with model.pretrained loaded (strictly) when given; the soft
        pruning spec resolved against it."""
        arch = arch_spec(pf.run.model, pf.num_classes)
        model = shaped_model(arch)
        path = pf.run.model.pretrained
        if path and not pf.need_files and not Path(path).exists():
            pf.notes.append(f"model.pretrained {path} not found (needed to run)")
        elif path:
            try:
                load_pretrained(model, path)
            except PipelineError as err:
                pf.fail("model.pretrained", first_line(err))
        soft = spec.prune_during_training
        if soft is not None:
            try:
                SoftPruner(copy.deepcopy(model), soft, torch.zeros((1, *pf.input_size)),
                           seed=pf.run.seed)
            except PruningError as err:
                pf.fail(f"stages.{name}.prune_during_training"
                        + (f".{err.key}" if err.key else ""), err.problem)
        return model, {}


def _run(stage: Pretrain, spec: Config, ctx: StageContext) -> dict:
    lr = stage.base_lr(spec, ctx.name, ctx.run)
    zero = spec.zero_init_residual
    if zero is None:
        zero = ctx.run.model.zero_init_residual
    model, arch = dense_model(ctx, zero)
    if spec.epochs == 0:
        return _pass_on(ctx, spec, model, arch)
    hooks = _snapshot_hooks(ctx, spec, model, arch)
    soft = spec.prune_during_training
    if soft is None:
        return training.train(ctx, spec, model, arch, lr, hooks=hooks)
    meta: dict = {}
    example = torch.zeros((1, *ctx.input_size))
    pruner = SoftPruner(model, soft, example, seed=ctx.run.seed,
                        mask_gradients=soft.mask_gradients)

    def soft_prune(trainer) -> None:
        done = trainer.epoch + 1
        if done % soft.every_epochs and done != trainer.cfg.epochs:
            return
        copies = [trainer.ema.module] if trainer.ema is not None else []
        record = pruner.step(*copies)
        meta["soft_pruning"] = trainer.meta["soft_pruning"] = {
            "spec": to_plain(soft), "epoch": done, "record": record}
        log.info("soft pruning after epoch %d: %d filters zeroed in %d groups", done,
                 sum(len(e["removed"]) for e in record), len(record))

    result = training.train(ctx, spec, model, arch, lr, meta=meta,
                            hooks=[CallbackHook(after_epoch=soft_prune), *hooks])
    if "soft_pruning" not in meta:  # resumed after the last epoch: read the zeros back
        _record_from_zeros(ctx, soft)
    record = _stored_record(ctx)
    result["soft_pruned_filters"] = sum(len(e["removed"]) for e in record)
    result["soft_pruned_groups"] = len(record)
    return result


def _snapshot_hooks(ctx: StageContext, spec: Config, model: torch.nn.Module,
                    arch: dict) -> list:
    """Keep the weights after the wanted epochs (before the epoch's evaluation; the EMA
    when kept, as the stage's output); epoch 0 (the initialization) is saved now."""
    epochs = snapshot_epochs(spec, ctx.name, ctx.run)
    if not epochs:
        return []
    bad = [e for e in epochs if e >= spec.epochs]
    if bad:
        raise UsageError(f"stage '{ctx.name}': weight snapshot after epoch {bad[0]} asked for, "
                         f"but the stage trains {spec.epochs} epochs")
    log.info("stage %s keeps weight snapshots after epochs %s", ctx.name, epochs)
    first = snapshot_path(ctx.stage_dir, 0)
    if 0 in epochs and ctx.dist.is_main and not first.is_file():
        ensure_dir(first.parent)
        ckpt.save_model(first, model, arch, {"stage": ctx.name, "epoch": 0})

    def keep(trainer) -> None:
        done = trainer.epoch + 1
        if done in epochs and ctx.dist.is_main:
            path = snapshot_path(ctx.stage_dir, done)
            ensure_dir(path.parent)
            ckpt.save_model(path, trainer.final_model(), arch, {"stage": ctx.name,
                                                                "epoch": done})

    return [CallbackHook(after_epoch=keep)]


def _pass_on(ctx: StageContext, spec: Config, model: torch.nn.Module, arch: dict) -> dict:
    """0 epochs: the pretrained weights, evaluated, become this stage's output."""
    batch = training.eval_batch(spec)
    data = build_data(ctx.run.data, batch, batch, ctx.run.seed, ctx.device, ctx.dist.rank,
                      ctx.dist.world_size, spec.channels_last)
    metrics = evaluate_splits(model.to(ctx.device), data, ctx.device,
                              training.precision_of(spec, ctx), spec.tta)
    model.cpu()
    with D.together():  # rank 0 writes; a failure there stops every rank
        if ctx.dist.is_main:
            ckpt.save_model(ctx.stage_dir / MODEL_FILE, model, arch,
                            {"stage": ctx.name, "pretrained": ctx.run.model.pretrained})
    macs = count_macs(model, data.input_size)
    return {**metrics, "params": count_params(model), "macs": macs["total"],
            "conv_macs": macs["conv"], "epochs": 0, "pretrained": ctx.run.model.pretrained}


def _stored_record(ctx: StageContext) -> list[dict]:
    if not ctx.dist.is_main:
        return []
    payload = ckpt.load(ctx.stage_dir / MODEL_FILE)
    return payload["meta"].get("soft_pruning", {}).get("record", [])


def _record_from_zeros(ctx: StageContext, soft: SoftPruneSpec) -> None:
    if not ctx.dist.is_main:
        return
    path = ctx.stage_dir / MODEL_FILE
    payload = ckpt.load(path)
    model = model_from_payload(payload, str(path))
    example = torch.zeros((1, *ctx.input_size))
    groups = candidate_groups(model, build_graph(model, example), soft)
    payload["meta"]["soft_pruning"] = {"spec": to_plain(soft), "epoch": None,
                                       "record": zero_pattern_record(groups)}
    ckpt.atomic_save(payload, path)
