"""Where a data set comes from: generated (synthetic), torchvision's CIFAR files, or an
ImageFolder tree; reading a whole split decoded, and answering cheap questions about a
source (is it there, how many classes) without decoding any image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .cache import load_small_folder
from .config import (
    DataConfig,
    DataError,
    SyntheticConfig,
    input_size,
    is_torchvision_cifar,
    resolve_root,
    small_size,
    val_count,
)
from .folders import IMAGE_EXTENSIONS, class_names, has_image, reason, split_folders
from .images import ImageSet, balanced_subset, split_off, take


def torchvision_cifar(cfg: DataConfig, train: bool) -> ImageSet:
    """A CIFAR-10/100 split from torchvision's python files (downloaded if allowed)."""
    import torchvision

    sets = torchvision.datasets
    cls = sets.CIFAR10 if cfg.dataset == "cifar10" else sets.CIFAR100
    root = resolve_root(cfg)
    try:
        ds = cls(str(root), train=train, download=cfg.download)
    except RuntimeError as err:
        hint = "" if cfg.download else " (set data.download: true, or point data.root at it)"
        raise DataError(f"{root}: {cfg.dataset} not found or corrupt: {reason(err)}"
                        f"{hint}") from None
    except Exception as err:
        raise DataError(f"{root}: cannot read {cfg.dataset}: {reason(err)}") from None
    images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.tensor(ds.targets, dtype=torch.long), list(ds.classes))


def synthetic_split(cfg: SyntheticConfig, train: bool, seed: int) -> ImageSet:
    """Learnable random images: a class-specific colour pattern plus noise."""
    n = cfg.train_size if train else cfg.test_size
    g = torch.Generator().manual_seed((1000 + seed * 2 + int(train)) % 2**64)
    protos = torch.Generator().manual_seed(seed)
    centers = torch.randint(40, 216, (cfg.num_classes, 3, 4, 4), generator=protos).float()
    labels = torch.arange(n) % cfg.num_classes
    labels = labels[torch.randperm(n, generator=g)]
    s = cfg.image_size
    base = torch.nn.functional.interpolate(centers[labels], size=(s, s), mode="nearest")
    noise = torch.randn((n, 3, s, s), generator=g) * 40
    images = (base + noise).clamp(0, 255).to(torch.uint8)
    return ImageSet(images, labels.long(), [f"class{i}" for i in range(cfg.num_classes)])


def read_split(cfg: DataConfig, train: bool, seed: int,
               classes: Sequence[str] | None = None) -> ImageSet:
    """A whole split decoded to uint8 (synthetic, torchvision CIFAR, or a small-image tree),
    reduced to the configured class-balanced subset (training: without the validation
    split, see `read_train_val`)."""
    if train:
        return read_train_val(cfg, seed, classes)[0]
    return _read_whole(cfg, False, seed, classes)


def read_train_val(cfg: DataConfig, seed: int, classes: Sequence[str] | None = None
                   ) -> tuple[ImageSet, ImageSet | None]:
    """The training split and the validation split held out of it (None without
    `val_split`). The validation images are drawn class-balanced from the whole training
    set with `val_seed` (the same for every run seed and rank); `train_samples` then
    subsets the rest with the run's seed."""
    data = _read_whole(cfg, True, seed, classes, subset=False)
    n_val = val_count(cfg, len(data.labels))
    val = None
    if n_val:
        kept, held = split_off(data.labels, n_val, cfg.val_seed)
        data, val = take(data, kept), take(data, held)
    if cfg.train_samples is not None:
        data = balanced_subset(data, cfg.train_samples, seed)
    return data, val


def _read_whole(cfg: DataConfig, train: bool, seed: int,
                classes: Sequence[str] | None = None, subset: bool = True) -> ImageSet:
    if cfg.dataset == "synthetic":
        data = synthetic_split(cfg.synthetic, train, seed)
        if cfg.image_size and cfg.image_size != cfg.synthetic.image_size:
            data.images = torch.nn.functional.interpolate(
                data.images.float(), size=(cfg.image_size,) * 2, mode="bilinear",
                antialias=True).round().clamp(0, 255).to(torch.uint8)
    elif is_torchvision_cifar(cfg):
        data = torchvision_cifar(cfg, train)
    else:
        train_dir, eval_dir = split_folders(resolve_root(cfg), cfg.eval_split)
        data = load_small_folder(train_dir if train else eval_dir, small_size(cfg),
                                 cfg.cache, classes, cfg.max_unreadable, cfg.cache_dir)
    limit = cfg.train_samples if train else cfg.test_samples
    if subset and limit is not None:
        data = balanced_subset(data, limit, seed)
    return data


def describe(cfg: DataConfig) -> tuple[int, tuple[int, int, int]]:
    """(number of classes, input size C,H,W) without decoding any image."""
    if cfg.dataset == "synthetic":
        return cfg.synthetic.num_classes, input_size(cfg)
    if is_torchvision_cifar(cfg):
        return (10 if cfg.dataset == "cifar10" else 100), input_size(cfg)
    train_dir, _ = split_folders(resolve_root(cfg), cfg.eval_split)
    return len(class_names(train_dir)), input_size(cfg)


def check_available(cfg: DataConfig) -> None:
    """Fail early, in one line naming the path, when the data cannot be found (before any
    stage runs). Cheap: looks at folders, not at every image."""
    if cfg.dataset == "synthetic":
        return
    root = resolve_root(cfg)
    if is_torchvision_cifar(cfg):
        base = "cifar-10-batches-py" if cfg.dataset == "cifar10" else "cifar-100-python"
        if not (root / base).is_dir() and not cfg.download:
            raise DataError(f"{root}: no {cfg.dataset} found (expected {root}/train/<class>/ "
                            f"images or torchvision's {base}/; set data.download: true to fetch)")
        return
    train_dir, eval_dir = split_folders(root, cfg.eval_split)
    train_classes = class_names(train_dir)
    for folder in (train_dir, eval_dir):
        classes = class_names(folder)
        empty = [c for c in classes if not has_image(folder / c)]
        if len(empty) == len(classes):
            raise DataError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...) in "
                            f"its {len(classes)} class folder(s)")
        if empty and folder == train_dir:  # a class the model would have but never see
            raise DataError(f"{folder / empty[0]}: class folder has no images "
                            f"({', '.join(IMAGE_EXTENSIONS[:3])}, ...; {len(empty)} such "
                            "folder(s)); remove it or add its images")
    unknown = sorted(set(class_names(eval_dir)) - set(train_classes))
    if unknown:
        raise DataError(f"{eval_dir / unknown[0]}: class folder not among the training classes")
