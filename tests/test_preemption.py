"""Preemption: SIGTERM / SIGUSR1 finish the current step, checkpoint it atomically and stop
(exit 143 / 0); the same command resumes and ends bitwise identical on the CPU to the run
never interrupted. The signals come from tests/fault_run.py's trainer step hook, at an
exact step, in a subprocess."""

from __future__ import annotations

import json
import signal

import pytest
from test_resume import (  # noqa: F401  # fixtures
    STEPS_PER_EPOCH,
    _retarget,
    assert_bitwise_equal,
    metric_rows,
    one_thread,
    reference,
    run_cli,
    run_in_process,
    weights,
)

from pipeline import checkpoint as ckpt
from pipeline import preemption


@pytest.mark.parametrize("event, at_step, code", [
    ("term", 3, 143),    # mid-epoch, between two checkpoint_every_steps checkpoints
    ("usr1", 5, 0),      # the last step of epoch 1: stops after its end-of-epoch checkpoint
    ("term2", 7, 143),   # a second SIGTERM inside every checkpoint write
], ids=["sigterm-mid-epoch", "sigusr1-epoch-end", "second-signal-while-saving"])
def test_signal_stops_checkpoints_and_resumes_bitwise(reference, tmp_path, event,  # noqa: F811
                                                      at_step, code):
    config, ref_dir = reference
    config = _retarget(config, tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    stopped = run_cli(config, fault=f"pretrain:{event}:{at_step}")
    assert stopped.returncode == code, stopped.stderr
    assert "Traceback" not in stopped.stderr
    name = "SIGUSR1" if event == "usr1" else "SIGTERM"
    (line,) = [x for x in stopped.stderr.splitlines()
               if x.startswith(("stopped:", "note:"))]
    assert line.startswith("note:" if code == 0 else "stopped:")
    assert f"stopped on {name} at step {at_step} of {2 * STEPS_PER_EPOCH}" in line
    assert str(run_dir / "pretrain" / "last.pt") in line
    last = ckpt.load(run_dir / "pretrain" / "last.pt")  # digest-checked: not corrupt
    assert last["global_step"] == at_step
    assert not list((run_dir / "pretrain").glob(".*.tmp"))
    summary = json.loads((run_dir / "pretrain" / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert not (run_dir / "prune").exists()  # nothing after the stopped stage ran
    assert f"stopped on {name}" in (run_dir / "log.txt").read_text()
    code, err = run_in_process(config)
    assert code == 0, err
    assert f"step {at_step}" in err and "resumed from" in err
    for stage in ("pretrain", "finetune"):
        assert_bitwise_equal(weights(run_dir / stage / "model.pt"),
                             weights(ref_dir / stage / "model.pt"))
    assert metric_rows(run_dir / "pretrain/metrics.csv") == metric_rows(
        ref_dir / "pretrain/metrics.csv")


def test_preempted_exit_codes():
    assert preemption.Preempted("x", signal.SIGTERM).exit_code == 143
    assert preemption.Preempted("x", signal.SIGUSR1).exit_code == 0


def test_handler_only_records(one_thread):  # noqa: F811
    with preemption.handle_signals():
        assert preemption.pending() is None
        signal.raise_signal(signal.SIGUSR1)
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)
        assert preemption.pending() == signal.SIGTERM  # SIGTERM wins
        assert preemption.requested() == signal.SIGTERM
    assert preemption.pending() is None
    assert signal.getsignal(signal.SIGTERM) is not preemption._handler


@pytest.mark.slow
def test_torchrun_every_rank_stops_at_the_same_step(tmp_path):
    """Only rank 1 gets SIGTERM, after step 3: the all-reduced stop request makes both
    ranks stop after that same step; rank 0 writes the step-3 checkpoint."""
    import os
    import subprocess
    import sys

    import yaml

    from conftest import ROOT, TINY, deep_update

    cfg = deep_update(TINY, {"out_dir": str(tmp_path / "runs"),
                             "data": {"synthetic": {"train_size": 160}},
                             "stages": {"pretrain": {"epochs": 2}}})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--standalone", str(ROOT / "tests" / "fault_run.py"), "pretrain:term_rank1:3", "run",
         str(path), "--progress", "off"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=240)
    assert done.returncode != 0
    stage = tmp_path / "runs" / "tiny" / "pretrain"
    assert ckpt.load(stage / "last.pt")["global_step"] == 3
    # both ranks report the same step (rank 1's log line, rank 0's error line)
    assert done.stderr.count("stopped on SIGTERM at step 3 of 10") >= 2, done.stderr
    # (torchrun prints its own traceback for a worker that exits non-zero; none of ours)
    assert str(ROOT / "pipeline") not in done.stderr
    # one process resumes the stage to the end
    code, err = run_in_process(path, "--stage", "pretrain")
    assert code == 0 and "resumed from" in err and "step 3" in err


def test_signal_at_the_last_step_stops_before_the_next_stage(reference, tmp_path):  # noqa: F811
    """SIGTERM after the final step of pretrain: the stage completes (its last checkpoint
    is the end of the schedule) and the run stops before prune; the same command goes on."""
    config, ref_dir = reference
    config = _retarget(config, tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    stopped = run_cli(config, fault=f"pretrain:term:{2 * STEPS_PER_EPOCH}")
    assert stopped.returncode == 143, stopped.stderr
    (line,) = [x for x in stopped.stderr.splitlines() if x.startswith("stopped:")]
    assert "stopped on SIGTERM before stage prune" in line
    assert json.loads((run_dir / "pretrain" / "summary.json").read_text())["status"] == \
        "completed"
    assert not (run_dir / "prune").exists()
    code, err = run_in_process(config)
    assert code == 0, err
    assert_bitwise_equal(weights(run_dir / "finetune" / "model.pt"),
                         weights(ref_dir / "finetune" / "model.pt"))
