"""The resolved plan of a run, without running it: what `--dry-run` prints.

Steps per epoch come from the data set's size (known sizes for CIFAR and ImageNet,
counted files for an ImageFolder tree, the subset size when one is set).
"""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.schedules import Schedule

from .base import upstream_training_stage

KNOWN_TRAIN_SIZES = {"cifar10": 50000, "cifar100": 50000, "imagenet": 1281167}


def train_size(run) -> tuple[int, str]:
    """(number of training images, how it was found)."""
    d = run.data
    if d.dataset == "synthetic":
        n, how = d.synthetic.train_size, "synthetic"
    elif d.dataset in ("cifar10", "cifar100"):
        n, how = KNOWN_TRAIN_SIZES[d.dataset], "known size"
    else:
        folder = Path(d.root) / "train"
        if folder.is_dir():
            n = sum(1 for p in folder.rglob("*") if p.is_file())
            how = f"counted in {folder}"
        else:
            n, how = KNOWN_TRAIN_SIZES["imagenet"], "assumed ImageNet-1k size (folder absent)"
    if d.train_samples is not None and d.train_samples < n:
        n, how = d.train_samples, "data.train_samples"
    return n, how


def steps_per_epoch(run, batch_size: int) -> int:
    n, _ = train_size(run)
    full, rest = divmod(n, batch_size)
    return max(full + (1 if rest >= 2 else 0), 1)


def stage_lr(run, name: str) -> float:
    """The peak lr a training stage resolves to (finetune: the lowest lr upstream)."""
    from stages import REGISTRY

    spec = run.stages[name]
    return REGISTRY[spec.type].base_lr(spec, run, name)


def schedule_of(run, name: str) -> Schedule:
    spec = run.stages[name]
    return Schedule(spec.schedule, stage_lr(run, name), spec.epochs,
                    steps_per_epoch(run, spec.batch_size))


def lowest_lr_of(run, name: str | None) -> float:
    if name is None:
        raise ValueError("no upstream training stage")
    return schedule_of(run, name).lowest_lr()


def _fmt(x: float) -> float:
    return float(f"{x:.6g}")


def build_plan(run) -> dict:
    n, how = train_size(run)
    plan = {"name": run.name, "run_dir": str(run.run_dir), "seed": run.seed,
            "device": run.device, "precision": run.precision,
            "data": {"dataset": run.data.dataset, "root": run.data.root, "train_images": n,
                     "train_images_source": how},
            "model": {"arch": run.model.arch, "shortcut": run.model.shortcut,
                      "pretrained": run.model.pretrained},
            "stages": []}
    for name, spec in run.stages.items():
        entry = {"name": name, "type": spec.type, "from": spec.from_}
        if spec.type == "prune":
            entry.update(method=spec.method, ratio=spec.ratio, policy=spec.policy,
                         target_macs_reduction=spec.target_macs_reduction)
            if spec.method == "fpgm" and (spec.fpgm.norm_ratio or spec.fpgm.distance_ratio):
                entry["fpgm"] = {"norm_ratio": spec.fpgm.norm_ratio,
                                 "distance_ratio": spec.fpgm.distance_ratio}
        else:
            sched = schedule_of(run, name)
            o = spec.optimizer
            entry.update(
                epochs=spec.epochs, batch_size=spec.batch_size,
                steps_per_epoch=sched.steps_per_epoch, total_steps=sched.total_steps,
                precision=spec.precision or run.precision,
                lr=_fmt(sched.base_lr),
                lr_source=_lr_source(run, name),
                optimizer={"name": o.name, "momentum": o.momentum, "nesterov": o.nesterov,
                           "weight_decay": o.weight_decay, "no_bias_decay": o.no_bias_decay},
                schedule={"type": spec.schedule.type, "milestones": spec.schedule.milestones,
                          "gamma": spec.schedule.gamma, "step_size": spec.schedule.step_size,
                          "min_lr": spec.schedule.min_lr,
                          "warmup": {"type": spec.schedule.warmup.type,
                                     "epochs": spec.schedule.warmup.epochs,
                                     "steps": sched.warmup_steps,
                                     "start_lr": _fmt(sched.warmup_start())
                                     if sched.warmup_steps else None}},
                lr_by_epoch={str(c["epoch"]): c["lr"] for c in sched.epoch_changes()},
                lr_key_steps=_key_steps(sched),
                recipe={"label_smoothing": spec.label_smoothing, "mixup": spec.mixup,
                        "cutmix": spec.cutmix, "ema_decay": spec.ema_decay,
                        "distill": None if spec.distill is None else spec.distill.from_,
                        "zero_init_residual": getattr(spec, "zero_init_residual", None)},
            )
            if spec.type == "scratch":
                entry["budget"] = spec.budget
                if spec.budget == "B":
                    entry["note"] = ("Scratch-B: epochs and milestones are multiplied by the "
                                     "MACs ratio measured after pruning")
        plan["stages"].append(entry)
    return plan


