"""Provenance of a run and of each stage: what produced these numbers, and are they stale?

Run level (`<run_dir>/provenance.json`, rewritten by every invocation, and one line per
invocation appended to `provenance.log.jsonl`): the command line, the git commit of the
code and whether the tree had uncommitted changes, the versions of python, torch,
torchvision and torch-pruning, the device, the world size, the seed and the hash of the
resolved config.

Stage level (fields merged into each completed stage's `summary.json` by the runner):
`code` (commit, dirty flag and `code_id`, a hash of the code that computes results,
uncommitted changes included), `model_sha256` (the stage's model.pt) and `input` (the
upstream stage's `finished` time and model hash as this stage consumed them). From these,
`stale_reasons` tells whether a completed stage still matches the code and its upstream:
a stage whose code changed, or whose input stage was re-run after it, is reported instead
of being silently mixed with fresh results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy
import torch
import torchvision

from .config import to_plain
from .rundir import read_json, read_summary, write_json
from .safefs import open_append

log = logging.getLogger("pipeline")

ROOT = Path(__file__).resolve().parent.parent
CODE_PATHS = ("pipeline", "stages")  # the code that computes results...
NOT_RESULTS = ("pipeline/report", "pipeline/reference.py", "pipeline/provenance.py")
# ...except the files (and folders) that only read or describe results


def is_result_code(path: str) -> bool:
    """Whether a repository path counts for `code_id`: under CODE_PATHS, not in NOT_RESULTS."""
    def under(p: str) -> bool:
        return path == p or path.startswith(p + "/")

    return any(under(p) for p in CODE_PATHS) and not any(under(p) for p in NOT_RESULTS)


def _git(args: list[str], cwd: Path = ROOT) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_version() -> dict[str, Any]:
    """The git commit, whether the tree has uncommitted changes (tracked files), and
    `code_id`: a hash of the committed and uncommitted state of the code that computes
    results (pipeline/ and stages/ without the reporting modules), so a commit that only
    touches docs, configs or tests leaves it unchanged. All None outside a git checkout."""
    commit = _git(["rev-parse", "HEAD"])
    status = _git(["status", "--porcelain", "--untracked-files=no"])
    tree = _git(["ls-tree", "-r", "HEAD", "--", *CODE_PATHS])
    diff = _git(["diff", "HEAD", "--", *CODE_PATHS,
                 *(f":(exclude){p}" for p in NOT_RESULTS)])
    code_id = None
    if tree is not None:
        kept = [line for line in tree.splitlines() if is_result_code(line.split("\t")[-1])]
        code_id = _sha(("\n".join(kept) + "\n" + (diff or "")).encode())
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status),
            "code_id": code_id}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@lru_cache(maxsize=1)
def versions() -> dict[str, str | None]:
    """Versions of the interpreter and the libraries that shape results."""
    try:
        tp_version: str | None = version("torch-pruning")
    except Exception:  # not installed as a distribution
        tp_version = None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "torch_pruning": tp_version,
            "numpy": numpy.__version__, "cuda": torch.version.cuda,
            "cudnn": str(torch.backends.cudnn.version()) if torch.cuda.is_available() else None,
            "platform": platform.platform()}


def config_hash(plain: dict) -> str:
    """Hash of a resolved config (plain data, YAML key names)."""
    return _sha(json.dumps(plain, sort_keys=True, default=str).encode())


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed: `python -m pipeline ...` when run as a module."""
    argv = list(sys.argv if argv is None else argv)
    head = Path(argv[0]).name if argv else ""
    if head == "__main__.py" and Path(argv[0]).parent.name == "pipeline":
        argv = ["python", "-m", "pipeline", *argv[1:]]
    return shlex.join(argv)


