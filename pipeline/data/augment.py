"""Augmentation geometry, one image at a time (the DataLoader path; the fast path crops
and flips whole batches in `tensor_loader`).

Training views: `pad` (zero-pad, random crop back to size, CIFAR), `resized` (the ImageNet
RandomResizedCrop: a random box of 8-100% of the area and aspect 3/4 to 4/3, resized to
size) or `none` (the eval view), then a random horizontal flip. Eval views: `resized`
(ImageNet: the shorter side resized to `resize`, aspect kept, then the centred size x size
crop) or `fit_square` (shorter side to size, centred square), which small images use.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect ratio bounds (width / height)


@dataclass(frozen=True)
class Views:
    """What a worker does to one image: the training crop or the eval view."""

    train: bool
    size: int
    crop: str  # pad | resized | none
    pad: int
    flip: bool
    resize: int
    scale_min: float


def fit_square(img, size: int):
    """Resize the shorter side to `size` and center-crop to size x size (no-op when the
    image already has that size). The one resize both paths use for small images."""
    from torchvision.transforms import functional as TF

    if img.size == (size, size):
        return img
    if min(img.size) != size:
        img = TF.resize(img, size, antialias=True)
    return TF.center_crop(img, [size, size])


def resized_crop_box(rng: random.Random, width: int, height: int,
                     scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from `rng`: (top, left, h, w).
    Ten tries at a box of area fraction in `scale` and aspect in `RATIO`, else the whole
    image center-cropped to the nearest allowed aspect."""
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    ratio_in = width / height
    if ratio_in < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif ratio_in > RATIO[1]:
        h, w = height, int(round(height * RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def eval_view(img, size: int, resize: int):
    """The ImageNet eval view: the shorter side resized to `resize` (aspect kept), then
    the centred size x size crop."""
    from torchvision.transforms import functional as TF

    return TF.center_crop(TF.resize(img, resize, antialias=True), [size, size])


def apply_views(img, views: Views, rng: random.Random | None) -> torch.Tensor:
    """One PIL image -> uint8 CHW tensor of views.size; deterministic given `rng`'s seed."""
    from torchvision.transforms import functional as TF

    s = views.size
    if views.train and views.crop == "resized":
        top, left, h, w = resized_crop_box(rng, *img.size, (views.scale_min, 1.0))
        img = TF.resized_crop(img, top, left, h, w, [s, s], antialias=True)
    elif views.crop == "resized":
        img = eval_view(img, s, views.resize)
    else:
        img = fit_square(img, s)
    x = TF.pil_to_tensor(img)
    if views.train and views.crop == "pad" and views.pad:
        p = views.pad
        dy, dx = rng.randint(0, 2 * p), rng.randint(0, 2 * p)
        x = torch.nn.functional.pad(x, (p, p, p, p))[:, dy:dy + s, dx:dx + s]
    if views.train and views.flip and rng.random() < 0.5:
        x = x.flip(2)
    return x.contiguous()
