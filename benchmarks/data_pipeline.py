"""Images/s delivered to the training step: the in-memory fast path against the usual
torchvision ImageFolder + DataLoader(num_workers=2), side by side on the real CIFAR-10.

    python benchmarks/data_pipeline.py [--quick] [--data DIR] [--device cpu|cuda]

Measured in one run, on the same images and device:
  * data only: batches of (augmented, normalized) images on the device, images/s;
  * data + a ResNet-20 training step (SGD, fp32): images/s, and the share of the step's
    wall time spent waiting for data.
The fast path is `pipeline.data.build_data` (decoded once into a uint8 tensor on the
device, pad-crop and flip in one gather per batch). The baseline is what most CIFAR
code does: ImageFolder(RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor(),
Normalize) + DataLoader(shuffle, num_workers=2, pin_memory on CUDA), timed from the
start of its epoch (worker start-up included, as every epoch pays it). The pipeline's
own DataLoader path (persistent workers, uint8 transfer) is shown for reference.

Needs the real CIFAR-10 as an ImageFolder tree of image files (`--data DIR`: train/ and
test/, one folder per class, 50,000 + 10,000 images, e.g. torchvision's CIFAR10 written out
as PNG files); skips with a reason when it is absent. Ends with one line per target.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import Loader  # noqa: E402
from pipeline.data import (  # noqa: E402
    CIFAR10_MEAN,
    CIFAR10_STD,
    DataConfig,
    TensorLoader,
    build_data,
    cache_paths,
    read_split,
)
from pipeline.models import build_model  # noqa: E402

FETCH = ROOT.parent / "shared" / "data" / "get_cifar10.sh"  # unpacks the tree, where present
GOAL_RATIO, GOAL_SHARE = 5.0, 0.05


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def baseline_loader(root: Path, batch_size: int, device: torch.device, workers: int = 2):
    """torchvision's usual CIFAR pipeline over the JPEG tree."""
    import torchvision
    from torchvision import transforms as T

    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    ds = torchvision.datasets.ImageFolder(str(root / "train"), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True,
                                       num_workers=workers, pin_memory=device.type == "cuda")


def batches_of(name: str, source, device: torch.device):
    """An iterator of (x, y) on the device for one epoch of `source`."""
    if name == "baseline":
        for x, y in source:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    else:
        source.set_epoch(0)
        yield from source.iterate(0)


def data_only(name: str, source, device: torch.device,
              n_batches: int) -> tuple[float, float, int]:
    """(seconds to the first batch, seconds for the next n_batches, their images): the
    rate is steady state, the epoch's start-up (worker launch) is reported apart."""
    sync(device)
    t0 = time.perf_counter()
    it = batches_of(name, source, device)
    next(it)
    sync(device)
    t1 = time.perf_counter()
    images = 0
    for i, (x, _) in enumerate(it):
        images += len(x)
        if i + 1 == n_batches:
            break
    sync(device)
    it.close()
    return t1 - t0, time.perf_counter() - t1, images


def with_step(name: str, source, device: torch.device, n_steps: int,
              warmup: int = 1) -> tuple[float, float, int]:
    """(seconds waiting for data, seconds in the step, images) over n_steps after the
    warm-up steps (which absorb the worker start-up of the DataLoader)."""
    torch.manual_seed(0)
    model = build_model({"name": "resnet20", "num_classes": 10, "shortcut": "A"}).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    x0 = torch.zeros(8, 3, 32, 32, device=device)  # warm the kernels, outside the epoch
    loss_fn(model(x0), torch.zeros(8, dtype=torch.long, device=device)).backward()
    opt.zero_grad(set_to_none=True)
    t_data = t_step = 0.0
    images = 0
    sync(device)
    it = batches_of(name, source, device)
    for i in range(warmup + n_steps):
        t0 = time.perf_counter()
        x, y = next(it)
        sync(device)
        t1 = time.perf_counter()
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        t2 = time.perf_counter()
        if i >= warmup:
            t_data += t1 - t0
            t_step += t2 - t1
            images += len(x)
    it.close()
    return t_data, t_step, images


