"""Which filters to remove: counts and rounding, local, mix and global selection.

Counts: floor(ratio x filters) removed, as the official FPGM code does (6/12/25 of
16/32/64 at 40%); with `round_to` torch-pruning's rule: keep int(filters x (1 - ratio))
rounded down to a multiple of round_to (`round_mode: nearest`: to the nearest multiple,
so 40% of 16/32/64 at round_to 8 keeps 8/16/40). `round_to: 1` is also the rounding of the
L1 paper's code (Rethinking's res56prune.py keeps int(filters x (1 - ratio)): 6 of 16 at
60%), which its ResNet-56-B figure (9.09E7 MACs) needs. `global_ranking` ranks all
candidate filters together by their per-group mean-normalized scores instead of
removing the same share from every group (each group keeps at least max(1, round_to)
channels).

Selection always happens on the weights as they are before the step's surgery, so in
one-shot pruning every layer is scored on the dense network, as the papers' code does.
"""

from __future__ import annotations

import math

import numpy as np

from .criteria import CRITERIA
from .groups import Group
from .spec import PruneSpec

Selection = dict[int, list[int]]  # group index -> filter indices (current numbering)


def lowest(scores: np.ndarray, n: int, blocks: int = 1) -> list[int]:
    """Indices of the n lowest scores, sorted (ties broken by index). With `blocks` > 1
    (channels of grouped convolutions, in that many contiguous blocks): n rounded down to
    a multiple of blocks, the n / blocks lowest of every block."""
    if n <= 0:
        return []
    if blocks > 1:
        per, size = n // blocks, len(scores) // blocks
        return sorted(b * size + int(i) for b in range(blocks)
                      for i in np.argsort(scores[b * size:(b + 1) * size], kind="stable")[:per])
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


def _select_in_group(spec: PruneSpec, g: Group, ratio: float, seed: int) -> list[int]:
    """One-shot local selection: indices (current numbering) of g's filters to remove."""
    channels = g.channels
    n = prune_count(channels, ratio, spec.round_to, spec.round_mode)
    if n <= 0:
        return []
    if not (spec.method == "fpgm" and spec.fpgm.is_mix):
        return lowest(CRITERIA[spec.method](g, seed), n, g.channel_groups)
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
    return fpgm_mix_selection(g.weights(), n_norm, n_dist)


def fpgm_mix_selection(weights: list[np.ndarray], n_norm: int, n_dist: int) -> list[int]:
    """The official FPGM mix: the n_norm smallest-L2 filters, then the n_dist filters with
    the smallest summed distance among the remaining ones."""
    channels = weights[0].shape[0]
    removed = lowest(CRITERIA["l2"].weight_scores(weights), n_norm)
    gone = set(removed)
    keep = [i for i in range(channels) if i not in gone]
    dist = CRITERIA["fpgm"].weight_scores([w[keep] for w in weights])
    removed += [keep[i] for i in lowest(dist, n_dist)]
    return sorted(removed)


def _global_selection(spec: PruneSpec, groups: list[Group], n_total: int,
                      seed: int) -> Selection:
    """Remove the n_total lowest filters across groups (scores / group mean; bn_scale's
    raw |gamma|, one global threshold), each group keeping at least max(1, round_to)
    channels."""
    criterion = CRITERIA[spec.method]
    scores = [criterion(g, seed + gi) for gi, g in enumerate(groups)]
    pool = []
    for gi, s in enumerate(scores):
        mean = float(np.abs(s).mean()) if criterion.normalize_global else 1.0
        pool += [(float(v), gi, i) for i, v in enumerate(s / mean if mean > 0 else s)]
    pool.sort()
    floor_keep = max(1, spec.round_to or 1)
    taken: Selection = {gi: [] for gi in range(len(groups))}
    count = 0
    for _, gi, i in pool:
        if count >= n_total:
            break
        if groups[gi].channels - len(taken[gi]) - 1 < floor_keep:
            continue
        taken[gi].append(i)
        count += 1
    if spec.round_to:
        _round_global(spec, groups, scores, taken)
    for gi, g in enumerate(groups):  # grouped convs: as many from every block
        if g.channel_groups > 1 and taken[gi]:
            taken[gi] = lowest(scores[gi], len(taken[gi]), g.channel_groups)
    return {gi: sorted(v) for gi, v in taken.items() if v}


def _round_global(spec: PruneSpec, groups: list[Group], scores: list[np.ndarray],
                  taken: Selection) -> None:
    """Make every pruned group keep a multiple of round_to: drop further lowest-ranked
    filters (round_mode nearest: or give back the highest-ranked of the taken ones)."""
    round_to = int(spec.round_to or 1)
    for gi, g in enumerate(groups):
        if not taken[gi]:
            continue
        keep = g.channels - len(taken[gi])
        extra = keep % round_to if keep > round_to else 0
        if (extra and spec.round_mode == "nearest" and 2 * extra >= round_to
                and keep + round_to - extra <= g.channels):
            del taken[gi][len(taken[gi]) - (round_to - extra):]
        elif extra:
            rest = [i for i in np.argsort(scores[gi], kind="stable").tolist()
                    if i not in taken[gi]]
            taken[gi] += rest[:extra]


def select(spec: PruneSpec, groups: list[Group], seed: int,
           ratio_scale: float | None = None) -> Selection:
    """Group index -> filter indices (current numbering) to remove, one-shot on the current
    weights. `ratio_scale` replaces every group's ratio (used by the target search)."""
    if spec.global_ranking:
        r = ratio_scale if ratio_scale is not None else (spec.ratio or 0.0)
        n_total = int(math.floor(r * sum(g.width for g in groups) + 1e-9))
        n_total -= sum(g.width - g.channels for g in groups)
        return _global_selection(spec, groups, n_total, seed) if n_total > 0 else {}
    out = {}
    for gi, g in enumerate(groups):
        if ratio_scale is None:
            idxs = _select_in_group(spec, g, g.ratio, seed + gi)
        else:  # the target's cumulative ratio of the dense width
            want = prune_count(g.width, ratio_scale, spec.round_to, spec.round_mode)
            n_more = want - (g.width - g.channels)
            if n_more <= 0:
                continue
            idxs = lowest(CRITERIA[spec.method](g, seed + gi), min(n_more, g.channels - 1),
                          g.channel_groups)
        if idxs:
            out[gi] = idxs
    return out


def selection_record(groups: list[Group], selection: Selection) -> list[dict]:
    """The selection as record entries, one per group ({"name", "convs", "removed", ...}):
    what soft pruning stores and `surgery.remove_filters` removes."""
    return [{"name": groups[gi].name, "number": groups[gi].number, "convs": groups[gi].convs,
             "coupled": groups[gi].coupled, "before": groups[gi].channels,
             "after": groups[gi].channels - len(idxs), "removed": list(map(int, idxs))}
            for gi, idxs in sorted(selection.items())]


__all__ = ["Selection", "fpgm_mix_selection", "lowest", "prune_count", "select",
           "selection_record"]
