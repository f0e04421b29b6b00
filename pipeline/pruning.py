"""Structured filter pruning: our criteria, torch-pruning's dependency-aware surgery.

Criteria (a score per output filter; the lowest-scored filters are removed):
  fpgm    Filter Pruning via Geometric Median (He et al. 2019) as the official code does
          it: filters flattened to rows, the Euclidean distance matrix between them, each
          filter scored by its summed distance to all others; the filters nearest the
          geometric median (smallest sums) are the most replaceable. The official "mix"
          variant first removes a share by smallest L2 norm, then a share by distance among
          the remaining filters (`fpgm: {norm_ratio, distance_ratio}`).
  l1/l2   sum of absolute weights / Euclidean norm per filter (Li et al. 2017).
  random  a seeded random score (the baseline).

A channel group is what torch-pruning's dependency graph removes together. When several
convolutions produce the group's channels (residual-coupled layers: the convs feeding one
residual stream, a projection shortcut), each conv's scores are divided by their mean and
the normalized scores are summed; a group of one conv uses its raw scores, so single
layers rank exactly as in the official code. The random criterion draws one score per
channel of the group.

Which groups are pruned:
  policy block_internal   groups that meet no residual addition (the inner convs of
                          residual blocks, the L1 paper's ResNet rule; every conv of a
                          plain network);
  policy all              every group, residual streams included (option-A shortcuts
                          through the custom pruner in `pruning_ops`);
  include / skip          layer names, glob patterns or layer numbers (see `layer_numbers`);
  layer_ratios            ratio per name pattern or layer number (per-stage ratios);
  skip_downsample         groups containing a downsample/shortcut projection are kept.

Counts: floor(ratio x filters) removed, as the official FPGM code does (6/12/25 of
16/32/64 at 40%); with `round_to` torch-pruning's rule: keep int(filters x (1 - ratio))
rounded down to a multiple of round_to (`round_mode: nearest`: to the nearest multiple,
so 40% of 16/32/64 at round_to 8 keeps 8/16/40). `round_to: 1` is also the rounding of the L1
paper's code (Rethinking's res56prune.py keeps int(filters x (1 - ratio)): 6 of 16 at
60%), which its ResNet-56-B figure (9.09E7 MACs) needs. `target_macs_reduction` prunes
in small steps (every pruned group's ratio grows by `target_step`, the criterion
re-scored on the current weights each step; within the last step groups are pruned in
module order until the target is met) until the MACs (conv + linear) fall by the target
share. `global_ranking` ranks all candidate filters together by their per-group
mean-normalized scores instead of removing the same share from every group (each group
keeps at least max(1, round_to) channels).

Selection always happens on the weights as they are before the step's surgery, so in
one-shot pruning every layer is scored on the dense network, as the papers' code does.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

from .config import Invalid, opt
from .errors import PipelineError

log = logging.getLogger(__name__)

Method = Literal["fpgm", "l1", "l2", "random"]
DEFAULT_RATIO = 0.4
SELECTION_KEYS = ("method", "ratio", "fpgm", "policy", "include", "skip", "layer_ratios",
                  "skip_downsample", "round_to", "round_mode", "global_ranking")


class PruningError(PipelineError):
    """The requested pruning cannot be done on this model: one line, says why."""


# --------------------------------------------------------------------------- criteria


def filter_matrix(weight: torch.Tensor) -> np.ndarray:
    """Conv/linear weight (out, ...) -> float64 rows, one flattened filter per row."""
    return weight.detach().double().cpu().reshape(weight.shape[0], -1).numpy()


def fpgm_scores(weight: torch.Tensor | np.ndarray) -> np.ndarray:
    """Summed Euclidean distance of each filter to every other filter (higher = keep)."""
    w = weight if isinstance(weight, np.ndarray) else filter_matrix(weight)
    sq = (w * w).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (w @ w.T), 0.0)
    np.fill_diagonal(d2, 0.0)
    return np.sqrt(d2).sum(1)


def norm_scores(weight: torch.Tensor | np.ndarray, p: int) -> np.ndarray:
    """L1 (p=1) or L2 (p=2) norm of each flattened filter."""
    w = weight if isinstance(weight, np.ndarray) else filter_matrix(weight)
    return np.abs(w).sum(1) if p == 1 else np.sqrt((w * w).sum(1))


def criterion_scores(method: str, weight: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per-filter scores of one layer under a deterministic criterion."""
    if method == "fpgm":
        return fpgm_scores(weight)
    if method == "l1":
        return norm_scores(weight, 1)
    if method == "l2":
        return norm_scores(weight, 2)
    raise ValueError(f"unknown pruning criterion {method!r}")


