"""Several ranks (torchrun, gloo on the CPU): a failure on one rank stops every rank with
its message; rank 0 decides from the shared filesystem; every rank evaluates and saves
rank 0's BatchNorm statistics; `pipeline eval` counts each image once.

Faults and stale filesystem views are injected into one rank by a `sitecustomize` module
put on PYTHONPATH for the torchrun children only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import ROOT, TINY, deep_update

pytestmark = pytest.mark.slow

# what rank INJECT_RANK does differently (the others run the code as it is)
INJECT = '''
import os
if os.environ.get("RANK") == os.environ.get("INJECT_RANK") and os.environ.get("INJECT"):
    kind = os.environ["INJECT"]
    if kind == "stale":  # this rank's view of the run directory misses every summary
        import pipeline.runner, pipeline.rundir
        pipeline.runner.read_summary = lambda *a, **k: None
        pipeline.runner.is_complete = lambda *a, **k: False
        pipeline.rundir.read_summary = lambda *a, **k: None
    elif kind == "unreadable":  # every image of this rank's share fails to decode
        import pipeline.data.folder_loader as fl
        def broken(path):
            raise OSError("image file is truncated")
        fl.open_rgb = broken
    elif kind == "disk_full":  # this rank's checkpoint writes fail
        import pipeline.checkpoint as ck
        def full(*a, **k):
            raise OSError(28, "No space left on device")
        ck.save = full
    elif kind == "skew":  # this rank runs late and sees other calibration batches
        import time
        import stages.prune as sp
        import stages.sensitivity as ss
        late = ss.build_data
        def slow_build(*a, **k):
            time.sleep(3)  # rank 0 has written precision.json by the time this rank looks
            return late(*a, **k)
        ss.build_data = slow_build
        batches = sp._training_batches
        class Other:
            def __init__(self, loader):
                self.loader = loader
            def iterate(self, start=0):
                for x, y in self.loader.iterate(start):
                    yield -x.flip(0), y.flip(0)
        sp._training_batches = lambda spec, ctx: Other(batches(spec, ctx))
    elif kind == "stale_stages":  # this rank sees none of the files a stage resumes from
        import pathlib
        import pipeline.runner, pipeline.rundir
        pipeline.runner.read_summary = lambda *a, **k: None
        pipeline.runner.is_complete = lambda *a, **k: False
        hidden = {"sensitivity.csv", "precision.json", "state.json", "pruned.pt",
                  "suggested.yaml"}
        real = pathlib.Path.is_file
        def is_file(self):
            if self.name in hidden or self.name.startswith("epoch_"):
                return False
            return real(self)
        pathlib.Path.is_file = is_file
if os.environ.get("FINGERPRINTS"):  # every rank: the weights the pruning stages work on
    import hashlib, pathlib
    import stages.iterative as si
    import stages.prune as sp

    def _note(what, model):
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
        out = pathlib.Path(os.environ["FINGERPRINTS"]) / f"rank{os.environ['RANK']}.txt"
        with open(out, "a") as f:
            f.write(f"{what} {h.hexdigest()}\\n")

    _round = si.prune_round
    def prune_round(model, *a, **k):
        _note("iterative_input", model)
        return _round(model, *a, **k)
    si.prune_round = prune_round
    _evaluate = sp.evaluate_splits
    def evaluate_splits(model, *a, **k):
        _note("pruned", model)
        return _evaluate(model, *a, **k)
    sp.evaluate_splits = evaluate_splits
'''


def torchrun(tmp: Path, *args: str, inject: str = "", rank: int = 1, timeout: int = 150,
             fingerprints: Path | None = None) -> tuple[subprocess.CompletedProcess, float]:
    hooks = tmp / f"hooks_{inject or 'none'}"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(INJECT)
    env = dict(os.environ, OMP_NUM_THREADS="1", INJECT=inject, INJECT_RANK=str(rank),
               FINGERPRINTS=str(fingerprints or ""),
               PYTHONPATH=os.pathsep.join([str(hooks), str(ROOT),
                                           os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", "--monitor-interval", "0.5", "-m", "pipeline", *args]
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return done, time.monotonic() - t0


def write_config(tmp: Path, over: dict, name: str = "config.yaml") -> Path:
    cfg = deep_update(TINY, {"out_dir": str(tmp / "runs"), "device": "cpu",
                             # a rank waiting for a peer that never comes fails in 30 s
                             "distributed": {"timeout_minutes": 0.5}, **over})
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_ranks_agree_on_buffers_eval_and_decisions(tmp_path, cli):
    """One DDP run, then: the saved model is the evaluated one (to the image), `eval`
    under torchrun counts each image once, and a rank with a stale view of the run
    directory follows rank 0 (skips the completed stages) instead of diverging."""
    config = write_config(tmp_path, {"stages": {
        "pretrain": {"epochs": 1, "batch_size": 32},
        "prune": {"type": "prune", "from": "pretrain", "method": "fpgm", "ratio": 0.4},
        "finetune": {"type": "finetune", "from": "prune", "epochs": 1, "batch_size": 32,
                     "ema_decay": 0.5}}})
    done, _ = torchrun(tmp_path, "run", str(config), "--progress", "off")
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"

    # BatchNorm statistics: the summary (each rank evaluating its share with its own
    # model) equals a single process evaluating model.pt; the EMA too (finetune)
    for stage in ("pretrain", "finetune"):
        summary = json.loads((run / stage / "summary.json").read_text())
        code, out, err = cli("eval", run / stage, "--device", "cpu", "--format", "json")
        assert code == 0, err
        single = json.loads(out)
        assert single["images"] == 64
        assert round(single["top1"] * 64 / 100) == round(summary["top1"] * 64 / 100), stage
        # (the summary keeps 6 decimals; rank 1 with its own statistics is ~2e-4 off)
        assert single["test_loss"] == pytest.approx(summary["test_loss"], rel=2e-5), stage

        # eval under torchrun: the same numbers, each image counted once
        if stage == "finetune":
            done, _ = torchrun(tmp_path, "eval", str(run / stage), "--device", "cpu",
                               "--format", "json")
            assert done.returncode == 0, done.stderr[-3000:]
            multi = json.loads(done.stdout)  # printed once, by rank 0
            assert multi["images"] == 64 and multi["processes"] == 2
            assert multi["top1"] == pytest.approx(single["top1"], abs=1e-9)
            assert multi["test_loss"] == pytest.approx(single["test_loss"], rel=1e-4)

    # rank 1 sees no completed stage (a stale NFS view): rank 0 decides, all skip
    before = (run / "pretrain" / "model.pt").stat().st_mtime_ns
    done, seconds = torchrun(tmp_path, "run", str(config), "--progress", "off",
                             inject="stale", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("already completed") == 3
    assert (run / "pretrain" / "model.pt").stat().st_mtime_ns == before


def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c in ("a", "b", "c", "d"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("inject,rank,message,code", [
    ("unreadable", 1, "image file is truncated", 2),
    ("disk_full", 0, "No space left on device", 1),
])
def test_a_failure_on_one_rank_stops_every_rank(tmp_path, inject, rank, message, code):
    data = _image_folder(tmp_path / "data")
    config = write_config(tmp_path, {
        "data": {"dataset": "imagefolder", "root": str(data), "image_size": 16,
                 "loader": "dataloader", "num_workers": 0},
        "stages": {"pretrain": {"epochs": 1, "batch_size": 8}}})
    done, seconds = torchrun(tmp_path, "run", str(config), "--stage", "pretrain",
                             "--progress", "off", inject=inject, rank=rank, timeout=120)
    assert seconds < 60, seconds
    assert done.returncode != 0
    # both ranks exited on their own with the error's code (none killed by torchrun)
    assert done.stderr.count(f"exitcode  : {code} ") == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], done.stderr[-3000:]
    # no traceback through the project's code (torchrun prints its own summary)
    ours = str(ROOT / "pipeline")
    assert not [line for line in done.stderr.splitlines() if ours in line]


PRUNING_STAGES = {
    "pretrain": {"epochs": 1, "batch_size": 32, "precision": "fp32"},
    "sens": {"type": "sensitivity", "from": "pretrain", "ratios": [0.3, 0.6]},
    "prune": {"type": "prune", "from": "pretrain", "method": "taylor", "ratio": 0.4,
              "batch_size": 16, "batches": 2},
    "iter": {"type": "iterative", "from": "pretrain", "rounds": 2, "finetune_epochs": 1,
             "lr": 0.01, "ema_decay": 0.5, "batch_size": 32, "precision": "fp32"},
    "rewind": {"type": "rewind", "from": "prune", "mode": "weights", "rewind_epoch": 0,
               "batch_size": 32, "precision": "fp32"},
}


def _fingerprints(folder: Path) -> tuple[list[str], list[str]]:
    return tuple((folder / f"rank{r}.txt").read_text().splitlines() for r in (0, 1))


def test_rank0_decides_in_the_pruning_stages(tmp_path):
    """Sensitivity, prune (taylor), iterative and rewind under 2 ranks with a short
    collective timeout (a hang fails in 30 s):
      * rank 1 late (sensitivity's precision.json written by rank 0 before rank 1 gets
        there) and fed other calibration batches (taylor): one selection, the same pruned
        weights on both ranks;
      * iterative: both ranks go on from the same (EMA) weights in round 2;
      * the sweep's groups are shared out: each rank sweeps some, the rows are all there;
      * BatchNorm over 16 images per rank without sync_bn: a warning;
    then the sweep, the iterative stage and rewind resumed with rank 1 seeing none of the
    files they resume from (a stale view): rank 0 decides, the run completes."""
    config = write_config(tmp_path, {"precision": "auto", "stages": PRUNING_STAGES,
                                     "distributed": {"timeout_minutes": 0.5}})
    cfg = yaml.safe_load(config.read_text())  # these stages only, in this order
    cfg["stages"] = {k: cfg["stages"][k] for k in PRUNING_STAGES}
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    prints = tmp_path / "fingerprints"
    prints.mkdir()
    done, _ = torchrun(tmp_path, "run", str(config), "--progress", "off", inject="skew",
                       fingerprints=prints, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    rank0, rank1 = _fingerprints(prints)
    assert rank0 == rank1 and len(rank0) == 3, (rank0, rank1)  # pruned, 2 iterative inputs
    assert [line.split()[0] for line in rank0] == ["pruned", "iterative_input",
                                                   "iterative_input"]
    assert "BatchNorm normalizes over 16 images per process (global batch 32 over 2 " \
           "processes), below 32" in done.stderr
    sens = json.loads((run / "sens" / "summary.json").read_text())
    groups = sens["groups"]
    assert sum(sens["pairs_per_rank"]) == 2 * groups and min(sens["pairs_per_rank"]) > 0
    rows = (run / "sens" / "sensitivity.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * groups

    # interrupted, as rank 0 sees it: the sweep before its last group, iterative after
    # round 1, rewind before it trained
    for stage in ("sens", "iter", "rewind"):
        (run / stage / "summary.json").unlink()
    (run / "sens" / "sensitivity.csv").write_text("\n".join(rows[:-2]) + "\n")
    state = json.loads((run / "iter" / "state.json").read_text())
    state["rows"] = state["rows"][:1]
    (run / "iter" / "state.json").write_text(json.dumps(state))
    shutil.rmtree(run / "iter" / "round_2")
    shutil.rmtree(run / "rewind")
    done, _ = torchrun(tmp_path, "run", str(config), "--progress", "off",
                       inject="stale_stages", timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{groups - 1} of {groups} group(s) already swept; resuming" in done.stderr
    assert (run / "sens" / "sensitivity.csv").read_text().splitlines() == rows
    assert "1 of 2 round(s) done; resuming" in done.stderr
    assert json.loads((run / "iter" / "summary.json").read_text())["rounds_done"] == 2
    assert json.loads((run / "rewind" / "summary.json").read_text())["status"] == "completed"
