"""Exact resume: a run killed (SIGKILL) after step k and resumed ends bitwise identical on
the CPU to the same run never interrupted, inside an epoch (from a `checkpoint_every_steps`
checkpoint, replaying the steps after it), at an epoch boundary, and for a finetune stage
(pruned model, EMA, mixup, label smoothing).

The killed run is `tests/fault_run.py`: the CLI with a trainer step (or checkpoint) hook
that sends SIGKILL to its own process at an exact point, so nothing gets the chance to
clean up.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from pipeline import checkpoint as ckpt

STEPS_PER_EPOCH = 5  # 160 images, batch 32
CONFIG = {
    "device": "cpu",  # the bitwise guarantee checked here is the CPU's
    "data": {"synthetic": {"train_size": 160}},
    "stages": {
        "pretrain": {"epochs": 2, "checkpoint_every_steps": 2, "log_interval": 2},
        "finetune": {"epochs": 2, "lr": 0.02, "checkpoint_every_steps": 3, "ema_decay": 0.9,
                     "mixup": 0.2, "label_smoothing": 0.1,
                     "schedule": {"type": "cosine"}},
    },
}


def run_cli(config, *args: str, fault: str) -> subprocess.CompletedProcess:
    """`python -m pipeline run CONFIG ...` in a fresh process (same env, same threads),
    killed at `fault` (STAGE:step:K or STAGE:checkpoint:K, see tests/fault_run.py)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread: fast on a busy 2-core box
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, str(ROOT / "tests" / "fault_run.py"), fault, "run",
                           str(config), *args, "--progress", "off"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def weights(path) -> dict[str, torch.Tensor]:
    return ckpt.load(path)["state_dict"]


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k} differs"


def metric_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def log_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def one_thread():
    """The in-process runs use one thread, like the killed subprocesses (same kernels,
    same summation order), and one thread is fast on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_in_process(config, *args: str) -> tuple[int, str]:
    """`python -m pipeline run` in this process (saves a torch import per run)."""
    import contextlib
    import io

    from pipeline.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["run", str(config), *args, "--progress", "off"])
    return code, err.getvalue()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_thread):
    """The uninterrupted run of the whole pipeline."""
    import yaml

    from conftest import TINY, deep_update

    base = tmp_path_factory.mktemp("resume")
    cfg = deep_update(TINY, CONFIG)
    cfg["out_dir"] = str(base / "runs")
    path = base / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    code, err = run_in_process(path)
    assert code == 0, err
    return path, base / "runs" / "tiny"


def killed_then_resumed(config, run_dir, fault: str, stage: str, at_step: int) -> None:
    """Run in a subprocess until the fault kills it, check where it died, then resume to
    the end in this process."""
    killed = run_cli(config, "--stage", stage, fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    last = ckpt.load(run_dir / stage / "last.pt")
    assert last["global_step"] == at_step
    assert not (run_dir / stage / "model.pt").exists()
    code, err = run_in_process(config, "--stage", stage)
    assert code == 0, err
    assert f"at epoch {at_step // STEPS_PER_EPOCH}, step {at_step}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("fault, at_step", [
    ("pretrain:step:7", 6),        # inside epoch 2: resume from the step-6 checkpoint
    ("pretrain:checkpoint:5", 5),  # right after the end-of-epoch-1 checkpoint
], ids=["mid-epoch", "epoch-boundary"])
def test_killed_pretrain_resumes_bitwise(reference, tmp_path, fault, at_step):
    config, ref_dir = reference
    run_dir = tmp_path / "runs" / "tiny"
    config = _retarget(config, tmp_path)
    killed_then_resumed(config, run_dir, fault, "pretrain", at_step)
    assert_bitwise_equal(weights(run_dir / "pretrain/model.pt"),
                         weights(ref_dir / "pretrain/model.pt"))
    ref_last = ckpt.load(ref_dir / "pretrain/last.pt")
    last = ckpt.load(run_dir / "pretrain/last.pt")
    assert_bitwise_equal(last["optimizer"]["state"][0], ref_last["optimizer"]["state"][0])
    assert (last["best_top1"], last["best_epoch"]) == (ref_last["best_top1"],
                                                       ref_last["best_epoch"])
    # metrics.csv and train_log.csv: the same rows, none duplicated by the resume
    assert metric_rows(run_dir / "pretrain/metrics.csv") == metric_rows(
        ref_dir / "pretrain/metrics.csv")
    steps = [int(r["step"]) for r in log_rows(run_dir / "pretrain/train_log.csv")]
    assert steps == sorted(set(steps)) and steps[-1] == 2 * STEPS_PER_EPOCH


def test_killed_finetune_resumes_bitwise(reference, tmp_path):
    config, ref_dir = reference
    run_dir = tmp_path / "runs" / "tiny"
    config = _retarget(config, tmp_path)
    for stage in ("pretrain", "prune"):  # completed upstream stages, as in the reference
        shutil.copytree(ref_dir / stage, run_dir / stage)
    killed_then_resumed(config, run_dir, "finetune:step:8", "finetune", 6)
    assert_bitwise_equal(weights(run_dir / "finetune/model.pt"),
                         weights(ref_dir / "finetune/model.pt"))
    last, ref_last = ckpt.load(run_dir / "finetune/last.pt"), ckpt.load(
        ref_dir / "finetune/last.pt")
    assert_bitwise_equal(last["ema"], ref_last["ema"])
    assert metric_rows(run_dir / "finetune/metrics.csv") == metric_rows(
        ref_dir / "finetune/metrics.csv")


def _retarget(config, tmp_path):
    """The reference config with out_dir moved into this test's folder."""
    import yaml

    cfg = yaml.safe_load(config.read_text())
    cfg["out_dir"] = str(tmp_path / "runs")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
