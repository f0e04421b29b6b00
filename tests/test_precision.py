"""`precision: auto`: the CPU probe (with a forced outcome and for real on a tiny model), the
CUDA rule (torch.cuda mocked), the choice kept by a resumed stage, and what the summary, the
checkpoint, the provenance and `--dry-run` say."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from fakes import FakeLoader, random_batches

from pipeline import checkpoint as ckpt
from pipeline import precision as P
from pipeline.models import build_model
from pipeline.trainer import RunSettings, TrainConfig, Trainer

ARCH = {"name": "resnet8", "num_classes": 4, "shortcut": "A"}

pytestmark = pytest.mark.usefixtures("one_thread")


def forced(times: dict[str, float], calls: list | None = None):
    """A stand-in for `precision.measure` that returns fixed seconds per candidate."""

    def measure(model, x, y, candidates=P.CANDIDATES, clock="wall"):
        if calls is not None:
            calls.extend((*c, tuple(x.shape)) for c in candidates)
        return {c: times[P.candidate_name(*c)] for c in candidates}

    return measure


REAL_CPU_HAS_BF16 = P.cpu_has_bf16


@pytest.fixture(autouse=True)
def bf16_kernels(monkeypatch):
    """The forced outcomes below include bf16: the probe must time it on any machine."""
    monkeypatch.setattr(P, "cpu_has_bf16", lambda: True)


BF16_CL_WINS = {"fp32": 0.40, "fp32 channels_last": 0.35, "bf16": 0.30,
                "bf16 channels_last": 0.20}
FP32_WINS = {"fp32": 0.10, "fp32 channels_last": 0.35, "bf16": 0.90, "bf16 channels_last": 0.8}


def make_trainer(out_dir, epochs: int = 1, precision: str = "auto") -> Trainer:
    cfg = TrainConfig(epochs=epochs, batch_size=16, lr=0.05, log_interval=100)
    torch.manual_seed(0)
    data = SimpleNamespace(train=FakeLoader(random_batches(3)),
                           test=FakeLoader(random_batches(1, seed=1)))
    run = RunSettings(precision=precision, show_progress=False)
    return Trainer(build_model(ARCH), cfg, data, out_dir, run=run, arch=ARCH, base_lr=0.05,
                   meta={"stage": "pretrain"})


def test_probe_picks_the_fastest_candidate_and_keeps_every_timing(monkeypatch):
    calls: list = []
    monkeypatch.setattr(P, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(P, "measure", forced(BF16_CL_WINS, calls))
    x, y = torch.randn(8, 3, 16, 16), torch.randint(4, (8,))
    d = P.decide(build_model(ARCH), (x, y), torch.device("cpu"), channels_last=False)
    assert (d.precision, d.channels_last, d.how, d.batch) == ("bf16", True, "cpu probe", 8)
    assert d.seconds_per_step == BF16_CL_WINS  # all four timed, on the real batch
    assert [c[:2] for c in calls] == list(P.CANDIDATES) and {c[2] for c in calls} == {x.shape}
    assert "bf16 channels_last" in d.describe() and "200 ms" in d.describe()
    monkeypatch.setattr(P, "measure", forced(FP32_WINS))
    d = P.decide(build_model(ARCH), (x, y), torch.device("cpu"), channels_last=True)
    assert (d.precision, d.channels_last) == ("fp32", False)  # the probe overrides the config


def test_a_cpu_without_bf16_kernels_is_probed_in_fp32_only(monkeypatch):
    """No oneDNN bf16 kernels (an AVX2-only CPU): bf16 is not timed (its steps would cost
    more than the rest of the probe), the decision says why, and it survives a round trip."""
    calls: list = []
    monkeypatch.setattr(P, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(P, "measure", forced(BF16_CL_WINS, calls))
    x, y = torch.randn(8, 3, 16, 16), torch.randint(4, (8,))
    d = P.decide(build_model(ARCH), (x, y), torch.device("cpu"), channels_last=False)
    assert [c[:2] for c in calls] == [("fp32", False), ("fp32", True)]
    assert (d.precision, d.channels_last) == ("fp32", True)
    assert set(d.seconds_per_step) == {"fp32", "fp32 channels_last"}
    assert "bf16 not timed: oneDNN has no bf16 kernels" in d.describe()
    assert P.Decision.from_dict(d.as_dict()) == d


def test_cpu_has_bf16_follows_onednn(monkeypatch):
    class Ops:
        def __init__(self, answer):
            self._is_mkldnn_bf16_supported = lambda: answer

    for answer in (True, False):
        monkeypatch.setattr(torch.ops, "mkldnn", Ops(answer))
        assert REAL_CPU_HAS_BF16() is answer


def test_real_probe_times_real_steps_without_touching_the_model():
    model = build_model(ARCH)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(4, 3, 16, 16), torch.randint(4, (4,))
    d = P.probe(model, x, y, clock="wall")  # wall time: never 0, whatever the machine's load
    assert set(d.seconds_per_step) == {P.candidate_name(*c) for c in P.CANDIDATES}
    assert all(t > 0 for t in d.seconds_per_step.values())
    assert d.seconds_per_step[d.label] == min(d.seconds_per_step.values())  # ties: any best
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # a copy was trained


def test_probe_takes_turns_and_stops_timing_a_hopeless_candidate(monkeypatch):
    order: list[str] = []
    seconds = {"fp32": [0.5, 0.1, 0.1], "bf16": [0.5, 1.0]}  # warmup, then timed steps

    def fake_step(net, x, y, precision, opt):
        order.append(precision)
        t = seconds[precision].pop(0)
        return t, 2 * t  # (wall, CPU)

    monkeypatch.setattr(P, "time_step", fake_step)
    x, y = torch.randn(2, 3, 16, 16), torch.randint(4, (2,))
    d = P.probe(build_model(ARCH), x, y, candidates=(("fp32", False), ("bf16", False)),
                clock="wall")
    # warmups, then round 1 in turns; bf16's 1.0 s is > 1.5x fp32's 0.1 s: not timed again
    assert order == ["fp32", "bf16", "fp32", "bf16", "fp32"]
    assert d.precision == "fp32" and d.seconds_per_step == {"fp32": 0.1, "bf16": 1.0}
    assert d.clock == "wall" and "(wall time)" in d.describe()


def test_a_loaded_machine_is_probed_by_cpu_time(monkeypatch):
    # bf16 steps wait longer for the CPU (wall) but compute less (CPU time)
    steps = {"fp32": (0.2, 0.30), "bf16": (0.5, 0.25)}
    monkeypatch.setattr(P, "time_step", lambda net, x, y, precision, opt: steps[precision])
    monkeypatch.setattr(P, "cpus_available", lambda: 2)
    x, y = torch.randn(2, 3, 16, 16), torch.randint(4, (2,))
    two = (("fp32", False), ("bf16", False))
    monkeypatch.setattr(P.os, "getloadavg", lambda: (0.8, 0.8, 0.8))
    d = P.probe(build_model(ARCH), x, y, candidates=two)
    assert (d.clock, d.precision) == ("wall", "fp32")
    monkeypatch.setattr(P.os, "getloadavg", lambda: (9.5, 9.0, 8.0))
    d = P.probe(build_model(ARCH), x, y, candidates=two)
    assert (d.clock, d.precision) == ("cpu", "bf16")
    assert d.seconds_per_step == {"fp32": 0.3, "bf16": 0.25}
    assert "CPU time of this process" in d.describe()
    assert P.Decision.from_dict(d.as_dict()) == d  # what a checkpoint stores comes back


@pytest.mark.parametrize("major, expected", [(8, "bf16"), (7, "fp16")])
def test_cuda_rule(monkeypatch, major, expected):
    """bf16 from compute capability 8.0 (the device's properties, mocked), fp16 before."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda *a, **k: SimpleNamespace(major=major, minor=0))
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(P, "measure", lambda *a, **k: pytest.fail("no probe on CUDA"))
    d = P.decide(build_model(ARCH), None, torch.device("cuda:0"), channels_last=True)
    assert (d.precision, d.channels_last, d.how, d.device) == (expected, True, "cuda rule",
                                                               "cuda:0")
    assert P.eval_precision("auto", torch.device("cuda")) == expected
    assert P.eval_precision("auto", torch.device("cpu")) == "fp32"
    assert P.eval_precision("bf16", torch.device("cpu")) == "bf16"


def test_trainer_applies_the_choice_and_a_resume_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "measure", forced(BF16_CL_WINS))
    t = make_trainer(tmp_path, epochs=1)
    assert (t.precision, t.channels_last) == ("bf16", True)
    assert t.data.train.memory_format == torch.channels_last
    assert t.module.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    t.fit()
    stored = ckpt.load(tmp_path / "last.pt")
    assert stored["precision"] == "bf16" and stored["channels_last"] is True
    assert stored["precision_decision"]["seconds_per_step"] == BF16_CL_WINS
    # the machine now "measures" fp32 fastest: a resumed stage must not probe or switch
    calls: list = []
    monkeypatch.setattr(P, "measure", forced(FP32_WINS, calls))
    again = make_trainer(tmp_path, epochs=2)
    assert calls == [] and (again.precision, again.channels_last) == ("bf16", True)
    again.fit()
    assert again.global_step == 6 and ckpt.load(tmp_path / "last.pt")["precision"] == "bf16"
    # a fresh stage probes again and follows the new measurement
    fresh = make_trainer(tmp_path / "fresh", epochs=1)
    assert len(calls) == 4 and (fresh.precision, fresh.channels_last) == ("fp32", False)


