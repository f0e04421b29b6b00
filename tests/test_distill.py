"""finetune: default lr from upstream; distillation from the unpruned model, teacher frozen."""

from __future__ import annotations

import json

import pytest
import torch

import stages.training
from pipeline.models import count_params, load_model
from pipeline.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


class WatchedTrainer(Trainer):
    """Records the teacher's state before and after fit() and its mode at every call."""

    seen: list[dict] = []

    def fit(self) -> dict:
        record = {"calls": []}
        teacher = self.teacher
        if teacher is not None:
            record["before"] = {k: v.clone() for k, v in teacher.state_dict().items()}
            record["params"] = count_params(teacher)
            record["grad"] = any(p.requires_grad for p in teacher.parameters())

            def hook(module, inp, out):
                record["calls"].append((module.training, torch.is_grad_enabled(),
                                        all(not m.training for m in teacher.modules())))

            teacher.register_forward_hook(hook)
        result = super().fit()
        if teacher is not None:
            record["after"] = {k: v.clone() for k, v in teacher.state_dict().items()}
        WatchedTrainer.seen.append(record)
        return result


def test_finetune_distills_from_the_frozen_unpruned_teacher(tiny_config, cli, tmp_path,
                                                            monkeypatch):
    monkeypatch.setattr(stages.training, "Trainer", WatchedTrainer)
    WatchedTrainer.seen = []
    cfg = tiny_config({"stages": {"finetune": {
        "epochs": 2, "distill": {"from": "pretrain", "temperature": 4.0, "alpha": 0.7}}}})
    code, _, err = cli("run", cfg)
    assert code == 0, err
    run = tmp_path / "runs/tiny"
    pre, fin = WatchedTrainer.seen[0], WatchedTrainer.seen[-1]
    assert not pre["calls"]  # pretrain has no teacher
    # the teacher ran on every training step, in eval mode, without autograd
    steps = json.loads((run / "finetune/summary.json").read_text())["global_steps"]
    assert len(fin["calls"]) == steps > 0
    assert all(c == (False, False, True) for c in fin["calls"])
    assert not fin["grad"]
    # its weights and BN statistics did not move
    assert fin["before"].keys() == fin["after"].keys()
    assert all(torch.equal(fin["before"][k], fin["after"][k]) for k in fin["before"])
    # it is the unpruned upstream model, bigger than the pruned student
    dense = load_model(run / "pretrain/model.pt")
    student = load_model(run / "finetune/model.pt")
    assert fin["params"] == count_params(dense) > count_params(student)
    dense_sd = dense.state_dict()
    assert all(torch.equal(v, dense_sd[k.removeprefix("net.")]) for k, v in fin["after"].items())


def test_finetune_default_lr_is_the_lowest_upstream_lr(tiny_config, cli, tmp_path):
    cfg = tiny_config({"stages": {
        "pretrain": {"epochs": 3, "lr": 0.2, "schedule": {"milestones": [1, 2], "gamma": 0.1}},
        "finetune": {"epochs": 1}}})
    code, out, err = cli("run", cfg, "--dry-run", "--format", "json")
    assert code == 0, err
    plan = {s["name"]: s for s in json.loads(out)["stages"]}
    assert plan["finetune"]["lr"] == pytest.approx(0.002)
    assert "lowest lr of 'pretrain'" in plan["finetune"]["lr_source"]
    code, _, err = cli("run", cfg)
    assert code == 0, err
    s = json.loads((tmp_path / "runs/tiny/finetune/summary.json").read_text())
    assert s["lr"] == pytest.approx(0.002)
    with open(tmp_path / "runs/tiny/finetune/metrics.csv") as f:
        assert float(f.read().splitlines()[1].split(",")[1]) == pytest.approx(0.002)
