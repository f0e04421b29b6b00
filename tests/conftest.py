"""Shared test helpers: a tiny config on generated data, the CLI called in-process, and the
real CIFAR-10 tree."""

from __future__ import annotations

import copy
import logging
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
        pytest.skip("the real CIFAR-10 (its unpack script, get_cifar10.sh) is absent")
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


def _reset_pipeline_loggers() -> None:
    for name in [n for n in logging.root.manager.loggerDict
                 if n == "pipeline" or n.startswith("pipeline.")]:
        lg = logging.getLogger(name)
        lg.setLevel(logging.NOTSET)
        lg.handlers.clear()
        lg.propagate = True


@pytest.fixture(autouse=True)
def _default_pipeline_logging():
    """An in-process run (in a test or a module fixture) configures the "pipeline" loggers
    (levels, handlers, propagation): each test starts and ends with the defaults."""
    _reset_pipeline_loggers()
    yield
    _reset_pipeline_loggers()


def tree_state(root: Path, inside: tuple[Path, ...] = ()) -> dict[str, tuple]:
    """Every entry under `root` (symlinks not followed) as relative path -> (kind, mode,
    content hash or link target), leaving out the folders in `inside` and what they hold."""
    import hashlib
    import os
    import stat

    skip = {os.path.abspath(p) for p in inside}
    state: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skip]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if path in skip:
                continue
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(st.st_mode):
                state[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                state[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                state[rel] = ("file", stat.S_IMODE(st.st_mode), digest)
    return state


@pytest.fixture
def outside_untouched():
    """Guard that nothing outside a run directory changes: `guard = outside_untouched(root,
    run_dir, ...)` records every file, folder and link under `root` except the named run
    directories; at the end of the test (or at `guard.check()`) the same must be found.

    Take the snapshot after writing the test's own inputs (configs, planted symlinks)."""

    class Guard:
        def __init__(self, root: Path, inside: tuple[Path, ...]):
            self.root, self.inside = Path(root), tuple(Path(p) for p in inside)
            self.before = tree_state(self.root, self.inside)

        def check(self) -> None:
            after = tree_state(self.root, self.inside)
            changed = sorted(k for k in set(self.before) | set(after)
                             if self.before.get(k) != after.get(k))
            assert not changed, f"changed outside the run directory under {self.root}: {changed}"

    guards: list[Guard] = []

    def watch(root: Path, *inside: Path) -> Guard:
        guard = Guard(root, inside)
        guards.append(guard)
        return guard

    yield watch
    for guard in guards:
        guard.check()
