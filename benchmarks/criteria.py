"""Criteria table: the CPU study's ResNet-20 on the real CIFAR-10 pruned at 40% by every
criterion (fpgm, l1, l2, random, taylor, bn_scale, group_l2), each finetuned the same few
epochs; accuracy before and after the finetune, MACs and parameters.

The dense model is the CPU study's (configs/cifar10_cpu_study.yaml: ResNet-20, option A).
Given `--pretrained FILE` (a pipeline checkpoint or state dict) it is loaded; otherwise the
script trains it first with the study's recipe, shortened: SGD Nesterov, batch 256, lr 0.2
(0.1 per 128 images), 1-epoch gradual warmup then cosine to 0, label smoothing 0.1,
weight decay 5e-4 (none on biases and BN), precision auto (the probe's fastest of fp32/bf16 x
NCHW/channels_last), `--pretrain-epochs` epochs, saved for later runs.

Every criterion prunes the same dense weights with the same spec (40% of the filters of
every block-internal conv, the CPU study's policy) and finetunes with the same recipe
(cosine from 0.02, `--finetune-epochs` epochs, same seed); random is the floor every
criterion should beat after the finetune. Taylor takes its gradients on 10 training
batches of 128; bn_scale scores the plain pretrained BN scales (no sparsity training).

`--seeds N` repeats the pruning and the finetune of every criterion under seeds 0..N-1 (the
random criterion's draw, Taylor's batches, the finetune's data order and augmentation; the
dense model is shared) and reports mean ± std over the seeds; a criterion beats random when
its finetuned top-1 exceeds random's by more than two standard errors of the per-seed
differences (paired by seed); every pair of criteria whose difference passes the same test
is listed under the table.

    python benchmarks/criteria.py --data data/cifar10             # full table
    python benchmarks/criteria.py --data data/cifar10 --seeds 3   # mean ± std over 3 seeds
    python benchmarks/criteria.py --data data/cifar10 --quick     # subsets: runs end to end

The table goes to benchmarks/results/criteria/table.md (and .json; `--seeds N` adds
`_seedsN` to the name, `--train-samples N` adds `_trainN`, `--tag T` adds `_T`).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.checkpoint import save_model  # noqa: E402
from pipeline.data import build_data  # noqa: E402
from pipeline.data.config import DataConfig  # noqa: E402
from pipeline.models import build_model, count_macs, count_params, load_pretrained  # noqa: E402
from pipeline.provenance import cpu_name  # noqa: E402
from pipeline.pruning import CRITERIA, PruneSpec, prune_model  # noqa: E402
from pipeline.recipes import OptimizerConfig  # noqa: E402
from pipeline.report.seeds import mean_std, paired_exceeds_two_se  # noqa: E402
from pipeline.schedules import ScheduleConfig, WarmupConfig  # noqa: E402
from pipeline.trainer import RunSettings, TrainConfig, Trainer, evaluate  # noqa: E402

ARCH = {"name": "resnet20", "num_classes": 10, "shortcut": "A"}
METHODS = ["fpgm", "l1", "l2", "random", "taylor", "bn_scale", "group_l2"]
OUT = Path(__file__).resolve().parent / "results" / "criteria"


def train(model, data, out_dir: Path, epochs: int, lr: float, warmup: float, smoothing: float,
          seed: int) -> dict:
    cfg = TrainConfig(epochs=epochs, batch_size=256, lr=lr, label_smoothing=smoothing,
                      optimizer=OptimizerConfig(momentum=0.9, nesterov=True, weight_decay=5e-4,
                                                no_bias_decay=True),
                      precision="auto", channels_last=True,
                      schedule=ScheduleConfig(type="cosine", warmup=WarmupConfig(
                          type="gradual" if warmup else "none", epochs=warmup)),
                      eval_every=max(epochs, 1), log_interval=10_000)
    run = RunSettings(seed=seed, show_progress=False)
    trainer = Trainer(model, cfg, data, out_dir, run=run, arch=ARCH, base_lr=lr)
    res = trainer.fit()
    res["precision"] = trainer.decision.label  # what the probe chose
    return res


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/cifar10", help="CIFAR-10 folder (ImageFolder tree "
                   "or torchvision's download, fetched there when absent)")
    p.add_argument("--pretrained", type=Path, default=OUT / "resnet20_pretrained.pt",
                   help="dense weights; trained and written there when the file is absent")
    p.add_argument("--pretrain-epochs", type=int, default=19)
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=list(CRITERIA))
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="prune and finetune every criterion under seeds 0..N-1 and report "
                        "mean ± std (default 1)")
    p.add_argument("--train-samples", type=int, default=None, metavar="N",
                   help="a class-balanced subset of N training images for the pretrain and "
                        "the finetunes (default: all 50,000)")
    p.add_argument("--test-samples", type=int, default=None, metavar="N",
                   help="a class-balanced subset of N test images (default: all 10,000)")
    p.add_argument("--tag", default="", help="appended to the table's file name, e.g. the "
                   "dense model's name (letters, digits, - and _)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--quick", action="store_true", help="1,000 training / 500 test images, "
                   "1 pretrain epoch (no warmup) and 1 finetune epoch, a temporary pretrained "
                   "model: checks that the script runs, its accuracies mean nothing")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds: expected a number of seeds >= 1, got {args.seeds}")
    for flag in ("train_samples", "test_samples"):
        n = getattr(args, flag)
        if n is not None and n < 10:
            p.error(f"--{flag.replace('_', '-')}: expected at least 10 images (one per "
                    f"class), got {n}")
    if args.tag and not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", args.tag):
        p.error(f"--tag: expected 1-40 letters, digits, - or _, got {args.tag!r}")
    return args


def dense_model(args, data, work: Path):
    dense = build_model(ARCH)
    if args.pretrained.is_file():
        load_pretrained(dense, args.pretrained)
        print(f"dense: {args.pretrained}")
        return dense
    print(f"dense: training ResNet-20 for {args.pretrain_epochs} epochs (no file at "
          f"{args.pretrained})")
    warmup = 0.0 if args.quick else 1.0
    train(dense, data, work / "pretrain", args.pretrain_epochs, 0.2, warmup, 0.1, 0)
    args.pretrained.parent.mkdir(parents=True, exist_ok=True)
    save_model(args.pretrained, dense, ARCH, {"stage": "pretrain",
                                              "epochs": args.pretrain_epochs})
    return dense


def prune_and_finetune(args, dense, dcfg: DataConfig, work: Path, seed: int) -> list[dict]:
    """Every criterion under one seed: its data order, random draw and Taylor batches."""
    data = build_data(dcfg, 256, 500, seed, torch.device("cpu"))
    size = data.input_size

    def taylor_batches():
        data.train.set_epoch(0)
        return data.train.iterate(0)

    rows = []
    for method in args.methods:
        model = copy.deepcopy(dense)
        spec = PruneSpec(method=method, ratio=args.ratio, batches=10)
        prune_model(model, spec, torch.zeros(1, *size), seed=seed, batches=taylor_batches)
        before = evaluate(model, data.test, torch.device("cpu"), "fp32")["top1"]
        res = train(model, data, work / f"{method}.seed{seed}", args.finetune_epochs, 0.02, 0.0,
                    0.1, seed)
        rows.append({"method": method, "seed": seed, "top1_pruned": round(before, 2),
                     "top1_finetuned": round(res["top1"], 2),
                     "macs": count_macs(model, size)["total"], "params": count_params(model),
                     "precision": res["precision"]})
        print(f"{method:9s} seed {seed}  pruned {before:6.2f}%  finetuned {res['top1']:6.2f}%  "
              f"MACs {rows[-1]['macs'] / 1e6:.2f}M  ({res['precision']})", flush=True)
    return rows


def summarize(rows: list[dict], methods: list[str]) -> list[dict]:
    """One row per criterion: mean, std and n of the pruned and finetuned top-1 over seeds,
    and whether it beats random (by more than two standard errors with several seeds)."""
    out = []
    rand = {r["seed"]: r["top1_finetuned"] for r in rows if r["method"] == "random"}
    for m in methods:
        mine = sorted((r for r in rows if r["method"] == m), key=lambda r: r["seed"])
        pruned, tuned = mean_std([r["top1_pruned"] for r in mine]), mean_std(
            [r["top1_finetuned"] for r in mine])
        beats = None
        if rand and m != "random":
            common = [r for r in mine if r["seed"] in rand]
            a = [r["top1_finetuned"] for r in common]
            b = [rand[r["seed"]] for r in common]
            diff = mean_std([x - y for x, y in zip(a, b, strict=True)])[0]
            beats = diff > 0 and (len(common) < 2 or paired_exceeds_two_se(a, b))
        out.append({"method": m, "n": len(mine), "pruned_mean": pruned[0], "pruned_std": pruned[1],
                    "finetuned_mean": tuned[0], "finetuned_std": tuned[1],
                    "macs": mine[0]["macs"], "params": mine[0]["params"], "beats_random": beats})
    return out


def significant_pairs(rows: list[dict], methods: list[str]) -> list[dict]:
    """Every pair of criteria whose finetuned top-1 differs by more than two standard errors
    of the per-seed differences (paired by seed, over the seeds both have), the better one
    first: [{a, b, diff, se, n}]."""
    by = {m: {r["seed"]: r["top1_finetuned"] for r in rows if r["method"] == m}
          for m in methods}
    out = []
    for a, b in itertools.combinations(methods, 2):
        common = sorted(set(by[a]) & set(by[b]))
        xa, xb = [by[a][s] for s in common], [by[b][s] for s in common]
        if len(common) < 2 or not paired_exceeds_two_se(xa, xb):
            continue
        diff, std, n = mean_std([x - y for x, y in zip(xa, xb, strict=True)])
        if diff < 0:
            a, b, diff = b, a, -diff
        out.append({"a": a, "b": b, "diff": diff, "se": std / math.sqrt(n), "n": n})
    return sorted(out, key=lambda p: -p["diff"] / p["se"] if p["se"] else -math.inf)


def table(summary: list[dict], args, dense_top1: float, dense, dense_macs: int,
          precisions: list[str], pairs: list[dict] | None = None) -> str:
    n = args.seeds
    pm = (lambda m, s: f"{m:.2f} ± {s:.2f}") if n > 1 else (lambda m, s: f"{m:.2f}")
    beat_head = "beats random (> 2 SE)" if n > 1 else "beats random"
    lines = [f"| ResNet-20, {args.ratio:.0%} per block-internal conv | top-1 pruned | "
             f"top-1 finetuned ({args.finetune_epochs} ep) | MACs | params | {beat_head} |",
             "|---|---:|---:|---:|---:|:-:|",
             f"| dense | {dense_top1:.2f} | | {dense_macs / 1e6:.2f}M | "
             f"{count_params(dense):,} | |"]
    for r in summary:
        beat = "" if r["beats_random"] is None else ("yes" if r["beats_random"] else "no")
        lines.append(f"| {r['method']} | {pm(r['pruned_mean'], r['pruned_std'])} | "
                     f"{pm(r['finetuned_mean'], r['finetuned_std'])} | {r['macs'] / 1e6:.2f}M | "
                     f"{r['params']:,} | {beat} |")
    lines.append("")
    if n > 1:
        lines.append(f"Mean ± sample standard deviation over {n} seeds (0..{n - 1}: pruning "
                     "draw and finetune data order; one dense model).")
    subset = [f"{n:,} {what} images" for n, what in
              ((args.train_samples, "training"), (args.test_samples, "test")) if n]
    if subset:
        lines.append(f"Class-balanced subsets: {' and '.join(subset)}.")
    lines.append(f"Finetune precision (the probe's choice): {', '.join(precisions)}; "
                 f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}.")
    if n > 1:
        lines += ["", "Finetuned top-1 differences beyond two standard errors (paired by seed):"
                  if pairs else "No two criteria differ by more than two standard errors "
                  "(paired by seed)."]
        lines += [f"- {p['a']} - {p['b']} = {p['diff']:+.2f} (SE {p['se']:.2f}, n {p['n']})"
                  for p in pairs or []]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dcfg = DataConfig(dataset="cifar10", root=args.data, download=True,
                      train_samples=args.train_samples, test_samples=args.test_samples)
    if args.quick:
        dcfg.train_samples, dcfg.test_samples = 1000, 500
        args.pretrain_epochs, args.finetune_epochs = 1, 1
        args.pretrained = Path(tempfile.mkdtemp()) / "resnet20_quick.pt"
    data = build_data(dcfg, 256, 500, 0, torch.device("cpu"))
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="criteria-"))
    dense = dense_model(args, data, work)
    dense_top1 = evaluate(dense, data.test, torch.device("cpu"), "fp32")["top1"]
    dense_macs = count_macs(dense, data.input_size)["total"]
    print(f"dense top-1 {dense_top1:.2f}%  MACs {dense_macs / 1e6:.2f}M")
    rows = []
    for seed in range(args.seeds):
        rows += prune_and_finetune(args, dense, dcfg, work, seed)
    summary = summarize(rows, args.methods)
    pairs = significant_pairs(rows, args.methods)
    text = table(summary, args, dense_top1, dense, dense_macs,
                 sorted({r["precision"] for r in rows}), pairs)
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    suffix = ("_quick" if args.quick else "") + (f"_seeds{args.seeds}" if args.seeds > 1 else "")
    if args.train_samples and not args.quick:  # a subset's table does not replace the full one
        suffix += f"_train{args.train_samples}"
    if args.tag:
        suffix += f"_{args.tag}"
    (OUT / f"table{suffix}.md").write_text(text + "\n")
    meta = {"dense_top1": dense_top1, "dense_macs": dense_macs, "rows": rows,
            "summary": summary, "significant_pairs": pairs, "seeds": args.seeds,
            "quick": args.quick, "pretrain_epochs": args.pretrain_epochs,
            "finetune_epochs": args.finetune_epochs, "train_samples": args.train_samples,
            "test_samples": args.test_samples, "torch": torch.__version__,
            "machine": cpu_name(), "threads": torch.get_num_threads(),
            "seconds": round(time.perf_counter() - t0, 1)}
    (OUT / f"table{suffix}.json").write_text(json.dumps(meta, indent=1))
    judged = [r for r in summary if r["beats_random"] is not None]
    if judged:
        beat = sum(bool(r["beats_random"]) for r in judged)
        how = " by more than 2 SE" if args.seeds > 1 else ""
        print(f"target criteria_beat_random{how}: {beat} of {len(judged)} (goal {len(judged)} "
              f"of {len(judged)}) {'met' if beat == len(judged) else 'missed'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
