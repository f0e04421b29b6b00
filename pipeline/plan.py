"""The resolved plan of a run, without running it: what `--dry-run` prints.

Steps per epoch come from the data set's size (known sizes for CIFAR and ImageNet,
counted files for an ImageFolder tree, the subset size when one is set).
"""

from __future__ import annotations

from pathlib import Path

from stages.base import upstream_training_stage

from .schedules import AFTER_WARMUP, LinearScaling, Schedule

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
    """Global batches per epoch, by the loaders' rule (a last partial batch of >= 2 counts)."""
    n, _ = train_size(run)
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 or full == 0 else 0)


def stage_lr(run, name: str) -> float:
    """The peak lr a training stage resolves to (finetune: the lowest lr upstream)."""
    from stages import REGISTRY

    spec = run.stages[name]
    return REGISTRY[spec.type].base_lr(spec, run, name)


def schedule_of(run, name: str) -> Schedule:
    """The resolved schedule of training stage `name` (Scratch-B: before its MACs scaling)."""
    spec = run.stages[name]
    return Schedule(spec.schedule, stage_lr(run, name), spec.epochs,
                    steps_per_epoch(run, spec.batch_size))


def lowest_lr_of(run, name: str | None) -> float:
    """The lowest lr of stage `name`'s decay (what a finetune after it starts from)."""
    if name is None:
        raise ValueError("no upstream training stage")
    return schedule_of(run, name).lowest_lr()


def finetune_default_problem(run, name: str) -> str | None:
    """Why stage `name` cannot default its lr to the lowest upstream lr, or None."""
    up = upstream_training_stage(run, name)
    if up is None:
        return "required: no training stage upstream to take the lowest lr from"
    if run.stages[up].epochs == 0:
        return (f"required: the upstream stage '{up}' trains no epochs (it passes "
                "model.pretrained on), so it has no lowest lr to take")
    sched = run.stages[up].schedule
    if sched.decays_to_zero:
        return (f"required: the upstream stage '{up}' decays to 0 ({sched.type}, min_lr 0), so "
                "its lowest lr is no finetune lr; set this lr or the upstream min_lr")
    return None


def _fmt(x: float) -> float:
    return float(f"{x:.6g}")


def build_plan(run) -> dict:
    """The resolved run as plain data: what `--dry-run --format json` prints."""
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
                         round_to=spec.round_to, round_mode=spec.round_mode,
                         target_macs_reduction=spec.target_macs_reduction)
            if spec.method == "fpgm" and (spec.fpgm.norm_ratio or spec.fpgm.distance_ratio):
                entry["fpgm"] = {"norm_ratio": spec.fpgm.norm_ratio,
                                 "distance_ratio": spec.fpgm.distance_ratio}
        else:
            entry.update(_training_entry(run, name, spec))
            if spec.type == "scratch":
                entry["budget"] = spec.budget
                if spec.budget == "B":
                    entry["note"] = ("Scratch-B: epochs and milestones are multiplied by the "
                                     "MACs ratio measured after pruning")
        plan["stages"].append(entry)
    return plan


def _training_entry(run, name: str, spec) -> dict:
    sched = schedule_of(run, name)
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
        lr_source=_lr_source(run, name),
        optimizer=optimizer,
        schedule={"type": c.type, "milestones": c.milestones,
                  "milestone_steps": sched.milestone_steps() if c.type == "multistep" else [],
                  "gamma": c.gamma, "step_size": c.step_size, "min_lr": c.min_lr,
                  "decay_axis": ("after warmup" if c.type in AFTER_WARMUP
                                 else "from the start of the run"),
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
                "zero_init_residual": _zero_init(run, spec)},
    )


def _zero_init(run, spec) -> bool | None:
    """Whether the stage zero-inits residual BN gammas (None: it does not initialize)."""
    if not hasattr(spec, "zero_init_residual"):
        return None  # finetune starts from trained weights
    if spec.zero_init_residual is not None:
        return spec.zero_init_residual
    return run.model.zero_init_residual


def _lr_source(run, name: str) -> str:
    spec = run.stages[name]
    if spec.lr is None:
        if spec.type == "finetune":
            return f"lowest lr of '{upstream_training_stage(run, name)}'"
        return "default"
    if isinstance(spec.lr, LinearScaling):
        return (f"linear scaling: {spec.lr.base:g} x {spec.batch_size} / {spec.lr.per_batch} "
                f"= {_fmt(spec.lr.resolve(spec.batch_size)):g}")
    return "config"


def format_text(plan: dict) -> str:
    """The plan for people: one block per stage."""
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
            if s.get("round_to"):
                what += f", kept filters rounded {s['round_mode']} to a multiple of {s['round_to']}"
            lines.append(f"    {s['method']} {what}, policy {s['policy']}")
            continue
        lines += _training_lines(s)
    return "\n".join(lines)


def _training_lines(s: dict) -> list[str]:
    o, sch = s["optimizer"], s["schedule"]
    every = s.get("eval_every", 1)
    lines = [f"    epochs {s['epochs']}, batch {s['batch_size']} "
             f"({s['steps_per_epoch']} steps/epoch, {s['total_steps']} steps), {s['precision']}"
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
          "zero-init residual BN" if r["zero_init_residual"] else ""]
    lines.append(f"    recipe: {', '.join(x for x in on if x) or 'plain'}")
    lines += [f"    warning: {w}" for w in s["warnings"]]
    if s.get("note"):
        lines.append(f"    {s['note']}")
    return lines


__all__ = ["build_plan", "format_text", "lowest_lr_of", "finetune_default_problem"]
