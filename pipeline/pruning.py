"""Structured filter pruning: our criteria, torch-pruning's dependency-aware surgery.

Criteria (scores per output filter; the lowest-scored filters are removed):
  fpgm    Filter Pruning via Geometric Median (He et al. 2019), as the official code
          does it: filters flattened to rows, the Euclidean distance matrix between
          them, each filter scored by its summed distance to all others; filters near
          the geometric median are the most replaceable.
  l1/l2   sum of absolute weights / Euclidean norm per filter (Li et al. 2017).
  random  a seeded random score (the baseline).

Which convolutions are pruned is a policy:
  block_internal  convs whose output channels feed no residual addition (the inner
                  convs of residual blocks; every conv of a plain network);
  all             every prunable channel group the dependency graph finds, residual-
                  coupled groups included.
Per-layer counts use the official code's rounding: floor(ratio * filters).
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

from .config import Invalid, opt

log = logging.getLogger(__name__)

Method = Literal["fpgm", "l1", "l2", "random"]


class PruningError(RuntimeError):
    """The requested pruning cannot be done on this model: one line, says why."""


# --------------------------------------------------------------------------- criteria


def filter_matrix(weight: torch.Tensor) -> np.ndarray:
    """Conv/linear weight (out, ...) -> float64 rows, one flattened filter per row."""
    return weight.detach().double().cpu().reshape(weight.shape[0], -1).numpy()


def fpgm_scores(weight: torch.Tensor) -> np.ndarray:
    """Summed Euclidean distance of each filter to every other filter (higher = keep)."""
    w = filter_matrix(weight)
    sq = (w * w).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * w @ w.T, 0.0)
    return np.sqrt(d2).sum(1)


def norm_scores(weight: torch.Tensor, p: int) -> np.ndarray:
    w = filter_matrix(weight)
    return np.abs(w).sum(1) if p == 1 else np.sqrt((w * w).sum(1))


def scores_for(method: str, weight: torch.Tensor, seed: int = 0) -> np.ndarray:
    if method == "fpgm":
        return fpgm_scores(weight)
    if method == "l1":
        return norm_scores(weight, 1)
    if method == "l2":
        return norm_scores(weight, 2)
    if method == "random":
        return np.random.default_rng(seed).random(weight.shape[0])
    raise ValueError(f"unknown pruning method {method!r}")


def lowest(scores: np.ndarray, n: int) -> list[int]:
    """Indices of the n lowest scores (stable: ties broken by index)."""
    return sorted(np.argsort(scores, kind="stable")[:n].tolist())


def prune_count(channels: int, ratio: float, round_to: int | None = None) -> int:
    """Filters to remove: floor(ratio * channels) as the official code does, or with
    `round_to`, the kept count rounded to a multiple of it (torch-pruning's rule)."""
    if round_to:
        keep = channels - int(ratio * channels)
        keep = max(round_to, int(round(keep / round_to)) * round_to)
        return max(0, min(channels - 1, channels - keep))
    return min(channels - 1, int(np.floor(ratio * channels + 1e-9)))


# --------------------------------------------------------------------------- config


@dataclass
class FPGMConfig:
    norm_ratio: float = opt(0.0, "share of filters first removed by smallest L2 norm (the "
                            "official code's 'mix' variant)", min=0, lt=1)
    distance_ratio: float | None = opt(None, "share then removed by geometric-median distance "
                                       "(default: ratio - norm_ratio)", min=0, lt=1)


@dataclass
class PruneSpec:
    method: Method = opt("fpgm", "criterion: fpgm | l1 | l2 | random")
    ratio: float | None = opt(0.4, "share of filters removed per pruned layer", gt=0, lt=1)
    fpgm: FPGMConfig = opt(FPGMConfig, "FPGM mix variant (norm share, distance share)")
    policy: Literal["block_internal", "all"] = opt(
        "block_internal", "block_internal: convs that feed no residual add; all: every "
        "channel group incl. residual-coupled ones")
    include: list[str] = opt([], "only prune these layers (names or glob patterns)")
    skip: list[str] = opt([], "never prune these layers (names or glob patterns)")
    layer_ratios: dict[str, float] = opt(
        {}, "ratio per layer-name pattern, e.g. {'layer1.*': 0.6}; first match wins", gt=0, lt=1)
    skip_downsample: bool = opt(False, "never prune downsample/shortcut projections")
    round_to: int | None = opt(None, "keep a multiple of this many channels (torch-pruning's "
                               "rounding) instead of floor(ratio * filters) removed", min=1)
    target_macs_reduction: float | None = opt(
        None, "instead of a ratio: prune in small steps until conv MACs fall by this share",
        gt=0, lt=1)
    global_ranking: bool = opt(False, "rank filters across layers (scores normalized per "
                               "layer) instead of per layer")
    seed: int | None = opt(None, "seed of the random criterion (default: the run's seed)")

    def validate(self) -> None:
        if self.ratio is None and self.target_macs_reduction is None:
            raise Invalid("ratio", "give a ratio or a target_macs_reduction")


# --------------------------------------------------------------------------- surgery


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name == p for p in patterns)


