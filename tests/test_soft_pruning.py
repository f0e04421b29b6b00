"""Soft filter pruning during pretraining (FPGM/SFP) and its hard removal in the prune stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from pipeline import checkpoint as ckpt
from pipeline.models import build_model, load_model, model_from_payload
from pipeline.pruning import PruneSpec, SoftPruner

X = torch.zeros(1, 3, 16, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


def net() -> nn.Module:
    torch.manual_seed(0)
    return build_model({"name": "resnet8", "num_classes": 4, "shortcut": "A"})


def zero_rows(conv: nn.Conv2d) -> list[int]:
    w = conv.weight.detach().reshape(conv.weight.shape[0], -1)
    return torch.nonzero(w.abs().sum(1) == 0).flatten().tolist()


def test_step_zeroes_the_selection_and_reselects_on_the_current_weights():
    model = net()
    pruner = SoftPruner(model, PruneSpec(method="l1", ratio=0.5, policy="all"), X)
    record = pruner.step()
    mods = dict(model.named_modules())
    assert len(record) == 6  # 3 internal convs + 3 residual streams
    for e in record:
        assert len(e["removed"]) == e["before"] // 2
        for conv in e["convs"]:
            assert zero_rows(mods[conv]) == e["removed"]
    # training moves the weights: the next selection is made on them, zeroed filters
    # included (they may come back)
    conv = model.layer1[0].conv1
    old = record[[e["name"] for e in record].index("layer1.0.conv1")]["removed"]
    with torch.no_grad():
        conv.weight[old] = 5.0  # the zeroed filters are now the largest
    new = {e["name"]: e["removed"] for e in pruner.step()}["layer1.0.conv1"]
    assert not set(new) & set(old)
    assert zero_rows(conv) == new


@pytest.mark.parametrize("mask", [False, True])
def test_mask_gradients_keeps_zeroed_filters_at_zero_within_the_epoch(mask):
    model = net()
    for m in model.modules():  # a positive BN offset: zeroed channels still pass gradients
        if isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.bias, 0.1)
    pruner = SoftPruner(model, PruneSpec(method="fpgm", ratio=0.5), X, mask_gradients=mask)
    record = pruner.step()
    model(torch.randn(4, 3, 16, 16)).sum().backward()
    mods = dict(model.named_modules())
    for e in record:
        grad = mods[e["name"]].weight.grad.reshape(e["before"], -1).abs().sum(1)
        assert bool(torch.all(grad[e["removed"]] == 0)) == mask
        assert bool(torch.all(grad[[i for i in range(e["before"]) if i not in e["removed"]]] > 0))


def reference_fpgm(weights: list[np.ndarray], ratio: float) -> list[int]:
    """FPGM over a channel group, written independently: per conv the summed pairwise
    Euclidean distances (broadcast), divided by their mean when several convs produce the
    channels, summed; the int(n * ratio) lowest go (ties by index)."""
    n = weights[0].shape[0]
    per_conv = []
    for w in weights:
        rows = w.reshape(n, -1)
        per_conv.append(np.sqrt(((rows[:, None, :] - rows[None, :, :]) ** 2).sum(-1)).sum(0))
    score = per_conv[0] if len(per_conv) == 1 else sum(s / np.abs(s).mean() for s in per_conv)
    return sorted(np.argsort(score, kind="stable")[:int(n * ratio)].tolist())


def capture_soft_steps(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Wrap SoftPruner.step: before each step, a copy of every grouped conv's weight."""
    before, step = [], SoftPruner.step

    def recording_step(self, *copies):
        before.append({name: m.weight.detach().cpu().clone()
                       for g in self.groups for name, m in zip(g.convs, g.modules, strict=True)})
        return step(self, *copies)

    monkeypatch.setattr(SoftPruner, "step", recording_step)
    return before


SOFT = {"method": "fpgm", "ratio": 0.5, "policy": "all"}


