"""A decoded data split (`ImageSet`) and the fixed, class-balanced subset of one."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageSet:
    """A decoded data split: uint8 NCHW images and int64 labels, on the CPU."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    skipped: list[str] = field(default_factory=list)  # unreadable files left out


def balanced_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of a fixed, class-balanced, seeded subset of n samples."""
    if n >= len(labels):
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    per_class = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        per_class.append(idx[torch.randperm(len(idx), generator=g)].tolist())
    order: list[int] = []
    for k in range(max(len(ix) for ix in per_class)):  # interleave so any prefix is balanced
        order.extend(ix[k] for ix in per_class if k < len(ix))
    return torch.tensor(sorted(order[:n]), dtype=torch.long)


def balanced_subset(data: ImageSet, n: int, seed: int) -> ImageSet:
    """A fixed, class-balanced, seeded subset of n images (round-robin over classes)."""
    if n >= len(data.labels):
        return data
    chosen = balanced_indices(data.labels, n, seed)
    return ImageSet(data.images[chosen], data.labels[chosen], data.classes, data.skipped)


def split_off(labels: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out): sorted indices of the rest and of a fixed, class-balanced, seeded
    part of n samples (n = 0: all kept, none held out)."""
    if n <= 0:
        return torch.arange(len(labels)), torch.zeros(0, dtype=torch.long)
    held = balanced_indices(labels, n, seed)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held] = False
    return torch.nonzero(mask).flatten(), held


def take(data: ImageSet, idx: torch.Tensor) -> ImageSet:
    return ImageSet(data.images[idx], data.labels[idx], data.classes, data.skipped)
