"""The run config's dataclasses: the top-level keys of a config file (`RunConfig`) and its
`logging` section. They sit below the stages, which read them (`run.seed`, `run.data`,
`run.model`, `run.precision`, `run.stages`, ...); loading a file into them and the checks
across stages are `pipeline.runconfig`'s."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .config import opt
from .data import DataConfig
from .distributed import DistributedConfig
from .models import ModelConfig


@dataclass
class LoggingConfig:
    tensorboard: bool = opt(False, "also write TensorBoard scalars to <stage>/tb")
    progress: Literal["auto", "on", "off"] = opt(
        "auto", "per-epoch progress bar: auto = only on a terminal and not under CI")


@dataclass
class RunConfig:
    name: str = opt(help="run name: the run directory is <out_dir>/<name>")
    out_dir: str = opt("checkpoints", "folder that holds run directories")
    seed: int = opt(0, "seed of weights init, data order and augmentation", min=0)
    seeds: int | list[int] | None = opt(
        None, "run the whole chain once per seed: N (seeds `seed`, seed+1, ..., seed+N-1) or "
        "a list of seeds; the run with seed `seed` goes to <out_dir>/<name>, each other one "
        "to <out_dir>/<name>.seed<S>; compare aggregates runs that differ only in seed into "
        "mean ± std", min=0)
    device: str = opt("auto", "auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    precision: Literal["fp32", "bf16", "fp16", "auto"] = opt(
        "fp32", "default mixed precision of every training stage (fp16 needs CUDA; auto: "
        "decided at each training stage's start, see stages.<name>.precision)")
    data: DataConfig = opt(DataConfig, "data set")
    model: ModelConfig = opt(ModelConfig, "network")
    stages: dict[str, Any] = opt({}, "stage name -> stage spec, run in the order written")
    logging: LoggingConfig = opt(LoggingConfig, "what the run shows and logs")
    distributed: DistributedConfig = opt(DistributedConfig, "multi-process runs (torchrun)")
    deterministic: bool = opt(
        False, "deterministic CUDA kernels (cudnn.deterministic, "
        "torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG) and no cuDNN autotuning: "
        "bitwise-reproducible GPU runs and resumes, typically 10-30% slower; the CPU is "
        "deterministic without it. Not on CUDA with torchvision's VGG or AlexNet (adaptive "
        "pooling to 7x7 / 6x6 has no deterministic backward: a preflight error)")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def seed_list(self) -> list[int]:
        """The seeds the chain runs under: `seeds` expanded, or just `seed`."""
        if self.seeds is None:
            return [self.seed]
        if isinstance(self.seeds, int):
            return list(range(self.seed, self.seed + self.seeds))
        return list(self.seeds)

    def seed_runs(self) -> list[RunConfig]:
        """One single-seed config per seed (`seeds` cleared), each naming its own run
        directory: `name` for the seed `seed`, `name.seed<S>` for the others."""
        if self.seeds is None:
            return [self]
        return [dataclasses.replace(self, seed=s, seeds=None, name=seed_run_name(self, s))
                for s in self.seed_list()]


SEED_SUFFIX = ".seed"  # <name>.seed<S>: the run directory of seed S of a `seeds:` run


def seed_run_name(cfg: RunConfig, seed: int) -> str:
    """The run name of `seed` under `cfg.seeds`: the config's name for its own seed."""
    return cfg.name if seed == cfg.seed else f"{cfg.name}{SEED_SUFFIX}{seed}"


__all__ = ["SEED_SUFFIX", "LoggingConfig", "RunConfig", "seed_run_name"]
