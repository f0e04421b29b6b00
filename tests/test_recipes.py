"""Recipe switches (Bag of Tricks and friends): each one against its definition.

No weight decay on 1-D parameters, zero-init of the last BN gamma of residual blocks,
mixup/cutmix, label smoothing, knowledge distillation, model EMA, optimizer settings.
"""

from __future__ import annotations

import copy
import csv
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fakes import FakeLoader

from pipeline.config import ConfigError, Loader
from pipeline.models import build_model, residual_last_bns
from pipeline.recipes import (
    DistillConfig,
    FrozenTeacher,
    ModelEMA,
    OptimizerConfig,
    build_optimizer,
    distillation_loss,
    mix_batch,
    soft_cross_entropy,
)
from pipeline.trainer import RunSettings, TrainConfig, Trainer

# ----------------------------------------------------------------------------- helpers


def batch(n: int = 8, classes: int = 4, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(classes, (n,), generator=g)


def small_net(classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes))


def trainer_for(model: nn.Module, tmp_path, teacher: nn.Module | None = None,
                **train_kw) -> Trainer:
    x, y = batch()
    cfg = TrainConfig(epochs=1, batch_size=len(y), **train_kw)
    data = SimpleNamespace(train=FakeLoader([(x, y)]), test=[(x, y)])
    return Trainer(model, cfg, data, tmp_path, run=RunSettings(show_progress=False),
                   arch={"name": "stub", "num_classes": 4}, base_lr=0.1, teacher=teacher)


# ----------------------------------------------------------------------------- no bias decay

MODELS = [("resnet8", "A"), ("vgg11", "A"), ("resnet18", "A")]


