"""What every stage that trains a `TrainConfig` shares: `TrainingStage` (lr, schedule,
checks and plan entry of such a stage) and `train` (data, trainer, final model and
summary)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, ClassVar

import torch.nn as nn

from pipeline import checkpoint as ckpt
from pipeline import distributed as D
from pipeline.config import Loader
from pipeline.data import build_data
from pipeline.data.sizes import steps_per_epoch
from pipeline.models import count_macs, count_params
from pipeline.precision import AUTO, eval_precision
from pipeline.provenance import record_stage_precision
from pipeline.recipes import FrozenTeacher
from pipeline.rundir import MODEL_FILE
from pipeline.runspec import RunConfig
from pipeline.schedules import LinearScaling, Schedule
from pipeline.trainer import HookBase, RunSettings, TrainConfig, Trainer

from .base import Preflight, StageContext, Trains


class TrainingStage(Trains):
    """A stage that trains (its Config includes TrainConfig)."""

    default_lr: ClassVar[float] = 0.1  # the lr when the spec sets none
    zero_epochs: ClassVar[bool] = False  # may train 0 epochs (pass model.pretrained on)

    def base_lr(self, spec: Any, name: str, run: RunConfig) -> float:
        """The peak lr the stage resolves to."""
        return spec.resolved_lr(self.default_lr)

    def lr_source(self, spec: Any, name: str, run: RunConfig) -> str:
        """Where `base_lr` comes from, in words (the plan shows it)."""
        if spec.lr is None:
            return "default"
        if isinstance(spec.lr, LinearScaling):
            return (f"linear scaling: {spec.lr.base:g} x {spec.batch_size} / "
                    f"{spec.lr.per_batch} = {_fmt(spec.lr.resolve(spec.batch_size)):g}")
        return "config"

    def schedule(self, spec: Any, name: str, run: RunConfig) -> Schedule:
        """The resolved lr schedule of the stage as configured (Scratch-B: before its MACs
        scaling)."""
        return Schedule(spec.schedule, self.base_lr(spec, name, run), spec.epochs,
                        steps_per_epoch(run.data, spec.batch_size))

    def check(self, spec: Any, name: str, run: RunConfig, loader: Loader) -> None:
        if spec.epochs != 0:
            return
        if not self.zero_epochs:
            loader.fail(f"stages.{name}.epochs", f"expected an integer >= 1 for a {spec.type} "
                        "stage, got 0")
        if not run.model.pretrained:
            loader.fail(f"stages.{name}.epochs", "0 epochs needs model.pretrained (a local "
                        "weights file to pass on instead of training)")

    def plan_entry(self, spec: Any, name: str, run: RunConfig) -> dict:
        return _training_entry(self, spec, name, run)

    def preflight(self, spec: Any, name: str, pf: Preflight) -> tuple[nn.Module | None, dict]:
        """The input model passes through; a distillation teacher must have as many
        outputs as the student."""
        model, entry = super().preflight(spec, name, pf)
        distill = getattr(spec, "distill", None)
        if distill is not None and model is not None:
            theirs = num_outputs(pf.models[distill.from_])
            ours = num_outputs(model)
            if theirs != ours:
                pf.fail(f"stages.{name}.distill.from", f"the teacher {distill.from_!r} has "
                        f"{theirs} outputs, this stage's model {ours}")
        return model, entry

    def plan_lines(self, entry: dict) -> list[str]:
        return _training_lines(entry)


def num_outputs(model: nn.Module) -> int | None:
    """The classifier's output size (its last linear layer), or None without one."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def precision_of(spec: TrainConfig, ctx: StageContext) -> str:
    """The precision an evaluation-only pass of the stage uses (auto resolved without a
    probe: `pipeline.precision.eval_precision`)."""
    return eval_precision(spec.precision or ctx.run.precision, ctx.device)


def eval_batch(spec: TrainConfig) -> int:
    return spec.eval_batch_size or max(spec.batch_size, 256)


def train(ctx: StageContext, spec: TrainConfig, model: nn.Module, arch: dict, base_lr: float,
          teacher: nn.Module | None = None, meta: dict | None = None,
          hooks: Sequence[HookBase] = (), schedule=None) -> dict:
    """Train `model` under `spec` in ctx.stage_dir; write model.pt; return the summary.
    The trainer runs the stage's `hooks` after the run's (`ctx.hooks`)."""
    return train_model(ctx, spec, model, arch, base_lr, teacher, meta, hooks, schedule)[0]


