"""Importance criteria: a score per output channel of a group; the lowest are removed.

Modelled on Torch-Pruning's `Importance` classes: a criterion is a small class with a
`name` and a scoring method, and `CRITERIA` is the one place that lists them (the
`method` key of a prune spec accepts exactly its names). A new criterion is one class and
one entry there.

  fpgm      Filter Pruning via Geometric Median (He et al. 2019) as the official code does
            it: filters flattened to rows, the Euclidean distance matrix between them, each
            filter scored by its summed distance to all others; the filters nearest the
            geometric median (smallest sums) are the most replaceable.
  l1/l2     sum of absolute weights / Euclidean norm per filter (Li et al. 2017).
  random    a seeded random score (the baseline), one per channel of the group.
  taylor    first-order Taylor importance (Molchanov et al. 2019, "Importance Estimation
            for Neural Network Pruning"): per filter, (sum over the filter's weights and
            bias and its BN's gamma and beta of gradient x weight)^2 for each training
            batch, averaged over the batches; a group of coupled filters sums its filters'
            importances, as the paper does for residual-coupled layers.
  bn_scale  network slimming (Liu et al. 2017): |gamma| of the BatchNorm after each conv
            (the mean over a group's BNs, as Torch-Pruning's BNScaleImportance); under
            global ranking the raw |gamma| are compared, the paper's one global threshold.
  group_l2  the group norm of DepGraph (Fang et al. 2023; Torch-Pruning's
            GroupMagnitudeImportance with p=2): per channel, the sum of squares of every
            parameter slice the removal deletes, the producers' rows, the consumers' input
            slices and the normalization layers' scales.

Attention heads (`heads` of a prune spec) are scored by the same criteria through
`Criterion.score_heads`: each head is one vector, its q, k and v weight rows and its
out-projection columns; fpgm/l1/l2 score those vectors as filter rows, random draws one
score per head, group_l2 sums the squares of every parameter the head's removal deletes
(also the q/k/v biases and Swin's bias-table column), taylor squares each batch's sum of
gradient x weight over those parameters and averages over the batches; bn_scale has no
BatchNorm to read and refuses.

For fpgm/l1/l2, when several convolutions produce a group's channels (residual-coupled
layers), each conv's scores are divided by their mean and the normalized scores are
summed; a group of one conv uses its raw scores, so single layers rank exactly as in the
official code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import ClassVar, Protocol

import numpy as np
import torch
import torch.nn as nn

from ..attention import head_gradient_products
from ..errors import PipelineError
from ..modes import eval_mode


class PruningError(PipelineError):
    """The requested pruning cannot be done on this model: one line, says why (also a
    criterion that cannot score a group: no BN for bn_scale, no batches for taylor). `key`,
    when set, is the spec key at fault (`skip[0]`, `target_macs_reduction`) and the message
    starts with it; `problem` is the message without it."""

    def __init__(self, problem: str, key: str | None = None):
        super().__init__(f"{key}: {problem}" if key else problem)
        self.problem, self.key = problem, key


class ScoredGroup(Protocol):
    """What a criterion reads of a channel group (see `groups.Group`)."""

    name: str

    def weights(self) -> list[np.ndarray]:
        """The filter rows of every layer producing the group's channels."""
        ...

    def bn_scales(self) -> list[np.ndarray]:
        """gamma of the BatchNorm after each producing layer (those that have one)."""
        ...

    def coupled_slices(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every parameter slice removing the channels deletes: (rows, channel of each
        row): producers' filter rows, consumers' input slices, norm layers' scales."""
        ...

    def taylor_terms(self) -> list[np.ndarray]:
        """Per producing layer, (batches, channels): each batch's sum of gradient x
        weight over the filter's parameters and its BN's."""
        ...


class ScoredHeads(Protocol):
    """What a criterion reads of one attention module's heads (see `heads.HeadSet`)."""

    name: str
    size: int  # the number of heads

    def vectors(self) -> np.ndarray:
        """(heads, features): q, k, v weight rows and out-projection columns per head."""
        ...

    def all_parameters(self) -> np.ndarray:
        """(heads, features): every parameter removing the head deletes."""
        ...

    def taylor_terms(self) -> np.ndarray:
        """(batches, heads): each batch's sum of gradient x weight over those parameters."""
        ...


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
    needs_gradients: ClassVar[bool] = False  # taylor: gradients of training batches
    normalize_global: ClassVar[bool] = True  # global ranking divides by each group's mean
    scores_heads: ClassVar[bool] = True  # can score attention heads (`score_heads`)

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

    def score_heads(self, heads: ScoredHeads, seed: int = 0) -> np.ndarray:
        """One score per attention head: the head's parameter vector scored as a filter."""
        return self.layer_scores(heads.vectors())


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

    def score_heads(self, heads: ScoredHeads, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).random(heads.size)


class Taylor(Criterion):
    name = "taylor"
    needs_gradients = True

    def __call__(self, group: ScoredGroup, seed: int = 0) -> np.ndarray:
        terms = group.taylor_terms()
        return np.sum([(t * t).mean(0) for t in terms], axis=0)

    def score_heads(self, heads: ScoredHeads, seed: int = 0) -> np.ndarray:
        t = heads.taylor_terms()
        return (t * t).mean(0)


class BNScale(Criterion):
    name = "bn_scale"
    normalize_global = False
    scores_heads = False

    def __call__(self, group: ScoredGroup, seed: int = 0) -> np.ndarray:
        scales = group.bn_scales()
        if not scales:
            raise PruningError(f"bn_scale: {group.name} is followed by no BatchNorm "
                                 "(network slimming scores the BN scale of each channel)")
        return np.mean([np.abs(s) for s in scales], axis=0)

    def score_heads(self, heads: ScoredHeads, seed: int = 0) -> np.ndarray:
        raise PruningError("bn_scale scores BatchNorm scales, which attention heads lack "
                           f"(use {head_criteria()})", "heads")


class GroupL2(Criterion):
    name = "group_l2"

    def __call__(self, group: ScoredGroup, seed: int = 0) -> np.ndarray:
        slices = group.coupled_slices()
        channels = group.weights()[0].shape[0]
        score = np.zeros(channels)
        for rows, channel in slices:
            np.add.at(score, channel, (rows * rows).sum(1))
        return score

    def score_heads(self, heads: ScoredHeads, seed: int = 0) -> np.ndarray:
        w = heads.all_parameters()
        return (w * w).sum(1)


CRITERIA: dict[str, Criterion] = {c.name: c for c in (
    FPGM(), L1(), L2(), Random(), Taylor(), BNScale(), GroupL2())}


def head_criteria() -> str:
    """The criteria that can score attention heads, as a message lists them."""
    names = [n for n, c in CRITERIA.items() if c.scores_heads]
    return f"{', '.join(names[:-1])} or {names[-1]}"


# --------------------------------------------------------------------------- gradients

_GRAD_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm,
               nn.LayerNorm)