def group_scores(method: str, weights: list[np.ndarray], seed: int = 0) -> np.ndarray:
    """Scores of a channel group from the weights (rows = channels) of the convs that
    produce it: one conv's raw scores, or the sum of each conv's mean-normalized scores."""
    channels = weights[0].shape[0]
    if method == "random":
        return np.random.default_rng(seed).random(channels)
    per_layer = [criterion_scores(method, w) for w in weights]
    if len(per_layer) == 1:
        return per_layer[0]
    total = np.zeros(channels)
    for s in per_layer:
        mean = float(np.abs(s).mean())
        total += s / mean if mean > 0 else s
    return total


def lowest(scores: np.ndarray, n: int) -> list[int]:
    """Indices of the n lowest scores, sorted (ties broken by index)."""
    if n <= 0:
        return []
    return sorted(np.argsort(scores, kind="stable")[:n].tolist())


def prune_count(channels: int, ratio: float, round_to: int | None = None,
                round_mode: str = "down") -> int:
    """Filters to remove from a layer of `channels` at `ratio`.

    Default: floor(ratio * channels), as the official FPGM and L1 code do (with a 1e-9
    tolerance so that 0.29 x 100 counts 29); at least one filter is kept. With
    `round_to`: torch-pruning's rule, keep int(channels * (1 - ratio)) rounded down to a
    multiple of round_to (at least round_to); round_to 1 is its plain rounding. With
    round_mode "nearest": keep channels * (1 - ratio) rounded to the nearest multiple of
    round_to (halves up; at least round_to, at most channels), e.g. 40% of 16/32/64 keeps
    8/16/40 at round_to 8, widths that CPU and GPU kernels run at full speed.
    """
    if ratio <= 0:
        return 0
    if round_to:
        if round_mode == "nearest":
            keep = int(math.floor(channels * (1 - ratio) / round_to + 0.5 + 1e-9)) * round_to
            keep = min(keep, channels)
        else:
            keep = int(channels * (1 - ratio))
            keep -= keep % round_to
        keep = max(keep, min(round_to, channels), 1)
        return max(0, channels - keep)
    return max(0, min(channels - 1, int(math.floor(ratio * channels + 1e-9))))


# --------------------------------------------------------------------------- config


@dataclass
class FPGMConfig:
    norm_ratio: float = opt(0.0, "share of each layer's filters first removed by smallest L2 "
                            "norm (the official code's 'mix' variant; its rate_norm = 1 - this)",
                            min=0, lt=1)
    distance_ratio: float | None = opt(
        None, "share then removed by geometric-median distance among the rest (the official "
        "rate_dist; default: each layer's ratio - norm_ratio)", min=0, lt=1)

    @property
    def is_mix(self) -> bool:
        return self.norm_ratio > 0 or self.distance_ratio is not None