def train_model(ctx: StageContext, spec: TrainConfig, model: nn.Module, arch: dict,
                base_lr: float, teacher: nn.Module | None = None, meta: dict | None = None,
                hooks: Sequence[HookBase] = (), schedule=None) -> tuple[dict, nn.Module]:
    """`train`, also returning the trained model as model.pt holds it (the EMA when kept),
    the same on every rank: what a stage that goes on from it uses without a file read."""
    t0 = time.perf_counter()
    if teacher is None and getattr(spec, "distill", None) is not None:
        teacher, _ = ctx.load_input(spec.distill.from_)  # pretrain/scratch distill too
    if teacher is not None:
        teacher = FrozenTeacher(teacher)  # eval mode and no_grad, whatever calls .train()
    data = build_data(
        ctx.run.data, spec.batch_size, eval_batch(spec), ctx.run.seed, ctx.device,
        ctx.dist.rank, ctx.dist.world_size, spec.channels_last)
    run = RunSettings(device=ctx.device, dist=ctx.dist, seed=ctx.run.seed,
                      precision=ctx.run.precision, show_progress=ctx.show_progress,
                      tensorboard=ctx.run.logging.tensorboard)
    trainer = Trainer(model, spec, data, ctx.stage_dir, run=run, arch=arch, base_lr=base_lr,
                      teacher=teacher, meta={"stage": ctx.name, **(meta or {})},
                      hooks=[*ctx.hooks, *hooks],
                      schedule=None if schedule is None else schedule(trainer_steps(data)))
    decision = trainer.decision
    if ctx.dist.is_main and (spec.precision or ctx.run.precision) == AUTO:
        record_stage_precision(ctx.run_dir, ctx.name, decision.as_dict())
    result = trainer.fit()
    final = trainer.final_model()
    with D.together():  # rank 0 writes; a failure there stops every rank
        if ctx.dist.is_main:
            ckpt.save_model(ctx.stage_dir / MODEL_FILE, final, arch,
                            {"stage": ctx.name, **(meta or {})})
    macs = count_macs(final, data.input_size)
    return {**result, "params": count_params(final), "macs": macs["total"],
            "conv_macs": macs["conv"], "lr": base_lr, "batch_size": spec.batch_size,
            "steps_per_epoch": trainer.steps_per_epoch, "train_seconds": time.perf_counter() - t0,
            "precision": decision.precision, "channels_last": decision.channels_last,
            "precision_decision": decision.as_dict()}, final


def trainer_steps(data) -> int:
    """Steps per epoch of the training loader (what the trainer's schedule counts)."""
    return len(data.train)


def _fmt(x: float) -> float:
    return float(f"{x:.6g}")


def _training_entry(stage: TrainingStage, spec: Any, name: str, run: RunConfig) -> dict:
    sched = stage.schedule(spec, name, run)
    o, c, w = spec.optimizer, spec.schedule, spec.schedule.warmup
    spe = max(sched.steps_per_epoch, 1)
    warm = sched.warmup_steps
    optimizer = {"name": o.name, "weight_decay": o.weight_decay, "no_bias_decay": o.no_bias_decay}
    if o.name == "sgd":
        optimizer.update(momentum=o.momentum, nesterov=o.nesterov)
    else:
        optimizer.update(betas=list(o.betas), eps=o.eps)
    return dict(
        epochs=spec.epochs, batch_size=spec.batch_size, eval_every=spec.eval_every,
        steps_per_epoch=sched.steps_per_epoch, total_steps=sched.total_steps,
        precision=spec.precision or run.precision,
        lr=_fmt(sched.base_lr),
        lr_source=stage.lr_source(spec, name, run),
        optimizer=optimizer,
        schedule={"type": c.type, "milestones": c.milestones,
                  "milestone_steps": sched.milestone_steps(),
                  "gamma": c.gamma, "step_size": c.step_size, "min_lr": c.min_lr,
                  **sched.plan_keys(), "decay_axis": sched.decay_axis,
                  "warmup": {"type": w.type, "epochs": w.epochs, "steps": warm,
                             "start_lr": _fmt(sched.warmup_start()) if warm else None,
                             "target_lr": _fmt(sched.warmup_target()) if warm else None},
                  "description": sched.describe()},
        lr_by_epoch={str(ch["epoch"]): ch["lr"] for ch in sched.epoch_changes()},
        lr_changes=sched.epoch_changes(),  # the same as a list of {epoch, lr}
        lr_key_steps=[{"step": k["step"], "epoch": _fmt(k["step"] / spe),
                       "lr": _fmt(sched.lr(k["step"])), "what": k["what"]}
                      for k in sched.key_steps()],
        lowest_lr=_fmt(sched.lowest_lr()),
        decays_to_zero=sched.decays_to_zero,
        warnings=sched.warnings(),
        recipe={"label_smoothing": spec.label_smoothing, "mixup": spec.mixup,
                "cutmix": spec.cutmix, "ema_decay": spec.ema_decay,
                "distill": None if spec.distill is None else {
                    "from": spec.distill.from_, "temperature": spec.distill.temperature,
                    "alpha": spec.distill.alpha},
                "zero_init_residual": _zero_init(spec, run),
                "l1_bn": spec.sparsity.l1_bn if spec.sparsity else 0.0,
                **({"tta": spec.tta} if spec.tta != "none" else {})},
    )