def _lr_source(run, name: str) -> str:
    spec = run.stages[name]
    if spec.lr is None:
        if spec.type == "finetune":
            return f"lowest lr of '{upstream_training_stage(run, name)}'"
        return "default"
    if hasattr(spec.lr, "per_batch"):
        return f"linear scaling: {spec.lr.base} x {spec.batch_size} / {spec.lr.per_batch}"
    return "config"


def _key_steps(sched: Schedule) -> list[dict]:
    """lr at the steps that matter: start, warmup end, each milestone, the last step."""
    total = sched.total_steps
    steps = {0, max(total - 1, 0)}
    if sched.warmup_steps:
        steps |= {sched.warmup_steps - 1, sched.warmup_steps}
    if sched.cfg.type == "multistep":
        for m in sched.cfg.milestones:
            s = sched._steps(m)
            if s < total:
                steps |= {max(s - 1, 0), s}
    if sched.cfg.type == "cosine":
        steps.add(total // 2)
    spe = max(sched.steps_per_epoch, 1)
    return [{"step": s, "epoch": _fmt(s / spe), "lr": _fmt(sched.lr(s))}
            for s in sorted(x for x in steps if 0 <= x < max(total, 1))]


def format_text(plan: dict) -> str:
    lines = [f"run {plan['name']} -> {plan['run_dir']}  (seed {plan['seed']}, device "
             f"{plan['device']}, precision {plan['precision']})",
             f"data: {plan['data']['dataset']} ({plan['data']['train_images']} train images, "
             f"{plan['data']['train_images_source']});  model: {plan['model']['arch']}"]
    for s in plan["stages"]:
        head = f"- {s['name']} [{s['type']}]" + (f" from {s['from']}" if s["from"] else "")
        lines.append(head)
        if s["type"] == "prune":
            what = (f"ratio {s['ratio']}" if s.get("ratio") is not None
                    else f"target MAC reduction {s['target_macs_reduction']}")
            lines.append(f"    {s['method']} {what}, policy {s['policy']}")
            continue
        o = s["optimizer"]
        lines.append(f"    epochs {s['epochs']}, batch {s['batch_size']} "
                     f"({s['steps_per_epoch']} steps/epoch), {s['precision']}")
        opt_line = f"    {o['name']} lr {s['lr']} ({s['lr_source']})"
        if o["name"] == "sgd":
            opt_line += f", momentum {o['momentum']}{' nesterov' if o['nesterov'] else ''}"
        opt_line += f", weight decay {o['weight_decay']}"
        if o["no_bias_decay"]:
            opt_line += " (not on bias/BN)"
        lines.append(opt_line)
        w = s["schedule"]["warmup"]
        if w["type"] != "none":
            lines.append(f"    warmup {w['type']} {w['epochs']} epochs ({w['steps']} steps) "
                         f"from {w['start_lr']}")
        changes = ", ".join(f"epoch {e}: {lr:g}" for e, lr in s["lr_by_epoch"].items())
        if len(s["lr_by_epoch"]) > 12:
            items = list(s["lr_by_epoch"].items())
            changes = ", ".join(f"epoch {e}: {lr:g}" for e, lr in items[:6]) + ", ... , " + \
                ", ".join(f"epoch {e}: {lr:g}" for e, lr in items[-4:])
        lines.append(f"    lr at epoch start: {changes}")
        keys = ", ".join(f"step {k['step']}: {k['lr']:g}" for k in s["lr_key_steps"])
        lines.append(f"    lr at key steps: {keys}")
        if s.get("note"):
            lines.append(f"    {s['note']}")
    return "\n".join(lines)


__all__ = ["build_plan", "format_text", "lowest_lr_of", "math"]
