"""benchmarks/gpu_check.py on a machine without CUDA: it fails in one clear line (exit 1,
nothing run), `--plan` names every check; and the parts of it that do not need a GPU: the
configs it runs pass the pipeline's own validation, the summary table and JSON, the
accuracy tolerance, the process plan, the collective counter, the step timer (a trainer
hook) and the SIGTERM child it resumes from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check as G  # noqa: E402


def script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = dict(os.environ, CUDA_VISIBLE_DEVICES="", **(env or {}))
    full["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *args],
                          cwd=ROOT, env=full, capture_output=True, text=True, timeout=120)


def test_without_cuda_it_fails_clearly_and_runs_nothing(tmp_path):
    done = script("--json", str(tmp_path / "out.json"))
    if "gpu_check on " in done.stdout:
        pytest.skip("a CUDA device is visible: the check would really run")
    assert done.returncode == 1
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("gpu_check:")]
    assert "CUDA is not available" in error and "nothing was run" in error
    assert not (tmp_path / "out.json").exists()  # no summary that could pass for a result
    for what in ("fp32 on CUDA vs the CPU", "fp16 with GradScaler", "bf16", "channels_last",
                 "torch.compile", "precision auto, EMA, mixup, distillation, soft masks, "
                 "Taylor, sensitivity replay, iterative, rewind", "DataLoader path",
                 "SIGTERM mid-epoch", "2 NCCL ranks", "2 gloo ranks on one GPU",
                 "eval under torchrun", "data path on the device", "steps vs steps",
                 "ResNet-50 batch 64", "latency vs MACs"):
        assert what in done.stdout, what
    plan = script("--plan")
    assert plan.returncode == 0 and plan.stdout == done.stdout
    assert "trainer_vs_bare >= 0.97" in plan.stdout


def test_the_configs_it_runs_pass_validation(tmp_path, cli):
    """Every config the check writes, dry-run on the CPU: a typo fails here, not on the
    first GPU."""
    data = G.image_folder(tmp_path / "folder", per_class=4, size=8)
    configs = [G.write_config(tmp_path, "quick"),
               G.write_config(tmp_path, "quick_cpu", device="cpu"),
               G.write_config(tmp_path, "compile", **{"stages.pretrain.compile": True,
                                                      "precision": "fp16"}),
               G.write_config(tmp_path, "coverage",
                              {**G.QUICK, "stages": G.COVERAGE_STAGES, "precision": "auto"}),
               G.write_config(tmp_path, "folder", {
                   **G.QUICK, "data": {"dataset": "imagefolder", "root": str(data),
                                       "image_size": 32, "loader": "dataloader",
                                       "num_workers": 2},
                   "stages": {"pretrain": G.QUICK["stages"]["pretrain"]}}),
               G.write_config(tmp_path, "det", deterministic=True, precision="fp16"),
               G.write_config(tmp_path, "ranks", **{"distributed.backend": "gloo"})]
    # the keys are checked: the network may be small, and the device this machine's
    small = ("--set", "model.arch=resnet8", "--set", "device=cpu")
    for config in configs:
        code, out, err = cli("run", config, "--dry-run", "--format", "json", *small)
        assert code == 0, (config.name, err)
    plan = json.loads(cli("run", configs[3], "--dry-run", "--format", "json", *small)[1])
    assert [s["type"] for s in plan["stages"]] == [
        s["type"] for s in G.COVERAGE_STAGES.values()]


def test_summary_table_and_json(tmp_path):
    res = G.Results()
    res.check("accuracy: fp32 on CUDA vs the CPU", True, "top-1 91.2 vs 91.0")
    res.check("quick pipeline fp16", False, "exit 1")
    res.skip("torchrun 2 x nccl", "one GPU")
    res.target("trainer_vs_bare", 0.981, 0.97)
    res.target("pruned_latency_vs_macs", 0.5, 0.7)
    table = res.table().splitlines()
    assert table[0].split() == ["check", "result", "figure"]
    assert [line.split("  ")[0].strip() for line in table[2:]] == [
        "accuracy: fp32 on CUDA vs the CPU", "quick pipeline fp16", "torchrun 2 x nccl"]
    assert "FAIL" in table[3] and "skipped" in table[4]
    res.write_json(tmp_path / "sub" / "out.json", {"gpu": "test"})
    data = json.loads((tmp_path / "sub" / "out.json").read_text())
    assert data["failed"] == ["quick pipeline fp16"]
    assert data["checks"][0] == {"check": "accuracy: fp32 on CUDA vs the CPU", "result": "ok",
                                 "figure": "top-1 91.2 vs 91.0"}
    assert data["targets"] == ["target trainer_vs_bare: 0.981 (goal 0.97) met",
                               "target pruned_latency_vs_macs: 0.500 (goal 0.7) missed"]


def test_accuracy_tolerance_and_process_plan():
    assert G.within(90.0, 91.5, G.ACCURACY_TOLERANCE)
    assert not G.within(88.0, 91.5, G.ACCURACY_TOLERANCE)
    assert not G.within(None, 91.5, 5.0)  # a run that wrote no top-1 never passes
    assert G.process_plan(8) == {"ranks": 2, "backend": "nccl",
                                 "note": "NCCL collectives on 2 GPUs"}
    one = G.process_plan(1)
    assert one["backend"] == "gloo" and one["ranks"] == 2
    assert "NCCL itself is not exercised" in one["note"]


def test_collective_counter_names_kind_and_device(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(G.COUNTER)
    code = ("import torch, torch.distributed as dist\n"
            f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'pg'}', "
            "rank=0, world_size=1)\n"
            "dist.all_reduce(torch.ones(2)); dist.all_reduce(torch.ones(1))\n"
            "dist.broadcast(torch.ones(1), 0); dist.all_gather_object([None], 1)\n"
            "dist.destroy_process_group()\n")
    env = dict(os.environ, RANK="0", COLLECTIVES_OUT=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    counts = json.loads((tmp_path / "rank0.json").read_text())
    assert counts["all_reduce/cpu"] == 2 and counts["broadcast/cpu"] >= 1
    assert counts["all_gather_object"] == 1
    text = G.collectives_summary([counts, counts])
    assert "all_reduce/cpu x2" in text and "DDP's gradient all-reduce" in text
    assert "differ" in G.collectives_summary([counts, {}])


def test_step_timer_times_exactly_the_steps_after_the_warmup(tmp_path):
    from types import SimpleNamespace

    from fakes import FakeLoader, random_batches

    from pipeline.trainer import RunSettings, TrainConfig, Trainer

    syncs = []
    timer = G.StepTimer(skip=2, count=3, sync=lambda: syncs.append(1))
    torch.manual_seed(0)
    arch = {"name": "resnet8", "num_classes": 4, "shortcut": "A"}
    data = SimpleNamespace(train=FakeLoader(random_batches(5)),
                           test=FakeLoader(random_batches(1)))
    Trainer(G.build_model(arch), TrainConfig(epochs=1, batch_size=16, lr=0.05), data,
            tmp_path, run=RunSettings(show_progress=False), arch=arch, base_lr=0.05,
            hooks=[timer]).fit()
    assert timer.steps == 3 and timer.seconds is not None and timer.seconds > 0
    assert len(syncs) == 2  # at the window's two ends only


def test_sigterm_child_stops_at_the_step_and_resumes(tmp_path, tiny_config, capsys):
    """The preemption check's child: the CLI with a SIGTERM hook after step 3 of pretrain
    exits 143 with last.pt at step 3 (on the CPU here)."""
    from pipeline import checkpoint

    config = tiny_config({"device": "cpu", "stages": {"pretrain": {"epochs": 1}}})
    code = G.main(["--sigterm-at", "pretrain:2", "--", "run", str(config), "--stage",
                   "pretrain", "--progress", "off"])
    assert code == 143
    last = checkpoint.load(Path(tmp_path) / "runs" / "tiny" / "pretrain" / "last.pt")
    assert last["global_step"] == 2


def test_kernel_flags_are_restored():
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    with G.kernel_flags():
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = not before[1]
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == \
        before
