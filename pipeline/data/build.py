"""`build_data`: the train and test loaders of one stage, from the `data:` config: the
fast path (`TensorLoader`) for small images, the DataLoader path (`FolderLoader`) else."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from .. import distributed as D
from .augment import Views
from .config import (
    DataConfig,
    crop_mode,
    input_size,
    is_torchvision_cifar,
    normalization,
    resolve_root,
    use_tensor_path,
)
from .folder_loader import ArraySource, FileSource, FolderLoader
from .folders import list_image_folder, split_folders
from .images import balanced_indices
from .sources import read_split
from .tensor_loader import TensorLoader

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class DataBundle:
    """A stage's loaders, the number of classes, the (C, H, W) of a batch, and one line
    describing the data for the log."""

    train: TensorLoader | FolderLoader
    test: TensorLoader | FolderLoader
    num_classes: int
    input_size: tuple[int, int, int]
    description: str


def _rank_zero_first(read: Callable[[], T]) -> T:
    """`read()` on the first process of each node before the others, which then find its
    cache (or torchvision's download) instead of decoding (downloading) too. A failure on
    any rank stops every rank with its message (`together`), never a hang."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return read()
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    result = None
    with D.together():
        if first:
            result = read()
    with D.together():
        if not first:
            result = read()
    return result  # type: ignore[return-value]


def build_data(cfg: DataConfig, batch_size: int, eval_batch_size: int, seed: int,
               device: torch.device, rank: int = 0, world_size: int = 1,
               channels_last: bool = False) -> DataBundle:
    """Train and test loaders for one stage (batch sizes are global): the fast path for
    small images, the DataLoader path otherwise (see `use_tensor_path`)."""
    kw = dict(seed=seed, device=torch.device(device), rank=rank, world_size=world_size,
              channels_last=channels_last)
    build = _build_tensor if use_tensor_path(cfg) else _build_dataloader
    with D.together():  # a rank that cannot read its data stops every rank, in one line
        bundle = build(cfg, batch_size, eval_batch_size, **kw)
    log.info("data: %s", bundle.description)
    return bundle


def _both_splits(cfg: DataConfig, seed: int):
    train = read_split(cfg, True, seed)
    return train, read_split(cfg, False, seed, classes=train.classes)


def _build_tensor(cfg: DataConfig, batch_size: int, eval_batch_size: int, seed: int,
                  device: torch.device, **kw) -> DataBundle:
    train, test = _rank_zero_first(lambda: _both_splits(cfg, seed))
    mean, std = normalization(cfg)
    pad = cfg.pad if crop_mode(cfg) == "pad" else 0
    tl = TensorLoader(train, batch_size, True, seed, device, mean, std, pad=pad, flip=cfg.flip,
                      **kw)
    vl = TensorLoader(test, eval_batch_size, False, seed, device, mean, std, pad=0, flip=False,
                      **kw)
    nc = cfg.synthetic.num_classes if cfg.dataset == "synthetic" else len(train.classes)
    nc = max(nc, int(train.labels.max()) + 1)
    shape = tuple(train.images.shape[1:])
    where = "" if device.type == "cpu" else f" on {device}"
    desc = f"{cfg.dataset} ({tl.n} train / {vl.n} test, {shape}, in memory{where})"
    return DataBundle(tl, vl, nc, shape, desc)


def _build_dataloader(cfg: DataConfig, batch_size: int, eval_batch_size: int, seed: int,
                      device: torch.device, **kw) -> DataBundle:
    root = resolve_root(cfg)
    if cfg.dataset != "synthetic" and not is_torchvision_cifar(cfg):  # an ImageFolder tree
        train_dir, eval_dir = split_folders(root, cfg.eval_split)
        items, classes = list_image_folder(train_dir)
        test_items, _ = list_image_folder(eval_dir, classes, require_all=False)
        train_src: FileSource | ArraySource = FileSource(items, train_dir)
        test_src: FileSource | ArraySource = FileSource(test_items, eval_dir)
        where = str(root)
        labels = (torch.tensor(train_src.labels), torch.tensor(test_src.labels))
        limits = (cfg.train_samples, cfg.test_samples)
        train_idx, test_idx = (None if n is None else balanced_indices(lab, n, seed)
                               for lab, n in zip(labels, limits, strict=True))
    else:  # decoded in memory already (synthetic, torchvision CIFAR): subsets applied
        train_set, test_set = _rank_zero_first(lambda: (read_split(cfg, True, seed),
                                                        read_split(cfg, False, seed)))
        classes = train_set.classes
        train_src, test_src = ArraySource(train_set, "train"), ArraySource(test_set, "test")
        where = cfg.dataset if cfg.dataset == "synthetic" else str(root)
        train_idx = test_idx = None
    crop, s = crop_mode(cfg), input_size(cfg)[1]
    views = dict(size=s, crop=crop, pad=cfg.pad, flip=cfg.flip, scale_min=cfg.crop_scale,
                 resize=cfg.resize_size or int(round(s * 256 / 224)))
    mean, std = normalization(cfg)
    common = dict(cfg=cfg, device=device, mean=mean, std=std, **kw)
    tl = FolderLoader(train_src, batch_size, True, seed, views=Views(True, **views),
                      indices=train_idx, **common)
    vl = FolderLoader(test_src, eval_batch_size, False, seed, views=Views(False, **views),
                      indices=test_idx, **common)
    tl.probe()
    vl.probe()
    desc = (f"{cfg.dataset} {where} ({tl.n} train / {vl.n} test, {crop} crop {s}px, "
            f"DataLoader x{cfg.num_workers} workers)")
    return DataBundle(tl, vl, len(classes), (3, s, s), desc)
