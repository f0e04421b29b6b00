"""prune: remove whole filters from the input model by FPGM / L1 / L2 / random.

Writes model.pt (the pruned network as data: its state dict's shapes are the widths),
`layers.json` (per-layer widths before and after) and a summary with params, MACs
before and after, and the pruned model's accuracy before any recovery.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

from pipeline import checkpoint as ckpt
from pipeline.config import opt
from pipeline.data import build_data
from pipeline.models import count_macs, count_params
from pipeline.pruning import PruneSpec, prune_model
from pipeline.trainer import evaluate

from .base import MODEL_FILE, StageBase, StageContext

NEEDS_INPUT = True


@dataclass
class Config(StageBase, PruneSpec):
    type: str = opt("prune", "stage kind")
    evaluate: bool = opt(True, "measure the pruned model's accuracy before recovery")
    eval_batch_size: int = opt(256, "batch size of that evaluation", min=1)


def run(spec: Config, ctx: StageContext) -> dict:
    t0 = time.perf_counter()
    model, payload = ctx.load_input(spec.from_)
    arch = payload["arch"]
    size = ctx.input_size
    before_macs = count_macs(model, size)
    before_params = count_params(model)
    example = torch.zeros((1, *size))
    seed = ctx.run.seed if spec.seed is None else spec.seed
    # identical on every rank: deterministic criteria on identical weights
    report = prune_model(model, spec, example, seed=seed)
    after_macs = count_macs(model, size)
    with torch.no_grad():
        out = model.eval()(example)
    if out.shape[1] != arch["num_classes"]:
        raise RuntimeError(f"pruned model's output has {out.shape[1]} classes, expected "
                           f"{arch['num_classes']}")
    summary = {
        "params_before": before_params, "params": count_params(model),
        "macs_before": before_macs["total"], "macs": after_macs["total"],
        "conv_macs_before": before_macs["conv"], "conv_macs": after_macs["conv"],
        "mac_reduction": 1 - after_macs["total"] / before_macs["total"],
        "conv_mac_reduction": 1 - after_macs["conv"] / before_macs["conv"],
        "method": spec.method, "ratio": spec.ratio, "policy": spec.policy,
        "pruned_layers": len(report.layers), "epochs": 0,
    }
    if spec.evaluate:
        data = build_data(ctx.run.data, spec.eval_batch_size, spec.eval_batch_size, ctx.run.seed,
                          ctx.device, ctx.dist.rank, ctx.dist.world_size)
        metrics = evaluate(model.to(ctx.device), data.test, ctx.device, ctx.run.precision)
        summary.update(top1=metrics["top1"], top5=metrics["top5"], test_loss=metrics["test_loss"])
        model.cpu()
    meta = {"stage": ctx.name, "method": spec.method, "ratio": spec.ratio,
            "layers": report.layers}
    if ctx.dist.is_main:
        ctx.stage_dir.mkdir(parents=True, exist_ok=True)
        ckpt.save_model(ctx.stage_dir / MODEL_FILE, model, arch, meta)
        (ctx.stage_dir / "layers.json").write_text(json.dumps(report.layers, indent=1))
    summary["prune_seconds"] = time.perf_counter() - t0
    return summary