@dataclass
class PruneSpec:
    """What to prune and how (the keys of a prune stage; see the module docstring)."""

    method: Method = opt("fpgm", "criterion: fpgm | l1 | l2 | random")
    ratio: float | None = opt(None, "share of filters removed per pruned layer (default 0.4 "
                              "unless target_macs_reduction is given)", gt=0, lt=1)
    fpgm: FPGMConfig = opt(FPGMConfig, "FPGM mix variant (norm share, distance share)")
    policy: Literal["block_internal", "all"] = opt(
        "block_internal", "block_internal: only groups that meet no residual addition (inner "
        "convs of residual blocks); all: every channel group incl. residual streams")
    include: list[int | str] = opt([], "only prune these layers: names, glob patterns, or "
                                   "layer numbers (1 = the stem; shortcut projections are not "
                                   "numbered)")
    skip: list[int | str] = opt([], "never prune these layers (names, globs or layer numbers, "
                                "e.g. the L1 paper's ResNet-56-B: [16, 18, 20, 34, 38, 54])")
    layer_ratios: dict[str, float] = opt(
        {}, "ratio per layer-name pattern or layer number, e.g. {'layer1.*': 0.6}; first "
        "match wins, others use `ratio`")
    skip_downsample: bool = opt(False, "never prune groups that contain a downsample/shortcut "
                                "projection (FPGM on ImageNet)")
    round_to: int | None = opt(None, "torch-pruning's rounding instead of floor(ratio x "
                               "filters): keep int(filters x (1 - ratio)) rounded down to a "
                               "multiple of this", min=1)
    round_mode: Literal["down", "nearest"] = opt(
        "down", "how round_to rounds the kept filters: down (torch-pruning's rule) or to the "
        "nearest multiple (40% of 16/32/64 at round_to 8: keep 8/16/40 instead of 8/16/32)")
    target_macs_reduction: float | None = opt(
        None, "instead of a ratio: prune in small steps until the MACs (conv + linear) fall "
        "by this share", gt=0, lt=1)
    target_step: float = opt(0.02, "ratio added to every pruned group per step of the "
                             "target_macs_reduction search (each step re-scores)", gt=0, lt=1)
    global_ranking: bool = opt(False, "rank filters across groups (scores normalized by each "
                               "group's mean) instead of removing `ratio` from every group")
    seed: int | None = opt(None, "seed of the random criterion (default: the run's seed)")

    def validate(self) -> None:
        mix = self.fpgm.is_mix
        if self.ratio is not None and self.target_macs_reduction is not None:
            raise Invalid("target_macs_reduction", "give either ratio or "
                          "target_macs_reduction, not both (set ratio: null)")
        if mix and self.method != "fpgm":
            raise Invalid("fpgm", f"norm_ratio/distance_ratio apply to method fpgm, not "
                          f"{self.method!r}")
        if mix and (self.global_ranking or self.target_macs_reduction is not None):
            raise Invalid("fpgm", "the mix variant (norm_ratio/distance_ratio) takes fixed "
                          "per-layer shares: not with global_ranking or target_macs_reduction")
        if self.fpgm.distance_ratio is not None:
            total = self.fpgm.norm_ratio + self.fpgm.distance_ratio
            if self.layer_ratios:
                raise Invalid("fpgm.distance_ratio", "leave it unset with layer_ratios (the "
                              "distance share is each layer's ratio - norm_ratio)")
            if not 0 < total < 1:
                raise Invalid("fpgm.distance_ratio", f"norm_ratio + distance_ratio = {total:g} "
                              "must be in (0, 1)")
            if self.ratio is not None and abs(self.ratio - total) > 1e-9:
                raise Invalid("fpgm.distance_ratio", f"norm_ratio + distance_ratio = {total:g} "
                              f"differs from ratio {self.ratio:g} (leave ratio unset)")
            self.ratio = total
        if self.round_mode != "down" and not self.round_to:
            raise Invalid("round_mode", f"{self.round_mode!r} rounds to multiples of round_to: "
                          "set round_to too")
        if self.ratio is None and self.target_macs_reduction is None:
            self.ratio = DEFAULT_RATIO
        if self.layer_ratios and self.target_macs_reduction is not None:
            raise Invalid("layer_ratios", "per-layer ratios need a ratio, not "
                          "target_macs_reduction")
        if self.layer_ratios and self.global_ranking:
            raise Invalid("layer_ratios", "per-layer ratios and global_ranking exclude each other")
        for key, r in self.layer_ratios.items():
            if not isinstance(r, (int, float)) or not 0 < r < 1:
                raise Invalid(f"layer_ratios.{key}", f"expected a ratio in (0, 1), got {r!r}")
            if mix and r <= self.fpgm.norm_ratio:
                raise Invalid(f"layer_ratios.{key}", f"{r:g} must exceed fpgm.norm_ratio "
                              f"{self.fpgm.norm_ratio:g}")
        if mix and self.ratio is not None and self.ratio <= self.fpgm.norm_ratio:
            raise Invalid("fpgm.norm_ratio", f"{self.fpgm.norm_ratio:g} must be below the "
                          f"ratio {self.ratio:g}")
        for key in ("include", "skip"):
            for item in getattr(self, key):
                if isinstance(item, int) and item < 1:
                    raise Invalid(key, f"layer numbers start at 1, got {item}")


def checked(spec: PruneSpec) -> PruneSpec:
    """Run the spec's validation (also for specs built in Python, not loaded from YAML)."""
    try:
        spec.validate()
    except Invalid as err:
        raise PruningError(f"{err.key}: {err.message}") from None
    return spec


# --------------------------------------------------------------------------- layers


def is_projection(name: str) -> bool:
    """A downsample/shortcut projection (torchvision `downsample`, our option-B `shortcut`)."""
    return any(part in ("downsample", "shortcut") for part in name.split("."))


def layer_numbers(model: nn.Module) -> dict[str, int]:
    """Conv name -> layer number, as the L1 paper's code counts: 1-based, in module order,
    every Conv2d of the main path (the stem is 1); shortcut projections are not numbered.

    On a CIFAR ResNet-56 this gives the stem 1, layerS.B.conv1 = 2 + 18(S-1) + 2B and
    conv2 one more, so the ResNet-56-B skip list [16, 18, 20, 34, 38, 54] names
    layer1.7.conv1, layer1.8.conv1, layer2.0.conv1, layer2.7.conv1, layer3.0.conv1 and
    layer3.8.conv1.
    """
    out, n = {}, 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and not is_projection(name):
            n += 1
            out[name] = n
    return out


