"""PyTorch against onnxruntime for dense and pruned CIFAR ResNets, through the export a user
runs (`python -m pipeline export`): the table of the README's "Using a pruned model".

For ResNet-20 and ResNet-56 (CIFAR, option A, 32x32), dense and FPGM 40% (`policy: all`),
each model is saved as a stage of a run directory and exported with
`pipeline.export.export_stage` to ONNX at a fixed batch (1 and 32): verified against the
PyTorch model on export, as `python -m pipeline export` does. Timed side by side in
interleaved rounds (median wall time): the PyTorch model in eval mode under
`torch.inference_mode` in channels_last (what `compare --latency` times by default) and the
ONNX file in onnxruntime's CPU provider, both on the same number of intra-op threads.
Speedup = dense / pruned time in the same engine; efficiency = speedup / MACs ratio.
Target: onnxruntime's efficiency >= 0.7 at batch 32 for both networks (the goal of
benchmarks/pruned_latency.py, in the engine a deployment runs).

    python benchmarks/export_latency.py            # about 3 minutes on a loaded 2-core CPU
    python benchmarks/export_latency.py --quick    # ResNet-20 only, fewer rounds
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.checkpoint import save_model  # noqa: E402
from pipeline.export import ExportOptions, export_stage, load_exported  # noqa: E402
from pipeline.models import build_model, count_macs, load_model  # noqa: E402
from pipeline.pruning import PruneSpec, prune_model  # noqa: E402
from pipeline.report.latency import in_memory_format, interleaved_median_seconds  # noqa: E402

GOAL = 0.7
SIZE = 32


def trained_like(model: nn.Module) -> nn.Module:
    """BN statistics of data and logits of a trained net's scale (random weights otherwise),
    so the export's fp32 check runs where trained models live."""
    x = torch.randn(64, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.train()(x)
        model.eval()
        model.fc.weight.mul_(10 / model(x).abs().max())
    return model


def stage(root: Path, name: str, model: nn.Module, arch: dict) -> Path:
    """`model` saved as the completed stage root/name/stage of a run directory."""
    run = root / name
    (run / "stage").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "name": name, "seed": 0, "model": {"arch": arch["name"], "shortcut": "A"},
        "data": {"dataset": "synthetic", "synthetic": {"num_classes": 10, "image_size": SIZE}},
        "stages": {"stage": {"type": "pretrain"}}}, sort_keys=False))
    save_model(run / "stage" / "model.pt", model, arch)
    (run / "stage" / "summary.json").write_text(json.dumps(
        {"stage": "stage", "type": "pretrain", "status": "completed"}))
    return run / "stage"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="ResNet-20 only, fewer rounds")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of both engines")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = ["resnet20"] if args.quick else ["resnet20", "resnet56"]
    print(f"# export_latency  {datetime.date.today()}  {platform.machine()}, {args.threads} "
          f"thread(s), torch {torch.__version__}{', quick' if args.quick else ''}")
    print("| model | batch | variant | MACs (M) | MACs ratio | PyTorch ms | onnxruntime ms | "
          "PyTorch speedup | onnxruntime speedup | PyTorch eff. | onnxruntime eff. |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    targets = []
    with tempfile.TemporaryDirectory(prefix="export-latency-") as tmp:
        for name in names:
            arch = {"name": name, "num_classes": 10, "shortcut": "A"}
            torch.manual_seed(0)
            dense = trained_like(build_model(arch))
            pruned = build_model(arch)
            pruned.load_state_dict(dense.state_dict())
            prune_model(pruned, PruneSpec(method="fpgm", ratio=0.4, policy="all"),
                        torch.zeros(1, 3, SIZE, SIZE))
            dirs = {"dense": stage(Path(tmp), f"{name}-dense", dense.eval(), arch),
                    "fpgm40": stage(Path(tmp), f"{name}-fpgm40", pruned.eval(), arch)}
            macs = {v: count_macs(load_model(d / "model.pt"), (3, SIZE, SIZE))["total"]
                    for v, d in dirs.items()}
            for batch in (1, 32):
                engines = {}
                for v, d in dirs.items():
                    out = d / f"model.b{batch}.onnx"
                    export_stage(d, ExportOptions(format="onnx", out=out, batch=batch,
                                                  eval_images=0))
                    engines[f"torch/{v}"] = in_memory_format(load_model(d / "model.pt").eval(),
                                                             "channels_last")
                    engines[f"onnxruntime/{v}"] = load_exported(out, "onnx", args.threads)
                x = in_memory_format(torch.randn(batch, 3, SIZE, SIZE), "channels_last")
                rounds = (5 if args.quick else 15) if batch > 1 else (30 if args.quick else 100)
                t = interleaved_median_seconds(engines, x, rounds, warmup=2)
                for v in dirs:
                    ratio = macs["dense"] / macs[v]
                    sp = {e: t[f"{e}/dense"] / t[f"{e}/{v}"] for e in ("torch", "onnxruntime")}
                    print(f"| {name} | {batch} | {v} | {macs[v] / 1e6:.1f} | {ratio:.2f} | "
                          f"{1000 * t[f'torch/{v}']:.2f} | {1000 * t[f'onnxruntime/{v}']:.2f} | "
                          f"{sp['torch']:.2f} | {sp['onnxruntime']:.2f} | "
                          f"{sp['torch'] / ratio:.2f} | {sp['onnxruntime'] / ratio:.2f} |",
                          flush=True)
                    if batch == 32 and v != "dense":
                        targets.append((f"{name}_fpgm40_batch32_onnxruntime_speedup_per_macs_"
                                        "ratio", sp["onnxruntime"] / ratio))
    for tname, value in targets:
        print(f"target {tname}: {value:.3f} (goal >= {GOAL}) "
              f"{'met' if value >= GOAL else 'missed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
