"""Why pruned ResNet-56 (FPGM 40%, widths 10/20/39) misses 0.7 of its MACs ratio on the CPU,
layer by layer, and whether padding the widths to a multiple of 8 would help (`round_to`).

For every convolution of the dense and the pruned network (batch 128, 32x32 input, option-A
shortcuts, one intra-op thread) the convolution alone is timed on an input of its shape,
under oneDNN (NCHW) and the GEMM convolution (`torch.backends.mkldnn.enabled = False`), and
so is the same convolution with its input and output widths zero-padded up to the next
multiple of 8 (what a padded inference form would run: 10->16, 20->24, 39->40). Shapes
repeat, so each distinct shape is timed once and counted as often as it occurs. The
models' time is split by operator type (convolution, batch norm, ReLU, add, the rest) with
torch.profiler (shares of each model's own time), and the whole models are timed side by
side for their speedup / MACs ratio. Times are medians of interleaved rounds of per-thread
CPU time (the machine is shared: CPU time is what the forward itself spent; wall time is
printed too).

    python benchmarks/odd_widths.py            # about 5 minutes on a loaded 2-core machine
    python benchmarks/odd_widths.py --quick    # fewer rounds, under a minute
"""

from __future__ import annotations

import argparse
import collections
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.models import build_model, count_macs  # noqa: E402
from pipeline.pruning import PruneSpec, prune_model  # noqa: E402

ARCH = {"name": "resnet56", "num_classes": 10, "shortcut": "A"}
SIZE = 32


def up8(n: int) -> int:
    return -(-n // 8) * 8


def conv_shapes(model: nn.Module, batch: int) -> collections.Counter:
    """(stage, c_in, c_out, kernel, stride, input side) of every conv, counted."""
    shapes: collections.Counter = collections.Counter()
    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(lambda mod, inp, out: shapes.update([(
                {32: 1, 16: 2, 8: 3}.get(out.shape[-1], 0), mod.in_channels, mod.out_channels,
                mod.kernel_size[0], mod.stride[0], inp[0].shape[-1])])))
    with torch.inference_mode():
        model(torch.zeros(1, 3, SIZE, SIZE))
    for h in hooks:
        h.remove()
    return shapes


def cpu_and_wall(fns: dict, rounds: int) -> tuple[dict, dict]:
    """Median per-thread CPU seconds and wall seconds of each call, interleaved rounds."""
    with torch.inference_mode():
        for f in fns.values():
            f()
        cpu: dict = {k: [] for k in fns}
        wall: dict = {k: [] for k in fns}
        for _ in range(rounds):
            for k, f in fns.items():
                c0, t0 = time.thread_time(), time.perf_counter()
                f()
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.thread_time() - c0)
    return ({k: statistics.median(v) for k, v in cpu.items()},
            {k: statistics.median(v) for k, v in wall.items()})


def conv_call(cin: int, cout: int, k: int, stride: int, side: int, batch: int):
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False).eval()
    x = torch.randn(batch, cin, side, side)
    return lambda: conv(x)


def time_shapes(shapes: set, batch: int, rounds: int) -> dict:
    """CPU seconds of each shape's convolution (stage key dropped)."""
    fns = {s: conv_call(*s[1:], batch) for s in shapes}
    return cpu_and_wall(fns, rounds)[0]


OP_GROUPS = (("conv", ("conv", "mkldnn_convolution", "thnn_conv")), ("batch_norm", ("batch_norm",)),
             ("relu", ("relu",)), ("add", ("add",)))


