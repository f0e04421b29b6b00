"""Retraining the pruned architecture from scratch: Scratch-E/B budgets and re-initialization."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn as nn

from pipeline import checkpoint as ckpt
from pipeline.config import Loader
from pipeline.models import PadShortcut, build_model
from pipeline.pruning import PruneSpec, prune_model
from stages import scratch

pytestmark = pytest.mark.usefixtures("one_thread")


def spec_of(**kw) -> scratch.Config:
    return Loader("cfg.yaml").load(scratch.Config, {"type": "scratch", "from": "prune", **kw},
                                   "stages.scratch")


def test_scratch_b_doubles_epochs_and_milestones_on_a_2x_reduction():
    spec = spec_of(budget="B", epochs=160, schedule={"milestones": [80, 120]})
    eff, factor = scratch.scaled(spec, dense_macs=2_000_000, pruned_macs=1_000_000)
    assert factor == 2.0 and eff.epochs == 320 and eff.schedule.milestones == [160, 240]
    assert spec.epochs == 160  # the stage's own config is untouched
    # fractions of the run scale by themselves (Rethinking: int(epochs * 0.5), * 0.75)
    frac = spec_of(budget="B", epochs=160, schedule={"milestones": [0.5, 0.75]})
    eff, _ = scratch.scaled(frac, 2_000_000, 1_000_000)
    assert eff.epochs == 320 and eff.schedule.milestones == [0.5, 0.75]
    # a step schedule's step size scales; Rethinking's int() rounding of the epochs
    step = spec_of(budget="B", epochs=90, schedule={"type": "step", "step_size": 30})
    eff, factor = scratch.scaled(step, 1_370_000, 1_000_000)
    assert eff.epochs == int(90 * 1.37) == 123
    assert math.isclose(eff.schedule.step_size, 30 * 1.37)
    # ImageNet's cap (max_scale 2): a 3x reduction trains 2x, milestones 2x
    capped = spec_of(budget="B", epochs=90, max_scale=2, schedule={"milestones": [30, 60]})
    eff, factor = scratch.scaled(capped, 3_000_000, 1_000_000)
    assert factor == 2.0 and eff.epochs == 180 and eff.schedule.milestones == [60, 120]
    # Scratch-E: unchanged
    e = spec_of(budget="E", epochs=160, schedule={"milestones": [80, 120]})
    assert scratch.scaled(e, 2_000_000, 1_000_000) == (e, 1.0)


def lr_by_epoch(path) -> list[float]:
    with open(path) as f:
        return [float(r["lr"]) for r in csv.DictReader(f)]


def test_scratch_b_end_to_end_after_a_2x_mac_target(tiny_config, cli, tmp_path):
    cfg = tiny_config({"stages": {
        "pretrain": {"epochs": 1},
        "prune": {"ratio": None, "target_macs_reduction": 0.5, "policy": "all"},
        "finetune": {"type": "scratch", "from": "prune", "budget": "B", "epochs": 2,
                     "batch_size": 32, "lr": 0.1, "max_scale": 2.0,
                     "schedule": {"type": "multistep", "milestones": [1]}}}})
    code, _, err = cli("run", cfg)
    assert code == 0, err
    run = tmp_path / "runs/tiny"
    pruned = json.loads((run / "prune/summary.json").read_text())
    assert pruned["mac_ratio"] >= 2.0 and pruned["mac_reduction"] < 0.53
    s = json.loads((run / "finetune/summary.json").read_text())
    assert s["budget"] == "B" and s["budget_factor"] == 2.0  # >= 2x, capped at exactly 2
    assert s["epochs"] == 4 and s["milestones"] == [2.0]
    assert lr_by_epoch(run / "finetune/metrics.csv") == pytest.approx([0.1, 0.1, 0.01, 0.01])
    # the pruned widths, freshly initialized
    p = ckpt.load(run / "prune/model.pt")["state_dict"]
    q = ckpt.load(run / "finetune/model.pt")["state_dict"]
    assert {k: v.shape for k, v in p.items()} == {k: v.shape for k, v in q.items()}


def pruned(arch: str, shortcut: str = "A") -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    a = {"name": arch, "num_classes": 10, "shortcut": shortcut}
    model = build_model(a)
    prune_model(model, PruneSpec(ratio=0.5), torch.zeros(1, 3, 32, 32))  # in != out widths
    rebuilt = build_model(a)
    sd = ckpt.state_dict_of(model)
    from pipeline.models import shrink_to

    shrink_to(rebuilt, sd)
    rebuilt.load_state_dict(sd, strict=True)
    return rebuilt, sd


def std_ok(w: torch.Tensor, expected: float) -> bool:
    return abs(w.std().item() / expected - 1) < 0.15


def test_reinit_follows_the_cifar_resnet_scheme_and_keeps_the_structure():
    model, sd = pruned("resnet20", "A")
    maps = {k: v.clone() for k, v in sd.items() if k.endswith(("in_index", "out_index", "sizes"))}
    assert scratch.reinitialize(model, "resnet20", seed=1) == "cifar_resnet"
    after = model.state_dict()
    for k, v in maps.items():  # option-A channel maps are structure: kept
        assert torch.equal(after[k], v)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    big = [m for m in convs if m.weight.numel() > 4000]
    assert big
    for m in big:  # kaiming_normal_, fan_in, at the pruned width
        assert std_ok(m.weight, math.sqrt(2.0 / m.weight[0].numel()))
        assert not torch.equal(m.weight, sd[[k for k, v in model.named_modules() if v is m][0]
                                             + ".weight"])
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
            assert torch.all(m.running_mean == 0) and torch.all(m.running_var == 1)
    assert any(isinstance(m, PadShortcut) for m in model.modules())
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    again, _ = pruned("resnet20", "A")
    scratch.reinitialize(again, "resnet20", seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  again.state_dict().values(), strict=True))


def test_reinit_follows_the_vgg_and_torchvision_schemes():
    model, _ = pruned("vgg16_l1")
    assert scratch.reinitialize(model, "vgg16_l1", seed=0) == "cifar_vgg"
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 0.5)
        elif isinstance(m, nn.BatchNorm1d):
            assert torch.all(m.weight == 1)
        elif isinstance(m, nn.Linear):
            assert std_ok(m.weight, 0.01) and torch.all(m.bias == 0)
    conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    fan_out = conv.weight.shape[0] * conv.weight[0, 0].numel()
    assert std_ok(conv.weight, math.sqrt(2.0 / fan_out))
    tv, _ = pruned("resnet18")
    assert scratch.reinitialize(tv, "resnet18", seed=0) == "tv_resnet"
    conv = tv.layer4[1].conv1
    assert std_ok(conv.weight, math.sqrt(2.0 / (conv.weight.shape[0] * 9)))
