"""Provenance of a run: command line, code version, library versions, device, config hash."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from pathlib import Path

import yaml


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_version() -> dict:
    root = Path(__file__).resolve().parent.parent
    commit = _git(["rev-parse", "HEAD"], root)
    status = _git(["status", "--porcelain", "--untracked-files=no"], root)
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def versions() -> dict:
    import torch
    import torchvision

    try:
        import torch_pruning

        tp_version = getattr(torch_pruning, "__version__", None)
        if tp_version is None:
            from importlib.metadata import version

            tp_version = version("torch-pruning")
    except Exception:
        tp_version = None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "torch_pruning": tp_version,
            "platform": platform.platform()}


def config_hash(plain: dict) -> str:
    text = json.dumps(plain, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record_provenance(run_dir: Path, cfg, config_path: str, overrides: list[str], device) -> dict:
    """Write <run_dir>/provenance.json (and append to provenance.log.jsonl)."""
    from .config import to_plain

    import torch

    plain = to_plain(cfg)
    info = {"command": [Path(sys.argv[0]).name, *sys.argv[1:]], "config_file": str(config_path),
            "overrides": list(overrides), **code_version(), **versions(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "seed": cfg.seed, "config_hash": config_hash(plain)}
    path = run_dir / "provenance.json"
    tmp = path.with_name(".provenance.json.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(path)
    with open(run_dir / "provenance.log.jsonl", "a") as f:
        f.write(json.dumps(info) + "\n")
    return info


__all__ = ["record_provenance", "code_version", "versions", "config_hash", "yaml"]
