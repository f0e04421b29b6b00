"""The rewind stage (Renda et al. 2020): the replayed lr against the upstream schedule, the
weight snapshots, the rewound kept filters, and the dry-run plan."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest
import torch

from pipeline import checkpoint as ckpt
from pipeline.models import model_from_payload
from pipeline.pruning import remove_filters
from pipeline.runconfig import load_config
from pipeline.schedules import ReplaySchedule, Schedule, ScheduleConfig
from stages.rewind import rewound_weights

pytestmark = pytest.mark.usefixtures("one_thread")

# pretrain: 4 epochs, x0.1 at epochs 2 and 3: lr 0.1, 0.1, 0.01, 0.001
REWIND = {"stages": {
    "pretrain": {"epochs": 4, "schedule": {"type": "multistep", "milestones": [2, 3]}},
    "lr_rewind": {"type": "rewind", "from": "prune", "mode": "lr", "epochs": 3,
                  "batch_size": 32},
    "w_rewind": {"type": "rewind", "from": "prune", "mode": "weights", "rewind_epoch": 1,
                 "batch_size": 32}}}


def test_replay_schedule_is_the_upstream_tail_by_position():
    up = Schedule(ScheduleConfig(type="multistep", milestones=[2, 3]), 0.1, 4, 10)
    r = ReplaySchedule(up, start_epoch=1, epochs=3, steps_per_epoch=5)  # twice the batch
    assert r.lr_by_epoch() == [0.1, 0.01, 0.001]
    for s in range(r.total_steps):
        assert r.lr(s) == up.lr(10 + 2 * s)


def test_dry_run_shows_the_replayed_lr(tiny_config, cli):
    code, out, err = cli("run", tiny_config(REWIND), "--dry-run")
    assert code == 0, err
    assert "replayed lr by epoch (upstream epoch: lr): 1: 0.1, 2: 0.01, 3: 0.001" in out
    code, out, err = cli("run", tiny_config(REWIND), "--dry-run", "--format", "json")
    plan = {s["name"]: s for s in json.loads(out)["stages"]}
    assert plan["w_rewind"]["epochs"] == 3 and plan["w_rewind"]["replayed_lr"] == [
        0.1, 0.01, 0.001]
    assert plan["lr_rewind"]["lr_by_epoch"] == {"0": 0.1, "1": 0.01, "2": 0.001}


def test_rewinding_end_to_end(tmp_path, tiny_config, cli):
    path = tiny_config(REWIND)
    code, _, err = cli("run", path)
    assert code == 0, err
    run = tmp_path / "runs/tiny"
    assert (run / "pretrain/snapshots/epoch_1.pt").is_file()
    cfg, _ = load_config(path)
    up = Schedule(cfg.stages["pretrain"].schedule, 0.1, 4, 3)
    for name in ("lr_rewind", "w_rewind"):
        with open(run / name / "train_log.csv") as f:
            steps = [(int(r["step"]), float(r["lr"])) for r in csv.DictReader(f)]
        assert steps, name
        for step, lr in steps:  # the lr of the step's last batch, replayed from epoch 1
            assert lr == pytest.approx(up.lr(3 + step - 1)), (name, step)
        s = json.loads((run / name / "summary.json").read_text())
        assert s["epochs"] == 3 and s["replay_start_epoch"] == 1
    prune = ckpt.load(run / "prune/model.pt")
    ctx = SimpleNamespace(run_dir=run, name="w_rewind", source=str(path), input_size=(3, 16, 16),
                          run=cfg, input_path=lambda n: run / n / "model.pt")
    pruned = model_from_payload(prune)
    got = rewound_weights(ctx, "pretrain", 1, pruned, prune)
    snap = model_from_payload(ckpt.load(run / "pretrain/snapshots/epoch_1.pt"))
    layer = prune["meta"]["layers"][0]
    kept = [i for i in range(layer["before"]) if i not in layer["removed"]]
    w = dict(got.named_parameters())[layer["name"] + ".weight"]
    assert torch.equal(w, dict(snap.named_parameters())[layer["name"] + ".weight"][kept])
    remove_filters(snap, prune["meta"]["layers"], torch.zeros(1, 3, 16, 16))
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(),
                                                 snap.state_dict().values(), strict=True))


@pytest.mark.parametrize("over, message", [
    ({"mode": "weights"}, "rewind_epoch: required"),
    ({"mode": "lr", "epochs": 9}, "exceeds the 4 epochs"),
    ({"mode": "lr", "epochs": 2, "lr": 0.1}, "leave lr"),
    ({"mode": "weights", "rewind_epoch": 1, "epochs": 2}, "leave it unset"),
])
def test_bad_rewind_configs_are_one_line_errors(tiny_config, cli, over, message):
    cfg = {"stages": {"pretrain": {"epochs": 4},
                      "rw": {"type": "rewind", "from": "prune", **over}}}
    code, _, err = cli("run", tiny_config(cfg), "--dry-run")
    assert code == 2 and message in err, err
