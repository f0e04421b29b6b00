"""DDP through torchrun on the CPU (gloo): the smoke pipeline end to end on 2 processes,
its first-epoch loss curve against the single-process run of the same global batch, only
rank 0 writing files, and trainer checkpoints moving between DDP and single-process runs.

Rank > 0 is watched by a `sitecustomize` audit hook (put on PYTHONPATH for the torchrun
children only) that records every file it opens for writing, renames, removes or creates.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from pipeline import checkpoint as ckpt
from pipeline.models import load_model

pytestmark = pytest.mark.slow

# the smoke pipeline with a train_log.csv row every 2 steps (8 steps per epoch)
OVERRIDES = ["--set", "stages.pretrain.log_interval=2", "--set", "device=cpu",
             "--progress", "off"]

AUDIT_HOOK = '''
import os, sys
if os.environ.get("RANK", "0") != "0" and os.environ.get("AUDIT_OUT"):
    import atexit
    _written = []
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _note(path):
        if isinstance(path, (str, bytes, os.PathLike)):
            _written.append(os.path.abspath(os.fsdecode(path)))

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            if (mode is not None and any(c in mode for c in "wax+")) or (
                    mode is None and isinstance(flags, int) and flags & _WRITE):
                _note(path)
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree",
                       "os.truncate", "os.link", "os.symlink"):
            _note(args[0])
            if event == "os.rename":
                _note(args[1])

    def _dump():
        with open(os.path.join(os.environ["AUDIT_OUT"], "rank%s.txt" % os.environ["RANK"]),
                  "w") as f:
            f.write("\\n".join(_written))

    sys.addaudithook(_hook)
    atexit.register(_dump)
'''


def torchrun(config, *args: str, audit: Path) -> subprocess.CompletedProcess:
    audit.mkdir(parents=True, exist_ok=True)
    (audit / "sitecustomize.py").write_text(AUDIT_HOOK)
    env = dict(os.environ)
    env.update(AUDIT_OUT=str(audit), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(audit), str(ROOT), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", "-m", "pipeline", "run", str(config), *OVERRIDES, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def rank1_writes(audit: Path, under: Path) -> list[str]:
    record = audit / "rank1.txt"
    assert record.is_file(), "rank 1 did not exit cleanly"
    root = str(under.resolve())
    return [p for p in record.read_text().splitlines() if p.startswith(root)]


def first_epoch_losses(stage_dir: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["loss"]) for r in rows(stage_dir / "train_log.csv")
            if r["epoch"] == "0"}


@pytest.fixture
def one_thread():
    """torchrun gives each of its processes one thread; so does the reference run here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_torchrun_smoke_pipeline(tmp_path, cli, one_thread):
    smoke = ROOT / "configs" / "smoke.yaml"
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"

    # single process, the same config: the reference loss curve
    code, _, err = cli("run", smoke, "--stage", "pretrain", "--set", f"out_dir={single_dir}",
                       *OVERRIDES)
    assert code == 0, err

    done = torchrun(smoke, "--set", f"out_dir={ddp_dir}", audit=tmp_path / "audit")
    assert done.returncode == 0, done.stderr[-3000:]
    run = ddp_dir / "smoke"
    for stage in ("pretrain", "prune", "finetune"):
        assert json.loads((run / stage / "summary.json").read_text())["status"] == "completed"
        assert (run / stage / "model.pt").is_file()
    # the final table is printed once (by rank 0)
    assert done.stdout.count("finetune         finetune  completed") == 1

    # same global batch, first epoch: the same steps and close losses (BatchNorm statistics
    # are per process: 32 images each instead of 64)
    ref, got = first_epoch_losses(single_dir / "smoke/pretrain"), first_epoch_losses(
        run / "pretrain")
    assert sorted(got) == sorted(ref) == [2, 4, 6, 8]
    for step, loss in ref.items():
        assert got[step] == pytest.approx(loss, rel=0.03), (step, got[step], loss)
    # each image counted once across the 2 ranks
    assert sum(int(r["images"]) for r in rows(run / "pretrain/train_log.csv")
               if r["epoch"] == "0") == 512

    # only rank 0 writes: nothing from rank 1 under the run folder, no duplicated lines
    assert rank1_writes(tmp_path / "audit", ddp_dir) == []
    log = (run / "log.txt").read_text().splitlines()
    for line in ("stage pretrain [pretrain]: starting", "epoch 1/2", "epoch 2/2",
                 "stage finetune [finetune] from prune: starting", "stage finetune: completed"):
        assert sum(line in entry for entry in log) == 1, line
    steps = [r["step"] for r in rows(run / "pretrain/train_log.csv")]
    assert len(steps) == len(set(steps)) == 8
    assert [r["epoch"] for r in rows(run / "pretrain/metrics.csv")] == ["0", "1"]

    # a DDP checkpoint resumes in a single process (no `module.` prefix anywhere)
    assert not any(k.startswith(("module.", "_orig_mod."))
                   for k in ckpt.load(run / "pretrain/last.pt")["state_dict"])
    solo = tmp_path / "solo" / "smoke" / "pretrain"
    solo.mkdir(parents=True)
    shutil.copy(run / "pretrain/last.prev.pt", solo / "last.pt")  # after epoch 1 of 2
    code, _, err = cli("run", smoke, "--stage", "pretrain", "--set",
                       f"out_dir={tmp_path / 'solo'}", *OVERRIDES)
    assert code == 0, err
    assert "at epoch 1, step 8" in err
    _close_second_epoch(solo, run / "pretrain")

    # and a single-process checkpoint resumes under DDP
    both = tmp_path / "both" / "smoke" / "pretrain"
    both.mkdir(parents=True)
    shutil.copy(single_dir / "smoke/pretrain/last.prev.pt", both / "last.pt")
    done = torchrun(smoke, "--stage", "pretrain", "--set", f"out_dir={tmp_path / 'both'}",
                    audit=tmp_path / "audit2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("at epoch 1, step 8") == 1
    _close_second_epoch(both, single_dir / "smoke/pretrain")
    assert rank1_writes(tmp_path / "audit2", tmp_path / "both") == []
    model = load_model(both / "model.pt")
    assert isinstance(model, torch.nn.Module)


def _close_second_epoch(resumed: Path, original: Path) -> None:
    """The resumed run's epoch 2 continues the original's (a fresh start would be far off)."""
    (a,) = [r for r in rows(resumed / "metrics.csv")]
    b = rows(original / "metrics.csv")[1]
    assert a["epoch"] == b["epoch"] == "1"
    assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=0.05)
