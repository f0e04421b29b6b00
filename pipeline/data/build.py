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
    val_count,
)
from .folder_loader import ArraySource, FileSource, FolderLoader
from .folders import list_image_folder, split_folders
from .images import balanced_indices, split_off
from .sources import read_split, read_train_val
from .tensor_loader import TensorLoader

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class DataBundle:
    """A stage's loaders, the number of classes, the (C, H, W) of a batch, and one line
    describing the data for the log. `val` is the validation split (None without
    `data.val_split`); `select` is what in-run decisions evaluate on: val when there is
    one, else the test set."""

    train: TensorLoader | FolderLoader
    test: TensorLoader | FolderLoader
    num_classes: int
    input_size: tuple[int, int, int]
    description: str
    val: TensorLoader | FolderLoader | None = None

    @property
    def select(self) -> TensorLoader | FolderLoader:
        return self.val if self.val is not None else self.test

    @property
    def select_split(self) -> str:
        """The name of the split in-run decisions use: "val" or "test"."""
        return "val" if self.val is not None else "test"


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


def _splits(cfg: DataConfig, seed: int):
    """(train, validation or None, test) of a data set decoded in memory."""
    train, val = read_train_val(cfg, seed)
    return train, val, read_split(cfg, False, seed, classes=train.classes)


def _build_tensor(cfg: DataConfig, batch_size: int, eval_batch_size: int, seed: int,
                  device: torch.device, **kw) -> DataBundle:
    train, val, test = _rank_zero_first(lambda: _splits(cfg, seed))
    mean, std = normalization(cfg)
    pad = cfg.pad if crop_mode(cfg) == "pad" else 0
    tl = TensorLoader(train, batch_size, True, seed, device, mean, std, pad=pad, flip=cfg.flip,
                      **kw)
    vl = TensorLoader(test, eval_batch_size, False, seed, device, mean, std, pad=0, flip=False,
                      **kw)
    val_l = None if val is None else TensorLoader(
        val, eval_batch_size, False, seed, device, mean, std, pad=0, flip=False, **kw)
    nc = cfg.synthetic.num_classes if cfg.dataset == "synthetic" else len(train.classes)
    nc = max(nc, int(train.labels.max()) + 1)
    shape = tuple(train.images.shape[1:])
    where = "" if device.type == "cpu" else f" on {device}"
    vals = "" if val_l is None else f" / {val_l.n} val"
    desc = f"{cfg.dataset} ({tl.n} train{vals} / {vl.n} test, {shape}, in memory{where})"
    return DataBundle(tl, vl, nc, shape, desc, val_l)


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
        train_labels = torch.tensor(train_src.labels)
        kept, held = split_off(train_labels, val_count(cfg, len(train_labels)), cfg.val_seed)
        val_src: FileSource | ArraySource | None = train_src if len(held) else None
        val_idx = held if len(held) else None
        train_idx = kept if len(held) else None
        if cfg.train_samples is not None:
            train_idx = kept[balanced_indices(train_labels[kept], cfg.train_samples, seed)]
        test_idx = (None if cfg.test_samples is None else
                    balanced_indices(torch.tensor(test_src.labels), cfg.test_samples, seed))
    else:  # decoded in memory already (synthetic, torchvision CIFAR): subsets applied
        train_set, val_set, test_set = _rank_zero_first(
            lambda: (*read_train_val(cfg, seed), read_split(cfg, False, seed)))
        classes = train_set.classes
        train_src, test_src = ArraySource(train_set, "train"), ArraySource(test_set, "test")
        val_src = None if val_set is None else ArraySource(val_set, "val")
        where = cfg.dataset if cfg.dataset == "synthetic" else str(root)
        train_idx = test_idx = val_idx = None
    crop, s = crop_mode(cfg), input_size(cfg)[1]
    views = dict(size=s, crop=crop, pad=cfg.pad, flip=cfg.flip, scale_min=cfg.crop_scale,
                 resize=cfg.resize_size or int(round(s * 256 / 224)))
    mean, std = normalization(cfg)
    common = dict(cfg=cfg, device=device, mean=mean, std=std, **kw)
    tl = FolderLoader(train_src, batch_size, True, seed, views=Views(True, **views),
                      indices=train_idx, **common)
    vl = FolderLoader(test_src, eval_batch_size, False, seed, views=Views(False, **views),
                      indices=test_idx, **common)
    val_l = None if val_src is None else FolderLoader(
        val_src, eval_batch_size, False, seed, views=Views(False, **views), indices=val_idx,
        **common)
    tl.probe()
    vl.probe()
    vals = "" if val_l is None else f" / {val_l.n} val"
    desc = (f"{cfg.dataset} {where} ({tl.n} train{vals} / {vl.n} test, {crop} crop {s}px, "
            f"DataLoader x{cfg.num_workers} workers)")
    return DataBundle(tl, vl, len(classes), (3, s, s), desc, val_l)
