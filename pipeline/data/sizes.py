"""How many training images a data config yields and how many steps an epoch takes, without
loading the data: what the plan and every lr schedule computed before training need.

Known sizes for CIFAR and ImageNet, counted files for an ImageFolder tree, the subset size
when one is set.
"""

from __future__ import annotations

from pathlib import Path

from .config import DataConfig, val_count

KNOWN_TRAIN_SIZES = {"cifar10": 50000, "cifar100": 50000, "imagenet": 1281167}


def train_size(d: DataConfig) -> tuple[int, str]:
    """(number of training images, how it was found)."""
    if d.dataset == "synthetic":
        n, how = d.synthetic.train_size, "synthetic"
    elif d.dataset in ("cifar10", "cifar100"):
        n, how = KNOWN_TRAIN_SIZES[d.dataset], "known size"
    else:
        folder = Path(d.root) / "train"
        if folder.is_dir():
            n = sum(1 for p in folder.rglob("*") if p.is_file())
            how = f"counted in {folder}"
        else:
            n, how = KNOWN_TRAIN_SIZES["imagenet"], "assumed ImageNet-1k size (folder absent)"
    held = val_count(d, n)
    if held:
        n, how = n - held, f"{how}, less {held} held out by data.val_split"
    if d.train_samples is not None and d.train_samples < n:
        n, how = d.train_samples, "data.train_samples"
    return n, how


def steps_per_epoch(d: DataConfig, batch_size: int) -> int:
    """Global batches per epoch, by the loaders' rule (a last partial batch of >= 2 counts)."""
    n, _ = train_size(d)
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 or full == 0 else 0)


__all__ = ["KNOWN_TRAIN_SIZES", "train_size", "steps_per_epoch"]
