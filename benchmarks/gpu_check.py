"""The GPU check: the CUDA, fp16 and NCCL paths of the pipeline, run for real on this
machine's GPUs in at most about 8 minutes, with generated data only (no downloads).

    python benchmarks/gpu_check.py            # everything
    python benchmarks/gpu_check.py --quick    # fewer timed steps

Checks, in order:
  1. the quick pipeline (pretrain -> prune -> finetune, CIFAR ResNet-20 on generated 32px
     data) in fp16 with GradScaler, in bf16, with channels_last and with torch.compile;
  2. kill-and-resume under `deterministic: true`: a run stopped after a mid-epoch
     checkpoint and resumed gives bitwise the weights of an uninterrupted run;
  3. torchrun with NCCL on every visible GPU (1 process on a 1-GPU machine), and
     `pipeline eval` of its model.pt agreeing with its summary;
  4. the in-memory data path on the device (batches produced on the GPU);
  5. trainer throughput against a bare loop (ResNet-56 batch 128 fp16; torchvision
     ResNet-50 batch 64 fp16 and bf16, channels_last);
  6. pruned ResNet-50 (FPGM, half the filters) latency speedup against its MACs ratio,
     batch 64, fp16, channels_last.
It ends with one line per target: `target NAME: MEASURED (goal GOAL) met|missed`.
On a machine without CUDA it prints this plan and exits 0 without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainer_overhead import InMemory  # noqa: E402  (the loader protocol over batches in memory)

from pipeline import checkpoint  # noqa: E402
from pipeline.data import build_data  # noqa: E402
from pipeline.models import build_model, count_macs  # noqa: E402
from pipeline.pruning import PruneSpec, prune_model  # noqa: E402
from pipeline.trainer import RunSettings, TrainConfig, Trainer, autocast_context  # noqa: E402

CHECKS = [
    "quick pipeline (pretrain -> prune -> finetune) in fp16 with GradScaler",
    "quick pipeline in bf16",
    "quick pipeline with channels_last",
    "quick pipeline with torch.compile",
    "kill-and-resume under deterministic: true, compared bitwise",
    "torchrun with NCCL on every visible GPU, then pipeline eval of its model.pt",
    "in-memory data path on the device",
    "trainer vs bare loop: ResNet-56 batch 128 fp16",
    "trainer vs bare loop: torchvision ResNet-50 batch 64 fp16 channels_last",
    "trainer vs bare loop: torchvision ResNet-50 batch 64 bf16 channels_last",
    "pruned ResNet-50 latency vs MACs ratio, batch 64 fp16 channels_last",
]
TARGETS = {"trainer_vs_bare": 0.97, "pruned_latency_vs_macs": 0.7}

QUICK = {
    "name": "gpu_quick", "seed": 0, "device": "cuda",
    "data": {"dataset": "synthetic",
             "synthetic": {"num_classes": 10, "train_size": 2048, "test_size": 512,
                           "image_size": 32}},
    "model": {"arch": "resnet20", "shortcut": "A"},
    "stages": {
        "pretrain": {"type": "pretrain", "epochs": 2, "batch_size": 128, "lr": 0.1,
                     "log_interval": 4},
        "prune": {"type": "prune", "from": "pretrain", "method": "fpgm", "ratio": 0.4},
        "finetune": {"type": "finetune", "from": "prune", "epochs": 1, "batch_size": 128,
                     "log_interval": 4},
    },
}


class Results:
    def __init__(self):
        self.failed: list[str] = []
        self.targets: list[str] = []

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
        if not ok:
            self.failed.append(name)

    def target(self, name: str, measured: float, goal: float) -> None:
        self.targets.append(f"target {name}: {measured:.3f} (goal {goal}) "
                            f"{'met' if measured >= goal else 'missed'}")


def pipeline_cmd(*args: str, torchrun: int = 0) -> list[str]:
    if torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(torchrun), "-m", "pipeline", *args]
    return [sys.executable, "-m", "pipeline", *args]


def run_cli(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT),
                                                       os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def write_config(tmp: Path, name: str, **over) -> Path:
    cfg = json.loads(json.dumps(QUICK))
    cfg.update(name=name, out_dir=str(tmp / "runs"))
    for key, value in over.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def summary(tmp: Path, run: str, stage: str) -> dict:
    return json.loads((tmp / "runs" / run / stage / "summary.json").read_text())


def check_quick_pipelines(tmp: Path, res: Results) -> None:
    variants = {
        "fp16": {"precision": "fp16"},
        "bf16": {"precision": "bf16"},
        "channels_last": {"precision": "fp16", "stages.pretrain.channels_last": True,
                          "stages.finetune.channels_last": True},
        "compile": {"precision": "fp16", "stages.pretrain.compile": True,
                    "stages.finetune.compile": True},
    }
    for name, over in variants.items():
        cfg = write_config(tmp, f"quick_{name}", **over)
        t0 = time.perf_counter()
        done = run_cli(pipeline_cmd("run", str(cfg), "--progress", "off"))
        ok = done.returncode == 0
        detail = done.stderr.strip().splitlines()[-1] if not ok and done.stderr else ""
        if ok:
            s = summary(tmp, f"quick_{name}", "finetune")
            ok = s["status"] == "completed" and s["top1"] is not None
            detail = f"finetune top-1 {s['top1']:.2f}, {time.perf_counter() - t0:.0f}s"
        res.check(f"quick pipeline {name}", ok, detail)


class _Stop(Exception):
    pass


def check_deterministic_resume(tmp: Path, res: Results) -> None:
    from pipeline import runner
    from pipeline.trainer import add_checkpoint_hook

    over = {"deterministic": True, "precision": "fp16", "stages.pretrain.epochs": 2,
            "stages.pretrain.checkpoint_every_steps": 6}
    whole = write_config(tmp, "det_whole", **over)
    cut = write_config(tmp, "det_cut", **over)
    runner.run(str(whole), [], stage="pretrain", show_progress=False)

    def stop(trainer) -> None:
        if trainer.saved_step == 6:
            raise _Stop

    remove = add_checkpoint_hook(stop)
    try:
        runner.run(str(cut), [], stage="pretrain", show_progress=False)
    except _Stop:
        pass
    finally:
        remove()
    runner.run(str(cut), [], stage="pretrain", show_progress=False)
    a = checkpoint.load(tmp / "runs/det_whole/pretrain/model.pt")["state_dict"]
    b = checkpoint.load(tmp / "runs/det_cut/pretrain/model.pt")["state_dict"]
    same = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    res.check("kill-and-resume (deterministic, fp16) bitwise", same,
              "" if same else "the resumed run's weights differ")


def check_torchrun(tmp: Path, res: Results) -> None:
    gpus = torch.cuda.device_count()
    cfg = write_config(tmp, "nccl")
    done = run_cli(pipeline_cmd("run", str(cfg), "--stage", "pretrain", "--progress", "off",
                                torchrun=gpus))
    if done.returncode != 0:
        res.check(f"torchrun NCCL x{gpus}", False, done.stderr.strip()[-500:])
        return
    s = summary(tmp, "nccl", "pretrain")
    ev = run_cli(pipeline_cmd("eval", str(tmp / "runs/nccl/pretrain"), "--format", "json"))
    ok = ev.returncode == 0
    detail = ev.stderr.strip()[-300:]
    if ok:
        e = json.loads(ev.stdout)
        ok = e["images"] == 512 and abs(e["top1"] - s["top1"]) < 1e-9
        detail = f"summary top-1 {s['top1']:.2f}, eval {e['top1']:.2f} on {e['images']} images"
    res.check(f"torchrun NCCL x{gpus} + eval", ok, detail)


def check_data_on_device(res: Results) -> None:
    from pipeline.data import DataConfig, SyntheticConfig

    cfg = DataConfig(dataset="synthetic", synthetic=SyntheticConfig(
        num_classes=10, train_size=512, test_size=256, image_size=32))
    data = build_data(cfg, 128, 256, 0, torch.device("cuda"))
    data.train.set_epoch(0)
    x, y = next(iter(data.train.iterate(0)))
    ok = x.is_cuda and y.is_cuda and x.shape == (128, 3, 32, 32)
    res.check("in-memory data path on the device", ok, f"batch {tuple(x.shape)} on {x.device}")


def _seconds(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def bare_loop(model: nn.Module, batches, precision: str, device) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    model.train()
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        with autocast_context(device, precision):
            loss = F.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def trainer_loop(model: nn.Module, batches, precision: str, device, arch: dict,
                 out: Path, channels_last: bool) -> None:
    cfg = TrainConfig(epochs=1, batch_size=batches[0][0].shape[0], lr=0.1,
                      channels_last=channels_last, log_interval=len(batches))
    cfg.schedule.type = "constant"
    data = SimpleNamespace(train=InMemory(batches), test=InMemory([]))
    run = RunSettings(device=device, precision=precision, show_progress=False)
    Trainer(model, cfg, data, out, run=run, arch=arch, base_lr=0.1,
            meta={"stage": "bench"}).fit()


def check_throughput(tmp: Path, res: Results, steps: int) -> float:
    device = torch.device("cuda")
    cases = [("resnet56", {"name": "resnet56", "num_classes": 10, "shortcut": "A"}, 32, 128,
              "fp16", False),
             ("resnet50 fp16", {"name": "resnet50", "num_classes": 1000}, 224, 64, "fp16", True),
             ("resnet50 bf16", {"name": "resnet50", "num_classes": 1000}, 224, 64, "bf16", True)]
    worst = float("inf")
    for name, arch, size, batch, precision, cl in cases:
        fmt = torch.channels_last if cl else torch.contiguous_format
        g = torch.Generator(device="cuda").manual_seed(0)
        batches = [(torch.randn(batch, 3, size, size, device=device, generator=g).contiguous(
            memory_format=fmt), torch.randint(0, arch["num_classes"], (batch,), device=device,
                                              generator=g)) for _ in range(steps)]
        torch.manual_seed(0)
        base = build_model(arch)
        bare_s, trainer_s = [], []
        for r in range(3):  # alternating rounds; the first warms cuDNN up
            m = build_model(arch)
            m.load_state_dict(base.state_dict())
            m = m.to(device, memory_format=fmt)
            bare_s.append(_seconds(lambda m=m, b=batches, pr=precision: bare_loop(
                m, b, pr, device)))
            m = build_model(arch)
            m.load_state_dict(base.state_dict())
            out = tmp / f"bench_{name.replace(' ', '_')}_{r}"
            trainer_s.append(_seconds(lambda m=m, out=out, b=batches, pr=precision, a=arch,
                                      c=cl: trainer_loop(m, b, pr, device, a, out, c)))
        ratio = min(bare_s[1:]) / min(trainer_s[1:])
        worst = min(worst, ratio)
        res.check(f"trainer vs bare {name} batch {batch} {precision}", True,
                  f"bare {batch * steps / min(bare_s[1:]):.0f} img/s, trainer "
                  f"{batch * steps / min(trainer_s[1:]):.0f} img/s, ratio {ratio:.3f}")
    return worst


def check_pruned_latency(res: Results, runs: int) -> float:
    from pipeline.report.latency import model_latency_ms

    arch = {"name": "resnet50", "num_classes": 1000}
    torch.manual_seed(0)
    dense = build_model(arch).eval()
    pruned = build_model(arch)
    pruned.load_state_dict(dense.state_dict())
    prune_model(pruned, PruneSpec(method="fpgm", ratio=0.5), torch.zeros(1, 3, 224, 224))
    shape = (3, 224, 224)
    macs_ratio = count_macs(dense, shape)["total"] / count_macs(pruned, shape)["total"]
    times = {}
    for name, model in (("dense", dense), ("pruned", pruned)):
        model = model.half()
        times[name] = _half_latency(model_latency_ms, model, runs)
    speedup = times["dense"] / times["pruned"]
    share = speedup / macs_ratio
    res.check("pruned ResNet-50 latency", True,
              f"dense {times['dense']:.2f} ms, pruned {times['pruned']:.2f} ms: speedup "
              f"{speedup:.2f}x for {macs_ratio:.2f}x fewer MACs ({share:.2f} of it)")
    return share


def _half_latency(model_latency_ms, model: nn.Module, runs: int) -> float:
    """fp16 weights and input: model_latency_ms draws an fp32 batch, so cast at the input."""
    wrapped = nn.Sequential(_ToHalf(), model)
    return model_latency_ms(wrapped, (3, 224, 224), 64, "cuda", "channels_last",
                            min_runs=runs)


class _ToHalf(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.half()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer timed steps and runs")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: CUDA is not available on this machine; on a GPU it would run:")
        for i, c in enumerate(CHECKS, 1):
            print(f"  {i:2d}. {c}")
        print("targets: " + ", ".join(f"{k} >= {v}" for k, v in TARGETS.items()))
        print("nothing was run (no CUDA device); exiting 0")
        return 0
    print(f"gpu_check on {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    res = Results()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp_name:
        tmp = Path(tmp_name)
        check_quick_pipelines(tmp, res)
        check_deterministic_resume(tmp, res)
        check_torchrun(tmp, res)
        check_data_on_device(res)
        ratio = check_throughput(tmp, res, steps=10 if args.quick else 30)
        share = check_pruned_latency(res, runs=10 if args.quick else 30)
    res.target("trainer_vs_bare", ratio, TARGETS["trainer_vs_bare"])
    res.target("pruned_latency_vs_macs", share, TARGETS["pruned_latency_vs_macs"])
    print(f"{len(res.failed)} check(s) failed" + (f": {', '.join(res.failed)}"
                                                  if res.failed else ""))
    for line in res.targets:
        print(line)
    return 1 if res.failed else 0


if __name__ == "__main__":
    sys.exit(main())