@pytest.mark.parametrize("arch,shortcut", MODELS)
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_no_bias_decay_puts_every_1d_parameter_in_the_zero_decay_group(arch, shortcut, name):
    model = build_model({"name": arch, "num_classes": 10, "shortcut": shortcut})
    cfg = OptimizerConfig(name=name, weight_decay=5e-4, no_bias_decay=True)
    opt = build_optimizer(model, cfg, lr=0.1)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    params = list(model.parameters())
    assert len(group_of) == len(params) == sum(len(g["params"]) for g in opt.param_groups)
    assert any(p.ndim == 1 for p in params) and any(p.ndim > 1 for p in params)
    for p in params:
        assert group_of[id(p)]["weight_decay"] == (0.0 if p.ndim == 1 else 5e-4)

    plain = build_optimizer(model, OptimizerConfig(name=name, weight_decay=5e-4), lr=0.1)
    assert [g["weight_decay"] for g in plain.param_groups] == [5e-4]


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_no_bias_decay_leaves_biases_and_bn_untouched_by_decay(name):
    """With zero gradients only weight decay moves a parameter: weights shrink, 1-D stay."""
    model = small_net()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    opt = build_optimizer(model, OptimizerConfig(name=name, weight_decay=0.1,
                                                 no_bias_decay=True), lr=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in model.parameters():
        if p.ndim == 1:
            assert torch.equal(p, torch.ones_like(p))
        else:
            assert torch.allclose(p, torch.full_like(p, 1 - 0.5 * 0.1))


def test_trainer_builds_the_groups_from_its_config(tmp_path):
    t = trainer_for(small_net(), tmp_path, optimizer=OptimizerConfig(no_bias_decay=True,
                                                                     nesterov=True))
    decays = {p.ndim > 1: g["weight_decay"] for g in t.optimizer.param_groups for p in g["params"]}
    assert decays == {True: 5e-4, False: 0.0}
    assert all(g["nesterov"] for g in t.optimizer.param_groups)


@pytest.mark.parametrize("data,key,msg", [
    ({"nesterov": True, "momentum": 0}, "optimizer.nesterov", "needs momentum > 0"),
    ({"betas": [0.9]}, "optimizer.betas", "two values"),
    ({"name": "adam"}, "optimizer.name", "did you mean 'adamw'"),
])
def test_bad_optimizer_config_names_the_key(data, key, msg):
    with pytest.raises(ConfigError) as err:
        Loader("c.yaml").load(OptimizerConfig, data, "optimizer")
    assert f"c.yaml: {key}: " in str(err.value) and msg in str(err.value)


# ----------------------------------------------------------------------------- zero init

ZERO_INIT = [  # (arch, shortcut, residual blocks)
    ("resnet8", "A", 3), ("resnet14", "B", 6), ("resnet18", "A", 8), ("resnet50", "A", 16)]


def block_shortcut(block: nn.Module) -> nn.Module:
    """The shortcut path of a CIFAR or torchvision residual block."""
    if hasattr(block, "shortcut"):
        return block.shortcut
    return block.downsample if block.downsample is not None else nn.Identity()


@pytest.mark.parametrize("arch,shortcut,blocks", ZERO_INIT)
def test_zero_init_makes_every_block_its_shortcut(arch, shortcut, blocks):
    spec = {"name": arch, "num_classes": 10, "shortcut": shortcut}
    torch.manual_seed(0)
    model = build_model(spec, zero_init_residual=True).eval()
    bns = residual_last_bns(model)
    assert len(bns) == blocks
    assert all(torch.count_nonzero(bn.weight) == 0 for bn in bns)
    owners = [m for m in model.modules() for c in m.children() if any(c is bn for bn in bns)]
    assert len(owners) == blocks
    kinds = {type(b.shortcut if hasattr(b, "shortcut") else b.downsample).__name__
             for b in owners}
    assert len(kinds) >= 2  # identity and downsampling shortcuts both covered
    seen = {}
    hooks = [b.register_forward_hook(lambda m, i, o: seen.__setitem__(m, (i[0], o)))
             for b in owners]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        for b in owners:
            x, out = seen[b]
            assert torch.allclose(out, F.relu(block_shortcut(b)(x)), atol=1e-6)
    for h in hooks:
        h.remove()

    # without zero-init the residual branch contributes
    torch.manual_seed(0)
    plain = build_model(spec).eval()
    assert all(torch.count_nonzero(bn.weight) > 0 for bn in residual_last_bns(plain))


# ----------------------------------------------------------------------------- mixup / cutmix


def test_mixup_alpha_zero_is_plain_training(tmp_path):
    """One trainer step with mixup 0 and cutmix 0 equals a hand-written plain SGD step."""
    model = small_net()
    ref = copy.deepcopy(model)
    t = trainer_for(model, tmp_path, mixup=0.0, cutmix=0.0)
    x, y = t.data.train.batches[0]
    t.train_step(x, y)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    F.cross_entropy(ref(x), y).backward()
    opt.step()
    for a, b in zip(t.module.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-7)

    g = torch.Generator().manual_seed(0)
    xm, target = mix_batch(x, y, 4, mixup=0.0, cutmix=0.0, generator=g)
    assert xm is x and torch.equal(target, F.one_hot(y, 4).float())


def test_mixup_mixes_images_and_targets_with_one_coefficient():
    x, y = batch(16)
    xm, target = mix_batch(x, y, 4, mixup=0.4, cutmix=0.0,
                           generator=torch.Generator().manual_seed(3))
    xm2, target2 = mix_batch(x, y, 4, mixup=0.4, cutmix=0.0,
                             generator=torch.Generator().manual_seed(3))
    assert torch.equal(xm, xm2) and torch.equal(target, target2)  # resume-exact
    assert torch.allclose(target.sum(1), torch.ones(16))
    lam = float(target[torch.arange(16), y].min())  # the own label's weight is >= lam
    logits = torch.randn(16, 4)
    loss = soft_cross_entropy(logits, target)
    by_hand = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(loss, by_hand)
    assert 0 < lam < 1 and not torch.equal(xm, x)
    # every mixed image is lam * itself + (1 - lam) * another image of the batch
    for i in range(16):
        rest = (xm[i] - lam * x[i]) / (1 - lam)
        assert min(float((rest - x[j]).abs().max()) for j in range(16)) < 1e-4


def test_cutmix_target_weight_is_the_pasted_area():
    x, y = batch(8, size=16)
    xm, target = mix_batch(x, y, 4, mixup=0.0, cutmix=1.0,
                           generator=torch.Generator().manual_seed(1))
    kept = (xm == x).all(dim=1).float().mean(dim=(1, 2))  # pixels from the image itself
    own = target[torch.arange(8), y]  # 1 where the partner has the same label
    mixed = own < 1
    assert mixed.any() and torch.allclose(target.sum(1), torch.ones(8))
    assert torch.allclose(kept[mixed], own[mixed], atol=1e-6)


# ----------------------------------------------------------------------------- label smoothing


def test_label_smoothing_matches_torch():
    logits, y = torch.randn(32, 10), torch.randint(10, (32,))
    ref = F.cross_entropy(logits, y, label_smoothing=0.1)
    assert torch.allclose(soft_cross_entropy(logits, y, 0.1), ref)
    assert torch.allclose(soft_cross_entropy(logits, F.one_hot(y, 10).float(), 0.1), ref)
    assert not torch.allclose(soft_cross_entropy(logits, y, 0.0), ref)


def test_trainer_loss_uses_label_smoothing(tmp_path):
    t = trainer_for(small_net(), tmp_path, label_smoothing=0.1)
    x, y = t.data.train.batches[0]
    logits, loss = t._loss(x, y, step=0)
    assert torch.allclose(loss, F.cross_entropy(t.module(x), y, label_smoothing=0.1))


# ----------------------------------------------------------------------------- distillation


class RecordingTeacher(nn.Module):
    """A teacher that records its mode and whether autograd was on at each call."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x):
        self.calls.append((self.training, torch.is_grad_enabled()))
        return self.net(x)


def test_distillation_loss_is_hinton_kd():
    s, t, T = torch.randn(6, 5), torch.randn(6, 5), 3.0
    pt = F.softmax(t / T, 1)
    by_hand = (pt * (pt.log() - F.log_softmax(s / T, 1))).sum(1).mean() * T * T
    assert torch.allclose(distillation_loss(s, t, T), by_hand)
    assert float(distillation_loss(t, t, T)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_distillation_mixes_kd_with_the_label_loss(tmp_path, alpha):
    torch.manual_seed(1)
    teacher = RecordingTeacher(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)))
    student = small_net()
    # the stages hand the trainer a FrozenTeacher (stages/training.py)
    t = trainer_for(student, tmp_path, teacher=FrozenTeacher(teacher),
                    distill=DistillConfig(from_="pretrain", temperature=2.0, alpha=alpha))
    t.teacher.train()  # whatever calls .train() on it, it runs in eval mode
    x, y = t.data.train.batches[0]
    logits, loss = t._loss(x, y, step=0)
    plain = F.cross_entropy(student(x), y)
    if alpha == 0:
        assert torch.allclose(loss, plain, rtol=1e-6, atol=0)
        assert teacher.calls == []  # the teacher is not even run
        return
    with torch.no_grad():
        kd = distillation_loss(student(x), teacher.net(x), 2.0)
    assert torch.allclose(loss, (1 - alpha) * plain + alpha * kd)
    assert teacher.calls == [(False, False)]  # eval mode, under no_grad
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_distillation_through_a_scratch_stage(tiny_config, cli, monkeypatch):
    """A scratch stage (not only finetune) loads its teacher and trains with the KD term."""
    import pipeline.trainer as trainer_mod

    calls = []

    def counting(student, teacher, T):
        calls.append(T)
        return distillation_loss(student, teacher, T)

    monkeypatch.setattr(trainer_mod, "distillation_loss", counting)
    cfg = tiny_config({
        "data": {"synthetic": {"image_size": 8}},
        "stages": {"pretrain": {"epochs": 1},
                   "finetune": {"type": "scratch", "lr": 0.05,
                                "distill": {"from": "pretrain", "temperature": 3.0}}}})
    code, _, err = cli("run", cfg)
    assert code == 0, err
    assert calls == [3.0] * 3  # 96 images / batch 32: every step of the scratch stage


# ----------------------------------------------------------------------------- EMA


def test_ema_averages_parameters_and_copies_bn_buffers():
    model = small_net()
    ema = ModelEMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()
    model(batch()[0])  # moves the BN running statistics
    ema.update(model)
    msd, esd = model.state_dict(), ema.state_dict()
    params = {k for k, _ in model.named_parameters()}
    for k in esd:
        if k in params:
            assert torch.allclose(esd[k], 0.9 * before[k] + 0.1 * msd[k])
        else:  # running_mean, running_var, num_batches_tracked
            assert torch.equal(esd[k], msd[k])
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())


def test_ema_is_evaluated_and_saved(tiny_config, cli, tmp_path):
    from pipeline import load_model
    from pipeline.checkpoint import load
    from pipeline.data import build_data
    from pipeline.runconfig import load_config
    from pipeline.trainer import evaluate

    cfg = tiny_config({"device": "cpu", "data": {"synthetic": {"image_size": 8}},
                       "stages": {"pretrain": {"epochs": 2, "ema_decay": 0.6}}})
    code, _, err = cli("run", cfg, "--stage", "pretrain")
    assert code == 0, err
    stage = tmp_path / "runs/tiny/pretrain"
    last, saved = load(stage / "last.pt"), load(stage / "model.pt")
    params = {k for k, _ in build_model(saved["arch"]).named_parameters()}
    assert set(saved["state_dict"]) == set(last["ema"])
    for k, v in saved["state_dict"].items():
        assert torch.equal(v, last["ema"][k])  # the EMA is what model.pt holds
        if k not in params:  # BN statistics: copied from the trained model
            assert torch.equal(v, last["state_dict"][k])
    assert any(not torch.equal(saved["state_dict"][k], last["state_dict"][k]) for k in params)

    run, _ = load_config(cfg)
    data = build_data(run.data, 32, 256, run.seed, torch.device("cpu"))
    with open(stage / "metrics.csv") as f:
        row = list(csv.DictReader(f))[-1]
    ema_metrics = evaluate(load_model(stage / "model.pt"), data.test, torch.device("cpu"), "fp32")
    assert float(row["test_loss"]) == pytest.approx(ema_metrics["test_loss"], rel=1e-5)
    live = build_model(saved["arch"])
    live.load_state_dict(last["state_dict"])
    live_metrics = evaluate(live, data.test, torch.device("cpu"), "fp32")
    assert live_metrics["test_loss"] != pytest.approx(ema_metrics["test_loss"], rel=1e-5)
