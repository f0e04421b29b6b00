"""What every stage kind shares: the `Stage` protocol (and `Trains`, that of a kind that
trains), the spec fields every kind has, and the context a stage runs in."""

from __future__ import annotations

import abc
import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import torch
import torch.nn as nn

from pipeline import checkpoint as ckpt
from pipeline import distributed as D
from pipeline.config import ConfigError, Loader, opt
from pipeline.distributed import DistInfo
from pipeline.errors import UsageError
from pipeline.models import arch_label, model_from_payload
from pipeline.pruning.spec import effective_round_to
from pipeline.rundir import MODEL_FILE
from pipeline.runspec import RunConfig
from pipeline.schedules import ReplaySchedule, Schedule

log = logging.getLogger("pipeline")


class StageInputError(UsageError):
    """A stage's input is missing: says which stage to run first."""


@dataclass
class StageBase:
    type: str = opt(help="stage kind: a name in the registry (`stages.REGISTRY`); an unknown "
                    "one is an error that lists them")
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
    # trainer callbacks (`pipeline.trainer.HookBase`) for every training of the stage
    hooks: tuple = ()

    def input_path(self, name: str) -> Path:
        return self.run_dir / name / MODEL_FILE

    def load_input(self, name: str | None) -> tuple[nn.Module, dict]:
        """The model a completed upstream stage wrote, and its checkpoint dict."""
        if name is None:
            raise StageInputError(f"stage '{self.name}' has no input (set 'from')")
        path = self.input_path(name)
        # rank 0 looks (another node's view of a shared filesystem may be stale)
        if not D.decide(path.is_file):
            raise StageInputError(
                f"stage '{self.name}' needs the output of stage '{name}' ({path}), which does "
                f"not exist: run `python -m pipeline run {self.source} --stage {name}` first")
        with D.together():
            payload = ckpt.load(path)
            model = model_from_payload(payload, str(path))
        return model, payload

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.extra["input_size"])


@dataclass
class Preflight:
    """What the preflight knows while it walks a run's stages in order, before any work: the
    file, the data's class count and input size, and per checked stage its output model
    (on the CPU, randomly initialized: the widths are what matters)."""

    run: RunConfig
    source: str
    num_classes: int
    input_size: tuple[int, int, int]
    models: dict[str, nn.Module] = field(default_factory=dict)
    need_files: bool = True  # False (--dry-run): files not there yet are assumed to come
    notes: list[str] = field(default_factory=list)  # what was assumed, for the plan
    cuda: bool = False  # the run computes on CUDA (as far as known before it starts)

    def fail(self, key: str, message: str) -> NoReturn:
        raise ConfigError(f"{self.source}: {key}: {message}")

    def input_model(self, spec: Any, copied: bool = False) -> nn.Module:
        """The output model of the stage `spec` takes its input from (a copy with `copied`,
        for a stage that changes it)."""
        model = self.models[spec.from_]
        return copy.deepcopy(model) if copied else model

    @property
    def arch_label(self) -> str:
        """The architecture as papers write it (resnet56 -> ResNet-56, vgg16 -> VGG-16)."""
        return arch_label(self.run.model.arch)


def tensor_core_round_to(round_to: int | None, run: Any, cuda: bool) -> int | None:
    """A pruning spec's effective `round_to` in this run: unset, 8 on CUDA when the run or
    any of its stages computes in half precision (`pipeline.pruning.spec`)."""
    precisions = [run.precision, *(getattr(s, "precision", None) for s in run.stages.values())]
    return effective_round_to(round_to, cuda, precisions)


