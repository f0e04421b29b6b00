"""Prune, then quantize: the int8 goals measured side by side in one run.

From a run directory of configs/cifar10_cpu_fpgm_int8.yaml (its dense `pretrain`, its
pruned and finetuned `finetune`, and, when completed, its `quantize_qat`):

  * the PTQ stage, run afresh in a temporary copy of the run directory through the pipeline
    (`run --stage quantize`): its wall time (calibration, conversion, the check, the test and
    validation passes) and its int8 top-1 against the finetuned fp32 model's;
  * the QAT stage's int8 top-1 against the same fp32 model (the run's own quantize_qat, or
    run afresh with --qat);
  * onnxruntime CPU latency at batch 32 (interleaved rounds, median): dense fp32, pruned fp32
    and pruned int8 ONNX files on the same threads; the file sizes;
  * with --pt2e, the PT2E backend on the same pruned model: conversion time, file size,
    latency of the program compiled by torch.compile against the pruned fp32 model in
    PyTorch (eager, channels_last), and its test-image agreement.

    python benchmarks/quantize.py --run checkpoints/cifar10_cpu_fpgm_int8 --data-root DIR
    # the CPU study's FPGM model through the int8 config's quantize stages:
    python benchmarks/quantize.py --run checkpoints/cifar10_cpu_study --data-root DIR \
        --config configs/cifar10_cpu_fpgm_int8.yaml \
        --stages prune=prune_fpgm,finetune=finetune_fpgm --set data.val_split=null --qat
    python benchmarks/quantize.py --quick      # under a minute: random-weight ResNet-20s,
                                               # latency and size only
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import read_yaml  # noqa: E402
from pipeline.models import build_model, count_macs, load_model  # noqa: E402
from pipeline.provenance import cpu_name  # noqa: E402
from pipeline.pruning import PruneSpec, prune_model  # noqa: E402
from pipeline.quantize import backend_of  # noqa: E402
from pipeline.quantize.ort import export_fp32, has_int8_dot  # noqa: E402
from pipeline.report.latency import in_memory_format, interleaved_median_seconds  # noqa: E402
from pipeline.runner import run as run_pipeline  # noqa: E402

GOALS = {"ptq_top1_drop": ("<=", 1.0), "qat_top1_drop": ("<=", 0.5),
         "int8_vs_pruned_fp32_speedup": (">=", 1.8), "int8_vs_dense_fp32_speedup": (">=", 3.0),
         "fp32_to_int8_file_ratio": (">=", 3.5), "ptq_stage_seconds": ("<=", 60.0)}
SIZE = (3, 32, 32)


def random_models() -> tuple[nn.Module, nn.Module]:
    """A dense ResNet-20 with data-like BN statistics and FPGM 40% of it (widths 8/16/40)."""
    arch = {"name": "resnet20", "num_classes": 10, "shortcut": "A"}
    torch.manual_seed(0)
    dense = build_model(arch)
    with torch.no_grad():
        dense.train()(torch.randn(128, *SIZE))
    pruned = build_model(arch)
    pruned.load_state_dict(dense.state_dict())
    prune_model(pruned, PruneSpec(method="fpgm", ratio=0.4, policy="block_internal", round_to=8,
                                  round_mode="nearest"), torch.zeros(1, *SIZE))
    return dense.eval(), pruned.eval()


UPSTREAM = ("pretrain", "prune", "finetune")


def ptq_stage(run_dir: Path, tmp: Path, overrides: list[str], stage: str,
              config: Path | None = None, names: dict[str, str] | None = None) -> dict:
    """Run `stage` of the run afresh in a copy of its directory; its summary. The stage's
    own check is opened wide (it would write nothing on a miss): the benchmark measures,
    and reports the agreement and the drop against the goals itself. `config` (default:
    the run's own config.yaml) gives the quantize stages; `names` maps the int8 chain's
    upstream stages (pretrain, prune, finetune) to the run's stage directories, so that the
    models of another chain (the CPU study's prune_fpgm and finetune_fpgm) are quantized."""
    overrides = [*overrides, f"stages.{stage}.verify.min_agreement=0",
                 f"stages.{stage}.verify.max_top1_drop=100"]
    plain = read_yaml(config or run_dir / "config.yaml")  # `base:` files merged in
    copy = tmp / str(plain["name"])
    copy.mkdir(parents=True)
    (copy / "config.yaml").write_text(yaml.safe_dump(plain, sort_keys=False))
    for name in UPSTREAM:
        source = run_dir / (names or {}).get(name, name)
        (copy / name).mkdir()
        for f in ("model.pt", "summary.json"):
            if (source / f).is_file():
                shutil.copy(source / f, copy / name / f)
    run_pipeline(str(copy / "config.yaml"), [f"out_dir={tmp}", *overrides], stage=stage,
                 show_progress=False)
    summary = json.loads((copy / stage / "summary.json").read_text())
    if summary.get("artifact"):
        summary["artifact_path"] = str(copy / stage / summary["artifact"])
    return summary


def ort_latency(files: dict[str, Path], threads: int, rounds: int, batch: int) -> dict:
    """Median ms per batch of each ONNX file in onnxruntime, interleaved."""
    ort = backend_of("onnxruntime")
    runners = {k: ort.runner(p, threads) for k, p in files.items()}
    x = torch.randn(batch, *SIZE)
    return {k: 1000 * v for k, v in interleaved_median_seconds(runners, x, rounds, 2).items()}


def pt2e_row(pruned: nn.Module, calib: list[torch.Tensor], images, tmp: Path, rounds: int,
             batch: int) -> dict:
    """The pt2e backend on the pruned model: conversion, size, compiled latency against the
    fp32 model in PyTorch (channels_last), agreement on the given test images."""
    b = backend_of("pt2e")
    t0 = time.perf_counter()
    data = b.quantize(pruned, calib, "minmax", 99.999, {}, tmp)
    seconds = time.perf_counter() - t0
    compiled = b.runner(data, compiled=True)
    x = torch.randn(batch, *SIZE)
    t1 = time.perf_counter()
    compiled(x)  # compiles
    compile_s = time.perf_counter() - t1
    eager = in_memory_format(pruned, "channels_last")
    t = interleaved_median_seconds({"fp32": eager, "int8": compiled},
                                   in_memory_format(x, "channels_last"), rounds, 2)
    agree = None
    if images is not None:
        with torch.no_grad():
            agree = float((pruned(images).argmax(1) == compiled(images).argmax(1)).float().mean())
    return {"seconds": seconds, "compile_seconds": compile_s, "bytes": len(data),
            "fp32_bytes": len(b.fp32_artifact(pruned, calib[0][:2], tmp)),
            "fp32_ms": 1000 * t["fp32"], "int8_ms": 1000 * t["int8"], "agreement": agree}


def target_line(name: str, value: float | None) -> str:
    op, goal = GOALS[name]
    if value is None:
        return f"target {name}: not measured (goal {op} {goal:g}) missed"
    ok = value <= goal if op == "<=" else value >= goal
    return f"target {name}: {value:.3f} (goal {op} {goal:g}) {'met' if ok else 'missed'}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=Path("checkpoints/cifar10_cpu_fpgm_int8"),
                   help="run directory of configs/cifar10_cpu_fpgm_int8.yaml")
    p.add_argument("--data-root", help="where the run's CIFAR-10 is now (data.root)")
    p.add_argument("--config", type=Path, help="the config whose quantize and quantize_qat "
                   "stages run (default: the run's own config.yaml)")
    p.add_argument("--stages", default="", metavar="pretrain=NAME,prune=NAME,finetune=NAME",
                   help="the run's stage directories that stand for the int8 chain's dense, "
                   "pruned and finetuned models, e.g. for a CPU study run: "
                   "prune=prune_fpgm,finetune=finetune_fpgm")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="a config override for the quantize stages (repeatable)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--qat", action="store_true", help="run the QAT stage afresh too (minutes)")
    p.add_argument("--observer", choices=["minmax", "percentile", "entropy"],
                   help="the PTQ stage's observer (default: the config's)")
    p.add_argument("--pt2e", action="store_true", help="also the pt2e backend (compiles)")
    p.add_argument("--quick", action="store_true", help="random-weight models: latency and "
                   "size only, fewer rounds (under a minute)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = {}
    for item in filter(None, args.stages.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in UPSTREAM or not value or "/" in value or value.startswith("."):
            p.error(f"--stages: {item!r} is not one of {', '.join(UPSTREAM)}=STAGE_NAME")
        names[key] = value
    if args.config and not args.config.is_file():
        p.error(f"--config: {args.config} is not a file")
    stage_dir = {k: args.run / names.get(k, k) for k in UPSTREAM}
    real = not args.quick and (stage_dir["finetune"] / "summary.json").is_file()
    print(f"# quantize  {datetime.date.today()}  {cpu_name()}, {args.threads} thread(s), "
          f"torch {torch.__version__}{', quick' if args.quick else ''}; int8 dot product "
          f"instructions (VNNI): {'yes' if has_int8_dot() else 'no'}")
    values: dict[str, float | None] = dict.fromkeys(GOALS)
    overrides = [f"data.root={args.data_root}"] if args.data_root else []
    overrides += args.sets
    if args.observer:
        overrides.append(f"stages.quantize.observer={args.observer}")
    with tempfile.TemporaryDirectory(prefix="quantize-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if real:
            dense = load_model(stage_dir["pretrain"] / "model.pt").eval()
            pruned = load_model(stage_dir["finetune"] / "model.pt").eval()
            s = ptq_stage(args.run, tmp, overrides, "quantize", args.config, names)
            int8_file = Path(s["artifact_path"])
            values["ptq_top1_drop"] = s["source_top1"] - s["top1"]
            values["ptq_stage_seconds"] = s["wall_seconds"]
            print(f"PTQ stage ({s['backend']}, {s['observer']}, reduce_range "
                  f"{s['reduce_range']}): {s['wall_seconds']:.1f} s (conversion "
                  f"{s['quantize_seconds']:.1f} s); top-1 fp32 {s['source_top1']:.2f} -> int8 "
                  f"{s['top1']:.2f}; val {s.get('source_val_top1')} -> {s.get('val_top1')}; "
                  f"agreement {100 * s['verification']['agreement']:.2f}% on "
                  f"{s['verification']['images']} test images")
            qat = (ptq_stage(args.run, tmp / "qat", overrides, "quantize_qat", args.config,
                             names) if args.qat
                   else json.loads((args.run / "quantize_qat" / "summary.json").read_text())
                   if (args.run / "quantize_qat" / "summary.json").is_file() else None)
            if qat and qat.get("status") == "completed":
                values["qat_top1_drop"] = qat["source_top1"] - qat["top1"]
                print(f"QAT stage ({qat['epochs']} epochs): top-1 fp32 {qat['source_top1']:.2f}"
                      f" -> int8 {qat['top1']:.2f} (fake-quantized fp32 "
                      f"{qat['fake_quant_top1']:.2f}); {qat['wall_seconds']:.0f} s")
        else:
            dense, pruned = random_models()
            calib = [torch.randn(16, *SIZE) for _ in range(4)]
            int8_file = tmp / "int8.onnx"
            int8_file.write_bytes(backend_of("onnxruntime").quantize(
                pruned, calib, "minmax", 99.999, {}, tmp, reduce_range=not has_int8_dot()))
        files = {"dense fp32": tmp / "dense.onnx", "pruned fp32": tmp / "pruned.onnx",
                 "pruned int8": int8_file}
        export_fp32(dense, torch.zeros(2, *SIZE), files["dense fp32"])
        export_fp32(pruned, torch.zeros(2, *SIZE), files["pruned fp32"])
        rounds = 8 if args.quick else 40
        ms = ort_latency(files, args.threads, rounds, args.batch)
        macs = {"dense fp32": count_macs(dense, SIZE)["total"],
                "pruned fp32": count_macs(pruned, SIZE)["total"]}
        macs["pruned int8"] = macs["pruned fp32"]
        print(f"\nonnxruntime CPU, batch {args.batch}, {args.threads} thread(s), {rounds} "
              "interleaved rounds (median):\n")
        print("| model | MACs (M) | file (KB) | latency (ms) | speedup vs dense fp32 |")
        print("|---|---|---|---|---|")
        for k, path in files.items():
            print(f"| {k} | {macs[k] / 1e6:.1f} | {path.stat().st_size / 1e3:.0f} | "
                  f"{ms[k]:.2f} | {ms['dense fp32'] / ms[k]:.2f}x |")
        values["int8_vs_pruned_fp32_speedup"] = ms["pruned fp32"] / ms["pruned int8"]
        values["int8_vs_dense_fp32_speedup"] = ms["dense fp32"] / ms["pruned int8"]
        values["fp32_to_int8_file_ratio"] = (files["pruned fp32"].stat().st_size
                                             / files["pruned int8"].stat().st_size)
        if args.pt2e:
            calib = [torch.randn(32, *SIZE) for _ in range(4)]
            r = pt2e_row(pruned, calib, None, tmp, rounds, args.batch)
            print(f"\npt2e (x86 quantizer, torch.compile): conversion {r['seconds']:.1f} s, "
                  f"compile {r['compile_seconds']:.1f} s, file {r['bytes'] / 1e3:.0f} KB "
                  f"(fp32 program {r['fp32_bytes'] / 1e3:.0f} KB); batch {args.batch}: "
                  f"int8 compiled {r['int8_ms']:.2f} ms, fp32 eager channels_last "
                  f"{r['fp32_ms']:.2f} ms ({r['fp32_ms'] / r['int8_ms']:.2f}x)")
    if not real:
        print("\n(no completed run directory: accuracy and stage time not measured)")
    for name in GOALS:
        print(target_line(name, values[name]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
