"""Importance criteria: a score per output channel of a group; the lowest are removed.

Modelled on Torch-Pruning's `Importance` classes: a criterion is a small class with a
`name` and a scoring method, and `CRITERIA` is the one place that lists them (the
`method` key of a prune spec accepts exactly its names). A new criterion is one class and
one entry there.

  fpgm    Filter Pruning via Geometric Median (He et al. 2019) as the official code does
          it: filters flattened to rows, the Euclidean distance matrix between them, each
          filter scored by its summed distance to all others; the filters nearest the
          geometric median (smallest sums) are the most replaceable.
  l1/l2   sum of absolute weights / Euclidean norm per filter (Li et al. 2017).
  random  a seeded random score (the baseline), one per channel of the group.

When several convolutions produce a group's channels (residual-coupled layers), each
conv's scores are divided by their mean and the normalized scores are summed; a group of
one conv uses its raw scores, so single layers rank exactly as in the official code.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import numpy as np
import torch


class ScoredGroup(Protocol):
    """What a criterion reads of a channel group (see `groups.Group`)."""

    def weights(self) -> list[np.ndarray]: ...


def filter_matrix(weight: torch.Tensor) -> np.ndarray:
    """Conv/linear weight (out, ...) -> float64 rows, one flattened filter per row."""
    return weight.detach().double().cpu().reshape(weight.shape[0], -1).numpy()


def fpgm_scores(w: np.ndarray) -> np.ndarray:
    """Summed Euclidean distance of each row to every other row (higher = keep)."""
    sq = (w * w).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (w @ w.T), 0.0)
    np.fill_diagonal(d2, 0.0)
    return np.sqrt(d2).sum(1)


class Criterion:
    """Scores the channels of a group; subclasses score one layer's filter rows."""

    name: ClassVar[str]

    def __call__(self, group: ScoredGroup, seed: int = 0) -> np.ndarray:
        """One score per channel of `group`, from the convs that produce its channels."""
        return self.weight_scores(group.weights(), seed)

    def weight_scores(self, weights: list[np.ndarray], seed: int = 0) -> np.ndarray:
        """Scores from the filter rows of each conv: one conv's raw scores, or the sum of
        each conv's mean-normalized scores."""
        per_layer = [self.layer_scores(w) for w in weights]
        if len(per_layer) == 1:
            return per_layer[0]
        total = np.zeros(weights[0].shape[0])
        for s in per_layer:
            mean = float(np.abs(s).mean())
            total += s / mean if mean > 0 else s
        return total

    def layer_scores(self, w: np.ndarray) -> np.ndarray:
        """One score per row (flattened filter) of one layer."""
        raise NotImplementedError


class FPGM(Criterion):
    name = "fpgm"

    def layer_scores(self, w: np.ndarray) -> np.ndarray:
        return fpgm_scores(w)


class L1(Criterion):
    name = "l1"

    def layer_scores(self, w: np.ndarray) -> np.ndarray:
        return np.abs(w).sum(1)


class L2(Criterion):
    name = "l2"

    def layer_scores(self, w: np.ndarray) -> np.ndarray:
        return np.sqrt((w * w).sum(1))


class Random(Criterion):
    name = "random"

    def weight_scores(self, weights: list[np.ndarray], seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).random(weights[0].shape[0])


CRITERIA: dict[str, Criterion] = {c.name: c for c in (FPGM(), L1(), L2(), Random())}


__all__ = ["CRITERIA", "Criterion", "FPGM", "L1", "L2", "Random", "filter_matrix",
           "fpgm_scores"]
