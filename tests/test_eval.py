"""`python -m pipeline eval RUN_DIR/STAGE`: a stage's model.pt evaluated on the run's test
set gives the summary's numbers; other checkpoints, data roots and splits; one-line errors
(exit 2) for a missing stage, a corrupt file, data without the run's classes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import TINY, deep_update
from pipeline import runner
from pipeline.cli import COMMANDS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny run: pretrain (1 epoch) -> prune, on the CPU."""
    tmp = tmp_path_factory.mktemp("eval")
    cfg = deep_update(TINY, {"out_dir": str(tmp / "runs"), "device": "cpu",
                             "stages": {"pretrain": {"epochs": 1}}})
    del cfg["stages"]["finetune"]
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    runner.run(str(path), [], show_progress=False)
    return tmp / "runs" / "tiny"


def test_eval_is_registered():
    assert "eval" in COMMANDS


@pytest.mark.parametrize("stage", ["pretrain", "prune"])
def test_eval_matches_the_stage_summary(run_dir, cli, stage):
    code, out, err = cli("eval", run_dir / stage, "--format", "json")
    assert code == 0, err
    got = json.loads(out)
    summary = json.loads((run_dir / stage / "summary.json").read_text())
    assert {"top1", "top5", "test_loss", "images", "checkpoint"} <= set(got)
    assert got["images"] == 64  # the whole synthetic test set, once
    assert got["top1"] == pytest.approx(summary["top1"], abs=1e-9)
    assert got["top5"] == pytest.approx(summary["top5"], abs=1e-9)
    assert got["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-5)
    assert got["checkpoint"] == str(run_dir / stage / "model.pt")
    assert got["params"] == summary["params"]  # the pruned model, not a dense rebuild
    # the text form says the same in one line
    code, out, _ = cli("eval", run_dir / stage, "--batch-size", "7")
    assert code == 0 and len(out.strip().splitlines()) == 1
    assert f"top-1 {summary['top1']:.2f}" in out and "on 64 images" in out


def test_eval_other_checkpoint(run_dir, cli):
    code, out, err = cli("eval", run_dir / "pretrain", "--checkpoint",
                         run_dir / "pretrain" / "last.pt", "--format", "json")
    assert code == 0, err
    got = json.loads(out)
    assert got["checkpoint"].endswith("last.pt") and got["images"] == 64


def test_eval_errors_are_one_line_exit_2(run_dir, cli, tmp_path):
    code, _, err = cli("eval", run_dir / "pretrian")
    assert code == 2 and "no such stage directory (did you mean 'pretrain'?)" in err
    assert len(err.strip().splitlines()) == 1
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    code, _, err = cli("eval", run_dir / "pretrain", "--checkpoint", bad)
    assert code == 2 and "broken.pt: not a torch checkpoint" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = cli("eval", run_dir / "prune", "--checkpoint", tmp_path / "none.pt")
    assert code == 2 and "checkpoint not found" in err
    code, _, err = cli("eval", run_dir / "prune", "--split", "val")
    assert code == 2 and "has only a test split" in err


def _folder(root: Path, classes: list[str], per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / c / f"{i}.png")
    return root


def test_eval_on_another_data_root(run_dir, cli, tmp_path):
    """An ImageFolder run evaluated on a moved copy of its data, and on a folder whose
    classes are not the run's (a one-line error)."""
    run = tmp_path / "folder_run"
    shutil.copytree(run_dir / "prune", run / "prune")
    plain = yaml.safe_load((run_dir / "config.yaml").read_text())
    plain["data"] = {"dataset": "imagefolder", "root": str(tmp_path / "gone"),
                     "image_size": 16}
    (run / "config.yaml").write_text(yaml.safe_dump(plain, sort_keys=False))
    data = _folder(tmp_path / "data", ["a", "b", "c", "d"])
    (data / "test").mkdir()
    shutil.copytree(data / "val" / "a", data / "test" / "a")
    code, out, err = cli("eval", run / "prune", "--data-root", data, "--format", "json")
    assert code == 0, err
    got = json.loads(out)
    assert got["images"] == 12 and got["split"] == "val"
    code, out, err = cli("eval", run / "prune", "--data-root", data, "--split", "test",
                         "--format", "json")
    assert code == 0, err
    assert json.loads(out)["images"] == 3  # the test/ folder: one class of 3 images
    other = _folder(tmp_path / "other", ["x", "y", "z"])
    code, _, err = cli("eval", run / "prune", "--data-root", other)
    assert code == 2 and "3 classes" in err and "has 4" in err
    code, _, err = cli("eval", run / "prune")
    assert code == 2 and "gone" in err and len(err.strip().splitlines()) == 1
