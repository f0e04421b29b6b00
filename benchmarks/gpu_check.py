"""The GPU check: the CUDA, fp16/bf16 and NCCL paths of the pipeline, run for real on this
machine's GPUs in about 10 minutes, with generated data only (no downloads).

    python benchmarks/gpu_check.py                    # everything
    python benchmarks/gpu_check.py --quick            # fewer timed steps
    python benchmarks/gpu_check.py --plan             # what it runs; nothing is run
    python benchmarks/gpu_check.py --json out.json    # where the summary goes

Every pipeline run is a child process with its own run folder (kernel settings such as
`deterministic: true` cannot leak from one check into the next); the in-process timings
restore the global kernel flags they change. Checks, in order:
  1. accuracy: the quick pipeline (pretrain -> prune -> finetune, CIFAR ResNet-20 on
     generated 32 px data) in fp32 on CUDA against the same seed on the CPU, top-1 within
     ACCURACY_TOLERANCE points; then in fp16 (GradScaler), bf16, channels_last and
     torch.compile, within HALF_TOLERANCE of the CPU run;
  2. paths no other check reaches, on CUDA: precision auto, EMA, mixup, distillation,
     soft masks (prune_during_training), Taylor, the sensitivity sweep with its replay,
     iterative, rewind, and the DataLoader path (a generated image folder, 2 workers);
  3. preemption under deterministic kernels: SIGTERM mid-epoch (exit 143, last.pt at that
     step), then the same command resumes and ends bitwise as an uninterrupted run;
  4. several processes: with 2 or more GPUs, 2 NCCL ranks; with one GPU, 2 gloo ranks on
     it (`distributed.backend: gloo`, the model on CUDA; NCCL itself not exercised);
     then `pipeline eval` under torchrun against the summary; the collectives that ran
     are counted per kind and tensor device and named;
  5. the in-memory data path on the device;
  6. trainer vs bare loop, steps against steps (a trainer hook times the same optimizer
     steps a bare loop runs; checkpoints and evaluation are outside the window):
     ResNet-56 batch 128 fp16; torchvision ResNet-50 batch 64 fp16 and bf16, channels_last;
  7. pruned ResNet-50 (FPGM, half the filters) latency speedup against its MACs ratio,
     batch 64, fp16, channels_last.
It prints one summary table (check, result, figure), writes it to --json, and ends with one
line per target: `target NAME: MEASURED (goal GOAL) met|missed`. On a machine without
CUDA it says so and exits 1: nothing was run, nothing was checked.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
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
from pipeline.models import build_model, count_macs  # noqa: E402
from pipeline.pruning import PruneSpec, prune_model  # noqa: E402
from pipeline.trainer import (  # noqa: E402
    HookBase,
    RunSettings,
    TrainConfig,
    Trainer,
    autocast_context,
)

CHECKS = [
    "accuracy: quick pipeline fp32 on CUDA vs the CPU, same seed",
    "quick pipeline in fp16 with GradScaler",
    "quick pipeline in bf16",
    "quick pipeline with channels_last",
    "quick pipeline with torch.compile",
    "paths on CUDA: precision auto, EMA, mixup, distillation, soft masks, Taylor, "
    "sensitivity replay, iterative, rewind",
    "DataLoader path on CUDA (image folder, 2 workers)",
    "preemption: SIGTERM mid-epoch on CUDA, resumed bitwise (deterministic: true)",
    "several processes: 2 NCCL ranks (2+ GPUs) or 2 gloo ranks on one GPU, collectives named",
    "pipeline eval under torchrun",
    "in-memory data path on the device",
    "trainer vs bare loop, steps vs steps: ResNet-56 batch 128 fp16",
    "trainer vs bare loop, steps vs steps: torchvision ResNet-50 batch 64 fp16 channels_last",
    "trainer vs bare loop, steps vs steps: torchvision ResNet-50 batch 64 bf16 channels_last",
    "pruned ResNet-50 latency vs MACs ratio, batch 64 fp16 channels_last",
]
TARGETS = {"trainer_vs_bare": 0.97, "pruned_latency_vs_macs": 0.7}
ACCURACY_TOLERANCE = 2.0  # top-1 points, fp32 on CUDA vs the CPU (cuDNN sums in other orders)
HALF_TOLERANCE = 5.0  # top-1 points, fp16/bf16/compile on CUDA vs fp32 on the CPU
PREEMPT_STEP = 5  # mid-epoch 1 of the quick pretrain (16 steps per epoch)

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

# the paths no quick pipeline reaches, in one run on CUDA
COVERAGE_STAGES = {
    "pretrain": {"type": "pretrain", "epochs": 2, "batch_size": 128, "lr": 0.1,
                 "precision": "auto", "ema_decay": 0.9, "mixup": 0.2, "save_epochs": [1],
                 "prune_during_training": {"method": "l1", "ratio": 0.3}},
    "sens": {"type": "sensitivity", "from": "pretrain", "ratios": [0.3, 0.6]},
    "taylor": {"type": "prune", "from": "pretrain", "method": "taylor", "ratio": 0.4,
               "use_soft_mask": False, "batches": 2},
    "distill": {"type": "finetune", "from": "taylor", "epochs": 1, "batch_size": 128,
                "lr": 0.01, "distill": {"from": "pretrain", "alpha": 0.5}},
    "iter": {"type": "iterative", "from": "pretrain", "rounds": 2, "finetune_epochs": 1,
             "lr": 0.01, "batch_size": 128},
    "soft": {"type": "prune", "from": "pretrain"},
    "rewind": {"type": "rewind", "from": "soft", "mode": "weights", "rewind_epoch": 1,
               "batch_size": 128},
}


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    """One line of the summary: the check, ok / FAIL / skipped, and what it measured."""

    check: str
    result: str
    figure: str = ""


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)

    def check(self, name: str, ok: bool, figure: str = "") -> None:
        self.rows.append(Row(name, "ok" if ok else "FAIL", figure))
        print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + figure if figure else ''}", flush=True)

    def skip(self, name: str, why: str) -> None:
        self.rows.append(Row(name, "skipped", why))
        print(f"skip {name}: {why}", flush=True)

    def target(self, name: str, measured: float, goal: float) -> None:
        self.targets.append(f"target {name}: {measured:.3f} (goal {goal}) "
                            f"{'met' if measured >= goal else 'missed'}")

    @property
    def failed(self) -> list[str]:
        return [r.check for r in self.rows if r.result == "FAIL"]

    def table(self) -> str:
        """The summary as a fixed-width text table."""
        w = max([len("check"), *(len(r.check) for r in self.rows)])
        lines = [f"{'check':<{w}}  result   figure", f"{'-' * w}  -------  ------"]
        lines += [f"{r.check:<{w}}  {r.result:<7}  {r.figure}" for r in self.rows]
        return "\n".join(lines)

    def write_json(self, path: Path, machine: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"machine": machine, "checks": [asdict(r) for r in self.rows],
                                    "targets": self.targets, "failed": self.failed},
                                   indent=2) + "\n")


def within(gpu_top1: float | None, cpu_top1: float | None, tolerance: float) -> bool:
    """Whether a CUDA run's top-1 matches the CPU run's within `tolerance` points."""
    if gpu_top1 is None or cpu_top1 is None:
        return False
    return abs(gpu_top1 - cpu_top1) <= tolerance


def process_plan(gpus: int) -> dict:
    """How the several-process check runs on `gpus` GPUs: 2 NCCL ranks, or with one GPU 2
    gloo ranks sharing it (the model on CUDA, gloo's collectives on CUDA tensors)."""
    if gpus >= 2:
        return {"ranks": 2, "backend": "nccl", "note": "NCCL collectives on 2 GPUs"}
    return {"ranks": 2, "backend": "gloo",
            "note": "one GPU: 2 gloo ranks share it; NCCL itself is not exercised"}


def collectives_summary(per_rank: list[dict[str, int]]) -> str:
    """The collectives counted in each rank (`{"all_reduce/cuda": n, ...}`) in words: every
    kind with its count on rank 0, and whether all ranks ran the same ones."""
    if not per_rank:
        return "no collective was counted"
    first = per_rank[0]
    kinds = ", ".join(f"{k} x{n}" for k, n in sorted(first.items()))
    same = all(r == first for r in per_rank[1:])
    return (f"{kinds or 'none'} (+ DDP's gradient all-reduce in its C++ reducer every step)"
            f"{'' if same else '; the ranks differ: ' + json.dumps(per_rank)}")


# --------------------------------------------------------------------------- running


def pipeline_cmd(*args: str, torchrun: int = 0) -> list[str]:
    if torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(torchrun), "-m", "pipeline", *args]
    return [sys.executable, "-m", "pipeline", *args]