def _matches(name: str, number: int | None, ref: int | str) -> bool:
    if isinstance(ref, int):
        return number == ref
    if ref.isdigit():
        return number == int(ref)
    return name == ref or fnmatch.fnmatchcase(name, ref)


def _check_refs(refs, key: str, names: list[str], numbers: dict[str, int]) -> None:
    for ref in refs:
        if not any(_matches(n, numbers.get(n), ref) for n in names):
            hint = f" (layers are numbered 1..{len(numbers)})" if (
                isinstance(ref, int) or str(ref).isdigit()) else ""
            raise PruningError(f"{key}: {ref!r} matches no convolution of the model{hint}")


# --------------------------------------------------------------------------- groups


@dataclass(eq=False)
class Group:
    """A prunable channel group: the convs whose output channels are removed together."""

    root: nn.Module
    name: str  # the root conv's name
    convs: list[str]  # every conv producing the group's channels (root first)
    modules: list[nn.Module]
    coupled: bool
    number: int | None
    ratio: float = 0.0
    order: int = 0
    width: int = 0  # channels before any pruning
    dense_ids: list[int] = field(default_factory=list)  # original index of each channel

    @property
    def channels(self) -> int:
        return int(self.root.weight.shape[0])

    def weights(self) -> list[np.ndarray]:
        return [filter_matrix(m.weight) for m in self.modules]


def build_graph(model: nn.Module, example: torch.Tensor):
    """torch-pruning's dependency graph of `model` (traced in eval mode)."""
    import torch_pruning as tp

    from .pruning_ops import customized_pruners

    was_training = model.training
    model.eval()
    try:
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=example, customized_pruners=customized_pruners(),
            verbose=False)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PruningError(f"torch-pruning cannot trace this model ({first[:160]})") from None
    finally:
        model.train(was_training)


def _out_convs(group, dg) -> list[nn.Module]:
    out = []
    for item in group:
        m = item.dep.target.module
        if isinstance(m, nn.Conv2d) and dg.is_out_channel_pruning_fn(item.dep.handler):
            if m not in out:
                out.append(m)
    return out


def is_residual_coupled(group, dg) -> bool:
    """True when the group's channels meet a residual addition: they pass through an
    element-wise add or an option-A shortcut. (Several convs can share channels without
    one, e.g. a squeeze-excitation gate's multiplication: those stay block-internal.)"""
    from torch_pruning import ops

    from .models import PadShortcut

    for item in group:
        m = item.dep.target.module
        if isinstance(m, PadShortcut):
            return True
        if isinstance(m, ops._ElementWiseOp) and "Add" in str(m._grad_fn):
            return True
    return False


def classifier_layers(model: nn.Module) -> list[nn.Module]:
    """The final linear layer: never pruned (the output classes stay)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def candidate_groups(model: nn.Module, dg, spec: PruneSpec) -> list[Group]:
    """The groups `spec` prunes, in module order, each with its ratio."""
    names = {m: n for n, m in model.named_modules()}
    order = {m: i for i, (_, m) in enumerate(model.named_modules())}
    numbers = layer_numbers(model)
    conv_names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    _check_refs(spec.include, "include", conv_names, numbers)
    _check_refs(spec.skip, "skip", conv_names, numbers)
    _check_refs(list(spec.layer_ratios), "layer_ratios", conv_names, numbers)

    def hit(conv_list: list[str], refs) -> bool:
        return any(_matches(c, numbers.get(c), r) for c in conv_list for r in refs)

    out, skipped_by_policy, grouped = [], [], []
    for group in dg.get_all_groups(ignored_layers=classifier_layers(model),
                                   root_module_types=[nn.Conv2d]):
        mods = _out_convs(group, dg)
        if not mods:
            continue
        # name the group by a full conv (a depthwise conv only follows its input)
        mods = sorted(mods, key=lambda m: (_is_depthwise(m), order[m]))
        root = mods[0]
        convs = [names[m] for m in mods]
        if any(_is_grouped(item.dep.target.module) for item in group):
            grouped.append(convs[0])
            continue
        coupled = is_residual_coupled(group, dg)
        if spec.include and not hit(convs, spec.include):
            continue
        if spec.skip and hit(convs, spec.skip):
            continue
        if spec.skip_downsample and any(is_projection(c) for c in convs):
            continue
        if spec.policy == "block_internal" and coupled:
            skipped_by_policy.append(convs)
            continue
        ratio = spec.ratio or 0.0
        for ref, r in spec.layer_ratios.items():
            if hit(convs, [ref]):
                ratio = float(r)
                break
        g = Group(root=root, name=names[root], convs=convs, modules=mods, coupled=coupled,
                  number=numbers.get(names[root]), ratio=ratio,
                  order=min(order[m] for m in mods))
        g.width = g.channels
        g.dense_ids = list(range(g.width))
        out.append(g)
    if grouped:
        log.warning("%d channel group(s) feed grouped convolutions (e.g. %s), which this "
                    "pruner leaves unpruned", len(grouped), grouped[0])
    if spec.include and skipped_by_policy:
        log.warning("include: %d matching group(s) are residual-coupled and not pruned under "
                    "policy block_internal (use policy: all)", len(skipped_by_policy))
    return sorted(out, key=lambda g: g.order)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels \
        == m.out_channels


def _is_grouped(m: nn.Module) -> bool:
    """A grouped, not depthwise, convolution (ResNeXt): its channel groups must shrink
    evenly, which per-channel selection does not guarantee."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and not _is_depthwise(m)


