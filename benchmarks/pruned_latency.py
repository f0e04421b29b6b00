"""CPU inference time of pruned networks against their MACs ratio: does a MACs reduction
become a wall-clock speedup on the CPU.

For ResNet-56 (CIFAR, option A, 32x32 input; batch 1 and 128) and ResNet-50 (torchvision,
224x224; batch 1 and 32): the unpruned model and FPGM-pruned copies at 30/40/50% and at
a 2x MACs target, timed side by side (interleaved rounds, median per model), eval mode,
no autograd, under three CPU set-ups: PyTorch's default (oneDNN convolutions, NCHW
tensors), oneDNN with channels_last (NHWC) tensors and weights, and the GEMM convolution
(`torch.backends.mkldnn.enabled = False`, NCHW); and, as information, onnxruntime's CPU
provider running each model exported to ONNX (BN folded; the export's logits checked against
PyTorch's; intra-op threads as torch's). oneDNN blocks channels by 8/16, so odd
pruned widths (10, 20, 39) buy it less than their MACs say; `fpgm40_r8` (FPGM 40% with
round_to 8, ResNet-56, full run only) shows the rounding's effect and is not a target.
Speedup = dense time / pruned time (same back-end); efficiency = speedup / MACs ratio.
Targets: efficiency >= 0.7 for every pruned variant (30/40/50%, 2x) at batch 128
(ResNet-56) and 32 (ResNet-50), per PyTorch set-up (onnxruntime has no target; a line per
model names the engine with the best worst-variant efficiency). Also reports the pruning
wall time (graph + scoring + surgery) per variant.

    python benchmarks/pruned_latency.py            # full
    python benchmarks/pruned_latency.py --quick    # about a minute: FPGM 40% and the 2x
                                                   # target on ResNet-56 at batch 128,
                                                   # FPGM 40% on ResNet-50 at batch 2
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.export import FORMATS, MissingExtraError  # noqa: E402
from pipeline.export.formats import OnnxFormat  # noqa: E402
from pipeline.models import build_model, count_macs  # noqa: E402
from pipeline.provenance import cpu_name  # noqa: E402
from pipeline.pruning import PruneSpec, prune_model  # noqa: E402
from pipeline.report.latency import in_memory_format, interleaved_median_seconds  # noqa: E402

GOAL = 0.7
VARIANTS = {
    "fpgm30": {"ratio": 0.3},
    "fpgm40": {"ratio": 0.4},
    "fpgm50": {"ratio": 0.5},
    "macs2x": {"ratio": None, "target_macs_reduction": 0.5},
    "fpgm40_r8": {"ratio": 0.4, "round_to": 8},  # information, not a target
}
INFO = {"fpgm40_r8"}
BACKENDS = {  # name: (oneDNN on, channels_last)
    "onednn": (True, False),
    "onednn_nhwc": (True, True),
    "gemm": (False, False),
    "onnxruntime": (True, False),  # information: the exported ONNX file in onnxruntime
}
INFO_BACKENDS = {"onnxruntime"}
MODELS = {  # name: (arch, input size, batches, target batch)
    "resnet56": ({"name": "resnet56", "num_classes": 10, "shortcut": "A"}, 32, (1, 128), 128),
    "resnet50": ({"name": "resnet50", "num_classes": 1000}, 224, (1, 32), 32),
}


def pruned_variants(arch: dict, size: int, policy: str, names: list[str]) -> list[dict]:
    """The dense model and one pruned copy per variant (same dense weights)."""
    torch.manual_seed(0)
    dense = build_model(arch).eval()
    shape = (3, size, size)
    state = dense.state_dict()
    out = [{"name": "dense", "model": dense, "macs": count_macs(dense, shape)["total"],
            "prune_s": 0.0}]
    for name in names:
        model = build_model(arch)
        model.load_state_dict(state)
        spec = PruneSpec(method="fpgm", policy=policy, **VARIANTS[name])
        t0 = time.perf_counter()
        prune_model(model, spec, torch.zeros(1, *shape))
        out.append({"name": name, "model": model.eval(), "prune_s": time.perf_counter() - t0,
                    "macs": count_macs(model, shape)["total"]})
    return out


def time_models(models: list[dict], batch: int, size: int, rounds: int,
                channels_last: bool = False) -> dict[str, float]:
    """Median seconds per forward; models run interleaved so load changes hit all alike."""
    fmt = "channels_last" if channels_last else "contiguous"
    x = in_memory_format(torch.randn(batch, 3, size, size), fmt)
    nets = {m["name"]: in_memory_format(m["model"], fmt) for m in models}
    return interleaved_median_seconds(nets, x, rounds)


def onnx_runners(models: list[dict], batch: int, size: int, threads: int) -> dict:
    """Each model exported to ONNX (fixed batch) and loaded in onnxruntime's CPU provider;
    the exported logits must match PyTorch's (max abs diff <= 1e-3 of the logits' scale)."""
    fmt: OnnxFormat = FORMATS["onnx"]
    x = torch.randn(batch, 3, size, size)
    out = {}
    for m in models:
        data = fmt.serialize(m["model"], x, False, None, {})
        run = fmt.runner(data, threads)
        with torch.inference_mode():
            ref = m["model"](x)
        err = (run(x) - ref).abs().max().item()
        if err > 1e-3 * max(1.0, ref.abs().max().item()):
            raise SystemExit(f"error: ONNX export of {m['name']} differs by {err:.2e}")
        out[m["name"]] = run
    return out


def time_onnx(models: list[dict], batch: int, size: int, rounds: int,
              threads: int) -> dict[str, float]:
    """Median seconds per onnxruntime forward, interleaved like `time_models`."""
    runs = onnx_runners(models, batch, size, threads)
    return interleaved_median_seconds(runs, torch.randn(batch, 3, size, size), rounds)


def rounds_for(batch: int, macs: int, quick: bool) -> int:
    work = batch * macs  # about a second of work per forward at ~50 GMAC/s
    if quick:
        return 2 if work > 2e10 else 5
    return 3 if work > 1e11 else 5 if work > 2e10 else 30


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer variants and rounds (< 1 min)")
    p.add_argument("--policy", default="all", choices=["all", "block_internal"])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--variants", nargs="+", choices=[v for v in VARIANTS if v not in INFO],
                   help="only these pruned variants (default: all; the targets then cover "
                        "these only)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = ["fpgm40", "macs2x"] if args.quick else [v for v in VARIANTS if v not in INFO]
    if args.variants:
        names = args.variants
    # --quick: only the target batch of ResNet-56; ResNet-50 at batch 2 with FPGM 40% alone
    # (its 2x search takes ~15 s)
    quick_r50 = {"variants": ["fpgm40"], "batch": 2}
    print(f"# pruned_latency  {datetime.date.today()}  {cpu_name()}"
          f"  {os.cpu_count()} cpus, {args.threads} thread(s), torch {torch.__version__}, "
          f"policy {args.policy}{', quick' if args.quick else ''}")
    print("| model | conv | batch | variant | MACs (M) | MACs ratio | ms / batch | speedup | "
          "speedup / MACs ratio | prune s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    backends = dict(BACKENDS)
    try:
        FORMATS["onnx"].require()
    except MissingExtraError as err:  # the onnxruntime rows need the export extra
        print(f"# onnxruntime not timed: {err}")
        del backends["onnxruntime"]
    targets = []
    best: dict[str, dict[str, float]] = {}  # model -> engine -> worst efficiency at target batch
    for key in args.models:
        arch, size, batches, target_batch = MODELS[key]
        variants = names + (["fpgm40_r8"] if key == "resnet56" and not (args.quick or
                                                                         args.variants) else [])
        if args.quick and key == "resnet50":
            variants, batches = args.variants or quick_r50["variants"], (quick_r50["batch"],)
            target_batch = quick_r50["batch"]
        elif args.quick:
            batches = (target_batch,)
        models = pruned_variants(arch, size, args.policy, variants)
        dense = models[0]
        for backend, (onednn, nhwc) in backends.items():
            torch.backends.mkldnn.enabled = onednn
            for batch in batches:
                rounds = rounds_for(batch, dense["macs"], args.quick)
                if backend == "onnxruntime":
                    t = time_onnx(models, batch, size, rounds, args.threads)
                else:
                    t = time_models(models, batch, size, rounds, channels_last=nhwc)
                worst = None
                for m in models:
                    ratio = dense["macs"] / m["macs"]
                    speedup = t["dense"] / t[m["name"]]
                    eff = speedup / ratio
                    if m["name"] not in INFO | {"dense"}:
                        worst = eff if worst is None else min(worst, eff)
                    print(f"| {key} | {backend} | {batch} | {m['name']} | {m['macs'] / 1e6:.1f} | "
                          f"{ratio:.2f} | {1000 * t[m['name']]:.2f} | {speedup:.2f} | {eff:.2f} | "
                          f"{m['prune_s']:.2f} |", flush=True)
                if batch == target_batch:
                    best.setdefault(key, {})[backend] = worst
                    if backend not in INFO_BACKENDS:
                        targets.append((f"{key}_batch{batch}_{backend}_speedup_per_macs_ratio",
                                        worst))
        torch.backends.mkldnn.enabled = True
    for key, engines in best.items():
        top = max(engines, key=engines.get)
        print(f"# {key}: the most of its MACs ratio (worst pruned variant, target batch) in "
              f"{top} ({engines[top]:.3f}); " + ", ".join(f"{e} {v:.3f}"
                                                       for e, v in engines.items()))
    for name, value in targets:
        verdict = "met" if value >= GOAL else "missed"
        print(f"target {name}: {value:.3f} (goal >= {GOAL}, worst pruned variant) {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

