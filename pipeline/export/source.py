"""What an export reads from a run directory: the stage's network, the input it expects
(size, normalization), its provenance, and a few of the run's test images."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .. import checkpoint
from ..config import Loader
from ..data import DataConfig, build_data, check_available, input_size, normalization
from ..errors import PipelineError, UsageError, did_you_mean, first_line
from ..models import check_forward, model_from_payload
from ..provenance import file_sha256, read_provenance
from ..rundir import CONFIG_FILE, MODEL_FILE, read_config, read_summary, stage_specs


class ExportUsageError(UsageError):
    """A stage that cannot be exported as asked (missing, unreadable, bad options)."""


@dataclass
class ExportSource:
    """A stage's network (eval mode, CPU) and what its input looks like."""

    model: nn.Module
    arch: dict
    stage_dir: Path
    data: DataConfig
    seed: int
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def run_dir(self) -> Path:
        return self.stage_dir.parent

    def provenance(self) -> dict:
        """Model name, stage, config hashes, git commit and the model.pt hash."""
        summary = read_summary(self.stage_dir) or {}
        run = read_provenance(self.run_dir) or {}
        code = summary.get("code") or {}
        return {"model": self.arch.get("name"), "arch": self.arch, "run": self.run_dir.name,
                "stage": self.stage_dir.name, "stage_type": summary.get("type"),
                "config_hash": summary.get("config_hash"),
                "run_config_hash": run.get("config_hash"),
                "git_commit": code.get("git_commit", run.get("git_commit")),
                "git_dirty": code.get("git_dirty", run.get("git_dirty")),
                "model_sha256": file_sha256(self.stage_dir / MODEL_FILE)}


def _stage_dir(path: Path) -> Path:
    if path.is_dir():
        return path
    run_dir = path.parent
    names = list(stage_specs(run_dir)) if run_dir.is_dir() else []
    hint = did_you_mean(path.name, names)
    raise ExportUsageError(f"{path}: no such stage directory{hint}")


def load_source(stage_dir: str | Path, data_root: str | None = None) -> ExportSource:
    """Read RUN_DIR/STAGE: its model.pt (weights only, dense or pruned) and the run's data
    config. `data_root` replaces the config's data.root (data moved since the run)."""
    stage_dir = Path(stage_dir)
    if stage_dir.name in ("", ".."):  # `export .`: the name and run dir of the absolute path
        stage_dir = Path(os.path.abspath(stage_dir))
    stage_dir = _stage_dir(stage_dir)
    model_path = stage_dir / MODEL_FILE
    if not model_path.is_file():
        raise ExportUsageError(f"{stage_dir}: no {MODEL_FILE} (the stage has not completed)")
    config_path = stage_dir.parent / CONFIG_FILE
    plain = read_config(stage_dir.parent)
    if not plain:
        raise ExportUsageError(f"{config_path}: missing or unreadable; the run's config gives "
                               "the input size and normalization of the export")
    try:
        payload = checkpoint.load(model_path)
        model = model_from_payload(payload, str(model_path))
    except checkpoint.CheckpointError as err:  # a file the user pointed at: usage, exit 2
        raise ExportUsageError(first_line(err)) from None
    data = Loader(str(config_path)).load(DataConfig, plain.get("data") or {}, "data")
    if data_root is not None:
        data = dataclasses.replace(data, root=str(data_root))
    try:
        check_forward(model, tuple(input_size(data)), str(model_path))
    except checkpoint.CheckpointError as err:
        raise ExportUsageError(first_line(err)) from None
    mean, std = normalization(data)
    return ExportSource(model=model.eval(), arch=dict(payload["arch"]), stage_dir=stage_dir,
                        data=data, seed=int(plain.get("seed") or 0),
                        input_size=tuple(input_size(data)), mean=mean, std=std)


def eval_images(source: ExportSource, limit: int = 256) -> tuple[torch.Tensor | None, str]:
    """Up to `limit` normalized test images (a fixed class-balanced subset, as the run's
    evaluation sees them), or None and the reason when the data is not available."""
    cfg = dataclasses.replace(source.data, num_workers=0, persistent_workers=False,
                              test_samples=min(source.data.test_samples or limit, limit))
    try:
        check_available(cfg)
        bundle = build_data(cfg, limit, limit, source.seed, torch.device("cpu"))
        x, _ = next(iter(bundle.test.iterate()))
    except (PipelineError, OSError, StopIteration) as err:
        return None, f"test data not available ({first_line(err)})"
    return x[:limit], f"{min(len(x), limit)} test images of {cfg.dataset}"


__all__ = ["ExportSource", "ExportUsageError", "load_source", "eval_images"]
