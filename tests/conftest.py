"""Shared test helpers: a tiny config on generated data, the CLI called in-process, and the
real CIFAR-10 tree."""

from __future__ import annotations

import copy
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {"dataset": "synthetic",
             "synthetic": {"num_classes": 4, "train_size": 96, "test_size": 64, "image_size": 16}},
    "model": {"arch": "resnet8", "shortcut": "A"},
    "stages": {
        "pretrain": {"type": "pretrain", "epochs": 2, "batch_size": 32, "lr": 0.1,
                     "schedule": {"type": "multistep", "milestones": [1]}},
        "prune": {"type": "prune", "from": "pretrain", "method": "fpgm", "ratio": 0.4},
        "finetune": {"type": "finetune", "from": "prune", "epochs": 1, "batch_size": 32},
    },
}


def deep_update(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_update(out[k], v)
        else:
            out[k] = v
    return out


@pytest.fixture(autouse=True)
def _restore_logging():
    """Each test starts with the logging set-up it found: a run in this process
    (`runner.setup_logging`) stops the pipeline's loggers from propagating, which would
    hide their records from a later test's caplog."""
    import logging

    names = ("pipeline", "pipeline.data", "pipeline.pruning")
    saved = {n: (logging.getLogger(n).level, logging.getLogger(n).propagate,
                 list(logging.getLogger(n).handlers)) for n in names}
    yield
    for n, (level, propagate, handlers) in saved.items():
        logger = logging.getLogger(n)
        logger.setLevel(level)
        logger.propagate = propagate
        logger.handlers[:] = handlers


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models run as fast on one, and the two shared cores do not
    stall each other (use with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def real_cifar10() -> Path:
    """The real CIFAR-10 as an ImageFolder tree (train/, test/, 50,000 + 10,000 JPEGs),
    unpacked once into the temp folder and reused; skips the test when it is absent."""
    script = SHARED_DATA / "get_cifar10.sh"
    if not script.is_file():
        pytest.skip("../shared/data (the real CIFAR-10) is absent")
    dest = Path(tempfile.gettempdir()) / "pipeline-test-cifar10"
    subprocess.run(["bash", str(script), str(dest)], check=True, capture_output=True)
    return dest


@pytest.fixture
def tiny_config(tmp_path):
    """Write a tiny config (optionally updated) into tmp_path; returns its path.

    Usage: path = tiny_config({"stages": {"pretrain": {"epochs": 1}}})
    The run directory is tmp_path / "runs" / <name>.
    """

    def make(over: dict | None = None, name: str = "config.yaml") -> Path:
        cfg = deep_update(TINY, over or {})
        cfg.setdefault("out_dir", str(tmp_path / "runs"))
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    return make


@pytest.fixture
def cli(capsys):
    """Run `python -m pipeline ARGS` in-process: returns (exit code, stdout, stderr)."""
    from pipeline.cli import main

    def call(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return call


def python() -> str:
    return sys.executable