def op_shares(model: nn.Module, batch: int, runs: int) -> dict[str, float]:
    """Share of the forward's time per operator group (self time of the leaf operators)."""
    x = torch.randn(batch, 3, SIZE, SIZE)
    with torch.inference_mode():
        model(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                model(x)
    out: dict[str, float] = collections.defaultdict(float)
    for e in prof.key_averages():
        name = e.key.lower()
        group = next((g for g, keys in OP_GROUPS if any(k in name for k in keys)), "other")
        out[group] += e.self_cpu_time_total
    total = sum(out.values())
    return {g: v / total for g, v in out.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds (under a minute)")
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(1)
    rounds = 9 if args.quick else 31
    torch.manual_seed(0)
    dense = build_model(ARCH).eval()
    pruned = build_model(ARCH)
    pruned.load_state_dict(dense.state_dict())
    prune_model(pruned, PruneSpec(method="fpgm", ratio=0.4, policy="all"),
                torch.zeros(1, 3, SIZE, SIZE))
    pruned.eval()
    macs = {n: count_macs(m, (3, SIZE, SIZE))["total"] for n, m in (("dense", dense),
                                                                    ("pruned", pruned))}
    ratio = macs["dense"] / macs["pruned"]
    sd, sp = conv_shapes(dense, args.batch), conv_shapes(pruned, args.batch)
    padded = collections.Counter()
    for (st, cin, cout, k, s, side), n in sp.items():
        padded[st, cin if cin == 3 else up8(cin), up8(cout), k, s, side] += n
    print(f"# odd_widths  {datetime.date.today()}  {platform.machine()}, 1 thread, torch "
          f"{torch.__version__}, batch {args.batch}, {rounds} rounds; ResNet-56 FPGM 40% "
          f"(policy all): MACs ratio {ratio:.2f}")
    print("| conv | stage | widths dense / pruned / padded | convs | dense ms | pruned ms | "
          "padded ms | MACs pruned/dense | time pruned/dense | time padded/pruned |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    totals = {}
    for backend, onednn in (("onednn", True), ("gemm", False)):
        torch.backends.mkldnn.enabled = onednn
        t = time_shapes(set(sd) | set(sp) | set(padded), args.batch, rounds)
        tot = collections.defaultdict(float)
        for stage in (1, 2, 3):
            row = {}
            for name, shapes in (("dense", sd), ("pruned", sp), ("padded", padded)):
                mine = {s: n for s, n in shapes.items() if s[0] == stage}
                row[name] = sum(1000 * t[s] * n for s, n in mine.items())
                row[name + "_macs"] = sum(s[1] * s[2] * s[3] ** 2 * (s[5] // s[4]) ** 2 * n
                                          for s, n in mine.items())
                row[name + "_w"] = max(s[2] for s in mine)
                row[name + "_n"] = sum(mine.values())
                tot[name] += row[name]
            print(f"| {backend} | {stage} | {row['dense_w']} / {row['pruned_w']} / "
                  f"{row['padded_w']} | {row['pruned_n']} | {row['dense']:.1f} | "
                  f"{row['pruned']:.1f} | {row['padded']:.1f} | "
                  f"{row['pruned_macs'] / row['dense_macs']:.2f} | "
                  f"{row['pruned'] / row['dense']:.2f} | {row['padded'] / row['pruned']:.2f} |",
                  flush=True)
        totals[backend] = dict(tot)
        print(f"| {backend} | all | | | {tot['dense']:.1f} | {tot['pruned']:.1f} | "
              f"{tot['padded']:.1f} | {1 / ratio:.2f} | {tot['pruned'] / tot['dense']:.2f} | "
              f"{tot['padded'] / tot['pruned']:.2f} |", flush=True)
    print()
    print("| conv | model | CPU ms (wall ms) | conv % | batch_norm % | relu % | add % | "
          "other % | speedup / MACs ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    x = torch.randn(args.batch, 3, SIZE, SIZE)
    for backend, onednn in (("onednn", True), ("gemm", False)):
        torch.backends.mkldnn.enabled = onednn
        cpu, wall = cpu_and_wall({"dense": lambda: dense(x), "pruned": lambda: pruned(x)},
                                 3 if args.quick else 9)
        for n, m in (("dense", dense), ("pruned", pruned)):
            o = op_shares(m, args.batch, 2 if args.quick else 3)
            eff = cpu["dense"] / cpu[n] / (ratio if n == "pruned" else 1.0)
            print(f"| {backend} | {n} | {1000 * cpu[n]:.0f} ({1000 * wall[n]:.0f}) | "
                  + " | ".join(f"{100 * o.get(g, 0.0):.0f}" for g in (
                      "conv", "batch_norm", "relu", "add", "other")) + f" | {eff:.2f} |",
                  flush=True)
        conv_only = totals[backend]["dense"] / totals[backend]["pruned"] / ratio
        print(f"| {backend} | convolutions alone (table above) | | | | | | | {conv_only:.2f} |")
    torch.backends.mkldnn.enabled = True
    for backend, tot in totals.items():
        gain = tot["pruned"] / tot["padded"]
        print(f"target padded_to_8_conv_speedup_{backend}: {gain:.3f} (goal > 1.0: padding "
              f"the widths to multiples of 8 makes the convolutions faster) "
              f"{'met' if gain > 1.0 else 'missed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