# --------------------------------------------------------------------------- selection


def _select_in_group(spec: PruneSpec, g: Group, ratio: float, seed: int) -> list[int]:
    """One-shot local selection: indices (current numbering) of g's filters to remove."""
    channels = g.channels
    n = prune_count(channels, ratio, spec.round_to, spec.round_mode)
    if n <= 0:
        return []
    weights = g.weights()
    if spec.method == "fpgm" and spec.fpgm.is_mix:
        # the official counts: int(N * (1 - rate_norm)) by norm, int(N * rate_dist) by
        # distance; with round_to the distance share fills up torch-pruning's total
        n_norm = int(math.floor(spec.fpgm.norm_ratio * channels + 1e-9))
        dist_ratio = spec.fpgm.distance_ratio
        if dist_ratio is None:
            dist_ratio = ratio - spec.fpgm.norm_ratio
        if spec.round_to:
            n_dist = n - n_norm
        else:
            n_dist = int(math.floor(dist_ratio * channels + 1e-9))
        n_norm = min(n_norm, channels - 1)
        n_dist = max(0, min(n_dist, channels - n_norm - 1))
        return fpgm_mix_selection(weights, n_norm, n_dist)
    return lowest(group_scores(spec.method, weights, seed), n)


def fpgm_mix_selection(weights: list[np.ndarray], n_norm: int, n_dist: int) -> list[int]:
    """The official FPGM mix: the n_norm smallest-L2 filters, then the n_dist filters with
    the smallest summed distance among the remaining ones."""
    channels = weights[0].shape[0]
    removed = lowest(group_scores("l2", weights), n_norm)
    gone = set(removed)
    keep = [i for i in range(channels) if i not in gone]
    dist = group_scores("fpgm", [w[keep] for w in weights])
    removed += [keep[i] for i in lowest(dist, n_dist)]
    return sorted(removed)


def _global_selection(spec: PruneSpec, groups: list[Group], n_total: int,
                      seed: int) -> dict[int, list[int]]:
    """Remove the n_total lowest filters across groups (scores / group mean), each group
    keeping at least max(1, round_to) channels."""
    pool = []
    for gi, g in enumerate(groups):
        s = group_scores(spec.method, g.weights(), seed + gi)
        mean = float(np.abs(s).mean())
        s = s / mean if mean > 0 else s
        pool += [(float(v), gi, i) for i, v in enumerate(s)]
    pool.sort()
    floor_keep = max(1, spec.round_to or 1)
    taken: dict[int, list[int]] = {gi: [] for gi in range(len(groups))}
    count = 0
    for _, gi, i in pool:
        if count >= n_total:
            break
        if groups[gi].channels - len(taken[gi]) - 1 < floor_keep:
            continue
        taken[gi].append(i)
        count += 1
    if spec.round_to:  # keep a multiple of round_to: drop further lowest-ranked filters
        for gi, g in enumerate(groups):
            if not taken[gi]:
                continue
            keep = g.channels - len(taken[gi])
            extra = keep % spec.round_to if keep > spec.round_to else 0
            if (extra and spec.round_mode == "nearest" and 2 * extra >= spec.round_to
                    and keep + spec.round_to - extra <= g.channels):
                # nearest: give back the highest-ranked of the taken filters instead
                del taken[gi][len(taken[gi]) - (spec.round_to - extra):]
                continue
            if extra:
                s = group_scores(spec.method, g.weights(), seed + gi)
                rest = [i for i in np.argsort(s, kind="stable").tolist() if i not in taken[gi]]
                taken[gi] += rest[:extra]
    return {gi: sorted(v) for gi, v in taken.items() if v}


