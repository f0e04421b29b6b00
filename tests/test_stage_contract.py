"""The `Stage` protocol's written contracts: the summary every registered kind returns
(checked on one tiny run with a stage of each kind), and that a kind which trains says its
lr schedule."""

from __future__ import annotations

import json

import pytest

from stages import REGISTRY
from stages.base import Stage, StageBase, Trains
from stages.registry import register

pytestmark = pytest.mark.usefixtures("one_thread")

# one stage of every registered kind, as small as each can be
EVERY_KIND = {
    "data": {"val_split": 16},  # so that training stages report val_top1
    "stages": {
        "pretrain": {"type": "pretrain", "epochs": 2, "batch_size": 32, "lr": 0.1,
                     "schedule": {"type": "multistep", "milestones": [1]}},
        "sensitivity": {"type": "sensitivity", "from": "pretrain", "ratios": [0.5],
                        "include": [2]},
        "prune": {"type": "prune", "from": "pretrain", "method": "l1", "ratio": 0.4},
        "finetune": {"type": "finetune", "from": "prune", "epochs": 1, "batch_size": 32},
        "iterative": {"type": "iterative", "from": "pretrain", "rounds": 2, "ratio": 0.4,
                      "finetune_epochs": 1, "batch_size": 32},
        "rewind": {"type": "rewind", "from": "prune", "mode": "lr", "epochs": 1,
                   "batch_size": 32},
        "scratch": {"type": "scratch", "from": "prune", "epochs": 1, "batch_size": 32},
        "quantize": {"type": "quantize", "from": "finetune",
                     "calibration": {"batches": 2, "batch_size": 16},
                     "verify": {"min_agreement": 0.0, "max_top1_drop": 100}},
    },
}
ROW_KEYS = {"stage", "top1", "top5", "val_top1", "macs", "params", "ratio", "epochs"}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def contract_problems(stage: Stage, s: dict) -> list[str]:
    """What a completed summary `s` of `stage`'s kind lacks, by the `Stage` docstring."""
    checks = [("top1", lambda v: v is None or _number(v), "a number or None"),
              ("top5", lambda v: v is None or _number(v), "a number or None"),
              ("macs", lambda v: isinstance(v, int) and v > 0, "a positive int"),
              ("epochs", lambda v: isinstance(v, int) and v >= 0, "an int >= 0")]
    if stage.trains:
        checks += [("top1", _number, "a number"), ("top5", _number, "a number"),
                   ("params", lambda v: isinstance(v, int) and v > 0, "a positive int"),
                   ("val_top1", _number, "a number (the data holds out a validation split)")]
    if stage.prunes:
        checks += [("params", lambda v: isinstance(v, int) and v > 0, "a positive int"),
                   ("method", lambda v: isinstance(v, str) and v != "", "a criterion's name"),
                   ("ratio", lambda v: v is None or 0 < v < 1, "a share or None"),
                   ("macs_before", lambda v: isinstance(v, int) and v >= s.get("macs", 0),
                    "the input's MACs")]
    out = [f"{key}: missing" if key not in s else f"{key}: {s[key]!r} is not {what}"
           for key, ok, what in checks if key not in s or not ok(s[key])]
    for row in stage.report_rows(s):
        if missing := ROW_KEYS - set(row):
            out.append(f"report_rows: a row lacks {sorted(missing)}")
    return out


def test_every_registered_kind_keeps_the_summary_contract(tiny_config, cli, tmp_path):
    code, _, err = cli("run", tiny_config(EVERY_KIND))
    assert code == 0, err
    summaries = {p.parent.name: json.loads(p.read_text())
                 for p in (tmp_path / "runs" / "tiny").glob("*/summary.json")}
    kinds = {s["type"] for s in summaries.values()}
    assert kinds == set(REGISTRY), "add a stage of each new kind to EVERY_KIND"
    problems = {name: contract_problems(REGISTRY[s["type"]], s)
                for name, s in summaries.items()}
    assert problems == {name: [] for name in summaries}
    assert summaries["iterative"]["rounds"]  # its report rows were checked above


def test_the_contract_check_sees_a_broken_summary():
    prune = REGISTRY["prune"]
    good = {"top1": None, "top5": None, "macs": 10, "epochs": 0, "params": 5,
            "method": "l1", "ratio": 0.4, "macs_before": 20}
    assert contract_problems(prune, good) == []
    broken = {k: v for k, v in good.items() if k != "method"}
    assert contract_problems(prune, broken) == ["method: missing"]
    assert contract_problems(REGISTRY["finetune"], {**good, "top5": 50.0}) == [
        "top1: None is not a number", "val_top1: missing"]


def test_a_kind_that_trains_must_say_its_schedule():
    class NoSchedule(Trains):
        kind = "test_no_schedule"
        Config = StageBase

        def base_lr(self, spec, name, run) -> float:
            return 0.1

        def run(self, spec, ctx) -> dict:
            return {}

    class Flagged(Stage):
        kind = "test_flagged"
        Config = StageBase
        trains = True

        def run(self, spec, ctx) -> dict:
            return {}

    with pytest.raises(TypeError, match="abstract"):
        register(NoSchedule)
    with pytest.raises(TypeError, match="no Trains subclass"):
        register(Flagged)
    assert "test_no_schedule" not in REGISTRY and "test_flagged" not in REGISTRY
