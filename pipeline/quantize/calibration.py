"""The calibration set of a static quantization: a fixed, seeded draw of images from the
training split (seen in the evaluation view: no crop, no flip) or from the validation split,
in batches; and the checks that refuse a set the ranges cannot be measured on."""

from __future__ import annotations

import dataclasses
import math

import torch

from ..data import DataConfig, build_data
from ..errors import UsageError


class CalibrationError(UsageError):
    """A calibration set that cannot calibrate: empty, too small, of the wrong shape, or
    holding non-finite values."""


def check_calibration(batches: list[torch.Tensor], input_size: tuple[int, ...],
                      where: str = "calibration") -> int:
    """The number of images in `batches`, or CalibrationError naming what is wrong: no
    batch or an empty one, a batch that is not (N, *input_size), a non-finite value."""
    if not batches:
        raise CalibrationError(f"{where}: the calibration set is empty (no batch)")
    size = tuple(input_size)
    total = 0
    for i, x in enumerate(batches):
        if x.dim() != 1 + len(size) or tuple(x.shape[1:]) != size:
            raise CalibrationError(f"{where}: batch {i} has shape {tuple(x.shape)}, the model "
                                   f"takes (N, {', '.join(map(str, size))})")
        if x.shape[0] == 0:
            raise CalibrationError(f"{where}: batch {i} is empty")
        if not bool(torch.isfinite(x).all()):
            raise CalibrationError(f"{where}: batch {i} holds non-finite values")
        total += int(x.shape[0])
    return total


def _eval_view(cfg: DataConfig) -> DataConfig:
    """The data config whose training loader yields evaluation-view images (no random
    crop, no flip) in its seeded shuffled order."""
    return dataclasses.replace(cfg, train_crop="none", flip=False, num_workers=0,
                               persistent_workers=False)


def calibration_batches(cfg: DataConfig, split: str, batches: int, batch_size: int,
                        seed: int, key: str = "calibration") -> list[torch.Tensor]:
    """`batches` normalized CPU batches of `batch_size` images from `split` ("train": the
    first images of the seeded epoch-0 order; "val": images spread evenly over the held-out
    split). CalibrationError when the split holds fewer images than asked."""
    want = batches * batch_size
    bundle = build_data(_eval_view(cfg), batch_size, batch_size, seed, torch.device("cpu"))
    loader = bundle.train if split == "train" else bundle.val
    if loader is None:
        raise CalibrationError(f"{key}.split: val needs data.val_split (the run holds out no "
                               "validation split)")
    have = loader.n
    if have < want:
        raise CalibrationError(f"{key}: {batches} batches of {batch_size} = {want} images "
                               f"asked, the {split} split holds {have}")
    loader.set_epoch(0)
    if split == "train":
        images = _first(loader, want)
    else:
        images = _spread(loader, want, have)
    return list(images.split(batch_size))


def _first(loader, want: int) -> torch.Tensor:
    out, n = [], 0
    for x, _ in loader.iterate(0):
        out.append(x.float().contiguous())
        n += len(x)
        if n >= want:
            break
    return torch.cat(out)[:want]


def _spread(loader, want: int, have: int) -> torch.Tensor:
    """Every k-th image of an unshuffled split (k = have // want): a sorted split is then
    sampled over all of its classes."""
    step = max(1, math.floor(have / want))
    out, seen = [], 0
    for x, _ in loader.iterate(0):
        idx = [i for i in range(len(x)) if (seen + i) % step == 0]
        seen += len(x)
        if idx:
            out.append(x[idx].float().contiguous())
    return torch.cat(out)[:want]


__all__ = ["CalibrationError", "calibration_batches", "check_calibration"]