def test_pretrain_soft_prunes_every_epoch_and_prune_removes_exactly_those(tiny_config, cli,
                                                                          tmp_path, monkeypatch):
    before = capture_soft_steps(monkeypatch)
    cfg = tiny_config({"stages": {
        "pretrain": {"epochs": 2, "prune_during_training": SOFT},
        "prune": {"policy": "all"},  # equal to the soft spec or left out: coherent
        "finetune": {"epochs": 1}}})
    code, _, err = cli("run", cfg)
    assert code == 0, err
    assert err.count("soft pruning after epoch") == 2
    run = tmp_path / "runs/tiny"
    payload = ckpt.load(run / "pretrain/model.pt")
    soft = payload["meta"]["soft_pruning"]
    assert soft["epoch"] == 2 and soft["spec"]["ratio"] == 0.5
    dense = model_from_payload(payload)
    mods = dict(dense.named_modules())
    for e in soft["record"]:  # the dense-shaped output holds the last selection zeroed
        for conv in e["convs"]:
            assert zero_rows(mods[conv]) == e["removed"]
    # the zeroed filters are the criterion's choice on the weights after the last epoch,
    # and zeroing them left every other filter as training had made it
    assert len(before) == 2
    last = before[-1]
    convs = {c for e in soft["record"] for c in e["convs"]}
    all_convs = {n for n, m in mods.items() if isinstance(m, nn.Conv2d)}
    assert convs == set(last) == all_convs  # policy all: every conv is in a pruned group
    for e in soft["record"]:
        weights = [last[c].double().numpy() for c in e["convs"]]
        assert e["removed"] == reference_fpgm(weights, 0.5), e["name"]
        kept = [i for i in range(e["before"]) if i not in e["removed"]]
        for conv in e["convs"]:
            saved = mods[conv].weight.detach()
            assert torch.all(saved[e["removed"]] == 0)
            assert torch.equal(saved[kept], last[conv][kept])
    s = json.loads((run / "pretrain/summary.json").read_text())
    assert s["soft_pruned_filters"] == sum(len(e["removed"]) for e in soft["record"]) > 0
    p = json.loads((run / "prune/summary.json").read_text())
    assert p["selection"] == "soft pruning of stage 'pretrain'"
    assert p["ratio"] == 0.5 and p["mac_reduction"] > 0.6
    layers = json.loads((run / "prune/layers.json").read_text())
    assert {e["name"]: e["removed"] for e in layers} == {
        e["name"]: e["removed"] for e in soft["record"]}
    pruned = load_model(run / "prune/model.pt")
    assert not any(zero_rows(m) for m in pruned.modules() if isinstance(m, nn.Conv2d))
    # removing the zeroed filters changes nothing but the BN offsets of those channels
    assert np.isfinite(p["top1"])


def test_prune_stage_refuses_a_different_selection_after_soft_pruning(tiny_config, cli):
    cfg = tiny_config({"stages": {
        "pretrain": {"epochs": 1, "prune_during_training": SOFT},
        "prune": {"ratio": 0.3}}})
    code, _, err = cli("run", cfg, "--dry-run")
    assert code == 2
    assert "stages.prune.ratio: 0.3 differs from stages.pretrain.prune_during_training.ratio" \
        in err and "Traceback" not in err
    cfg = tiny_config({"stages": {
        "pretrain": {"epochs": 1, "prune_during_training": SOFT},
        "prune": {"ratio": 0.3, "use_soft_mask": False}}})
    assert cli("run", cfg, "--dry-run")[0] == 0
    cfg = tiny_config({"stages": {"prune": {"use_soft_mask": True}}})
    code, _, err = cli("run", cfg, "--dry-run")
    assert code == 2 and "stages.prune.use_soft_mask" in err
    cfg = tiny_config({"stages": {"pretrain": {"prune_during_training": {
        "ratio": None, "target_macs_reduction": 0.5}}}})
    code, _, err = cli("run", cfg, "--dry-run")
    assert code == 2 and "prune_during_training.target_macs_reduction" in err
