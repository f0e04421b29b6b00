"""The --dry-run plan: resolved lr (linear scaling), lr at key steps, finetune default lr."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest

# tiny config: 96 synthetic training images, batch 32 -> 3 steps per epoch
WARM_COSINE = {"stages": {
    "pretrain": {"epochs": 10, "batch_size": 32, "lr": {"base": 0.1, "per_batch": 16},
                 "schedule": {"type": "cosine",
                              "warmup": {"type": "gradual", "epochs": 2, "start_factor": 0.1}}},
    "finetune": {"lr": 0.01}}}
# resolved lr 0.1 * 32 / 16 = 0.2; warmup 6 steps from 0.02; cosine over the other 24 of 30
EXPECTED_KEYS = {
    0: (0.02, "start"),
    5: (0.02 + 0.18 * 5 / 6, "last warmup step"),
    6: (0.2, "end of warmup (target)"),
    18: (0.1, "middle of the decay"),
    29: (0.2 * 0.5 * (1 + math.cos(math.pi * 23 / 24)), "last step"),
}


def stage(plan: dict, name: str) -> dict:
    return next(s for s in plan["stages"] if s["name"] == name)


def dry_json(cli, cfg, *args) -> dict:
    code, out, err = cli("run", cfg, "--dry-run", "--format", "json", *args)
    assert code == 0, err
    return json.loads(out)


def dry_text(cli, cfg, *args) -> str:
    code, out, err = cli("run", cfg, "--dry-run", *args)
    assert code == 0, err
    return out


def test_json_plan_shows_linear_scaling_and_lr_at_key_steps(tiny_config, cli):
    s = stage(dry_json(cli, tiny_config(WARM_COSINE)), "pretrain")
    assert s["lr"] == pytest.approx(0.2)
    assert s["lr_source"] == "linear scaling: 0.1 x 32 / 16 = 0.2"
    assert (s["steps_per_epoch"], s["total_steps"]) == (3, 30)
    w = s["schedule"]["warmup"]
    assert (w["type"], w["steps"], w["start_lr"], w["target_lr"]) == ("gradual", 6, 0.02, 0.2)
    assert s["schedule"]["decay_axis"] == "after warmup"
    keys = {k["step"]: (k["lr"], k["what"]) for k in s["lr_key_steps"]}
    assert set(keys) == set(EXPECTED_KEYS)
    for step, (lr, what) in EXPECTED_KEYS.items():
        assert keys[step][0] == pytest.approx(lr, rel=1e-5) and keys[step][1] == what


def test_text_plan_says_the_same(tiny_config, cli):
    out = dry_text(cli, tiny_config(WARM_COSINE))
    block = out.split("- pretrain [pretrain]")[1].split("\n- ")[0]
    assert "lr 0.2 (linear scaling: 0.1 x 32 / 16 = 0.2)" in block
    assert ("schedule: gradual warmup 2 epochs (6 steps) from 0.02 to 0.2 (linear per "
            "iteration); then cosine decay from 0.2 to 0 over the remaining 8 epochs (24 steps, "
            "starting after warmup)") in block
    rows = re.findall(r"step (\d+)\s+epoch (\S+)\s+lr (\S+)\s+(.+)", block)
    got = {int(step): (float(lr), what.strip()) for step, _, lr, what in rows}
    assert set(got) == set(EXPECTED_KEYS)
    for step, (lr, what) in EXPECTED_KEYS.items():
        assert got[step][0] == pytest.approx(lr, rel=1e-5) and got[step][1] == what
    assert "decays to 0: a finetune after this stage must set its lr" in block


def test_plan_lr_matches_what_training_uses(tiny_config, cli, tmp_path):
    """The plan and the trainer read the same schedule: metrics.csv's lr at each epoch start
    equals the plan's lr_by_epoch."""
    over = {"data": {"synthetic": {"image_size": 8}}, "stages": {"pretrain": {
        "epochs": 2, "lr": {"base": 0.05, "per_batch": 16},
        "schedule": {"type": "cosine", "min_lr": 0.001,
                     "warmup": {"type": "gradual", "epochs": 1}}}}}
    cfg = tiny_config(over)
    s = stage(dry_json(cli, cfg), "pretrain")
    code, _, err = cli("run", cfg, "--stage", "pretrain")
    assert code == 0, err
    with open(tmp_path / "runs/tiny/pretrain/metrics.csv") as f:
        trained = [float(r["lr"]) for r in csv.DictReader(f)]
    planned = [s["lr_by_epoch"][str(e)] for e in range(2)]
    assert trained == pytest.approx(planned, rel=1e-5)
    assert planned[1] == pytest.approx(0.1)  # warmup reached the linear-scaling lr exactly


