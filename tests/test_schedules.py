"""Schedules: closed forms, Goyal warmup, agreement with torch's schedulers, exact resume.

Table-driven on a one-parameter model: the lr is read back from the optimizer of the
real `Trainer` after `_set_lr(step)`, the path training takes.
"""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from fakes import FakeLoader
from torch.optim import lr_scheduler as tls

from pipeline.config import ConfigError, Loader
from pipeline.schedules import LinearScaling, Schedule, ScheduleConfig, WarmupConfig
from pipeline.trainer import RunSettings, TrainConfig, Trainer

# ----------------------------------------------------------------------------- helpers


def sched_cfg(**kw) -> ScheduleConfig:
    """A ScheduleConfig through the strict loader, as a YAML file would give it."""
    return Loader("test.yaml").load(ScheduleConfig, kw, "schedule")


def stub_batch(epoch: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch b of `epoch`: 2 random 1-feature samples."""
    g = torch.Generator().manual_seed(epoch * 1000 + b)
    return torch.randn(2, 1, generator=g), torch.randint(2, (2,), generator=g)


def one_param_trainer(tmp_path, schedule: ScheduleConfig, base_lr: float, epochs: int,
                      steps_per_epoch: int, **train_kw) -> Trainer:
    """The real Trainer around a one-parameter network (Linear(1, 2) without bias: 2 weights
    in one tensor) so `_set_lr`, `state()` and resume are exercised as in training."""
    torch.manual_seed(0)
    model = nn.Linear(1, 2, bias=False)
    cfg = TrainConfig(epochs=epochs, batch_size=2, schedule=schedule, **train_kw)
    data = SimpleNamespace(train=FakeLoader(make=stub_batch, steps=steps_per_epoch), test=[])
    return Trainer(model, cfg, data, tmp_path, run=RunSettings(show_progress=False),
                   arch={"name": "stub", "num_classes": 2}, base_lr=base_lr)


def trainer_lrs(trainer: Trainer, steps) -> list[float]:
    out = []
    for s in steps:
        trainer._set_lr(s)
        (lr,) = {g["lr"] for g in trainer.optimizer.param_groups}
        out.append(lr)
    return out


def cos_decay(lr, floor, u):
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * u))


# ----------------------------------------------------------------------------- closed forms

# base lr 0.1, 10 epochs x 10 steps = 100 steps; (schedule, {step: closed form})
CLOSED_FORMS = [
    ("constant", {"type": "constant"}, {0: 0.1, 57: 0.1, 99: 0.1}),
    ("step", {"type": "step", "step_size": 3, "gamma": 0.5},
     {0: 0.1, 29: 0.1, 30: 0.05, 59: 0.05, 60: 0.025, 99: 0.0125}),
    ("multistep epochs", {"type": "multistep", "milestones": [5, 8]},
     {0: 0.1, 49: 0.1, 50: 0.1 * 0.1, 79: 0.1 * 0.1, 80: 0.1 * 0.1**2, 99: 0.1 * 0.1**2}),
    ("multistep fractions", {"type": "multistep", "milestones": [0.5, 0.75], "gamma": 0.2},
     {49: 0.1, 50: 0.1 * 0.2, 74: 0.1 * 0.2, 75: 0.1 * 0.2**2}),
    ("cosine", {"type": "cosine", "min_lr": 0.001},
     {s: cos_decay(0.1, 0.001, s / 100) for s in (0, 1, 25, 50, 99)}),
    ("linear", {"type": "linear"}, {s: 0.1 * (1 - s / 100) for s in (0, 10, 50, 99)}),
    # gradual warmup 2 epochs (20 steps) from 0.1 * 0.1; cosine over the remaining 80 steps
    ("gradual + cosine", {"type": "cosine", "warmup": {"type": "gradual", "epochs": 2}},
     {0: 0.01, 5: 0.01 + 0.09 * 5 / 20, 19: 0.01 + 0.09 * 19 / 20, 20: 0.1,
      60: cos_decay(0.1, 0.0, 40 / 80), 99: cos_decay(0.1, 0.0, 79 / 80)}),
    ("gradual + linear", {"type": "linear", "min_lr": 0.02,
                          "warmup": {"type": "gradual", "epochs": 2, "start_lr": 0.0}},
     {0: 0.0, 10: 0.05, 20: 0.1, 60: 0.1 + (0.02 - 0.1) * 0.5}),
    # milestones count from the start of the run, warmup included (Goyal et al.)
    ("gradual + multistep", {"type": "multistep", "milestones": [5],
                             "warmup": {"type": "gradual", "epochs": 2, "start_factor": 0.5}},
     {0: 0.05, 10: 0.075, 20: 0.1, 49: 0.1, 50: 0.01, 99: 0.01}),
    ("constant warmup + step", {"type": "step", "step_size": 4,
                                "warmup": {"type": "constant", "epochs": 1, "start_lr": 0.005}},
     {0: 0.005, 9: 0.005, 10: 0.1, 39: 0.1, 40: 0.01, 80: 0.001}),
    # one cycle: up from 0.1 x 0.1 to the peak at step 30, then linear to 0 at step 100
    ("onecycle", {"type": "onecycle"},
     {0: 0.01, 15: 0.01 + 0.09 * 15 / 30, 29: 0.01 + 0.09 * 29 / 30, 30: 0.1,
      65: 0.1 * (1 - 35 / 70), 99: 0.1 * (1 - 69 / 70)}),
    ("onecycle cosine", {"type": "onecycle", "peak_at": 0.5, "start_factor": 0.2,
                         "anneal": "cosine", "min_lr": 0.001},
     {0: 0.02, 25: 0.06, 50: 0.1, 75: cos_decay(0.1, 0.001, 25 / 50),
      99: cos_decay(0.1, 0.001, 49 / 50)}),
]


@pytest.mark.parametrize("name,kw,expected", CLOSED_FORMS, ids=[c[0] for c in CLOSED_FORMS])
def test_lr_equals_closed_form(tmp_path, name, kw, expected):
    trainer = one_param_trainer(tmp_path, sched_cfg(**kw), 0.1, epochs=10, steps_per_epoch=10)
    got = trainer_lrs(trainer, list(expected))
    assert got == pytest.approx(list(expected.values()), rel=1e-12, abs=1e-15)


def test_goyal_gradual_warmup_reaches_k_times_lr_exactly():
    """Goyal et al.: batch k*n with lr k*eta, warmup from eta (= target / k) over 5 epochs,
    linear per iteration, then x0.1 at epochs 30, 60, 80 (absolute) of 90."""
    k, spe = 32, 40
    lr = LinearScaling(base=0.1, per_batch=256).resolve(256 * k)
    assert lr == pytest.approx(3.2)
    cfg = sched_cfg(type="multistep", milestones=[30, 60, 80],
                    warmup={"type": "gradual", "epochs": 5, "start_factor": 1 / k})
    s = Schedule(cfg, lr, epochs=90, steps_per_epoch=spe)
    n = 5 * spe
    ramp = [s.lr(i) for i in range(n + 1)]
    assert ramp[0] == pytest.approx(lr / k, rel=1e-12)
    assert ramp[n] == lr  # exactly the target at the end of warmup, not approximately
    assert all(r < lr for r in ramp[:n])
    steps = [b - a for a, b in zip(ramp, ramp[1:], strict=False)]
    assert steps == pytest.approx([(lr - lr / k) / n] * n, rel=1e-9)  # linear per iteration
    assert s.lr(30 * spe - 1) == lr and s.lr(30 * spe) == pytest.approx(lr * 0.1)
    assert s.lr(80 * spe) == pytest.approx(lr * 1e-3)


def test_constant_warmup_holds_then_jumps():
    cfg = sched_cfg(type="constant", warmup={"type": "constant", "epochs": 5, "start_factor": 0.25})
    s = Schedule(cfg, 0.4, epochs=10, steps_per_epoch=7)
    assert {s.lr(i) for i in range(35)} == {0.1}
    assert {s.lr(i) for i in range(35, 70)} == {0.4}


def test_cosine_after_warmup_peaks_at_end_of_warmup_and_hits_the_floor_at_the_end():
    cfg = sched_cfg(type="cosine", min_lr=0.01, warmup={"type": "gradual", "epochs": 3})
    s = Schedule(cfg, 1.0, epochs=13, steps_per_epoch=10)
    lrs = [s.lr(i) for i in range(131)]
    assert max(lrs) == lrs[30] == 1.0
    assert lrs[130] == pytest.approx(0.01)  # one past the last step
    assert all(a >= b for a, b in zip(lrs[30:], lrs[31:], strict=False))


# ----------------------------------------------------------------------------- torch schedulers


def torch_lrs(make, steps: int, lr: float) -> list[float]:
    """lr of each iteration under a torch scheduler stepped once per iteration."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = make(opt)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    return out


E, SPE, LR = 12, 9, 0.3
T = E * SPE
W = 2 * SPE
TORCH_CASES = [
    ("multistep", {"type": "multistep", "milestones": [4, 9], "gamma": 0.2},
     lambda o: tls.MultiStepLR(o, [4 * SPE, 9 * SPE], gamma=0.2)),
    ("step", {"type": "step", "step_size": 5, "gamma": 0.5},
     lambda o: tls.StepLR(o, 5 * SPE, gamma=0.5)),
    ("cosine", {"type": "cosine", "min_lr": 0.003},
     lambda o: tls.CosineAnnealingLR(o, T_max=T, eta_min=0.003)),
    ("linear", {"type": "linear"},
     lambda o: tls.LinearLR(o, start_factor=1.0, end_factor=0.0, total_iters=T)),
    ("warmup + cosine", {"type": "cosine", "warmup": {"type": "gradual", "epochs": 2}},
     lambda o: tls.SequentialLR(o, [tls.LinearLR(o, 0.1, 1.0, total_iters=W),
                                    tls.CosineAnnealingLR(o, T_max=T - W)], milestones=[W])),
    ("warmup + multistep", {"type": "multistep", "milestones": [6, 10],
                            "warmup": {"type": "gradual", "epochs": 2, "start_factor": 0.25}},
     lambda o: tls.ChainedScheduler([tls.LinearLR(o, 0.25, 1.0, total_iters=W),
                                     tls.MultiStepLR(o, [6 * SPE, 10 * SPE])])),
]


@pytest.mark.parametrize("name,kw,make", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_matches_torch_scheduler_stepped_per_iteration(tmp_path, name, kw, make):
    trainer = one_param_trainer(tmp_path, sched_cfg(**kw), LR, epochs=E, steps_per_epoch=SPE)
    ours = trainer_lrs(trainer, range(T))
    assert ours == pytest.approx(torch_lrs(make, T, LR), rel=1e-9, abs=1e-12)


# ----------------------------------------------------------------------------- resume

RESUME_CASES = [
    {"type": "cosine", "warmup": {"type": "gradual", "epochs": 1.5}},
    {"type": "multistep", "milestones": [0.5, 0.75], "warmup": {"type": "constant", "epochs": 1}},
    {"type": "step", "step_size": 1},
]


@pytest.mark.parametrize("kw", RESUME_CASES, ids=["cosine", "multistep", "step"])
@pytest.mark.parametrize("stop", [7, 13, 20])  # mid-warmup, mid-epoch, an epoch boundary
def test_restored_at_step_s_continues_the_same_lr_sequence(tmp_path, kw, stop):
    spe, epochs = 5, 4
    total = spe * epochs

    def run(trainer, until):
        lrs = []
        for epoch in range(trainer.epoch, epochs):
            trainer.data.train.set_epoch(epoch)
            for x, y in trainer.data.train.iterate(trainer.step_in_epoch):
                if trainer.global_step >= until:
                    return lrs
                trainer.train_step(x, y)
                lrs.append(trainer.optimizer.param_groups[0]["lr"])
            trainer.epoch, trainer.step_in_epoch = epoch + 1, 0
        return lrs

    straight = one_param_trainer(tmp_path / "a", sched_cfg(**kw), 0.1, epochs, spe)
    full = run(straight, total)
    first = one_param_trainer(tmp_path / "b", sched_cfg(**kw), 0.1, epochs, spe)
    head = run(first, stop)
    first.out_dir.mkdir(parents=True)
    torch.save(first.state(), first.checkpoints.last_path)  # resumed through a weights_only load
    resumed = one_param_trainer(tmp_path / "b", sched_cfg(**kw), 0.1, epochs, spe)
    assert resumed.try_resume() and resumed.global_step == stop
    tail = run(resumed, total)
    assert len(full) == total and head + tail == full  # exactly, not approximately
    assert torch.equal(resumed.module.weight, straight.module.weight)


# ----------------------------------------------------------------------------- lowest lr

LOWEST = [
    # the source notes' FPGM CIFAR setting: 0.1, x0.1 at 150 and 225 of 300 epochs -> 0.001
    ({"type": "multistep", "milestones": [150, 225]}, 300, 0.001),
    ({"type": "multistep", "milestones": [0.5, 0.75]}, 160, 0.001),
    ({"type": "multistep", "milestones": [150, 300]}, 300, 0.01),  # 300 of 300 never fires
    ({"type": "step", "step_size": 30}, 100, 0.1 * 0.1**3),
    ({"type": "constant", "warmup": {"type": "gradual", "epochs": 5, "start_lr": 0.0}}, 20, 0.1),
    ({"type": "multistep", "milestones": [10],
      "warmup": {"type": "gradual", "epochs": 2, "start_lr": 0.0}}, 20, 0.01),  # not the 0 start
]


@pytest.mark.parametrize("kw,epochs,expected", LOWEST)
def test_lowest_lr_is_the_end_of_the_decay(kw, epochs, expected):
    s = Schedule(sched_cfg(**kw), 0.1, epochs, steps_per_epoch=3)
    assert s.lowest_lr() == pytest.approx(expected, rel=1e-12)


def test_lowest_lr_of_cosine_is_its_last_step():
    s = Schedule(sched_cfg(type="cosine", min_lr=0.002), 0.1, 10, steps_per_epoch=4)
    assert s.lowest_lr() == s.lr(39) == pytest.approx(cos_decay(0.1, 0.002, 39 / 40))
    assert not s.decays_to_zero
    assert Schedule(sched_cfg(type="linear"), 0.1, 10, 4).decays_to_zero


def test_warnings_for_milestones_that_never_fire_or_fall_in_warmup():
    s = Schedule(sched_cfg(type="multistep", milestones=[1, 5, 40],
                           warmup={"type": "gradual", "epochs": 2}), 0.1, 10, 4)
    text = " | ".join(s.warnings())
    assert "milestone 40 is at or past the end" in text
    assert "milestone 1 falls inside warmup" in text
    assert "milestone 5" not in text


# ----------------------------------------------------------------------------- config errors

BAD = [
    ({"warmup": {"type": "gradual"}}, "schedule.warmup.epochs", "needs epochs > 0"),
    ({"warmup": {"epochs": 5}}, "schedule.warmup.type", "has no effect"),
    ({"milestones": [0.5, 100]}, "schedule.milestones", "mixes fractions"),
    ({"milestones": [80, 30]}, "schedule.milestones", "increasing"),
    ({"type": "cosinus"}, "schedule.type", "did you mean 'cosine'"),
    ({"type": "onecycle", "warmup": {"type": "gradual", "epochs": 1}}, "schedule.warmup.type",
     "onecycle ramps up on its own"),
    ({"type": "onecycle", "peak_at": 1.0}, "schedule.peak_at", "(0, 1)"),
    ({"type": "onecycle", "anneal": "exp"}, "schedule.anneal", "'linear'"),
    ({"warmup": {"type": "gradual", "epochs": 1, "start_factor": 2}},
     "schedule.warmup.start_factor", "in [0, 1]"),
]


@pytest.mark.parametrize("kw,key,msg", BAD)
def test_bad_schedule_config_names_the_key(kw, key, msg):
    with pytest.raises(ConfigError) as err:
        sched_cfg(**kw)
    assert f"test.yaml: {key}: " in str(err.value) and msg in str(err.value)


def test_linear_scaling_through_train_config():
    cfg = TrainConfig(batch_size=1024, lr=LinearScaling(base=0.1, per_batch=256))
    assert cfg.resolved_lr(0.5) == pytest.approx(0.4)
    assert TrainConfig(batch_size=1024).resolved_lr(0.5) == 0.5
    assert isinstance(sched_cfg().warmup, WarmupConfig)


# ----------------------------------------------------------------------------- schedule types

# (schedule, epochs x steps, {key step: (what, lr)}): each type's marks and its lr there
KEY_STEPS = [
    ("onecycle", {"type": "onecycle", "peak_at": 0.25}, 8,
     {0: ("start", 0.01), 19: ("last step of the ramp", 0.01 + 0.09 * 19 / 20),
      20: ("peak", 0.1), 50: ("middle of the descent", 0.05),
      79: ("last step", 0.1 / 60)}),
    ("linear", {"type": "linear", "warmup": {"type": "gradual", "epochs": 1}}, 8,
     {0: ("start", 0.01), 9: ("last warmup step", 0.01 + 0.09 * 9 / 10),
      10: ("end of warmup (target)", 0.1), 45: ("middle of the decay", 0.05),
      79: ("last step", 0.1 / 70)}),
    ("step", {"type": "step", "step_size": 3}, 8,
     {0: ("start", 0.1), 29: ("before decay at epoch 3", 0.1), 30: ("decay at epoch 3", 0.01),
      59: ("before decay at epoch 6", 0.01), 60: ("decay at epoch 6", 0.001),
      79: ("last step", 0.001)}),
]


@pytest.mark.parametrize("name,kw,epochs,expected", KEY_STEPS, ids=[k[0] for k in KEY_STEPS])
def test_key_steps_name_each_change_and_its_lr(name, kw, epochs, expected):
    s = Schedule(sched_cfg(**kw), 0.1, epochs, steps_per_epoch=10)
    got = {k["step"]: (k["what"], s.lr(k["step"])) for k in s.key_steps()}
    assert list(got) == list(expected)
    for step, (what, lr) in expected.items():
        assert got[step][0] == what and got[step][1] == pytest.approx(lr, rel=1e-12)


@pytest.mark.parametrize("kw", [c[1] for c in CLOSED_FORMS], ids=[c[0] for c in CLOSED_FORMS])
def test_lr_is_a_pure_function_of_the_step(kw):
    """Any order of calls, any fresh instance: the same lr at the same step."""
    a = Schedule(sched_cfg(**kw), 0.1, 10, 10)
    forward = [a.lr(s) for s in range(100)]
    backward = [Schedule(sched_cfg(**kw), 0.1, 10, 10).lr(s) for s in reversed(range(100))]
    assert forward == backward[::-1]


def test_onecycle_lowest_lr_skips_the_ramp_and_the_plan_says_so():
    s = Schedule(sched_cfg(type="onecycle", min_lr=0.004, start_factor=0.01), 0.1, 10, 10)
    assert s.lowest_lr() == pytest.approx(s.lr(99))  # not the ramp's start, 0.001
    assert not s.decays_to_zero
    assert Schedule(sched_cfg(type="onecycle"), 0.1, 10, 10).decays_to_zero
    assert "one cycle: linear from 0.001 to 0.1 over the first 3 epochs (30 steps)" in \
        s.describe()
    assert s.decay.plan(s) == {"peak_at": 0.3, "peak_step": 30, "start_factor": 0.01,
                               "anneal": "linear"}
    short = Schedule(sched_cfg(type="onecycle", peak_at=0.1), 0.1, 1, 4)
    assert "too few steps" in " ".join(short.warnings())


def test_every_config_type_has_one_registered_class_and_both_schedules_share_a_protocol():
    import typing

    from pipeline.schedules import DECAYS, LrSchedule, ReplaySchedule
    types = typing.get_args(typing.get_type_hints(ScheduleConfig)["type"])
    assert sorted(types) == sorted(DECAYS)
    assert all(d.name == n for n, d in DECAYS.items())
    up = Schedule(sched_cfg(type="cosine"), 0.1, 4, 5)
    assert isinstance(up, LrSchedule)
    assert isinstance(ReplaySchedule(up, start_epoch=1, epochs=2, steps_per_epoch=5), LrSchedule)


def test_a_new_schedule_type_is_one_registered_class(monkeypatch):
    """What a schedule type needs is the class alone: lr, marks, description, warnings."""
    from pipeline import schedules as S

    monkeypatch.setattr(S, "DECAYS", dict(S.DECAYS))

    @S.register
    class Halving(S.Decay):
        name = "halving"

        def lr(self, s, step):
            return s.base_lr / 2 ** (step // s.steps_per_epoch)

        def mark(self, s, marks, max_decays):
            marks[s.steps_per_epoch] = "first halving"

        def describe(self, s):
            return "halved every epoch"

        def warnings(self, s):
            return ["halving is steep"]

    cfg = ScheduleConfig()
    cfg.type = "halving"
    s = Schedule(cfg, 0.4, 3, 2)
    assert [s.lr(i) for i in range(6)] == [0.4, 0.4, 0.2, 0.2, 0.1, 0.1]
    assert {"step": 2, "what": "first halving"} in s.key_steps()
    assert s.describe() == "halved every epoch" and s.warnings() == ["halving is steep"]


def test_a_rewind_stage_plans_its_replayed_schedule(tiny_config, cli):
    """The plan reads a ReplaySchedule through the same protocol as a Schedule."""
    path = tiny_config({"stages": {"lr_rewind": {"type": "rewind", "from": "prune", "mode": "lr",
                                                 "epochs": 1, "batch_size": 32}}})
    code, out, err = cli("run", path, "--dry-run", "--format", "json")
    assert code == 0, err
    import json

    entry = next(s for s in json.loads(out)["stages"] if s["name"] == "lr_rewind")
    assert entry["schedule"]["decay_axis"] == "from the start of the run"
    assert "replay of the upstream schedule" in entry["schedule"]["description"]