def test_explicit_precision_is_not_probed(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "measure", lambda *a, **k: pytest.fail("probed"))
    t = make_trainer(tmp_path, precision="fp32")
    assert (t.precision, t.channels_last, t.decision.how) == ("fp32", False, "config")


def test_auto_through_the_cli_summary_provenance_and_log(tiny_config, cli, tmp_path,
                                                        monkeypatch):
    monkeypatch.setattr(P, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(P, "measure", forced(BF16_CL_WINS))
    path = tiny_config({"precision": "auto", "stages": {"pretrain": {"epochs": 1}}})
    code, _, err = cli("run", path)
    assert code == 0, err
    run_dir = tmp_path / "runs" / "tiny"
    for stage in ("pretrain", "finetune"):
        s = json.loads((run_dir / stage / "summary.json").read_text())
        assert (s["precision"], s["channels_last"]) == ("bf16", True)
        assert s["precision_decision"]["how"] == "cpu probe"
        assert s["precision_decision"]["seconds_per_step"] == BF16_CL_WINS
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert prov["precision_decisions"]["pretrain"]["precision"] == "bf16"
    assert set(prov["precision_decisions"]) == {"pretrain", "finetune"}
    log = (run_dir / "log.txt").read_text()
    assert "precision auto (cpu probe on cpu): bf16 channels_last" in log
    assert "fp32 400 ms" in log
    # a second invocation (everything skipped) keeps the decisions in provenance.json
    assert cli("run", path)[0] == 0
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert set(prov["precision_decisions"]) == {"pretrain", "finetune"}


def test_stage_level_auto_and_dry_run_text(tiny_config, cli):
    path = tiny_config({"precision": "auto", "stages": {"finetune": {"precision": "fp32"}}})
    code, out, err = cli("run", path, "--dry-run")
    assert code == 0, err
    assert "precision auto (decided at start)" in out.splitlines()[0]
    pre, ft = out.split("- pretrain")[1].split("- prune")[0], out.split("- finetune")[1]
    assert "steps), auto (decided at start)" in pre
    assert "steps), fp32" in ft and "decided at start" not in ft
    code, out, _ = cli("run", path, "--dry-run", "--format", "json")
    plan = json.loads(out)
    assert plan["precision"] == "auto"
    assert [s.get("precision") for s in plan["stages"]] == ["auto", None, "fp32"]
    code, _, err = cli("run", path, "--dry-run", "--set", "precision=fastest")
    assert code == 2 and "precision" in err and "auto" in err


def test_evaluation_only_stages_and_eval_resolve_a_run_level_auto(tiny_config, cli, tmp_path,
                                                                 monkeypatch):
    """A run with `precision: auto` also holds stages that only evaluate (a sensitivity
    sweep, iterative rounds' scoring, `eval`): they take eval_precision's answer (fp32 on the
    CPU) instead of passing "auto" on to autocast."""
    monkeypatch.setattr(P, "measure", forced(FP32_WINS))
    path = tiny_config({"precision": "auto", "data": {"val_split": 16},
                        "stages": {"pretrain": {"epochs": 1},
                                   "sens": {"type": "sensitivity", "from": "pretrain",
                                            "ratios": [0.5]},
                                   "it": {"type": "iterative", "from": "pretrain",
                                          "rounds": 2, "ratio": 0.5, "finetune_epochs": 0}}})
    for stage in ("pretrain", "sens", "it"):
        code, _, err = cli("run", path, "--stage", stage)
        assert code == 0, f"{stage}: {err}"
    run_dir = tmp_path / "runs" / "tiny"
    assert (run_dir / "sens" / "sensitivity.csv").is_file()
    assert json.loads((run_dir / "it" / "summary.json").read_text())["rounds_done"] == 2
    code, out, err = cli("eval", run_dir / "it", "--format", "json")
    assert code == 0, err
    assert json.loads(out)["precision"] == "fp32"


def test_inference_probe_picks_the_faster_forward_and_skips_bf16_without_kernels(monkeypatch):
    model = build_model(ARCH)
    x = torch.randn(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    calls = []

    def fake(net, xb, precision):
        calls.append((precision, xb.is_contiguous(memory_format=torch.channels_last)))
        return {"fp32": 0.30, "bf16": 0.10}[precision]

    monkeypatch.setattr(P, "time_forward", fake)
    d = P.decide_inference(model, x, torch.device("cpu"))
    assert (d.precision, d.channels_last, d.how) == ("bf16", True, "cpu inference probe")
    assert d.seconds_per_step == {"fp32 channels_last": 0.30, "bf16 channels_last": 0.10}
    assert "per forward pass at batch 8" in d.describe()
    assert {p for p, _ in calls} == {"fp32", "bf16"} and all(cl for _, cl in calls)
    monkeypatch.setattr(P, "time_forward", lambda *a: {"fp32": 0.1, "bf16": 0.3}[a[2]])
    assert P.decide_inference(model, x.contiguous(), torch.device("cpu")).label == "fp32"
    monkeypatch.setattr(P, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(P, "time_forward", lambda *a: pytest.fail("timed without bf16"))
    d = P.decide_inference(model, x, torch.device("cpu"))
    assert d.precision == "fp32" and "no bf16 kernels" in d.note and "no bf16" in d.describe()
    monkeypatch.setattr(torch.cuda, "get_device_properties",  # a pre-Ampere GPU
                        lambda *a, **k: SimpleNamespace(major=7, minor=5))
    monkeypatch.setattr(torch.version, "hip", None)
    assert P.decide_inference(model, None, torch.device("cuda")).precision == "fp16"


def test_sensitivity_sweep_under_auto_probes_once_and_keeps_the_choice(tiny_config, cli,
                                                                      tmp_path, monkeypatch):
    monkeypatch.setattr(P, "measure", forced(FP32_WINS))
    monkeypatch.setattr(P, "time_forward", lambda net, x, p: {"fp32": 0.3, "bf16": 0.1}[p])
    path = tiny_config({"precision": "auto", "data": {"val_split": 16},
                        "stages": {"pretrain": {"epochs": 1},
                                   "sens": {"type": "sensitivity", "from": "pretrain",
                                            "ratios": [0.5]}}})
    for stage in ("pretrain", "sens"):
        code, _, err = cli("run", path, "--stage", stage)
        assert code == 0, f"{stage}: {err}"
    d = tmp_path / "runs" / "tiny" / "sens"
    s = json.loads((d / "summary.json").read_text())
    assert s["precision"] == "bf16" and s["precision_decision"]["how"] == "cpu inference probe"
    assert json.loads((d / "precision.json").read_text())["precision"] == "bf16"
    prov = json.loads((tmp_path / "runs" / "tiny" / "provenance.json").read_text())
    assert prov["precision_decisions"]["sens"]["precision"] == "bf16"
    # a resumed sweep keeps the stored decision (the probe would now say fp32)
    monkeypatch.setattr(P, "time_forward", lambda net, x, p: {"fp32": 0.1, "bf16": 0.3}[p])
    (d / "summary.json").unlink()
    code, _, err = cli("run", path, "--stage", "sens")
    assert code == 0, err
    assert json.loads((d / "summary.json").read_text())["precision"] == "bf16"
