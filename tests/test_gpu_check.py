"""benchmarks/gpu_check.py on a machine without CUDA: it names what it would run and
exits 0 saying that nothing ran (the path CI takes)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT


def test_gpu_check_without_cuda_prints_its_plan_and_exits_0():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if "gpu_check on " in done.stdout:
        pytest.skip("a CUDA device is visible: the check would really run")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "CUDA is not available" in out and "nothing was run" in out
    for what in ("fp16 with GradScaler", "bf16", "channels_last", "torch.compile",
                 "deterministic: true", "NCCL", "data path on the device",
                 "ResNet-56 batch 128 fp16", "ResNet-50 batch 64", "latency vs MACs"):
        assert what in out, what
    assert "trainer_vs_bare >= 0.97" in out and "pruned_latency_vs_macs >= 0.7" in out