def reproduce_command(config_path: str, overrides: list[str]) -> str:
    """The `run` command that resolves to the same config."""
    parts = ["python", "-m", "pipeline", "run", str(config_path)]
    for o in overrides:
        parts += ["--set", o]
    return shlex.join(parts)


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU as a published figure should name it: the model name, its family/model where
    the name alone is vague (a VM's "AMD EPYC"), and whether it has AMX and AVX-512 BF16
    (what decides bf16 speed on a CPU). Read from /proc/cpuinfo where there is one."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:
                break  # the first processor's block is enough
            continue
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    if flags:
        name += ", AMX" if "amx_bf16" in flags else ", no AMX"
        name += ", AVX-512 BF16" if "avx512_bf16" in flags else (
            ", AVX-512" if "avx512f" in flags else ", no AVX-512")
    return name


def device_name(device) -> str:
    if getattr(device, "type", None) == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def record_provenance(run_dir: Path, cfg, config_path: str, overrides: list[str],
                      device) -> dict:
    """Write <run_dir>/provenance.json and append it to provenance.log.jsonl."""
    info = {"command": command_line(), "reproduce": reproduce_command(config_path, overrides),
            "config_file": str(config_path), "overrides": list(overrides),
            **code_version(), **versions(), "device": str(device),
            "device_name": device_name(device),
            "world_size": int(os.environ.get("WORLD_SIZE", 1)), "seed": cfg.seed,
            "config_hash": config_hash(to_plain(cfg)), "host": platform.node()}
    before = read_json(Path(run_dir) / "provenance.json") or {}
    if before.get("precision_decisions"):  # stages decided by an earlier invocation
        info["precision_decisions"] = before["precision_decisions"]
    write_json(Path(run_dir) / "provenance.json", info)
    with open_append(Path(run_dir) / "provenance.log.jsonl") as f:
        f.write(json.dumps(info) + "\n")
    return info


def record_stage_precision(run_dir: Path, stage: str, decision: dict) -> None:
    """Add what `precision: auto` chose for `stage` to <run_dir>/provenance.json (under
    `precision_decisions`; written again for a resumed stage, which keeps its choice)."""
    path = Path(run_dir) / "provenance.json"
    info = read_json(path) or {}
    info.setdefault("precision_decisions", {})[stage] = decision
    write_json(path, info)


def read_provenance(run_dir: Path) -> dict | None:
    return read_json(Path(run_dir) / "provenance.json")


# --------------------------------------------------------------------------- stages


def file_sha256(path: Path) -> str | None:
    """Hash of a file's bytes (streamed), or None when it does not exist."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()[:16]


def input_record(run_dir: Path, upstream: str | None) -> dict | None:
    """What a stage consumes from its input stage: its name, `finished` and model hash."""
    if upstream is None:
        return None
    s = read_summary(Path(run_dir) / upstream) or {}
    return {"stage": upstream, "finished": s.get("finished"),
            "model_sha256": s.get("model_sha256")}


def stage_record(stage_dir: Path, run_dir: Path, upstream: str | None,
                 consumed: dict | None = None) -> dict:
    """Fields the runner adds to a completed stage's summary (see the module docstring).
    `consumed` is the input record taken when the stage started."""
    return {"code": code_version(), "model_sha256": file_sha256(Path(stage_dir) / "model.pt"),
            "input": consumed if consumed is not None else input_record(run_dir, upstream)}


def stale_reasons(summary: dict, run_dir: Path, code: dict | None = None) -> list[str]:
    """Why a completed stage's results may no longer match the code or its input stage
    (empty when they match, or when the summary predates these records)."""
    reasons = []
    then = summary.get("code") or {}
    now = code if code is not None else code_version()
    if then.get("code_id") and now.get("code_id") and then["code_id"] != now["code_id"]:
        was, now_at = (then.get("git_commit") or "?")[:10], (now.get("git_commit") or "?")[:10]
        dirty = " with uncommitted changes" if then.get("git_dirty") else ""
        reasons.append(f"computed by other code (commit {was}{dirty}; now {now_at}"
                       f"{' with uncommitted changes' if now.get('git_dirty') else ''})")
    used = summary.get("input") or {}
    if used.get("stage"):
        up = read_summary(Path(run_dir) / used["stage"]) or {}
        if up.get("status") != "completed":
            reasons.append(f"its input stage '{used['stage']}' is no longer completed")
        elif used.get("model_sha256") and up.get("model_sha256"):
            if used["model_sha256"] != up["model_sha256"]:
                reasons.append(f"its input stage '{used['stage']}' was re-run after it "
                               f"(finished {up.get('finished')}, this stage used the one "
                               f"finished {used.get('finished')})")
        elif used.get("finished") and up.get("finished") != used["finished"]:
            reasons.append(f"its input stage '{used['stage']}' was re-run after it "
                           f"(finished {up.get('finished')}, this stage used the one finished "
                           f"{used.get('finished')})")
    return reasons


__all__ = ["record_provenance", "record_stage_precision", "read_provenance", "code_version",
           "is_result_code",
           "versions", "config_hash", "command_line", "stage_record", "input_record",
           "stale_reasons", "file_sha256"]
