"""Sensitivity sweep time: a `type: sensitivity` stage on ResNet-56 (CIFAR-10, option A),
every block-internal conv (27 groups) pruned alone at 9 ratios (0.1..0.9) and evaluated on
5,000 held-out training images (`data.val_split: 5000`), run through `python -m pipeline
run` as a user would; the stage's own `stage_seconds` is the figure. Goal: 10 minutes.

The weights come from `--pretrained FILE` (a pipeline checkpoint of a CIFAR ResNet-56)
or, without one, are a fresh initialization: the time of a sweep does not depend on what
the weights are, only the accuracies it writes do.

    python benchmarks/sensitivity_speed.py --data data/cifar10            # the full sweep
    python benchmarks/sensitivity_speed.py --data data/cifar10 --quick    # 3 groups, 3 ratios
    python benchmarks/sensitivity_speed.py --data DIR --precision fp32    # the sweep in fp32

`--data` is the real CIFAR-10 as an ImageFolder tree (train/ and test/); without it the
script says so and stops.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.checkpoint import save_model  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.provenance import cpu_name  # noqa: E402

ARCH = {"name": "resnet56", "num_classes": 10, "shortcut": "A"}
GOAL_SECONDS = 600.0
RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def config(data: str, val: int, ratios: list[float], precision: str, pretrained: str,
           include: list[str]) -> dict:
    model = {"arch": "resnet56", "shortcut": "A", "pretrained": pretrained}
    sens = {"type": "sensitivity", "from": "pretrain", "method": "fpgm", "ratios": ratios,
            "policy": "block_internal"}
    if include:
        sens["include"] = include
    return {"name": "sensitivity_speed", "seed": 0, "precision": precision,
            "data": {"dataset": "cifar10", "root": data, "download": False, "val_split": val},
            "model": model,
            "stages": {"pretrain": {"type": "pretrain", "epochs": 0}, "sens": sens}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/cifar10", help="CIFAR-10 ImageFolder tree")
    p.add_argument("--pretrained", help="a CIFAR ResNet-56 checkpoint (default: fresh weights)")
    p.add_argument("--precision", default="auto", choices=["fp32", "bf16", "auto"],
                   help="the run's precision (auto: the sweep's inference probe picks the "
                        "faster of fp32 and bf16)")
    p.add_argument("--quick", action="store_true",
                   help="3 groups x 3 ratios on 1,000 images (under a minute)")
    args = p.parse_args(argv)
    if not (Path(args.data) / "train").is_dir():
        print(f"no CIFAR-10 ImageFolder tree at {args.data} (train/, test/): give --data DIR")
        print("target sensitivity_resnet56_sweep: not measured (no data)")
        return 0
    ratios, val = ([0.3, 0.6, 0.9], 1000) if args.quick else (RATIOS, 5000)
    include = ["layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1"] if args.quick else []
    work = Path(tempfile.mkdtemp(prefix="sensitivity-speed-"))
    pretrained = args.pretrained
    if not pretrained:  # fresh weights, saved as the checkpoint the pretrain stage passes on
        torch.manual_seed(0)
        pretrained = str(work / "resnet56_init.pt")
        save_model(pretrained, build_model(ARCH), ARCH, {"stage": "init"})
    cfg = config(str(Path(args.data).resolve()), val, ratios, args.precision, pretrained,
                 include)
    cfg["out_dir"] = str(work / "runs")
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(path)], cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-2000:], sep="\n")
        print(f"target sensitivity_resnet56_sweep: run failed (exit {proc.returncode}) missed")
        return 1
    run_dir = work / "runs" / "sensitivity_speed"
    s = json.loads((run_dir / "sens" / "summary.json").read_text())
    seconds = float(s["stage_seconds"])
    evals = s["groups"] * len(s["ratios"])
    print(f"# sensitivity_speed  {time.strftime('%Y-%m-%d')}  {cpu_name()}  "
          f"torch {torch.__version__}  {torch.get_num_threads()} threads")
    print(f"ResNet-56, {s['groups']} groups x {len(s['ratios'])} ratios = {evals} pruned "
          f"models, each evaluated on {s['split_images']} images ({s['split']} split), "
          f"precision {s['precision']} (run: {args.precision}); {s['replayed']} evaluated by "
          f"replaying the dense activations; base top-1 {s['base_top1']:.2f}")
    if s.get("precision_decision"):
        times = s["precision_decision"].get("seconds_per_step") or {}
        print("inference probe (s per forward of one batch): " +
              ", ".join(f"{k} {v:.3f}" for k, v in times.items()))
    print(f"sweep (stage_seconds): {seconds:.1f} s, {seconds / evals:.2f} s per pruned model; "
          f"whole process {wall:.1f} s")
    if args.quick:
        print(f"target sensitivity_resnet56_sweep: {seconds:.1f} s for the --quick subset "
              f"(goal <= {GOAL_SECONDS:.0f} s for the full sweep) not measured")
        return 0
    verdict = "met" if seconds <= GOAL_SECONDS else "missed"
    print(f"target sensitivity_resnet56_sweep: {seconds:.0f} s (goal <= {GOAL_SECONDS:.0f} s) "
          f"{verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
