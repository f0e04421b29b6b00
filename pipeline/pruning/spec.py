"""What to prune and how: `PruneSpec` (the keys of a prune stage), its validation, and
the one error a pruning that cannot be done raises.

`method` names a criterion of `criteria.CRITERIA`; `ratio` is the share of filters
removed per pruned group (counted and rounded by `selection.prune_count`);
`target_macs_reduction` instead prunes in small steps until the MACs fall by that share
(`search`); `global_ranking` ranks all candidate filters together instead of removing
the same share from every group; `policy`, `include`, `skip`, `layer_ratios` and
`skip_downsample` choose the groups (`groups`). `heads` removes that share of whole
attention heads from every attention module (`heads`), before any filter pruning. The
FPGM "mix" variant of the official code first removes a share by smallest L2 norm, then
a share by distance among the remaining filters (`fpgm: {norm_ratio, distance_ratio}`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from ..config import Invalid, opt
from .criteria import CRITERIA, PruningError, head_criteria

Method = Literal[tuple(CRITERIA)]  # type: ignore[valid-type]  # the registry's names
DEFAULT_RATIO = 0.4
# tensor cores run fp16/bf16 convolutions and GEMMs at full speed on channel counts that are
# multiples of 8 (NVIDIA's "Deep Learning Performance" guide, channels in multiples of 8)
TENSOR_CORE_MULTIPLE = 8
HALF = ("fp16", "bf16", "auto")  # auto on CUDA is bf16 or fp16


def effective_round_to(round_to: int | None, cuda: bool, precisions) -> int | None:
    """The rounding a spec's `round_to` means: as set (0: none); unset: TENSOR_CORE_MULTIPLE
    on CUDA when any of `precisions` (the run's and its stages') is half, else none."""
    if round_to is not None:
        return round_to or None
    half = any(p in HALF for p in precisions if p is not None)
    return TENSOR_CORE_MULTIPLE if cuda and half else None


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

    method: Method = opt("fpgm", f"criterion: {' | '.join(CRITERIA)}")
    ratio: float | None = opt(None, "share of filters removed per pruned layer (default 0.4 "
                              "unless target_macs_reduction or heads is given)", gt=0, lt=1)
    heads: float | None = opt(
        None, "share of attention heads removed from every attention module (ViT, Swin): "
        "floor(heads x num_heads), at least one head kept; whole heads, scored by `method`",
        gt=0, lt=1)
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
                               "multiple of this; unset: 8 on CUDA when the run computes in "
                               "fp16/bf16 (tensor cores), else none; 0: none", min=0)
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
    seed: int | None = opt(None, "seed of the random criterion (default: the run's seed)",
                           min=0)
    batches: int = opt(10, "taylor: training batches whose gradients the importance is "
                       "averaged over (taken on the input model, no update applied)", min=1,
                       limit=100_000)

    def validate(self) -> None:
        if self.ratio is not None and self.target_macs_reduction is not None:
            raise Invalid("target_macs_reduction", "give either ratio or "
                          "target_macs_reduction, not both (set ratio: null)")
        self._validate_mix()
        self._validate_heads()
        if self.round_mode != "down" and not self.round_to:
            raise Invalid("round_mode", f"{self.round_mode!r} rounds to multiples of round_to: "
                          "set round_to too")
        if self.ratio is None and self.target_macs_reduction is None and self.heads is None:
            self.ratio = DEFAULT_RATIO
        self._validate_layer_ratios()
        if self.fpgm.is_mix and self.ratio is not None and self.ratio <= self.fpgm.norm_ratio:
            raise Invalid("fpgm.norm_ratio", f"{self.fpgm.norm_ratio:g} must be below the "
                          f"ratio {self.ratio:g}")
        for key in ("include", "skip"):
            for item in getattr(self, key):
                if isinstance(item, int) and item < 1:
                    raise Invalid(key, f"layer numbers start at 1, got {item}")

    def _validate_heads(self) -> None:
        if self.heads is None:
            return
        if isinstance(self.heads, bool) or not isinstance(self.heads, (int, float)) \
                or not 0 < self.heads < 1:
            raise Invalid("heads", f"expected a share of heads in (0, 1), got {self.heads!r}")
        if not CRITERIA[self.method].scores_heads:  # bn_scale: heads have no BatchNorm
            raise Invalid("heads", f"{self.method} cannot score attention heads: use "
                          f"{head_criteria()}")
        if self.target_macs_reduction is not None:
            raise Invalid("heads", "a fixed share of heads, not with target_macs_reduction "
                          "(give ratio, or leave heads out)")

    def _validate_mix(self) -> None:
        """The FPGM mix variant: fpgm only, fixed shares; its two shares give the ratio."""
        if self.fpgm.is_mix and self.method != "fpgm":
            raise Invalid("fpgm", f"norm_ratio/distance_ratio apply to method fpgm, not "
                          f"{self.method!r}")
        if self.fpgm.is_mix and (self.global_ranking or self.target_macs_reduction is not None):
            raise Invalid("fpgm", "the mix variant (norm_ratio/distance_ratio) takes fixed "
                          "per-layer shares: not with global_ranking or target_macs_reduction")
        if self.fpgm.distance_ratio is None:
            return
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

    def _validate_layer_ratios(self) -> None:
        if self.layer_ratios and self.target_macs_reduction is not None:
            raise Invalid("layer_ratios", "per-layer ratios need a ratio, not "
                          "target_macs_reduction")
        if self.layer_ratios and self.global_ranking:
            raise Invalid("layer_ratios", "per-layer ratios and global_ranking exclude each other")
        for key, r in self.layer_ratios.items():
            if not isinstance(r, (int, float)) or not 0 < r < 1:
                raise Invalid(f"layer_ratios.{key}", f"expected a ratio in (0, 1), got {r!r}")
            if self.fpgm.is_mix and r <= self.fpgm.norm_ratio:
                raise Invalid(f"layer_ratios.{key}", f"{r:g} must exceed fpgm.norm_ratio "
                              f"{self.fpgm.norm_ratio:g}")


# the keys that decide which filters are selected (the MAC target's and the seed aside)
SELECTION_KEYS = tuple(f.name for f in dataclasses.fields(PruneSpec)
                       if f.name not in ("target_macs_reduction", "target_step", "seed"))


def checked(spec: PruneSpec) -> PruneSpec:
    """Run the spec's validation (also for specs built in Python, not loaded from YAML)."""
    try:
        spec.validate()
    except Invalid as err:
        raise PruningError(f"{err.key}: {err.message}") from None
    return spec


__all__ = ["DEFAULT_RATIO", "FPGMConfig", "Method", "PruneSpec", "PruningError",
           "SELECTION_KEYS", "checked"]
