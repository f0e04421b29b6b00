"""The check that an exported file computes what the PyTorch model computes: the same
inputs through both, the largest logit difference against a tolerance, and how often the
top-1 class agrees."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .formats import Runner

FP32_TOLERANCE = 1e-4  # absolute, on the logits
# fp16/bf16, relative to the logit scale (the largest |logit|, at least 1): the file and the
# PyTorch model both compute in reduced precision but round in different places (weights
# rounded after BN folding, other kernels and summation orders), so they differ by the
# rounding error accumulated through the network, which grows with the logits. fp16 keeps
# 11 significant bits: measured 0.1-0.2% of the largest logit (pruned ResNet-20, all three
# formats), 1e-2 leaves 5x room. bf16 keeps 8 (8x coarser): measured ~1%, hence 5e-2.
# A wrong graph (a layer lost, wrong weights or channel maps) is off by the order of the
# logits themselves and still fails.
RELATIVE_TOLERANCE = {"fp16": 1e-2, "bf16": 5e-2}
DYNAMIC_CHUNK = 32  # batch size the inputs are fed in when the file takes any batch


def tolerance(precision: str, reference: torch.Tensor) -> float:
    """The largest logit difference accepted for `precision`, given the reference logits."""
    if precision == "fp32":
        return FP32_TOLERANCE
    scale = max(1.0, float(reference.abs().max()))
    return RELATIVE_TOLERANCE[precision] * scale


@dataclass
class Check:
    """One comparison of exported and PyTorch logits."""

    what: str
    images: int
    max_diff: float
    tolerance: float
    agree: int

    @property
    def passed(self) -> bool:
        return self.max_diff <= self.tolerance  # NaN fails

    @property
    def agreement(self) -> float:
        return self.agree / max(self.images, 1)

    def line(self) -> str:
        return (f"{self.what}: max |logit diff| {self.max_diff:.3g} "
                f"(tolerance {self.tolerance:.3g}), top-1 agreement "
                f"{100 * self.agreement:.1f}% ({self.agree}/{self.images})")


def _forward(fn, x: torch.Tensor, batch: int | None) -> torch.Tensor:
    """fn over x in batches of the file's size; a short last batch is filled up with its
    own images repeated (a fixed-batch file takes nothing else), their outputs dropped."""
    step = batch or DYNAMIC_CHUNK
    outs = []
    for i in range(0, len(x), step):
        part = x[i:i + step]
        k = len(part)
        if batch and k < batch:
            part = part[torch.arange(batch) % k]
        outs.append(fn(part)[:k].float())
    return torch.cat(outs)


def compare(what: str, model: nn.Module, exported: Runner, x: torch.Tensor,
            batch: int | None, precision: str) -> Check:
    """Run `x` through the PyTorch model and the exported file and compare the logits."""
    with torch.inference_mode():
        ref = _forward(model, x, batch)
    out = _forward(exported, x, batch)
    if out.shape != ref.shape:
        return Check(what, len(x), math.inf, tolerance(precision, ref), 0)
    diff = float((out - ref).abs().max())
    agree = int((out.argmax(1) == ref.argmax(1)).sum())
    return Check(what, len(x), diff, tolerance(precision, ref), agree)


__all__ = ["Check", "compare", "tolerance", "FP32_TOLERANCE", "RELATIVE_TOLERANCE"]
