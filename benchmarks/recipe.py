"""The CPU study's pretrain recipe against the fast CIFAR recipe, at the same epoch budget.

Side by side in one run, each the pretrain stage of `configs/cifar10_cpu_study.yaml` run by
the pipeline's own CLI on the real CIFAR-10 (a fresh process each, flip TTA reported apart):

  study   as configured: batch 256, lr 0.2 (0.1 per 128 images), 1-epoch gradual warmup then
          cosine to 0, Nesterov, label smoothing 0.1, no weight decay on BN and bias;
  fast    the same with the fast CIFAR trainers' changes (Page 2018; airbench): batch 512 at
          the linearly scaled lr 0.4, a one-cycle lr (linear up to the peak at a quarter of
          the run, linear down to 0; no separate warmup) and zero-init residual BN gammas.

Both train `--epochs` epochs on the same images (`--train-samples` of them, a fixed,
class-balanced subset, or all 50,000) and are tested on the same `--test-samples`; the
precision is the study's `auto` unless `--precision` is given. Plain top-1 decides; the
flip-TTA top-1 is shown beside it.

    python benchmarks/recipe.py --root data/cifar10                 # 45 epochs, full data
    python benchmarks/recipe.py --root data/cifar10 --epochs 10
    python benchmarks/recipe.py --root data/cifar10 --quick         # under a minute

Ends with `target fast_recipe_top1: FAST (goal >= STUDY) met|missed`.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.provenance import cpu_name  # noqa: E402

CONFIG = ROOT / "configs" / "cifar10_cpu_study.yaml"
S = "stages.pretrain."
RECIPES = {
    "study": [],
    "fast": [f"{S}batch_size=512", f"{S}schedule.type=onecycle", f"{S}schedule.peak_at=0.25",
             f"{S}schedule.start_factor=0.1", f"{S}schedule.warmup.type=none",
             f"{S}schedule.warmup.epochs=0", f"{S}zero_init_residual=true"],
}


def overrides(args: argparse.Namespace, out_dir: Path, name: str) -> list[str]:
    sets = [f"name={name}", f"out_dir={out_dir}", f"data.root={args.root}",
            "data.download=false", f"{S}epochs={args.epochs}", f"{S}eval_every={args.epochs}",
            f"{S}tta=flip", *RECIPES[name]]
    if args.train_samples:
        sets.append(f"data.train_samples={args.train_samples}")
    if args.test_samples:
        sets.append(f"data.test_samples={args.test_samples}")
    if args.precision:
        sets.append(f"precision={args.precision}")
    return sets


def run_recipe(args: argparse.Namespace, out_dir: Path, name: str) -> dict:
    cmd = [sys.executable, "-m", "pipeline", "run", str(CONFIG), "--stage", "pretrain",
           "--progress", "off", "--format", "json"]
    for s in overrides(args, out_dir, name):
        cmd += ["--set", s]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name}: the pipeline exited {done.returncode}: "
                 f"{done.stderr.strip().splitlines()[-1:]}")
    (summary,) = json.loads(done.stdout)
    return {"recipe": name, "top1": summary["top1"], "top1_tta": summary.get("top1_tta"),
            "images_per_s": summary.get("images_per_s"), "precision": summary.get("precision"),
            "wall_seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="data/cifar10", help="CIFAR-10 as an ImageFolder tree "
                   "(train/, test/) or torchvision's download")
    p.add_argument("--epochs", type=int, default=45, help="epochs of each recipe (the study's)")
    p.add_argument("--train-samples", type=int, help="a class-balanced training subset")
    p.add_argument("--test-samples", type=int, help="a class-balanced test subset")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"],
                   help="default: the study's (auto: the probe's fastest)")
    p.add_argument("--out", type=Path, help="where the two run directories go (default: a "
                   "temporary folder)")
    p.add_argument("--quick", action="store_true", help="1 epoch of 1,000 images, 500 test "
                   "images: checks that the script runs, its accuracies mean nothing")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.train_samples, args.test_samples = 1, 1000, 500
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="recipe-"))
    rows = [run_recipe(args, out_dir, name) for name in RECIPES]
    print(f"{args.epochs} epochs on {args.train_samples or 50000} training images, tested on "
          f"{args.test_samples or 10000}; {cpu_name()}, torch {torch.__version__}")
    print("| recipe | top-1 (%) | top-1 flip TTA (%) | img/s | precision | wall (s) |")
    print("|---|---:|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['recipe']} | {r['top1']:.2f} | {r['top1_tta']:.2f} | {r['images_per_s']} "
              f"| {r['precision']} | {r['wall_seconds']:.0f} |")
    study, fast = rows
    met = fast["top1"] >= study["top1"]
    print(f"target fast_recipe_top1: {fast['top1']:.2f} (goal >= {study['top1']:.2f}) "
          f"{'met' if met else 'missed'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