def _each_backward(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   after: Callable[[], None]) -> int:
    """Run every batch forward and backward (cross-entropy, eval mode: BN statistics
    unchanged) and call `after()` with that batch's gradients in place; the model's
    gradients are left as they were and no update is applied. Returns the batches."""
    params = [p for p in model.parameters()]
    saved = [p.grad for p in params]
    count = 0
    try:
        with eval_mode(model), torch.enable_grad():
            for x, y in batches:
                for p in params:
                    p.grad = None
                loss = nn.functional.cross_entropy(model(x).float(), y)
                loss.backward()
                after()
                count += 1
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g
    return count


def gradient_products(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                      ) -> dict[nn.Module, np.ndarray]:
    """For every conv, linear and norm layer: (batches, out channels), each batch's sum of
    gradient x weight over each output channel's parameters (weight row and bias) under
    the cross-entropy loss (see `_each_backward`)."""
    layers = [m for m in model.modules() if isinstance(m, _GRAD_TYPES)
              and getattr(m, "weight", None) is not None]
    rows: dict[nn.Module, list[np.ndarray]] = {m: [] for m in layers}

    def collect() -> None:
        for m in layers:
            s = _row_products(m.weight)
            bias = getattr(m, "bias", None)
            if isinstance(bias, torch.Tensor) and bias.grad is not None:
                s = s + (bias.grad * bias).detach().double()
            rows[m].append(s.cpu().numpy())

    if not _each_backward(model, batches, collect) and layers:
        raise PruningError("taylor: no training batch to take gradients from")
    return {m: np.stack(r) for m, r in rows.items() if r}


def head_gradient_terms(model: nn.Module, modules: list[nn.Module],
                        batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                        ) -> dict[nn.Module, np.ndarray]:
    """For every attention module of `modules`: (batches, heads), each batch's sum of
    gradient x weight over each head's parameters (`attention.head_gradient_products`)."""
    rows: dict[nn.Module, list[np.ndarray]] = {m: [] for m in modules}

    def collect() -> None:
        for m in modules:
            rows[m].append(head_gradient_products(m))

    if not _each_backward(model, batches, collect):
        raise PruningError("taylor: no training batch to take gradients from", "heads")
    return {m: np.stack(r) for m, r in rows.items()}


def _row_products(weight: torch.Tensor) -> torch.Tensor:
    """Per output channel: the sum of gradient x weight over the channel's weights."""
    if weight.grad is None:
        return torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    gw = (weight.grad * weight).detach().double()
    return gw.reshape(weight.shape[0], -1).sum(1)


__all__ = ["BNScale", "CRITERIA", "Criterion", "FPGM", "GroupL2", "L1", "head_criteria",
           "L2", "PruningError", "Random", "ScoredGroup", "Taylor", "filter_matrix", "fpgm_scores",
           "gradient_products", "head_gradient_terms", "ScoredHeads"]
