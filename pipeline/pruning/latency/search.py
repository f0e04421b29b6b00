"""Choosing each group's width under a latency budget: keep the most importance whose
predicted time fits.

Each group g may take one of its candidate widths (the tops of its measured stairs); keeping
width w keeps the w most important channels, whose importance (the criterion's scores,
normalized by the group's mean as global ranking does) is `kept[g][w]`. The budget is on
the table's layer sum. A layer's time depends on two groups at once (its input and its
output width), so the problem is a knapsack whose item costs interact:

- small problems (at most `EXACT_LIMIT` width combinations) are solved exactly, by
  enumeration;
- otherwise NetAdapt-style greedy (Yang et al., ECCV 2018): from the dense widths, step
  the group whose next narrower candidate (up to `LOOKAHEAD` stairs down) loses the least
  importance per millisecond saved, until the budget is met; then local search over the
  staircase (HALP's knapsack view, Shen et al., NeurIPS 2022): widen a group where the
  budget allows, or widen one and narrow another when that keeps more importance, until
  no such move is left.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from ..criteria import PruningError
from .table import LatencyTable

EXACT_LIMIT = 20000
LOOKAHEAD = 3
EPS = 1e-9


def kept_importance(scores: np.ndarray, widths: Sequence[int]) -> dict[int, float]:
    """Per candidate width w, the summed scores of the w highest-scored channels."""
    order = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    csum = np.concatenate([[0.0], np.cumsum(order)])
    return {int(w): float(csum[int(w)]) for w in widths}


def normalized(scores: np.ndarray, normalize: bool = True) -> np.ndarray:
    """Scores divided by the group's mean |score| (comparable across groups)."""
    s = np.asarray(scores, dtype=np.float64)
    mean = float(np.abs(s).mean()) if normalize and len(s) else 1.0
    return s / mean if mean > 0 else s


def check_reachable(table: LatencyTable, budget: float,
                    cands: list[list[int]] | None = None) -> None:
    """PruningError, naming the best reachable speedup, when even the narrowest widths
    (of `cands`, default the table's candidates) predict a layer sum over `budget`."""
    narrowest = [c[0] for c in (cands or table.candidates)]
    if table.layer_sum(narrowest) > budget + EPS:
        fastest, dense = table.predict_ms(narrowest), table.predict_ms(table.dense)
        raise PruningError(
            f"the latency target is out of reach: {fastest:.4g} ms predicted with every "
            f"pruned group at its narrowest fast width (at most {dense / fastest:.3g}x the "
            f"dense {dense:.4g} ms)")


def search_widths(table: LatencyTable, kept: list[dict[int, float]], budget: float,
                  upper: list[int] | None = None, exact_limit: int = EXACT_LIMIT) -> list[int]:
    """The widths (one candidate per group, at most `upper`) with the most kept importance
    whose layer sum is at most `budget`. PruningError when even the narrowest is over."""
    cands = [[w for w in c if upper is None or w <= upper[g]] or [min(c)]
             for g, c in enumerate(table.candidates)]
    check_reachable(table, budget, cands)
    if math.prod(len(c) for c in cands) <= exact_limit:
        return _exact(table, kept, budget, cands)
    return _refine(table, kept, budget, cands, _greedy(table, kept, budget, cands))


def _exact(table: LatencyTable, kept: list[dict[int, float]], budget: float,
           cands: list[list[int]]) -> list[int]:
    best, best_key = None, None
    for combo in itertools.product(*cands):
        widths = list(combo)
        cost = table.layer_sum(widths)
        if cost > budget + EPS:
            continue
        k = (sum(kept[g][w] for g, w in enumerate(widths)), -cost)
        if best_key is None or k > best_key:
            best, best_key = widths, k
    return best  # type: ignore[return-value]  # the narrowest fits, so one was found


def _greedy(table: LatencyTable, kept: list[dict[int, float]], budget: float,
            cands: list[list[int]]) -> list[int]:
    idx = [len(c) - 1 for c in cands]
    widths = [c[-1] for c in cands]
    cost = table.layer_sum(widths)
    while cost > budget + EPS:
        best = None
        for g, c in enumerate(cands):
            for k in range(1, LOOKAHEAD + 1):
                if idx[g] - k < 0:
                    break
                w = c[idx[g] - k]
                saving = -table.delta(widths, {g: w})
                if saving <= EPS:
                    continue
                ratio = (kept[g][widths[g]] - kept[g][w]) / saving
                if best is None or (ratio, -saving) < (best[0], -best[1]):
                    best = (ratio, saving, g, idx[g] - k)
        if best is None:  # no single step saves time: take the narrowest of everything
            return [c[0] for c in cands]
        _, saving, g, i = best
        idx[g], widths[g] = i, cands[g][i]
        cost -= saving
    return widths


def _refine(table: LatencyTable, kept: list[dict[int, float]], budget: float,
            cands: list[list[int]], widths: list[int], max_moves: int = 500) -> list[int]:
    """Local search: widen where the budget allows; widen one group and narrow another when
    that keeps more importance within the budget; the best such move each time."""
    cost = table.layer_sum(widths)
    pos = [c.index(w) for c, w in zip(cands, widths, strict=True)]
    for _ in range(max_moves):
        best = None  # (gain, changes, new cost)
        for g, c in enumerate(cands):
            if pos[g] + 1 >= len(c):
                continue
            up = c[pos[g] + 1]
            gain_up = kept[g][up] - kept[g][widths[g]]
            extra = table.delta(widths, {g: up})
            if cost + extra <= budget + EPS and (best is None or gain_up > best[0] + EPS):
                best = (gain_up, {g: up}, cost + extra)
            for h, ch in enumerate(cands):
                if h == g:
                    continue
                for k in range(1, LOOKAHEAD + 1):
                    if pos[h] - k < 0:
                        break
                    down = ch[pos[h] - k]
                    gain = gain_up - (kept[h][widths[h]] - kept[h][down])
                    if gain <= EPS or (best is not None and gain <= best[0] + EPS):
                        continue
                    new = cost + table.delta(widths, {g: up, h: down})
                    if new <= budget + EPS:
                        best = (gain, {g: up, h: down}, new)
                        break
        if best is None:
            break
        for g, w in best[1].items():
            widths[g], pos[g] = w, cands[g].index(w)
        cost = best[2]
    return widths


__all__ = ["EXACT_LIMIT", "check_reachable", "kept_importance", "normalized", "search_widths"]