def select(spec: PruneSpec, groups: list[Group], seed: int,
           ratio_scale: float | None = None) -> dict[int, list[int]]:
    """Group index -> filter indices (current numbering) to remove, one-shot on the current
    weights. `ratio_scale` replaces every group's ratio (used by the target search)."""
    if spec.global_ranking:
        r = ratio_scale if ratio_scale is not None else (spec.ratio or 0.0)
        n_total = int(math.floor(r * sum(g.width for g in groups) + 1e-9))
        n_total -= sum(g.width - g.channels for g in groups)
        return _global_selection(spec, groups, n_total, seed) if n_total > 0 else {}
    out = {}
    for gi, g in enumerate(groups):
        ratio = ratio_scale if ratio_scale is not None else g.ratio
        if ratio_scale is not None:  # the target's cumulative ratio of the dense width
            want = prune_count(g.width, ratio, spec.round_to, spec.round_mode)
            n_more = want - (g.width - g.channels)
            if n_more <= 0:
                continue
            idxs = lowest(group_scores(spec.method, g.weights(), seed + gi),
                          min(n_more, g.channels - 1))
        else:
            idxs = _select_in_group(spec, g, ratio, seed + gi)
        if idxs:
            out[gi] = idxs
    return out


# --------------------------------------------------------------------------- surgery


@dataclass
class PruneReport:
    """What was pruned: one entry per pruned group (dense numbering), plus the steps."""

    layers: list[dict] = field(default_factory=list)
    steps: int = 1


def _apply(dg, groups: list[Group], selection: dict[int, list[int]]) -> None:
    import torch_pruning as tp

    for gi, idxs in selection.items():
        g = groups[gi]
        handler = (tp.prune_depthwise_conv_out_channels if _is_depthwise(g.root)
                   else tp.prune_conv_out_channels)
        pg = dg.get_pruning_group(g.root, handler, idxs)
        if not dg.check_pruning_group(pg):
            raise PruningError(f"{g.name}: torch-pruning refuses to remove {len(idxs)} of "
                               f"{g.channels} channels (a layer would be left empty)")
        try:
            pg.prune()
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise PruningError(f"{g.name}: channel removal failed ({first[:160]})") from None
        gone = set(idxs)
        g.dense_ids = [d for i, d in enumerate(g.dense_ids) if i not in gone]


def _report(groups: list[Group], steps: int) -> PruneReport:
    layers = []
    for g in groups:
        width = g.width
        if g.channels == width:
            continue
        kept = set(g.dense_ids)
        layers.append({"name": g.name, "number": g.number, "convs": g.convs,
                       "coupled": g.coupled, "before": width, "after": g.channels,
                       "share": round(1 - g.channels / width, 6),
                       "removed": [i for i in range(width) if i not in kept]})
    return PruneReport(layers=layers, steps=steps)


def _forward_check(model: nn.Module, example: torch.Tensor, shape: torch.Size,
                   spec: PruneSpec) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PruningError(f"the pruned model fails its forward pass ({first[:160]}); policy "
                           f"{spec.policy!r} is not supported on this architecture") from None
    finally:
        model.train(was_training)
    if out.shape != shape:
        raise PruningError(f"the pruned model's output shape {tuple(out.shape)} differs from "
                           f"{tuple(shape)}; policy {spec.policy!r} is not supported here")


def _output_shape(model: nn.Module, example: torch.Tensor) -> torch.Size:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(example).shape
    finally:
        model.train(was_training)


def prune_model(model: nn.Module, spec: PruneSpec, example: torch.Tensor,
                seed: int = 0) -> PruneReport:
    """Prune `model` in place according to `spec`; returns the pruned groups' widths.

    The forward output shape is checked to be unchanged; any failure is a PruningError.
    """
    spec = checked(spec)
    seed = spec.seed if spec.seed is not None else seed
    shape = _output_shape(model, example)
    dg = build_graph(model, example)
    groups = candidate_groups(model, dg, spec)
    if not groups:
        raise PruningError(f"nothing to prune: no channel group passes policy {spec.policy!r}"
                           " and the include/skip lists")
    if spec.target_macs_reduction is not None:
        steps = _prune_to_target(model, spec, example, dg, groups, seed)
    else:
        _apply(dg, groups, select(spec, groups, seed))
        steps = 1
    _forward_check(model, example, shape, spec)
    report = _report(groups, steps)
    log.info("pruned %d channel group(s) in %d step(s)", len(report.layers), steps)
    return report


