"""The resolved plan of a run, without running it: what `--dry-run` prints. Each stage kind
contributes its own entry (`Stage.plan_entry`) and text (`Stage.plan_lines`)."""

from __future__ import annotations

from stages import REGISTRY, stage_of

from .data.sizes import train_size


def build_plan(run, checked: dict | None = None) -> dict:
    """The resolved run as plain data: what `--dry-run --format json` prints. `checked`:
    the preflight's results (`pipeline.preflight.preflight`), merged into the entries."""
    checked = checked or {}
    n, how = train_size(run.data)
    plan = {"name": run.name, "run_dir": str(run.run_dir), "seed": run.seed,
            "device": run.device, "precision": run.precision,
            "data": {"dataset": run.data.dataset, "root": run.data.root, "train_images": n,
                     "train_images_source": how},
            "model": {"arch": run.model.arch, "shortcut": run.model.shortcut,
                      "pretrained": run.model.pretrained},
            "stages": []}
    if run.seeds is not None:  # the chain runs once per seed, each into its own directory
        plan["seeds"] = run.seed_list()
        plan["run_dirs"] = [str(m.run_dir) for m in run.seed_runs()]
    for name, spec in run.stages.items():
        entry = {"name": name, "type": spec.type, "from": spec.from_}
        entry.update(stage_of(spec).plan_entry(spec, name, run))
        entry.update(checked.get(name, {}))
        plan["stages"].append(entry)
    if "_data" in checked:
        plan["data"].update(checked["_data"])
    return plan


def format_text(plan: dict) -> str:
    """The plan for people: one block per stage."""
    lines = [f"run {plan['name']} -> {plan['run_dir']}  (seed {plan['seed']}, device "
             f"{plan['device']}, precision {plan['precision']}"
             f"{' (decided at start)' if plan['precision'] == 'auto' else ''})",
             f"data: {plan['data']['dataset']} ({plan['data']['train_images']} train images, "
             f"{plan['data']['train_images_source']});  model: {plan['model']['arch']}"]
    if "seeds" in plan:
        lines.append(f"seeds {', '.join(map(str, plan['seeds']))}: the chain runs once per "
                     f"seed, into {', '.join(plan['run_dirs'])}")
    d = plan["data"]
    if "num_classes" in d:
        lines.append(f"preflight: passed in {d['preflight_seconds']:.1f}s ({d['num_classes']} "
                     "classes" + "".join(f"; {n}" for n in d["notes"]) + ")")
    for s in plan["stages"]:
        head = f"- {s['name']} [{s['type']}]" + (f" from {s['from']}" if s["from"] else "")
        lines.append(head)
        lines += REGISTRY[s["type"]].plan_lines(s)
    return "\n".join(lines)


__all__ = ["build_plan", "format_text"]
