"""Preflight time: how long the checks before any work (`pipeline.preflight.preflight`,
run by `--dry-run` and at the start of every `run`) take for a config, in wall-clock and
CPU seconds. The target is the first round in a fresh process (what the start of a run
pays: the module imports are done before it, the first model build and trace are in it);
the later rounds show the warm figure.

    python benchmarks/preflight.py                       # the ImageNet ResNet-50 FPGM config
    python benchmarks/preflight.py --quick               # 2 rounds
    python benchmarks/preflight.py --config configs/cifar10_l1.yaml
    python benchmarks/preflight.py --set stages.prune.ratio=null \
        --set stages.prune.target_macs_reduction=0.4        # the MAC target search

The data set and the pretrained weights need not be there (the `--dry-run` rules).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.preflight import preflight  # noqa: E402
from pipeline.provenance import cpu_name  # noqa: E402
from pipeline.runconfig import load_config  # noqa: E402

GOAL_SECONDS = 10.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/imagenet_resnet50_fpgm.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config key, as `run --set`")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="2 rounds")
    args = p.parse_args()
    rounds = 2 if args.quick else args.rounds
    cfg, _ = load_config(args.config, args.overrides)
    walls, cpus = [], []
    for _ in range(rounds):
        w, c = time.perf_counter(), time.process_time()
        checked = preflight(cfg, args.config, need_data=False)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    prune = next((e["predicted"] for e in checked.values() if "predicted" in e), None)
    print(f"config {args.config} {' '.join(args.overrides)}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {cpu_name()}")
    if prune:
        print(f"predicted: MACs {prune['macs_before']:.4g} -> {prune['macs']:.4g}, params "
              f"{prune['params_before']} -> {prune['params']}")
    print(f"wall s per round: {', '.join(f'{x:.2f}' for x in walls)}")
    print(f"cpu s per round: {', '.join(f'{x:.2f}' for x in cpus)}")
    wall = walls[0]
    if len(walls) > 1:
        print(f"warm (median of rounds 2-{len(walls)}): {statistics.median(walls[1:]):.2f} s")
    print(f"target preflight_seconds: {wall:.2f} (goal < {GOAL_SECONDS:g}) "
          f"{'met' if wall < GOAL_SECONDS else 'missed'}")


if __name__ == "__main__":
    main()
