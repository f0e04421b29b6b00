"""The check of an int8 model against the fp32 model it was made from: the same test images
through both, how often their top-1 classes agree, and their accuracies."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .base import Runner


@dataclass
class Agreement:
    """The int8 model against fp32 on `images` test images."""

    images: int
    agree: int
    int8_correct: int
    fp32_correct: int

    @property
    def rate(self) -> float:
        return self.agree / max(self.images, 1)

    @property
    def int8_top1(self) -> float:
        return 100 * self.int8_correct / max(self.images, 1)

    @property
    def fp32_top1(self) -> float:
        return 100 * self.fp32_correct / max(self.images, 1)

    def as_dict(self) -> dict:
        return {"images": self.images, "agreement": round(self.rate, 6),
                "int8_top1": round(self.int8_top1, 4), "fp32_top1": round(self.fp32_top1, 4)}

    def line(self, against: str = "fp32") -> str:
        return (f"top-1 agreement with the {against} model {100 * self.rate:.2f}% ("
                f"{self.agree}/{self.images} test images), top-1 int8 {self.int8_top1:.2f}% "
                f"vs {against} {self.fp32_top1:.2f}%")


@torch.inference_mode()
def agreement(fp32: nn.Module, int8: Runner, batches: list[tuple[torch.Tensor, torch.Tensor]]
              ) -> Agreement:
    """Run each (images, labels) batch through both models and count."""
    fp32.eval()
    n = agree = c8 = c32 = 0
    for x, y in batches:
        a = fp32(x.float()).argmax(1)
        b = int8(x).argmax(1)
        n += len(y)
        agree += int((a == b).sum())
        c8 += int((b == y).sum())
        c32 += int((a == y).sum())
    return Agreement(n, agree, c8, c32)


def accuracy(run: Runner, loader) -> dict:
    """Top-1/top-5 (%) and the image count of `run` over every batch of `loader`."""
    n = c1 = c5 = 0
    for x, y in loader:
        logits = run(x.cpu())
        y = y.cpu()
        k = min(5, logits.shape[1])
        hit = logits.topk(k, dim=1).indices.eq(y.view(-1, 1))
        c1 += int(hit[:, :1].sum())
        c5 += int(hit.sum())
        n += len(y)
    return {"top1": 100 * c1 / max(n, 1), "top5": 100 * c5 / max(n, 1), "images": n}


__all__ = ["Agreement", "agreement", "accuracy"]