def build_graph(model: nn.Module, example: torch.Tensor):
    import torch_pruning as tp

    from .pruning_ops import customized_pruners

    was_training = model.training
    model.eval()
    try:
        dg = tp.DependencyGraph().build_dependency(
            model, example_inputs=example, customized_pruners=customized_pruners(),
            verbose=False)
    finally:
        model.train(was_training)
    return dg


def _out_convs(group, dg) -> list[nn.Module]:
    out = []
    for dep, _ in group:
        m = dep.target.module
        if isinstance(m, (nn.Conv2d, nn.Linear)) and dg.is_out_channel_pruning_fn(dep.handler):
            out.append(m)
    return out


def is_residual_coupled(group, dg) -> bool:
    """True when the group's channels meet a residual addition: several convs (or an
    option-A shortcut) share them, or they pass through an element-wise add."""
    from torch_pruning import ops

    from .models import PadShortcut

    if len(_out_convs(group, dg)) > 1:
        return True
    for dep, _ in group:
        m = dep.target.module
        if isinstance(m, PadShortcut):
            return True
        if isinstance(m, ops._ElementWiseOp) and "Add" in str(m._grad_fn):
            return True
    return False


def classifier_layers(model: nn.Module) -> list[nn.Module]:
    """The final linear layer(s): never pruned."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


@dataclass
class PruneReport:
    layers: list[dict] = field(default_factory=list)  # name, before, after


def prune_model(model: nn.Module, spec: PruneSpec, example: torch.Tensor,
                seed: int = 0) -> PruneReport:
    """Prune `model` in place according to `spec`; returns per-layer widths."""
    dg = build_graph(model, example)
    names = {m: n for n, m in model.named_modules()}
    ignored = classifier_layers(model)
    report = PruneReport()
    groups = list(dg.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d]))
    plans = []
    for group in groups:
        convs = _out_convs(group, dg)
        if not convs:
            continue
        root = group[0].dep.target.module
        root_name = names[root]
        coupled = is_residual_coupled(group, dg)
        if spec.policy == "block_internal" and coupled:
            continue
        if spec.include and not any(_matches(names[c], spec.include) for c in convs):
            continue
        if any(_matches(names[c], spec.skip) for c in convs):
            continue
        if spec.skip_downsample and any(_is_downsample(names[c]) for c in convs):
            continue
        ratio = spec.ratio
        for pattern, r in spec.layer_ratios.items():
            if _matches(root_name, pattern):
                ratio = r
                break
        if not ratio:
            continue
        plans.append((root, convs, ratio))
    for root, convs, ratio in plans:
        channels = root.out_channels
        n = prune_count(channels, ratio, spec.round_to)
        if n <= 0:
            continue
        idxs = select(spec, root, convs, n, seed + len(report.layers))
        import torch_pruning as tp

        group = dg.get_pruning_group(root, tp.prune_conv_out_channels, idxs)
        if not dg.check_pruning_group(group):
            continue
        group.prune()
        report.layers.append({"name": names[root], "before": channels,
                              "after": root.out_channels, "coupled": [names[c] for c in convs]})
    return report


def select(spec: PruneSpec, root: nn.Module, convs: list[nn.Module], n: int, seed: int) -> list[int]:
    """The n filters of `root`'s channel group to remove under the spec's criterion.

    For a residual-coupled group the per-layer scores are summed over every conv whose
    output channels are in the group (each layer's scores normalized by its mean first,
    so no layer dominates by scale).
    """
    if spec.method == "fpgm" and (spec.fpgm.norm_ratio > 0 or spec.fpgm.distance_ratio):
        return _fpgm_mix(spec, root, convs, n)
    total = np.zeros(root.out_channels)
    for c in convs:
        s = scores_for(spec.method, c.weight, seed)
        total += s / (np.abs(s).mean() + 1e-12) if len(convs) > 1 else s
    return lowest(total, n)


def _fpgm_mix(spec: PruneSpec, root: nn.Module, convs: list[nn.Module], n: int) -> list[int]:
    """Official FPGM 'mix': remove a share by small L2 norm, then a share by distance
    among the remaining filters."""
    channels = root.out_channels
    n_norm = int(np.floor(spec.fpgm.norm_ratio * channels + 1e-9))
    dist_ratio = spec.fpgm.distance_ratio
    n_dist = int(np.floor(dist_ratio * channels + 1e-9)) if dist_ratio is not None else n - n_norm
    n_dist = max(0, min(n_dist, channels - n_norm - 1))
    norm = sum(norm_scores(c.weight, 2) for c in convs)
    removed = lowest(norm, n_norm)
    keep = [i for i in range(channels) if i not in set(removed)]
    w = torch.cat([c.weight.detach().reshape(c.weight.shape[0], -1) for c in convs], 1)
    dist = fpgm_scores(w[keep])
    removed += [keep[i] for i in lowest(dist, n_dist)]
    return sorted(removed)


def _is_downsample(name: str) -> bool:
    return "downsample" in name or "shortcut" in name