def cifar_tree(dest: Path) -> Path | None:
    """The CIFAR-10 ImageFolder tree at `dest` (unpacked there first by the fetch script when
    the tree is incomplete and the script exists), or None."""
    if FETCH.is_file():
        subprocess.run([str(FETCH), str(dest)], check=True, stdout=subprocess.DEVNULL)
    return dest if (dest / "train").is_dir() and (dest / "test").is_dir() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a fraction of an epoch (under a minute)")
    p.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "pipeline-bench-cifar10"),
                   help="the CIFAR-10 ImageFolder tree of image files (train/, test/)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    root = cifar_tree(Path(args.data))
    if root is None:
        print(f"skipped: no CIFAR-10 ImageFolder tree at {args.data} (train/ and test/ of "
              "image files): give --data DIR")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bs = args.batch_size
    cpu = device.type == "cpu"
    n_data = 10 if args.quick else 50000 // bs - 1  # batches after the first, data only
    # measured ResNet-20 steps (after one warm-up); a CPU step takes seconds, so fewer
    n_steps = 2 if args.quick else (5 if cpu else 50)
    step_bs = (64 if args.quick else 128) if cpu else bs

    cfg = Loader("benchmark").load(DataConfig, {"dataset": "cifar10", "root": str(root),
                                                "loader": "tensor"}, "data")
    cached = any(p.is_file() for p in cache_paths(root / "train", 32))
    t0 = time.perf_counter()
    train = read_split(cfg, True, 0)  # what build_data does on the fast path
    start_up = time.perf_counter() - t0
    fast = TensorLoader(train, bs, True, 0, device, CIFAR10_MEAN, CIFAR10_STD)
    fast_step = TensorLoader(train, step_bs, True, 0, device, CIFAR10_MEAN, CIFAR10_STD)
    dl_cfg = Loader("benchmark").load(DataConfig, {
        "dataset": "cifar10", "root": str(root), "loader": "dataloader", "num_workers": 2,
        "persistent_workers": True}, "data")
    ours_dl = build_data(dl_cfg, bs, bs, 0, device).train

    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads"
    print(f"device {device} ({what}), torch {torch.__version__}, batch {bs}, "
          f"{'quick' if args.quick else 'full'}")
    how = "read from the cache" if cached else "decoded 50,000 JPEGs and wrote the cache"
    print(f"fast path start-up (training split): {start_up:.1f} s, {how}")
    rows = []
    for name, label, source in (
            ("fast", "fast path (in-memory tensor)", fast),
            ("baseline", "torchvision ImageFolder + DataLoader(num_workers=2)",
             baseline_loader(root, bs, device)),
            ("ours_dl", "pipeline DataLoader path (2 persistent workers)", ours_dl)):
        start, secs, imgs = data_only(name, source, device, n_data)
        rows.append((name, label, imgs / secs, start))
    rate = {name: r for name, _, r, _ in rows}
    print(f"\ndata only ({n_data} batches of {bs} after the first; first batch apart):")
    for _, label, r, start in rows:
        print(f"  {label:<55} {r:>10,.0f} img/s   first batch {start:5.2f} s")

    print(f"\ndata + ResNet-20 train step ({n_steps} steps of {step_bs}, after 1 warm-up):")
    shares = {}
    for name, label, source in (
            ("fast", "fast path", fast_step),
            ("baseline", "torchvision ImageFolder + DataLoader(2)",
             baseline_loader(root, step_bs, device))):
        t_data, t_step, imgs = with_step(name, source, device, n_steps)
        shares[name] = t_data / (t_data + t_step)
        print(f"  {label:<55} {imgs / (t_data + t_step):>10,.0f} img/s   data "
              f"{shares[name]:6.1%} of the step time")

    ratio = rate["fast"] / rate["baseline"]
    share = shares["fast"]
    print()
    print(f"target fast_vs_dataloader: {ratio:.1f}x (goal >= {GOAL_RATIO:g}x) "
          f"{'met' if ratio >= GOAL_RATIO else 'missed'}")
    print(f"target data_share_resnet20_step: {share:.2%} (goal < {GOAL_SHARE:.0%}) "
          f"{'met' if share < GOAL_SHARE else 'missed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
