"""The CIFAR-10 study's pretrain throughput against a plain torchvision loop.

Side by side in one run, for one epoch's worth of training steps (196 steps of 256 images):

  study   the pipeline's pretrain stage as `configs/cifar10_cpu_study.yaml` sets it up: the
          in-memory uint8 fast path (batched pad-crop + flip on tensors) feeding our Trainer
          (its train_step: per-step lr from the schedule, label smoothing, on-device stats);
  plain   torchvision `ImageFolder` + `DataLoader(num_workers=2, shuffle)` with the usual
          transforms (RandomCrop 32 pad 4, flip, ToTensor, Normalize) and a hand-written
          loop: same model (ResNet-20, channels_last), optimizer, loss and precision (fp32).

The two alternate in chunks, so a change in machine load hits both. Images/s count the
images trained on, from the first step of a chunk to the last (the DataLoader's worker
start-up is excluded: its iterator is created once, before timing, and kept).

    python benchmarks/study_speed.py             # one epoch's worth of steps each (195)
    python benchmarks/study_speed.py --quick     # 24 steps each, under a minute
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.data import build_data  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.provenance import cpu_name  # noqa: E402
from pipeline.runconfig import load_config  # noqa: E402
from pipeline.trainer import RunSettings, Trainer  # noqa: E402

TARGET = 1.5
CONFIG = ROOT / "configs" / "cifar10_cpu_study.yaml"
SHARED = ROOT.parent / "shared" / "data" / "get_cifar10.sh"


def data_root(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    for cand in (ROOT / "data" / "cifar10", Path(tempfile.gettempdir()) / "cifar10"):
        if (cand / "train").is_dir():
            return cand
    if not SHARED.is_file():
        sys.exit("skipped: no CIFAR-10 ImageFolder tree (train/, test/ of image files): "
                 "pass --root DIR")
    dest = Path(tempfile.gettempdir()) / "cifar10"
    subprocess.run(["bash", str(SHARED), str(dest)], check=True)
    return dest


def study_side(root: Path, device: torch.device):
    """The Trainer of the study's pretrain stage, on the fast path."""
    cfg, _ = load_config(CONFIG, [f"data.root={root}", "data.download=false"])
    spec = cfg.stages["pretrain"]
    data = build_data(cfg.data, spec.batch_size, spec.batch_size, cfg.seed, device,
                      channels_last=spec.channels_last)
    torch.manual_seed(0)
    model = build_model({"name": "resnet20", "num_classes": 10, "shortcut": "A"})
    out = Path(tempfile.mkdtemp(prefix="study_speed_"))
    trainer = Trainer(model, spec, data, out, run=RunSettings(device=device, show_progress=False),
                      arch={"name": "resnet20", "num_classes": 10}, base_lr=spec.resolved_lr(0.1))
    data.train.set_epoch(0)
    return trainer, data.train.iterate(0), spec


def plain_side(root: Path, spec, workers: int):
    import torchvision
    from torchvision import transforms as T

    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))])
    ds = torchvision.datasets.ImageFolder(str(root / "train"), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=spec.batch_size, shuffle=True,
                                         num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0)
    torch.manual_seed(0)
    model = build_model({"name": "resnet20", "num_classes": 10, "shortcut": "A"})
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    it = iter(loader)
    first = next(it)  # worker start-up, outside the timing
    return step, it, first, len(loader)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="24 steps each (under a minute)")
    ap.add_argument("--root", help="the real CIFAR-10 as an ImageFolder tree of image files "
                    "(train/, test/; default: data/cifar10 when it holds one)")
    ap.add_argument("--workers", type=int, default=2, help="plain DataLoader workers")
    args = ap.parse_args()
    root = data_root(args.root)
    device = torch.device("cpu")
    trainer, study_it, spec = study_side(root, device)
    step, plain_it, pending, plain_len = plain_side(root, spec, args.workers)
    # one epoch's worth: the epoch's batches less the untimed warm-up step
    steps = 24 if args.quick else min(len(trainer.data.train), plain_len) - 1
    chunk = 8 if args.quick else 49
    times = {"study": 0.0, "plain": 0.0}
    images = {"study": 0, "plain": 0}
    done = 0
    # one untimed step each so both start warm
    x, y = next(study_it)
    trainer.train_step(x, y)
    step(*pending)
    while done < steps:
        n = min(chunk, steps - done)
        t0 = time.perf_counter()
        for _ in range(n):
            x, y = next(study_it)
            trainer.train_step(x, y)
            images["study"] += len(y)
        float(trainer.acc[0])  # the host sync the trainer does once per interval
        times["study"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(n):
            x, y = next(plain_it)
            step(x, y)
            images["plain"] += len(y)
        times["plain"] += time.perf_counter() - t0
        done += n
        print(f"  {done}/{steps} steps: study {images['study'] / times['study']:.0f} img/s, "
              f"plain {images['plain'] / times['plain']:.0f} img/s", flush=True)
    rate = {k: images[k] / times[k] for k in times}
    ratio = rate["study"] / rate["plain"]
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} "
          f"torch threads, torch {torch.__version__}, batch {spec.batch_size}, fp32, "
          f"channels_last, {steps} steps each")
    print(f"| study pretrain (fast path + Trainer) | {rate['study']:.0f} img/s |")
    print(f"| torchvision ImageFolder + DataLoader({args.workers}) + plain loop | "
          f"{rate['plain']:.0f} img/s |")
    verdict = "met" if ratio >= TARGET else "missed"
    print(f"target study_throughput: {ratio:.2f}x (goal >= {TARGET}x) {verdict}")


if __name__ == "__main__":
    main()
