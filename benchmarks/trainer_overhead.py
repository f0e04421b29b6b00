"""Trainer overhead: images/s of `pipeline.trainer.Trainer.fit()` against a bare PyTorch
loop on the same model (CIFAR ResNet-20), the same batches already in memory and the same
precision, measured side by side in one run (rounds alternate bare/trainer, so a load
change on a shared machine hits both).

The trainer's round is a whole `fit()` of one epoch: lr schedule, on-device statistics,
the end-of-epoch host sync, metrics row, train_log.csv and the last.pt/best.pt writes;
evaluation gets an empty test set (the bare loop does not evaluate either).

    python benchmarks/trainer_overhead.py            # 8 rounds of 20 steps
    python benchmarks/trainer_overhead.py --quick    # 3 rounds of 5 steps, under a minute

One CPU thread by default: on a small shared machine, OpenMP threads that wait at every
operator's barrier for a core another process holds make both loops several times slower
and the measurement mostly noise (`--threads 2` to see it).
"""

from __future__ import annotations

import argparse
import copy
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.models import build_model  # noqa: E402
from pipeline.trainer import RunSettings, TrainConfig, Trainer, autocast_context  # noqa: E402

ARCH = {"name": "resnet20", "num_classes": 10, "shortcut": "A"}
TARGET = 0.97


class InMemory:
    """The loader protocol over batches already in memory (no augmentation, no copies)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.batches = batches
        self.memory_format = torch.contiguous_format  # the batches are made in the right one

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        pass

    def iterate(self, start: int = 0):
        yield from self.batches[start:]

    def __iter__(self):
        return self.iterate(0)


def bare_loop(model: nn.Module, batches, precision: str, device: torch.device) -> float:
    """The reference: SGD step by step, nothing else. Returns seconds."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.train()
    clock = _Clock()
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        with autocast_context(device, precision):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
    _sync(device)
    return clock.stop()


def trainer_loop(model: nn.Module, batches, precision: str, device: torch.device,
                 out_dir: Path) -> float:
    """One epoch of the pipeline's Trainer over the same batches. Returns seconds."""
    shutil.rmtree(out_dir, ignore_errors=True)  # never resume from the previous round
    cfg = TrainConfig(epochs=1, batch_size=batches[0][0].shape[0], lr=0.1)
    cfg.schedule.type = "constant"
    data = SimpleNamespace(train=InMemory(batches), test=InMemory([]))
    clock = _Clock()
    run = RunSettings(device=device, precision=precision, show_progress=False)
    trainer = Trainer(model, cfg, data, out_dir, run=run, arch=ARCH, base_lr=0.1,
                      meta={"stage": "bench"})
    trainer.fit()
    _sync(device)
    return clock.stop()


class _Clock:
    """Wall seconds, and this process's CPU seconds: with one thread on a shared machine
    the CPU time is the work done, the wall time also the waits for a core."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 rounds of 5 steps (under a minute)")
    p.add_argument("--rounds", type=int, default=None, help="measured rounds (default 8)")
    p.add_argument("--steps", type=int, default=None, help="steps per round (default 20)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--batch", type=int, default=128, help="batch size")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 8)
    steps = args.steps or (5 if args.quick else 20)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch, 3, 32, 32, generator=g).to(device),
                torch.randint(10, (args.batch,), generator=g).to(device)) for _ in range(steps)]
    torch.manual_seed(0)
    init = build_model(ARCH).to(device)
    out_dir = Path(tempfile.mkdtemp(prefix="trainer_overhead_"))
    print(f"# ResNet-20, batch {args.batch}, {args.precision}, {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}; {rounds} rounds x {steps} steps "
          f"(after a 2-step warm-up)")
    wall: dict[str, list[float]] = {"bare": [], "trainer": []}
    cpu: dict[str, list[float]] = {"bare": [], "trainer": []}
    images = steps * args.batch
    try:
        # warm-up: allocator, oneDNN primitive caches, lazy imports
        bare_loop(copy.deepcopy(init), batches[:2], args.precision, device)
        trainer_loop(copy.deepcopy(init), batches[:2], args.precision, device, out_dir)
        for r in range(1, rounds + 1):
            # alternate the order so a drift in machine load hits both sides alike
            order = ("bare", "trainer") if r % 2 else ("trainer", "bare")
            for kind in order:
                model = copy.deepcopy(init)
                if kind == "bare":
                    w, c = bare_loop(model, batches, args.precision, device)
                else:
                    w, c = trainer_loop(model, batches, args.precision, device, out_dir)
                wall[kind].append(images / w)
                cpu[kind].append(images / c)
            print(f"round {r}: wall img/s  bare {wall['bare'][-1]:6.1f}  trainer "
                  f"{wall['trainer'][-1]:6.1f}  ratio {wall['trainer'][-1] / wall['bare'][-1]:.3f}"
                  f"   |   per CPU-second  bare {cpu['bare'][-1]:6.1f}  trainer "
                  f"{cpu['trainer'][-1]:6.1f}  ratio {cpu['trainer'][-1] / cpu['bare'][-1]:.3f}")
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    ratio = {name: statistics.median(t / b for t, b in zip(d["trainer"], d["bare"], strict=True))
             for name, d in (("wall", wall), ("cpu", cpu))}
    print(f"\n| loop | images/s, wall (median of {rounds}) | images per CPU-second |\n"
          f"|---|---|---|\n"
          f"| bare PyTorch | {statistics.median(wall['bare']):.1f} | "
          f"{statistics.median(cpu['bare']):.1f} |\n"
          f"| pipeline Trainer | {statistics.median(wall['trainer']):.1f} | "
          f"{statistics.median(cpu['trainer']):.1f} |\n"
          f"| trainer / bare (median of paired rounds) | {ratio['wall']:.3f} | "
          f"{ratio['cpu']:.3f} |\n")
    # one thread: CPU time is the fair measure on a shared machine; else wall time
    key = "cpu" if device.type == "cpu" and args.threads == 1 else "wall"
    verdict = "met" if ratio[key] >= TARGET else "missed"
    print(f"target trainer_overhead: {ratio[key]:.3f} (goal >= {TARGET}, {key} time) {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
