"""Runs that differ only in seed, aggregated: one row per stage with the mean, the standard
deviation over seeds and n, and which differences exceed two standard errors.

Runs belong together when their config.yaml files are equal once `seed`, `seeds`, `name` and
`out_dir` are left out (a `seeds:` config writes such runs: `<name>`, `<name>.seed1`, ...;
runs made by hand with `--set seed=S` group the same way). A group of one run stays as it is.

The statistics, for n values x_i: mean, sample standard deviation s (n - 1 in the
denominator) and the standard error of the mean s / sqrt(n). A difference is marked when it
exceeds two standard errors:
  * a stage against its baseline: the per-seed differences (each seed's stage minus that
    seed's baseline, the `delta_top1` of each run) have a mean beyond 2 s_d / sqrt(n);
  * two stages of a group: paired by seed the same way (`paired_exceeds_two_se`), else
    Welch's standard error sqrt(s_a^2 / n_a + s_b^2 / n_b) (`exceeds_two_se`).
"""

from __future__ import annotations

import json
import math
import re
from itertools import combinations
from pathlib import Path
from typing import Any

from ..rundir import read_config
from .rows import is_prune_stage

IGNORED_KEYS = ("seed", "seeds", "name", "out_dir")  # what may differ within a group
MEAN_COLUMNS = ["top1", "top5", "val_top1", "top1_tta", "delta_top1", "params_m", "macs_m",
                "mac_reduction_pct", "size_mb", "epochs", "wall_seconds", "latency_ms",
                "speedup", "params", "macs"]
STD_COLUMNS = ["top1", "top5", "val_top1", "top1_tta", "delta_top1"]  # also get <col>_std
SEED_SUFFIX = re.compile(r"\.seed\d+$")


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation, n); the deviation of one value is 0."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var), n


def mean_exceeds_two_se(diffs: list[float]) -> bool:
    """Whether the mean of paired differences lies beyond two standard errors of 0."""
    if len(diffs) < 2:
        return False
    mean, std, n = mean_std(diffs)
    return abs(mean) > 2 * std / math.sqrt(n)


def paired_exceeds_two_se(a: list[float], b: list[float]) -> bool:
    """a[i] and b[i] measured under the same seed: is mean(a - b) beyond two SEs of 0?"""
    return mean_exceeds_two_se([x - y for x, y in zip(a, b, strict=True)])


def exceeds_two_se(a: list[float], b: list[float]) -> bool:
    """Unpaired: |mean a - mean b| > 2 sqrt(s_a^2/n_a + s_b^2/n_b) (Welch's standard error)."""
    if len(a) < 2 or len(b) < 2:
        return False
    ma, sa, na = mean_std(a)
    mb, sb, nb = mean_std(b)
    return abs(ma - mb) > 2 * math.sqrt(sa**2 / na + sb**2 / nb)


def group_key(run_dir: Path) -> str:
    """What runs of one group share: the config without seed, seeds, name, out_dir."""
    plain = {k: v for k, v in read_config(run_dir).items() if k not in IGNORED_KEYS}
    return json.dumps(plain, sort_keys=True, default=str)


def seed_groups(run_dirs: list[Path]) -> list[list[Path]]:
    """The run directories grouped by `group_key`, in first-seen order (a run without a
    readable config is a group of its own)."""
    groups: dict[str, list[Path]] = {}
    for d in run_dirs:
        key = group_key(d) if read_config(d) else f"\0{d}"
        groups.setdefault(key, []).append(d)
    return list(groups.values())


def _seed_of(run_dir: Path) -> int | None:
    seed = read_config(run_dir).get("seed")
    return int(seed) if isinstance(seed, int) else None


def _label(runs: list[Path]) -> str:
    """The group's name: its runs' names without the `.seed<S>` suffix."""
    names = sorted({SEED_SUFFIX.sub("", d.name) for d in runs})
    return names[0] if len(names) == 1 else "+".join(names)


def aggregate(rows: list[dict], run_dirs: list[Path]) -> list[dict]:
    """The rows with each group of runs that differ only in seed replaced by one row per
    stage: the mean of every number, `<col>_std` for the accuracies, `n` (the completed
    seeds), `seeds`, `<col>_by_seed` and `delta_exceeds_2se`."""
    out: list[dict] = []
    for runs in seed_groups(run_dirs):
        names = {d.name for d in runs}
        mine = [r for r in rows if r["run"] in names]
        if len(runs) < 2:
            out += mine
            continue
        seeds = {d.name: _seed_of(d) for d in runs}
        stages = list(dict.fromkeys(r["stage"] for r in mine))
        for stage in stages:
            members = [r for r in mine if r["stage"] == stage]
            out.append(_aggregate_stage(members, _label(runs), seeds, len(runs)))
    return out