def run_cli(args: list[str], timeout: int = 600, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    full = dict(os.environ, **(env or {}))
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [full.pop("EXTRA_PATH", ""), str(ROOT),
                                                      os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(args, cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


def write_config(tmp: Path, name: str, base: dict | None = None, **over) -> Path:
    cfg = json.loads(json.dumps(base or QUICK))
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


def last_line(done: subprocess.CompletedProcess) -> str:
    lines = (done.stderr or "").strip().splitlines()
    return lines[-1][-300:] if lines else f"exit {done.returncode}"


@contextlib.contextmanager
def kernel_flags() -> Iterator[None]:
    """Restore the global kernel settings a block changes (deterministic algorithms,
    cuDNN benchmark/deterministic): one check cannot change the next one's kernels."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[1:]


# --------------------------------------------------------------------------- the checks


def check_accuracy(tmp: Path, res: Results) -> None:
    """The quick pipeline on the CPU and in fp32 on CUDA, then the half/compile variants."""
    top1 = {}
    for name, over in {"cpu": {"device": "cpu"}, "fp32": {"precision": "fp32"}}.items():
        done = run_cli(pipeline_cmd("run", str(write_config(tmp, f"quick_{name}", **over)),
                                    "--progress", "off"), timeout=900)
        top1[name] = summary(tmp, f"quick_{name}", "finetune")["top1"] \
            if done.returncode == 0 else None
        if done.returncode != 0:
            res.check(f"quick pipeline {name}", False, last_line(done))
    cpu = top1["cpu"]
    res.check("accuracy: fp32 on CUDA vs the CPU", within(top1["fp32"], cpu, ACCURACY_TOLERANCE),
              f"finetune top-1 {top1['fp32']} on CUDA, {cpu} on the CPU (tolerance "
              f"{ACCURACY_TOLERANCE} points)")
    variants = {
        "fp16": {"precision": "fp16"},
        "bf16": {"precision": "bf16"},
        "channels_last": {"precision": "fp16", "stages.pretrain.channels_last": True,
                          "stages.finetune.channels_last": True},
        "compile": {"precision": "fp16", "stages.pretrain.compile": True,
                    "stages.finetune.compile": True},
    }
    for name, over in variants.items():
        t0 = time.perf_counter()
        done = run_cli(pipeline_cmd("run", str(write_config(tmp, f"quick_{name}", **over)),
                                    "--progress", "off"))
        if done.returncode != 0:
            res.check(f"quick pipeline {name}", False, last_line(done))
            continue
        got = summary(tmp, f"quick_{name}", "finetune")["top1"]
        res.check(f"quick pipeline {name}", within(got, cpu, HALF_TOLERANCE),
                  f"finetune top-1 {got:.2f} (CPU fp32 {cpu}, tolerance {HALF_TOLERANCE}), "
                  f"{time.perf_counter() - t0:.0f}s")


def check_coverage(tmp: Path, res: Results) -> None:
    """precision auto, EMA, mixup, soft masks, sensitivity replay, Taylor, distillation,
    iterative and rewind in one run on CUDA."""
    base = {**QUICK, "stages": COVERAGE_STAGES, "precision": "auto"}
    done = run_cli(pipeline_cmd("run", str(write_config(tmp, "coverage", base)), "--progress",
                                "off"), timeout=900)
    for stage in COVERAGE_STAGES:
        path = tmp / "runs" / "coverage" / stage / "summary.json"
        s = json.loads(path.read_text()) if path.is_file() else {}
        ok = s.get("status") == "completed"
        figure = last_line(done) if not ok else _coverage_figure(stage, s)
        res.check(f"on CUDA: {stage} ({COVERAGE_STAGES[stage]['type']})", ok, figure)


def _coverage_figure(stage: str, s: dict) -> str:
    if stage == "pretrain":
        return (f"precision auto chose {s.get('precision')}, top-1 {s.get('top1')}, "
                f"soft-pruned filters {s.get('soft_pruned_filters')}")
    if stage == "sens":
        return f"{s.get('replayed')} evaluations by replay, base top-1 {s.get('base_top1')}"
    return f"top-1 {s.get('top1')}, MACs {s.get('macs')}"


def image_folder(root: Path, classes: int = 4, per_class: int = 32, size: int = 40) -> Path:
    """A generated ImageFolder tree (train/ and val/) of PNGs."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", per_class), ("val", per_class // 4)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = (torch.rand(size, size, 3, generator=g) * 64 + 48 * c).clamp(0, 255)
                Image.fromarray(img.to(torch.uint8).numpy()).save(folder / f"{i}.png")
    return root


def check_dataloader_path(tmp: Path, res: Results) -> None:
    data = image_folder(tmp / "folder")
    cfg = write_config(tmp, "folder", {
        **QUICK, "data": {"dataset": "imagefolder", "root": str(data), "image_size": 32,
                          "loader": "dataloader", "num_workers": 2},
        "stages": {"pretrain": {**QUICK["stages"]["pretrain"], "batch_size": 32}}})
    done = run_cli(pipeline_cmd("run", str(cfg), "--progress", "off"))
    ok = done.returncode == 0
    figure = last_line(done) if not ok else \
        f"pretrain top-1 {summary(tmp, 'folder', 'pretrain')['top1']}"
    res.check("DataLoader path on CUDA (2 workers)", ok, figure)


def check_preemption(tmp: Path, res: Results) -> None:
    """deterministic: true; SIGTERM after PREEMPT_STEP (mid-epoch); resume; bitwise."""
    over = {"deterministic": True, "precision": "fp16"}
    whole = write_config(tmp, "det_whole", **over)
    cut = write_config(tmp, "det_cut", **over)
    done = run_cli(pipeline_cmd("run", str(whole), "--stage", "pretrain", "--progress", "off"))
    if done.returncode != 0:
        res.check("preemption on CUDA, bitwise resume", False, last_line(done))
        return
    stopped = run_cli([sys.executable, str(Path(__file__)), "--sigterm-at",
                       f"pretrain:{PREEMPT_STEP}", "--", "run", str(cut), "--stage",
                       "pretrain", "--progress", "off"])
    last = tmp / "runs/det_cut/pretrain/last.pt"
    step = checkpoint.load(last)["global_step"] if last.is_file() else None
    resumed = run_cli(pipeline_cmd("run", str(cut), "--stage", "pretrain", "--progress", "off"))
    same = resumed.returncode == 0 and _same_weights(
        tmp / "runs/det_whole/pretrain/model.pt", tmp / "runs/det_cut/pretrain/model.pt")
    ok = stopped.returncode == 143 and step == PREEMPT_STEP and same
    res.check("preemption on CUDA (SIGTERM mid-epoch), bitwise resume", ok,
              f"exit {stopped.returncode} (want 143), last.pt at step {step} (want "
              f"{PREEMPT_STEP}), resumed weights {'bitwise equal' if same else 'DIFFER'}")


def _same_weights(a: Path, b: Path) -> bool:
    if not (a.is_file() and b.is_file()):
        return False
    x, y = checkpoint.load(a)["state_dict"], checkpoint.load(b)["state_dict"]
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


# counts every Python-level collective of a torchrun child by kind and tensor device
COUNTER = '''
import os
if os.environ.get("RANK") is not None and os.environ.get("COLLECTIVES_OUT"):
    import atexit, json
    import torch
    import torch.distributed as dist
    _counts = {}
    def _wrap(name):
        real = getattr(dist, name)
        def counted(*a, **k):
            t = next((x for x in a if isinstance(x, torch.Tensor)), None)
            if t is None and a and isinstance(a[0], list) and a[0] and \\
                    isinstance(a[0][0], torch.Tensor):
                t = a[0][0]
            key = name + ("/" + t.device.type if t is not None else "")
            _counts[key] = _counts.get(key, 0) + 1
            return real(*a, **k)
        setattr(dist, name, counted)
    for _n in ("all_reduce", "broadcast", "all_gather", "all_gather_object",
               "broadcast_object_list", "barrier"):
        _wrap(_n)
    def _dump():
        with open(os.path.join(os.environ["COLLECTIVES_OUT"],
                               "rank%s.json" % os.environ["RANK"]), "w") as f:
            json.dump(_counts, f)
    atexit.register(_dump)
'''


def check_processes(tmp: Path, res: Results) -> None:
    """2 ranks (NCCL, or gloo on one GPU) through the quick pipeline, then `eval` under
    torchrun against the summary, with the collectives that ran named."""
    plan = process_plan(torch.cuda.device_count())
    counter = tmp / "counter"
    counter.mkdir(exist_ok=True)
    (counter / "sitecustomize.py").write_text(COUNTER)
    env = {"EXTRA_PATH": str(counter), "COLLECTIVES_OUT": str(counter)}
    cfg = write_config(tmp, "ranks", **{"distributed.backend": plan["backend"]})
    name = f"torchrun {plan['ranks']} x {plan['backend']}"
    done = run_cli(pipeline_cmd("run", str(cfg), "--progress", "off", torchrun=plan["ranks"]),
                   timeout=900, env=env)
    counts = [json.loads(p.read_text()) for p in sorted(counter.glob("rank*.json"))]
    if done.returncode != 0:
        res.check(name, False, last_line(done))
        return
    res.check(name, True, f"{plan['note']}; collectives: {collectives_summary(counts)}")
    s = summary(tmp, "ranks", "finetune")
    ev = run_cli(pipeline_cmd("eval", str(tmp / "runs/ranks/finetune"), "--format", "json",
                              torchrun=plan["ranks"]), env=env)
    ok = ev.returncode == 0
    figure = last_line(ev)
    if ok:
        e = json.loads(ev.stdout)
        ok = e["images"] == QUICK["data"]["synthetic"]["test_size"] and within(
            e["top1"], s["top1"], 1e-6) and e["processes"] == plan["ranks"]
        figure = (f"summary top-1 {s['top1']:.2f}, eval {e['top1']:.2f} on {e['images']} "
                  f"images by {e['processes']} processes")
    res.check(f"pipeline eval under {name}", ok, figure)


def check_data_on_device(res: Results) -> None:
    from pipeline.data import DataConfig, SyntheticConfig, build_data

    cfg = DataConfig(dataset="synthetic", synthetic=SyntheticConfig(
        num_classes=10, train_size=512, test_size=256, image_size=32))
    data = build_data(cfg, 128, 256, 0, torch.device("cuda"))
    data.train.set_epoch(0)
    x, y = next(iter(data.train.iterate(0)))
    ok = x.is_cuda and y.is_cuda and x.shape == (128, 3, 32, 32)
    res.check("in-memory data path on the device", ok, f"batch {tuple(x.shape)} on {x.device}")


class StepTimer(HookBase):
    """Times optimizer steps `skip`+1 .. `skip`+`count` of a Trainer (CUDA synchronized at
    both ends): steps only, not its checkpoints or evaluation."""

    def __init__(self, skip: int, count: int, sync=None):
        self.skip, self.count, self.sync = skip, count, sync or torch.cuda.synchronize
        self.t0: float | None = None
        self.seconds: float | None = None
        self.steps = 0

    def before_train(self, trainer) -> None:
        if self.skip == 0:
            self.sync()
            self.t0 = time.perf_counter()

    def after_step(self, trainer) -> None:
        step = trainer.global_step
        if step == self.skip and self.skip > 0:
            self.sync()
            self.t0 = time.perf_counter()
        elif self.t0 is not None and self.seconds is None and step > self.skip:
            self.steps += 1
            if self.steps == self.count:
                self.sync()
                self.seconds = time.perf_counter() - self.t0


def bare_loop(model: nn.Module, batches, precision: str, device, skip: int) -> float:
    """The reference: fused SGD steps, nothing else; seconds of the steps after `skip`."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    model.train()
    t0 = None
    for i, (x, y) in enumerate(batches):
        if i == skip:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast_context(device, precision):
            loss = F.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def trainer_steps(model: nn.Module, batches, precision: str, device, arch: dict, out: Path,
                  channels_last: bool, skip: int) -> float:
    """The Trainer on the same batches; seconds of the same steps (StepTimer)."""
    cfg = TrainConfig(epochs=1, batch_size=batches[0][0].shape[0], lr=0.1,
                      channels_last=channels_last, log_interval=len(batches))
    cfg.schedule.type = "constant"
    data = SimpleNamespace(train=InMemory(batches), test=InMemory([]))
    run = RunSettings(device=device, precision=precision, show_progress=False)
    timer = StepTimer(skip, len(batches) - skip)
    Trainer(model, cfg, data, out, run=run, arch=arch, base_lr=0.1, meta={"stage": "bench"},
            hooks=[timer]).fit()
    return timer.seconds


def check_throughput(tmp: Path, res: Results, steps: int) -> float:
    device = torch.device("cuda")
    cases = [("resnet56", {"name": "resnet56", "num_classes": 10, "shortcut": "A"}, 32, 128,
              "fp16", False),
             ("resnet50 fp16", {"name": "resnet50", "num_classes": 1000}, 224, 64, "fp16", True),
             ("resnet50 bf16", {"name": "resnet50", "num_classes": 1000}, 224, 64, "bf16", True)]
    skip = max(2, steps // 5)  # warm-up steps outside the window (cuDNN autotuning)
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
        with kernel_flags():
            torch.backends.cudnn.benchmark = True  # as a run on CUDA sets it
            for r in range(2):  # alternating rounds, the faster of each kept
                m = build_model(arch)
                m.load_state_dict(base.state_dict())
                bare_s.append(bare_loop(m.to(device, memory_format=fmt), batches, precision,
                                        device, skip))
                m = build_model(arch)
                m.load_state_dict(base.state_dict())
                trainer_s.append(trainer_steps(m, batches, precision, device, arch,
                                               tmp / f"bench_{name.replace(' ', '_')}_{r}",
                                               cl, skip))
        ratio = min(bare_s) / min(trainer_s)
        worst = min(worst, ratio)
        timed = batch * (steps - skip)
        res.check(f"trainer vs bare {name} batch {batch} {precision}", True,
                  f"bare {timed / min(bare_s):.0f} img/s, trainer {timed / min(trainer_s):.0f} "
                  f"img/s over the same {steps - skip} steps, ratio {ratio:.3f}")
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
    with kernel_flags():
        torch.backends.cudnn.benchmark = True
        for name, model in (("dense", dense), ("pruned", pruned)):
            wrapped = nn.Sequential(_ToHalf(), model.half())  # fp16 weights and input
            times[name] = model_latency_ms(wrapped, shape, 64, "cuda", "channels_last",
                                           min_runs=runs)
    speedup = times["dense"] / times["pruned"]
    share = speedup / macs_ratio
    res.check("pruned ResNet-50 latency", True,
              f"dense {times['dense']:.2f} ms, pruned {times['pruned']:.2f} ms: speedup "
              f"{speedup:.2f}x for {macs_ratio:.2f}x fewer MACs ({share:.2f} of it)")
    return share


class _ToHalf(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.half()


# --------------------------------------------------------------------------- entry points


class SigtermAt(HookBase):
    """Sends SIGTERM to this process after optimizer step `step` of stage `stage`."""

    def __init__(self, stage: str, step: int):
        self.stage, self.step = stage, step

    def after_step(self, trainer) -> None:
        if trainer.stage == self.stage and trainer.global_step == self.step:
            import signal

            os.kill(os.getpid(), signal.SIGTERM)


def plan_text() -> str:
    lines = ["gpu_check runs, on a machine with CUDA:"]
    lines += [f"  {i:2d}. {c}" for i, c in enumerate(CHECKS, 1)]
    lines.append("targets: " + ", ".join(f"{k} >= {v}" for k, v in TARGETS.items()))
    return "\n".join(lines)


def machine() -> dict:
    from pipeline.provenance import cpu_name

    return {"gpus": torch.cuda.device_count(), "gpu": torch.cuda.get_device_name(0),
            "cpu": cpu_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "date": time.strftime("%Y-%m-%d")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer timed steps and runs")
    p.add_argument("--plan", action="store_true", help="print the checks; run nothing")
    p.add_argument("--json", type=Path, default=Path("gpu_check.json"),
                   help="where the summary table goes (default: ./gpu_check.json)")
    p.add_argument("--sigterm-at", metavar="STAGE:STEP",
                   help="(internal) run `pipeline ARGS` after `--`, SIGTERM after that step")
    args, rest = p.parse_known_args(argv)
    if args.sigterm_at:
        from pipeline.cli import main as cli_main

        stage, step = args.sigterm_at.split(":")
        return cli_main([a for a in rest if a != "--"], hooks=[SigtermAt(stage, int(step))])
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.plan:
        print(plan_text())
        return 0
    if not torch.cuda.is_available():
        print(plan_text())
        print("gpu_check: error: CUDA is not available on this machine "
              "(torch.cuda.is_available() is False); nothing was run, nothing was checked",
              file=sys.stderr)
        return 1
    info = machine()
    print(f"gpu_check on {info['gpus']} x {info['gpu']}, torch {info['torch']}, CUDA "
          f"{info['cuda']}", flush=True)
    res = Results()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp_name:
        tmp = Path(tmp_name)
        check_accuracy(tmp, res)
        check_coverage(tmp, res)
        check_dataloader_path(tmp, res)
        check_preemption(tmp, res)
        check_processes(tmp, res)
        check_data_on_device(res)
        ratio = check_throughput(tmp, res, steps=15 if args.quick else 40)
        share = check_pruned_latency(res, runs=10 if args.quick else 30)
    res.target("trainer_vs_bare", ratio, TARGETS["trainer_vs_bare"])
    res.target("pruned_latency_vs_macs", share, TARGETS["pruned_latency_vs_macs"])
    print()
    print(res.table())
    res.write_json(args.json, info)
    print(f"\nsummary written to {args.json}; {len(res.failed)} check(s) failed"
          + (f": {', '.join(res.failed)}" if res.failed else ""))
    for line in res.targets:
        print(line)
    return 1 if res.failed else 0


if __name__ == "__main__":
    sys.exit(main())