@pytest.mark.parametrize("milestones", [[150, 225], [0.5, 0.75]])
def test_finetune_default_is_the_lowest_upstream_lr(tiny_config, cli, milestones):
    """0.1 with x0.1 at 150 and 225 of 300 epochs: the finetune defaults to 0.001."""
    cfg = tiny_config({"stages": {"pretrain": {
        "epochs": 300, "lr": 0.1, "schedule": {"type": "multistep", "milestones": milestones,
                                               "warmup": {"type": "gradual", "epochs": 5}}}}})
    plan = dry_json(cli, cfg)
    ft, pre = stage(plan, "finetune"), stage(plan, "pretrain")
    assert pre["lowest_lr"] == 0.001
    assert ft["lr"] == 0.001 and ft["lr_source"] == "lowest lr of 'pretrain'"
    assert {k["lr"] for k in ft["lr_key_steps"]} == {0.001}
    out = dry_text(cli, cfg)
    assert "lr 0.001 (lowest lr of 'pretrain')" in out
    assert "x0.1 at epochs 150, 225 counted from the start of the run, warmup included" in out


def test_finetune_default_after_cosine_with_a_floor(tiny_config, cli):
    cfg = tiny_config({"stages": {"pretrain": {
        "epochs": 20, "lr": 0.1, "schedule": {"type": "cosine", "min_lr": 0.002}}}})
    ft = stage(dry_json(cli, cfg), "finetune")
    last = 0.002 + 0.098 * 0.5 * (1 + math.cos(math.pi * 59 / 60))  # step 59 of 60
    assert ft["lr"] == pytest.approx(last, rel=1e-5)


def test_finetune_without_lr_after_a_decay_to_zero_is_a_config_error(tiny_config, cli):
    cfg = tiny_config({"stages": {"pretrain": {"schedule": {"type": "cosine"}}}})
    code, out, err = cli("run", cfg, "--dry-run")
    assert code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert "stages.finetune.lr: required: the upstream stage 'pretrain' decays to 0" in line


def test_plan_warns_about_milestones_past_the_end(tiny_config, cli):
    cfg = tiny_config({"stages": {"pretrain": {"epochs": 2,
                                               "schedule": {"milestones": [1, 150]}}}})
    out = dry_text(cli, cfg)
    assert "warning: milestone 150 is at or past the end (2 epochs): it never fires" in out
    assert stage(dry_json(cli, cfg), "finetune")["lr"] == pytest.approx(0.01)


@pytest.mark.parametrize("batch", [32, 40, 95, 200])
def test_plan_steps_per_epoch_match_the_loader(tiny_config, batch):
    import torch

    from pipeline.data import build_data
    from pipeline.data.sizes import steps_per_epoch
    from pipeline.runconfig import load_config

    cfg, _ = load_config(tiny_config())
    data = build_data(cfg.data, batch, 64, 0, torch.device("cpu"))
    assert steps_per_epoch(cfg.data, batch) == len(data.train)


def test_plan_lists_the_recipe_switches_that_are_on(tiny_config, cli):
    cfg = tiny_config({"model": {"zero_init_residual": True}, "stages": {
        "pretrain": {"label_smoothing": 0.1, "mixup": 0.2, "ema_decay": 0.999,
                     "optimizer": {"no_bias_decay": True, "nesterov": True}},
        "finetune": {"distill": {"from": "pretrain", "temperature": 4, "alpha": 0.9}}}})
    out = dry_text(cli, cfg)
    pre, ft = out.split("- finetune")[0], out.split("- finetune")[1]
    assert "recipe: label smoothing 0.1, mixup 0.2, EMA 0.999, zero-init residual BN" in pre
    assert "sgd momentum 0.9 nesterov, weight decay 0.0005 (none on biases/BN" in pre
    assert "recipe: distill from pretrain (T 4, alpha 0.9)" in ft
    r = stage(dry_json(cli, cfg), "finetune")["recipe"]
    assert r["distill"] == {"from": "pretrain", "temperature": 4.0, "alpha": 0.9}


def test_plan_shows_test_frequency_and_width_rounding(tiny_config, cli):
    cfg = tiny_config({"stages": {"pretrain": {"eval_every": 3},
                                  "prune": {"round_to": 8, "round_mode": "nearest"}}})
    plan = dry_json(cli, cfg)
    assert stage(plan, "pretrain")["eval_every"] == 3
    assert (stage(plan, "prune")["round_to"], stage(plan, "prune")["round_mode"]) == (8, "nearest")
    out = dry_text(cli, cfg)
    assert "test every 3 epochs" in out.split("- pretrain [pretrain]")[1].split("\n- ")[0]
    assert "kept filters rounded nearest to a multiple of 8" in out
    assert "test every" not in dry_text(cli, tiny_config())  # every epoch: nothing to say
