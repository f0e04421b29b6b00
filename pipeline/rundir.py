"""The run directory, as every layer reads and writes it.

  <out_dir>/<name>/config.yaml          the resolved config
  <out_dir>/<name>/provenance.json      how the run was started (provenance.py)
  <out_dir>/<name>/log.txt              the run's log (rank 0)
  <out_dir>/<name>/<stage>/             model.pt (what the stage hands downstream),
                                        checkpoints, metrics.csv and summary.json

A stage is complete when its summary.json says `"status": "completed"`.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from . import yamlload
from .atomic import atomic_write_text

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.pt"  # what a completed stage hands downstream
SUMMARY_FILE = "summary.json"


def read_json(path: Path) -> dict | None:
    """A JSON object from `path`, or None when it is absent, unreadable or not an object."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def write_json(path: Path, obj: dict) -> None:
    """Write `obj` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_summary(stage_dir: Path) -> dict | None:
    """A stage's summary.json, or None when it has none (yet)."""
    return read_json(Path(stage_dir) / SUMMARY_FILE)


def is_complete(stage_dir: Path) -> bool:
    s = read_summary(stage_dir)
    return bool(s) and s.get("status") == "completed"


def read_config(run_dir: Path) -> dict:
    """The resolved config a run wrote, as plain data ({} when absent or unreadable)."""
    try:
        cfg = yamlload.load((Path(run_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8
        return {}
    return cfg if isinstance(cfg, dict) else {}


def is_run_dir(path: Path) -> bool:
    """A folder written by `run`: its config.yaml or a stage summary."""
    path = Path(path)
    return path.is_dir() and ((path / CONFIG_FILE).is_file() or
                              any(path.glob(f"*/{SUMMARY_FILE}")))


def stage_specs(run_dir: Path) -> dict[str, dict]:
    """Stage name -> its resolved spec, in config order (else the stages with a summary)."""
    stages = read_config(run_dir).get("stages")
    if isinstance(stages, dict) and stages:
        return {str(k): (v if isinstance(v, dict) else {}) for k, v in stages.items()}
    found = {}
    for p in sorted(Path(run_dir).glob(f"*/{SUMMARY_FILE}")):
        s = read_summary(p.parent) or {}
        found[p.parent.name] = {"type": s.get("type"), "from": s.get("from")}
    return found


def walk_from(start: str | None, parent_of) -> list[str]:
    """The names up a `from` chain starting at `start` (included), nearest first; stops at a
    name seen before. `parent_of(name)` gives a stage's `from`, or None."""
    out: list[str] = []
    cur = start
    while cur is not None and cur not in out:
        out.append(cur)
        cur = parent_of(cur)
    return out


def chain(specs: dict[str, dict], name: str) -> list[str]:
    """`name` and the stages up its `from` chain in plain specs, nearest first."""
    def parent(n: str) -> str | None:
        up = specs[n].get("from")
        return up if up in specs else None

    return walk_from(name if name in specs else None, parent)


__all__ = ["CONFIG_FILE", "MODEL_FILE", "SUMMARY_FILE", "read_json", "write_json",
           "read_summary", "is_complete", "read_config", "is_run_dir", "stage_specs",
           "walk_from", "chain"]