class Stage(abc.ABC):
    """A stage kind. A new kind is a subclass in its own module, decorated with
    `stages.registry.register`: the runner, the plan and the report ask it (its `Config`,
    whether it needs an input, trains or prunes, its checks and plan entry) and never
    switch on its name. A kind that trains subclasses `Trains`.

    Every method about one stage of a run takes `(spec, name, run, ...)` in this order:
    the stage's spec, its name in the config and the whole run config.

    The summary contract: `run` returns the stage's summary fields, which the runner
    writes to `<stage>/summary.json` (adding stage, type, from, status, wall_seconds,
    config_hash, finished and provenance; a key left out of top1, top5, params and macs
    is written as None, epochs as the spec's) and `compare` (`pipeline/report/rows.py`)
    shows. Every kind returns
      top1, top5    the test split's accuracy (%) of the stage's model, or None when the
                    stage does not evaluate it (a prune stage without `evaluate`, a
                    sensitivity sweep)
      macs          its model's MACs per image (conv + linear + attention), an int
      epochs        the epochs it trained, 0 when none
    a kind that trains (`trains`) also
      top1, top5    numbers
      params        its model's parameter count
      val_top1      the validation split's top-1 when `data.val_split` holds one out
    a kind that prunes (`prunes`) also
      params        its model's parameter count
      method        the criterion that chose the filters (the report's `method` column)
      ratio         the share of each pruned group's filters removed, None under a MAC
                    target (the report's `ratio` column)
      macs_before   its input's MACs (the MAC reduction when the run has no dense model)
    and a kind whose `report_rows` adds rows, the keys those read (an iterative stage's
    `rounds`). `tests/test_stage_contract.py` runs every registered kind and checks this.
    """

    kind: ClassVar[str]  # the `type:` of its specs
    Config: ClassVar[type]  # its spec dataclass (a StageBase subclass)
    needs_input: ClassVar[bool] = False  # takes the model of an earlier stage (`from`)
    trains: ClassVar[bool] = False  # runs the trainer (a `Trains` subclass)
    prunes: ClassVar[bool] = False  # writes a narrower model than its input

    def check(self, spec: Any, name: str, run: RunConfig, loader: Loader) -> None:
        """Validation across stages, after every spec has loaded (`loader.fail` to report)."""
        return None

    def plan_entry(self, spec: Any, name: str, run: RunConfig) -> dict:
        """What `--dry-run --format json` shows for this stage beyond name, type and from."""
        return {}

    def plan_lines(self, entry: dict) -> list[str]:
        """The text form of `plan_entry`'s result, indented under the stage's header."""
        return []

    def report_rows(self, summary: dict) -> list[dict]:
        """Extra `compare` rows of a completed stage, before its own (e.g. an iterative
        stage's rounds): dicts with `stage` (a suffix), `top1`, `top5`, `val_top1` (None
        without a validation split), `macs`, `params`, `ratio`, `epochs`; the plot joins
        them, in order, into a path."""
        return []

    def snapshots_wanted(self, spec: Any, name: str, run: RunConfig) -> dict[str, list[int]]:
        """Weight snapshots this stage needs from earlier training stages: {stage: [epoch]}
        (those stages save them, `save_epochs`)."""
        return {}

    def preflight(self, spec: Any, name: str, pf: Preflight) -> tuple[nn.Module | None, dict]:
        """Resolve the spec against the model it will get, before any stage runs (in
        `--dry-run` and at the start of `run`): the stage's output model (CPU, random
        weights, the widths it will have) and what the plan adds to this stage's entry.
        Raises ConfigError (`pf.fail`) naming the file and the key. The default: the
        output is the input model."""
        return (pf.input_model(spec) if self.needs_input else None), {}

    @abc.abstractmethod
    def run(self, spec: Any, ctx: StageContext) -> dict:
        """Do the stage's work in ctx.stage_dir, write model.pt, return the summary fields
        (see the summary contract above)."""


class Trains(Stage):
    """A stage kind that runs the trainer: it has epochs, a batch size and an lr schedule,
    which the plan shows and a finetune after it reads (its lowest lr)."""

    trains = True

    @abc.abstractmethod
    def base_lr(self, spec: Any, name: str, run: RunConfig) -> float:
        """The peak lr the stage resolves to."""

    @abc.abstractmethod
    def schedule(self, spec: Any, name: str, run: RunConfig) -> Schedule | ReplaySchedule:
        """The stage's lr schedule as configured."""
