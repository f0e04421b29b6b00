"""The `data:` section of a run config, and what follows from it without reading any
file: which loader serves it, the training crop, the batch shape, the normalization."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import MAX_IMAGE_SIZE, Invalid, opt
from ..errors import UsageError

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SYNTHETIC_MEAN, SYNTHETIC_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
SMALL_IMAGE_MAX = 64  # auto: images up to this size take the fast path


class DataError(UsageError):
    """Missing or unusable data: one line naming the path."""


@dataclass
class SyntheticConfig:
    num_classes: int = opt(10, "number of classes", min=2, limit=100_000)
    train_size: int = opt(512, "training images", min=1, limit=1_000_000)
    test_size: int = opt(256, "test images", min=1, limit=1_000_000)
    image_size: int = opt(32, "height and width", min=8, limit=MAX_IMAGE_SIZE)


@dataclass
class DataConfig:
    dataset: Literal["cifar10", "cifar100", "imagefolder", "synthetic"] = opt(
        "cifar10", "cifar10/cifar100 (torchvision files, or an ImageFolder tree root/train + "
        "root/test), imagefolder (root/train and root/val or root/test, one folder per "
        "class), synthetic (generated, for tests)")
    root: str = opt("data", "data folder (relative paths are relative to the working directory)")
    download: bool = opt(False, "let torchvision download CIFAR into root when absent")
    eval_split: Literal["auto", "val", "test"] = opt(
        "auto", "the ImageFolder split evaluated, beside root/train: auto = val/ when present, "
        "else test/")
    train_samples: int | None = opt(
        None, "use a fixed, class-balanced, seeded subset of this many training images", min=1)
    test_samples: int | None = opt(
        None, "use a fixed, class-balanced, seeded subset of this many test images", min=1)
    val_split: int | float | None = opt(
        None, "hold out a fixed, class-balanced part of the training set as the validation "
        "split: a number of images (>= 1) or a fraction (< 1); best epoch and every decision "
        "inside a run (sensitivity, iterative stopping) use it, the test set is only reported",
        gt=0)
    val_seed: int = opt(0, "seed of the validation split (independent of the run's seed, so "
                        "that every run and rank holds out the same images)", min=0)
    loader: Literal["auto", "tensor", "dataloader"] = opt(
        "auto", "tensor = in-memory fast path on the training device; dataloader = torch "
        "DataLoader with workers; auto = tensor for CIFAR/synthetic and for imagefolder "
        f"images of image_size {SMALL_IMAGE_MAX} or less, else dataloader")
    num_workers: int = opt(4, "DataLoader workers per process (dataloader path)", min=0,
                          limit=1024)
    pin_memory: bool = opt(True, "dataloader path: pinned host memory for batches (CUDA only)")
    persistent_workers: bool = opt(
        True, "dataloader path: keep the workers alive across epochs (no start-up per epoch)")
    prefetch_factor: int = opt(2, "dataloader path: batches each worker prepares ahead", min=1,
                              limit=1024)
    image_size: int | None = opt(
        None, "train crop and eval size; default 32 for CIFAR, 224 for imagefolder; the fast "
        "path resizes (shorter side) and center-crops imagefolder images to it once", min=8,
        limit=MAX_IMAGE_SIZE)
    resize_size: int | None = opt(None, "imagefolder eval (ImageNet preset): resize the shorter "
                                  "side to this before the center crop (default image_size * "
                                  "256/224)", min=8, limit=MAX_IMAGE_SIZE)
    train_crop: Literal["auto", "pad", "resized", "none"] = opt(
        "auto", "training crop: pad = zero-pad by `pad` and crop back (CIFAR); resized = "
        "RandomResizedCrop (ImageNet preset, dataloader path only); none = the eval view; "
        "auto = resized for imagefolder on the dataloader path, else pad")
    crop_scale: float = opt(0.08, "resized crop: smallest area fraction of the crop", gt=0, max=1)
    pad: int = opt(4, "pad crop: zero padding on each side before the random crop", min=0,
                  limit=MAX_IMAGE_SIZE)
    flip: bool = opt(True, "random horizontal flip for training")
    mean: list[float] | None = opt(None, "normalization mean per channel (0-1 scale); default "
                                   "the data set's (CIFAR-10, CIFAR-100 or ImageNet values)")
    std: list[float] | None = opt(None, "normalization std per channel; default the data set's")
    max_unreadable: float = opt(
        0.1, "unreadable image files are skipped with a warning; more than this fraction of "
        "a split is an error (probably the wrong folder)", min=0, max=1)
    cache: bool = opt(True, "fast path: cache the decoded uint8 tensor (root/.pipeline_cache)")
    cache_dir: str | None = opt(
        None, "where the decoded tensor is cached when root is read-only (default "
        "$XDG_CACHE_HOME/pipeline-data or ~/.cache/pipeline-data)")
    synthetic: SyntheticConfig = opt(SyntheticConfig, "synthetic data set settings")

    def validate(self) -> None:
        if isinstance(self.val_split, float) and not self.val_split < 1:
            raise Invalid("val_split", f"a fraction must be below 1 (or give a number of "
                          f"images), got {self.val_split:g}")
        if self.loader == "tensor" and self.train_crop == "resized":
            raise Invalid("train_crop", "the tensor path does 'pad' or 'none' crops; use "
                          "loader: dataloader for RandomResizedCrop")
        if self.loader == "tensor" and (self.image_size or 0) > SMALL_IMAGE_MAX:
            raise Invalid("loader", f"the tensor path is for small images ({SMALL_IMAGE_MAX} px "
                          "or less); use loader: dataloader")
        if self.dataset == "imagefolder" and self.loader == "tensor" and not self.image_size:
            raise Invalid("image_size", "set the size the tensor path decodes imagefolder "
                          "images to (e.g. 32 or 64)")
        for key in ("mean", "std"):
            v = getattr(self, key)
            if v is not None and (len(v) != 3 or (key == "std" and min(v) <= 0)):
                raise Invalid(key, f"expected 3 numbers{' > 0' if key == 'std' else ''}, got {v}")


def val_count(cfg: DataConfig, n_train: int) -> int:
    """Images the validation split holds out of `n_train` training images (0: none)."""
    v = cfg.val_split
    if v is None:
        return 0
    n = int(v * n_train) if isinstance(v, float) else int(v)
    if n < 1:
        raise DataError(f"data.val_split: {v:g} of the {n_train} training images holds out "
                        "none; give a larger fraction or a number of images")
    if n >= n_train:
        raise DataError(f"data.val_split: {v} holds out {n} of the {n_train} training images; "
                        "leave some to train on")
    return n


def resolve_root(cfg: DataConfig) -> Path:
    """The data folder, `~` expanded (relative paths stay relative to the working directory)."""
    return Path(os.path.expanduser(cfg.root))


def is_torchvision_cifar(cfg: DataConfig) -> bool:
    """CIFAR read from torchvision's files: a cifar data set whose root has no train/ tree."""
    return cfg.dataset in ("cifar10", "cifar100") and not (resolve_root(cfg) / "train").is_dir()