def _zero_init(spec: Any, run: RunConfig) -> bool | None:
    """Whether the stage zero-inits residual BN gammas (None: it does not initialize)."""
    if not hasattr(spec, "zero_init_residual"):
        return None  # finetune starts from trained weights
    if spec.zero_init_residual is not None:
        return spec.zero_init_residual
    return run.model.zero_init_residual


def _training_lines(s: dict) -> list[str]:
    o, sch = s["optimizer"], s["schedule"]
    every = s.get("eval_every", 1)
    precision = s["precision"] + (" (decided at start)" if s["precision"] == AUTO else "")
    lines = [f"    epochs {s['epochs']}, batch {s['batch_size']} "
             f"({s['steps_per_epoch']} steps/epoch, {s['total_steps']} steps), {precision}"
             + (f", test every {every} epochs" if every > 1 else ""),
             f"    lr {s['lr']:g} ({s['lr_source']})"]
    opt_line = f"    {o['name']}"
    if o["name"] == "sgd":
        opt_line += f" momentum {o['momentum']:g}{' nesterov' if o['nesterov'] else ''},"
    opt_line += f" weight decay {o['weight_decay']:g}"
    if o["no_bias_decay"]:
        opt_line += " (none on biases/BN: every 1-D parameter)"
    lines.append(opt_line)
    lines.append(f"    schedule: {sch['description']}")
    lines.append("    lr at key steps:")
    for k in s["lr_key_steps"]:
        lines.append(f"      step {k['step']:<8} epoch {k['epoch']:<9g} lr {k['lr']:<12.6g}"
                     f"{k['what']}")
    items = list(s["lr_by_epoch"].items())
    shown = items if len(items) <= 12 else items[:6] + [("...", None)] + items[-4:]
    changes = ", ".join("..." if lr is None else f"{e}: {lr:g}" for e, lr in shown)
    lines.append(f"    lr at epoch start (where it changes): {changes}")
    if s["decays_to_zero"]:
        lines.append(f"    lowest lr {s['lowest_lr']:g} (decays to 0: a finetune after this "
                     "stage must set its lr)")
    else:
        lines.append(f"    lowest lr {s['lowest_lr']:g} (a finetune after this stage defaults "
                     "to it)")
    r = s["recipe"]
    on = [f"label smoothing {r['label_smoothing']:g}" if r["label_smoothing"] else "",
          f"mixup {r['mixup']:g}" if r["mixup"] else "",
          f"cutmix {r['cutmix']:g}" if r["cutmix"] else "",
          f"EMA {r['ema_decay']:g}" if r["ema_decay"] else "",
          (f"distill from {r['distill']['from']} (T {r['distill']['temperature']:g}, alpha "
           f"{r['distill']['alpha']:g})") if r["distill"] else "",
          "zero-init residual BN" if r["zero_init_residual"] else "",
          f"L1 sparsity {r['l1_bn']:g} on BN scales" if r.get("l1_bn") else "",
          f"{r['tta']} TTA at evaluation (reported beside plain top-1)" if r.get("tta") else ""]
    lines.append(f"    recipe: {', '.join(x for x in on if x) or 'plain'}")
    lines += [f"    warning: {w}" for w in s["warnings"]]
    if s.get("note"):
        lines.append(f"    {s['note']}")
    return lines


