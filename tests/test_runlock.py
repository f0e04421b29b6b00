"""One run at a time per run directory: a second `run` refuses at once with the holder's
PID and host; a lock left by a dead process is taken over; readers take no lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from conftest import ROOT
from pipeline.runlock import LOCK_FILE, RunLock


def cli_subprocess(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_second_run_refuses_while_the_first_is_alive(tiny_config, tmp_path, cli):
    cfg = tiny_config({"stages": {"pretrain": {"epochs": 1}}})
    run_dir = tmp_path / "runs" / "tiny"
    with RunLock(run_dir):  # a live holder: this process
        t0 = time.monotonic()
        second = cli_subprocess("run", str(cfg), "--progress", "off")
        assert second.returncode == 2, second.stderr
        (line,) = second.stderr.strip().splitlines()
        assert f"PID {os.getpid()} on {socket.gethostname()}" in line
        assert str(run_dir) in line and "Traceback" not in line
        assert time.monotonic() - t0 < 60  # at once: no training started
        assert not (run_dir / "pretrain").exists() and not (run_dir / "log.txt").exists()
        # readers take no lock
        code, out, err = cli("run", cfg, "--dry-run")
        assert code == 0, err
    assert not (run_dir / LOCK_FILE).exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tiny_config, tmp_path, cli):
    cfg = tiny_config({"stages": {"pretrain": {"epochs": 1}, "finetune": {"epochs": 1}}})
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": "gone"}))
    code, _, err = cli("run", cfg, "--progress", "off")
    assert code == 0, err
    assert f"stale lock of PID {int(dead.stdout)} on gone" in (run_dir / "log.txt").read_text()
    assert not (run_dir / LOCK_FILE).exists()  # released on exit
    # compare reads a run directory without the lock, even while one holds it
    with RunLock(run_dir):
        code, out, err = cli("compare", str(run_dir))
        assert code == 0, err
