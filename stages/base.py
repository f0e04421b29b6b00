"""What every stage kind shares: its context, config fields, and helpers to read inputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from pipeline import checkpoint as ckpt
from pipeline.config import opt
from pipeline.distributed import DistInfo
from pipeline.errors import UsageError

if TYPE_CHECKING:
    from pipeline.runconfig import RunConfig

log = logging.getLogger("pipeline")

MODEL_FILE = "model.pt"  # what a completed stage hands downstream


class StageInputError(UsageError):
    """A stage's input is missing: says which stage to run first."""


@dataclass
class StageBase:
    type: str = opt(help="stage kind: pretrain | prune | finetune | scratch")
    from_: str | None = opt(None, key="from", help="the earlier stage whose model is the input")


@dataclass
class StageContext:
    """Where a stage runs and what it can read: one per stage execution."""

    run: RunConfig
    name: str
    run_dir: Path
    stage_dir: Path
    device: torch.device
    dist: DistInfo
    source: str
    show_progress: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def stage_spec(self, name: str):
        return self.run.stages[name]

    def input_path(self, name: str) -> Path:
        return self.run_dir / name / MODEL_FILE

    def load_input(self, name: str | None) -> tuple[nn.Module, dict]:
        """The model a completed upstream stage wrote, and its checkpoint dict."""
        if name is None:
            raise StageInputError(f"stage '{self.name}' has no input (set 'from')")
        path = self.input_path(name)
        if not path.is_file():
            raise StageInputError(
                f"stage '{self.name}' needs the output of stage '{name}' ({path}), which does "
                f"not exist: run `python -m pipeline run {self.source} --stage {name}` first")
        payload = ckpt.load(path)
        return ckpt.model_from_payload(payload, str(path)), payload

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.extra["input_size"])


def upstream_training_stage(run: RunConfig, name: str) -> str | None:
    """Nearest stage up the `from` chain of `name` that trains (pretrain/scratch/finetune)."""
    seen = set()
    cur = run.stages[name].from_
    while cur is not None and cur not in seen:
        seen.add(cur)
        spec = run.stages[cur]
        if spec.type in ("pretrain", "scratch", "finetune"):
            return cur
        cur = spec.from_
    return None


def upstream_of_type(run: RunConfig, name: str, kind: str) -> str | None:
    seen = set()
    cur = run.stages[name].from_
    while cur is not None and cur not in seen:
        seen.add(cur)
        if run.stages[cur].type == kind:
            return cur
        cur = run.stages[cur].from_
    return None