def normalization(cfg: DataConfig) -> tuple[tuple, tuple]:
    """The (mean, std) used to normalize, on the 0-1 scale."""
    default = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
               "synthetic": (SYNTHETIC_MEAN, SYNTHETIC_STD)}.get(
        cfg.dataset, (IMAGENET_MEAN, IMAGENET_STD))
    return tuple(cfg.mean or default[0]), tuple(cfg.std or default[1])


def use_tensor_path(cfg: DataConfig) -> bool:
    """Whether the in-memory fast path serves this data (else the DataLoader path)."""
    if cfg.loader != "auto":
        return cfg.loader == "tensor"
    if cfg.train_crop == "resized":
        return False
    if cfg.dataset in ("cifar10", "cifar100", "synthetic"):
        return (cfg.image_size or 32) <= SMALL_IMAGE_MAX
    return (cfg.image_size or 224) <= SMALL_IMAGE_MAX


def crop_mode(cfg: DataConfig) -> str:
    """The training crop, 'auto' resolved: pad, resized or none."""
    if cfg.train_crop != "auto":
        return cfg.train_crop
    return "resized" if cfg.dataset == "imagefolder" and not use_tensor_path(cfg) else "pad"


def small_size(cfg: DataConfig) -> int:
    """The side the fast path decodes to: image_size, else the data's native size."""
    if cfg.dataset == "synthetic":
        return cfg.image_size or cfg.synthetic.image_size
    return cfg.image_size or 32


def input_size(cfg: DataConfig) -> tuple[int, int, int]:
    """(C, H, W) of the batches: image_size, else the data's native size for small-image
    sets and 224 for imagefolder on the DataLoader path."""
    if cfg.dataset == "imagefolder" and not use_tensor_path(cfg):
        s = cfg.image_size or 224
    else:
        s = small_size(cfg)
    return (3, s, s)
