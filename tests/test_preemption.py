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
    """Only rank 1 gets SIGTERM, after step 3: the stop request rides on the all-reduce of
    the next log interval (every 2 steps; no collective per step), so both ranks stop after
    step 4; rank 0 writes the step-4 checkpoint. Between log intervals the trainer makes no
    collective of its own (counted: one all_reduce pair per interval and epoch end)."""
    import os
    import subprocess
    import sys

    import yaml

    from conftest import ROOT, TINY, deep_update

    cfg = deep_update(TINY, {"out_dir": str(tmp_path / "runs"),
                             "data": {"synthetic": {"train_size": 160}},
                             "stages": {"pretrain": {"epochs": 2, "log_interval": 2}}})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    counter = tmp_path / "count"
    counter.mkdir()
    (counter / "sitecustomize.py").write_text(COUNT_ALL_REDUCE)
    env = dict(os.environ, OMP_NUM_THREADS="1", COUNT_OUT=str(counter))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(counter), str(ROOT),
                                                      env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--standalone", str(ROOT / "tests" / "fault_run.py"), "pretrain:term_rank1:3", "run",
         str(path), "--progress", "off"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=240)
    assert done.returncode != 0
    stage = tmp_path / "runs" / "tiny" / "pretrain"
    assert ckpt.load(stage / "last.pt")["global_step"] == 4
    # both ranks report the same step (rank 1's log line, rank 0's error line)
    assert done.stderr.count("stopped on SIGTERM at step 4 of 10") >= 2, done.stderr
    # (torchrun prints its own traceback for a worker that exits non-zero; none of ours)
    assert str(ROOT / "pipeline") not in done.stderr
    # the trainer's all_reduces in steps 1-4: 2 per log interval (sums and flags, then the
    # first non-finite step) at steps 2 and 4, 1 for the checkpoint's epoch sums and 2 more
    # in the stop's own sync; none per step
    counts = [int((counter / f"rank{r}.txt").read_text()) for r in (0, 1)]
    assert counts[0] == counts[1] <= 8, counts
    # one process resumes the stage to the end
    code, err = run_in_process(path, "--stage", "pretrain")
    assert code == 0 and "resumed from" in err and "step 4" in err


# counts the Python-level all_reduce calls of a torchrun child, written at exit
COUNT_ALL_REDUCE = '''
import os
if os.environ.get("RANK") is not None and os.environ.get("COUNT_OUT"):
    import atexit
    import torch.distributed as dist
    _calls = [0]
    _real = dist.all_reduce
    def _counted(*a, **k):
        _calls[0] += 1
        return _real(*a, **k)
    dist.all_reduce = _counted
    def _dump():
        with open(os.path.join(os.environ["COUNT_OUT"], "rank%s.txt" % os.environ["RANK"]),
                  "w") as f:
            f.write(str(_calls[0]))
    atexit.register(_dump)
'''


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


@pytest.mark.slow
def test_sigterm_to_the_whole_job_with_dataloader_workers(tmp_path, one_thread):  # noqa: F811
    """SLURM sends SIGTERM to every process of the job step: on the folder path with 2
    DataLoader workers, the signal to the whole process group after step 3 (mid-epoch)
    leaves the workers running; the main process checkpoints step 3 and exits 143, and
    the resumed run ends bitwise as the uninterrupted one."""
    import os
    import subprocess
    import sys

    import yaml
    from test_multirank import _image_folder

    from conftest import ROOT, TINY, deep_update

    data = _image_folder(tmp_path / "data")  # 32 training images: 4 steps of 8 per epoch

    def config(name: str) -> object:
        cfg = deep_update(TINY, {
            "out_dir": str(tmp_path / name), "device": "cpu",
            "data": {"dataset": "imagefolder", "root": str(data), "image_size": 16,
                     "loader": "dataloader", "num_workers": 2},
            "stages": {"pretrain": {"epochs": 2, "batch_size": 8, "log_interval": 2}}})
        cfg["stages"] = {"pretrain": cfg["stages"]["pretrain"]}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    code, err = run_in_process(config("whole"))
    assert code == 0, err
    cut = config("cut")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    stopped = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fault_run.py"), "pretrain:termpg:3", "run",
         str(cut), "--progress", "off"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300, start_new_session=True)  # its own process group, workers included
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "DataLoader worker" not in stopped.stderr and "Traceback" not in stopped.stderr
    assert "stopped on SIGTERM at step 3 of 8" in stopped.stderr
    stage = tmp_path / "cut" / "tiny" / "pretrain"
    assert ckpt.load(stage / "last.pt")["global_step"] == 3
    code, err = run_in_process(cut)
    assert code == 0 and "resumed from" in err, err
    assert_bitwise_equal(weights(stage / "model.pt"),
                         weights(tmp_path / "whole" / "tiny" / "pretrain" / "model.pt"))