def _aggregate_stage(members: list[dict], label: str, seeds: dict[str, int | None],
                     runs: int) -> dict:
    done = [r for r in members if r.get("status") == "completed"]
    row: dict[str, Any] = {**members[0], "run": label, "note": None, "finished": None,
                           "baseline": None}
    row["seeds"] = ",".join(str(seeds[r["run"]]) for r in members)
    row["n"] = len(done)
    row["status"] = "completed" if len(done) == runs else (
        f"{len(done)} of {runs} completed" if done else members[0].get("status"))
    for col in MEAN_COLUMNS:
        values = [r[col] for r in done if isinstance(r.get(col), (int, float))
                  and not isinstance(r.get(col), bool)]
        row[col] = mean_std(values)[0] if values else None
        if col in STD_COLUMNS:
            row[f"{col}_std"] = mean_std(values)[1] if len(values) > 1 else None
            row[f"{col}_by_seed"] = {str(seeds[r["run"]]): r.get(col) for r in done}
    deltas = [r["delta_top1"] for r in done if r.get("delta_top1") is not None]
    row["delta_exceeds_2se"] = mean_exceeds_two_se(deltas) if len(deltas) > 1 else None
    missing = [r["run"] for r in members if r.get("status") != "completed"]
    if missing:
        row["note"] = f"not completed in {', '.join(missing)}: the mean is over {len(done)}"
    return row


def significant_pairs(rows: list[dict], col: str = "top1") -> list[dict]:
    """Pairs of aggregated rows of one group whose `col` differs by more than two standard
    errors, paired by seed over the seeds both completed: [{run, a, b, diff, se, n}].
    Compared: the stages that deliver a pruned model (not the dense baseline, not a prune
    stage's untrained result, not an iterative stage's intermediate rounds)."""
    out = []
    by_run: dict[str, list[dict]] = {}
    for r in rows:
        comparable = r.get("method") not in (None, "-") and not is_prune_stage(r) \
            and not r.get("path_of")
        if comparable and r.get(f"{col}_by_seed"):
            by_run.setdefault(r["run"], []).append(r)
    for run, group in by_run.items():
        for a, b in combinations(group, 2):
            common = [s for s in a[f"{col}_by_seed"] if s in b[f"{col}_by_seed"]
                      and a[f"{col}_by_seed"][s] is not None
                      and b[f"{col}_by_seed"][s] is not None]
            if len(common) < 2:
                continue
            xa = [a[f"{col}_by_seed"][s] for s in common]
            xb = [b[f"{col}_by_seed"][s] for s in common]
            if paired_exceeds_two_se(xa, xb):
                mean, std, n = mean_std([x - y for x, y in zip(xa, xb, strict=True)])
                out.append({"run": run, "a": a["stage"], "b": b["stage"], "diff": mean,
                            "se": std / math.sqrt(n), "n": n})
    return out


def significance_note(rows: list[dict]) -> str:
    """The markdown under an aggregated table: what ± and * mean, and the pairs of stages
    whose top-1 differs beyond two standard errors."""
    if not any("n" in r for r in rows):
        return ""
    lines = ["mean ± sample standard deviation over n seeds; * after Δ top-1: the per-seed "
             "changes against the baseline have a mean beyond two standard errors "
             "(s / sqrt(n))."]
    pairs = significant_pairs(rows)
    if pairs:
        lines += ["", "Top-1 differences beyond two standard errors (paired by seed):", ""]
        lines += [f"- {p['run']}: {p['a']} - {p['b']} = {p['diff']:+.2f} (SE {p['se']:.2f}, "
                  f"n {p['n']})" for p in pairs]
    else:
        lines += ["", "No top-1 difference between two stages of a group exceeds two standard "
                  "errors (paired by seed)."]
    return "\n".join(lines)


__all__ = ["IGNORED_KEYS", "MEAN_COLUMNS", "STD_COLUMNS", "mean_std", "mean_exceeds_two_se",
           "paired_exceeds_two_se", "exceeds_two_se", "group_key", "seed_groups", "aggregate",
           "significant_pairs", "significance_note"]