def _prune_to_target(model: nn.Module, spec: PruneSpec, example: torch.Tensor, dg,
                     groups: list[Group], seed: int) -> int:
    """Grow every group's ratio by target_step (criterion re-scored on the current weights
    each step) until the MACs fall by target_macs_reduction. Within a step the groups are
    pruned in module order and the search stops at the first group that reaches the
    target, so the result overshoots by at most one group's step."""
    macs = MacCounter(model, example)
    base = macs.total()
    target = float(spec.target_macs_reduction or 0.0)
    reduction, step = 0.0, 0
    max_steps = int(math.ceil(1.0 / spec.target_step)) + 1
    while reduction + 1e-12 < target:
        step += 1
        if step > max_steps:
            raise PruningError(f"target_macs_reduction {target:g} is out of reach with policy "
                               f"{spec.policy!r}: {reduction:.3f} with every pruned layer at its "
                               "minimum width")
        ratio = min(step * spec.target_step, 1.0)
        selection = select(spec, groups, seed + 7919 * step, ratio_scale=ratio)
        for gi in sorted(selection):
            _apply(dg, groups, {gi: selection[gi]})
            reduction = 1 - macs.total() / base
            if reduction + 1e-12 >= target:
                break
    return step


class MacCounter:
    """MACs (conv + linear, as `models.count_macs` counts them) from the layers' current
    widths and the output positions recorded once: no forward pass per query."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        self.layers: list[tuple[nn.Module, int]] = []  # (conv or linear, output positions)
        hooks = []

        def hook(m, inp, out):
            channels = m.out_channels if isinstance(m, nn.modules.conv._ConvNd) \
                else m.out_features
            self.layers.append((m, int(out[0].numel() // channels)))

        for m in model.modules():
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                hooks.append(m.register_forward_hook(hook))
        try:
            _output_shape(model, example)
        finally:
            for h in hooks:
                h.remove()

    def total(self) -> int:
        return sum(int(m.weight.numel()) * positions for m, positions in self.layers)


# --------------------------------------------------------------------------- records


def select_filters(model: nn.Module, spec: PruneSpec, example: torch.Tensor,
                   seed: int = 0) -> list[dict]:
    """The filters `spec` would remove, without removing them: one record entry per group
    ({"name", "convs", "removed", ...}), used by soft pruning and by tests."""
    spec = checked(spec)
    if spec.target_macs_reduction is not None:
        raise PruningError("target_macs_reduction needs the actual removal (MACs are measured "
                           "between steps); give a ratio")
    seed = spec.seed if spec.seed is not None else seed
    groups = candidate_groups(model, build_graph(model, example), spec)
    return selection_record(groups, select(spec, groups, seed))


def selection_record(groups: list[Group], selection: dict[int, list[int]]) -> list[dict]:
    return [{"name": groups[gi].name, "number": groups[gi].number, "convs": groups[gi].convs,
             "coupled": groups[gi].coupled, "before": groups[gi].channels,
             "after": groups[gi].channels - len(idxs), "removed": list(map(int, idxs))}
            for gi, idxs in sorted(selection.items())]


@torch.no_grad()
def zero_filters(model: nn.Module, record: list[dict]) -> int:
    """Zero the recorded filters (every conv of each group: weight rows and bias) in place;
    returns how many filters were zeroed. BN parameters are left alone, as in the official
    FPGM/SFP code."""
    mods = dict(model.named_modules())
    count = 0
    for entry in record:
        idx = entry["removed"]
        if not idx:
            continue
        for name in entry["convs"]:
            conv = mods[name]
            index = torch.as_tensor(idx, dtype=torch.long, device=conv.weight.device)
            conv.weight.index_fill_(0, index, 0.0)
            if conv.bias is not None:
                conv.bias.index_fill_(0, index, 0.0)
            count += len(idx)
    return count


def remove_filters(model: nn.Module, record: list[dict], example: torch.Tensor) -> PruneReport:
    """Remove exactly the recorded filters (dense numbering), e.g. those soft pruning zeroed."""
    shape = _output_shape(model, example)
    dg = build_graph(model, example)
    mods = dict(model.named_modules())
    names = {m: n for n, m in mods.items()}
    by_root = {}
    for group in dg.get_all_groups(ignored_layers=classifier_layers(model),
                                   root_module_types=[nn.Conv2d]):
        for m in _out_convs(group, dg):
            by_root[names[m]] = group[0].dep.target.module
    groups, selection = [], {}
    for entry in record:
        root = by_root.get(entry["name"])
        if root is None:
            raise PruningError(f"soft-pruning record names {entry['name']!r}, which is no "
                               "prunable convolution of this model")
        if int(root.weight.shape[0]) != int(entry["before"]):
            raise PruningError(f"{entry['name']}: the record expects {entry['before']} "
                               f"channels, the model has {int(root.weight.shape[0])}")
        g = Group(root=root, name=names[root], convs=list(entry["convs"]),
                  modules=[mods[c] for c in entry["convs"]], coupled=bool(entry["coupled"]),
                  number=entry.get("number"))
        g.width = g.channels
        g.dense_ids = list(range(g.width))
        selection[len(groups)] = list(entry["removed"])
        groups.append(g)
    _apply(dg, groups, selection)
    _forward_check(model, example, shape, PruneSpec(policy="all"))
    return _report(groups, 1)


def zero_pattern_record(groups: list[Group]) -> list[dict]:
    """The record of the channels whose filters are zero in every conv of their group (what
    soft pruning leaves behind), for when the selection itself was not kept."""
    selection = {}
    for gi, g in enumerate(groups):
        zero = np.ones(g.channels, dtype=bool)
        for w in g.weights():
            zero &= ~np.any(w != 0, axis=1)
        if zero.any():
            selection[gi] = np.flatnonzero(zero).tolist()
    return selection_record(groups, selection)


# --------------------------------------------------------------------------- soft pruning


@dataclass
class SoftPruneSpec(PruneSpec):
    """`prune_during_training` of a training stage: the selection keys of a prune stage
    plus how often to re-select."""

    every_epochs: int = opt(1, "re-select and zero the filters every this many epochs (and "
                            "after the last one)", min=1)
    mask_gradients: bool = opt(False, "also zero the selected filters' gradients until the "
                               "next selection, as the official FPGM code's do_grad_mask "
                               "(default: SFP, zeroed filters keep training)")

    def validate(self) -> None:
        if self.target_macs_reduction is not None:
            raise Invalid("target_macs_reduction", "soft pruning needs a ratio (MACs only "
                          "fall when the filters are removed)")
        super().validate()


class SoftPruner:
    """Soft filter pruning (SFP, He et al. 2018, as in FPGM's training loop).

    `step()` (after every epoch) scores the candidate filters on the current weights,
    zeroes the selected ones and keeps the selection as a record; the zeroed filters keep
    training (unless `mask_gradients`) and may be chosen differently next time. The groups
    are found once on the model given here; later calls may pass that model after it was
    moved to another device, and extra copies (an EMA) to zero by name.
    """

    def __init__(self, model: nn.Module, spec: PruneSpec, example: torch.Tensor,
                 seed: int = 0, mask_gradients: bool = False):
        spec = checked(spec)
        if spec.target_macs_reduction is not None:
            raise PruningError("soft pruning needs a ratio, not target_macs_reduction")
        self.spec = spec
        self.seed = spec.seed if spec.seed is not None else seed
        self.groups = candidate_groups(model, build_graph(model, example), spec)
        if not self.groups:
            raise PruningError(f"nothing to prune: no channel group passes policy "
                               f"{spec.policy!r} and the include/skip lists")
        self.record: list[dict] = []
        self.masks: dict[str, torch.Tensor] = {}
        if mask_gradients:
            for g in self.groups:
                for name, m in zip(g.convs, g.modules, strict=True):
                    self.masks[name] = torch.ones(m.weight.shape[0])
                    m.weight.register_hook(self._grad_hook(name))

    def _grad_hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            mask = self.masks[name].to(grad.device, grad.dtype)
            return grad * mask.view(-1, *([1] * (grad.dim() - 1)))
        return hook

    def step(self, *copies: nn.Module) -> list[dict]:
        """Select on the current weights of the model the groups were found on, zero the
        selection there and in `copies` (matched by name, e.g. an EMA); returns the record."""
        selection = select(self.spec, self.groups, self.seed)
        self.record = selection_record(self.groups, selection)
        _zero_groups(self.groups, selection)
        for m in copies:
            zero_filters(m, self.record)
        for entry in self.record:
            for name in entry["convs"]:
                if name in self.masks:
                    mask = torch.ones_like(self.masks[name])
                    mask[entry["removed"]] = 0
                    self.masks[name] = mask
        return self.record


@torch.no_grad()
def _zero_groups(groups: list[Group], selection: dict[int, list[int]]) -> None:
    for gi, idxs in selection.items():
        for m in groups[gi].modules:
            index = torch.as_tensor(idxs, dtype=torch.long, device=m.weight.device)
            m.weight.index_fill_(0, index, 0.0)
            if m.bias is not None:
                m.bias.index_fill_(0, index, 0.0)
