"""The run config: top-level keys, the stage mapping, and cross-stage validation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stages import REGISTRY, stage_of

from .config import Loader, apply_overrides, opt, read_yaml
from .data import DataConfig
from .distributed import DistributedConfig
from .errors import did_you_mean, show_value
from .models import ModelConfig, check_arch
from .safefs import check_name


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


def parse(data: dict, source: str) -> RunConfig:
    """Plain YAML data -> validated RunConfig (raises ConfigError)."""
    loader = Loader(source)
    raw_stages = data.get("stages")
    body = {k: v for k, v in data.items() if k != "stages"}
    if "name" not in body:
        loader.fail("name", "missing required key (the run's name; every other top-level "
                    "key has a default)")
    cfg: RunConfig = loader.load(RunConfig, body, "")
    problem = check_name(cfg.name)
    if problem:
        loader.fail("name", f"the run directory's name {problem}")
    _check_seeds(cfg, loader)
    if raw_stages is None or raw_stages == {}:
        loader.fail("stages", "at least one stage is required")
    if not isinstance(raw_stages, dict):
        loader.fail("stages", f"expected a mapping of stage name -> spec, got "
                    f"{show_value(raw_stages)}")
    stages: dict[str, Any] = {}
    for name, spec in raw_stages.items():
        _check_stage_name(name, stages, loader)
        key = f"stages.{name}"
        if not isinstance(spec, dict):
            loader.fail(key, f"expected a mapping with a 'type', got {show_value(spec)}")
        kind = spec.get("type")
        if kind is None:
            loader.fail(f"{key}.type", f"missing; one of {sorted(REGISTRY)}")
        if not isinstance(kind, str):
            loader.fail(f"{key}.type", f"expected a stage type name, got {show_value(kind)}; "
                        f"one of {sorted(REGISTRY)}")
        if kind not in REGISTRY:
            loader.fail(f"{key}.type", f"unknown stage type {kind!r}"
                        f"{did_you_mean(kind, REGISTRY)}; known: {sorted(REGISTRY)}")
        stages[str(name)] = loader.load(REGISTRY[kind].Config, spec, key)
    cfg.stages = stages
    _check_links(cfg, loader)
    problem = check_arch(cfg.model.arch)
    if problem:
        loader.fail("model.arch", problem)
    for name, spec in stages.items():
        stage_of(spec).check(spec, name, cfg, loader)
    return cfg


# what a run directory holds besides its stages' folders (and <stage>.restart / .old)
RESERVED = {"config.yaml", "provenance.json", "provenance.log.jsonl", "log.txt", "run.lock",
            "restart.json", "report"}


def _check_stage_name(name: Any, earlier: dict[str, Any], loader: Loader) -> None:
    """A stage's name is the name of its folder in the run directory: a plain name
    (safefs.check_name) that is none of the run directory's own files, no `<stage>.restart`
    or `<stage>.old` folder, and not another stage's name in other letter case."""
    problem = check_name(name)
    if problem:
        loader.fail("stages", f"stage name {problem}")
    folded = {n.casefold(): n for n in earlier}
    if name.casefold() in {r.casefold() for r in RESERVED}:
        problem = "is a file of the run directory"
    elif name.endswith((".restart", ".old")):
        problem = "ends like the folder of a restarted stage (.restart, .old)"
    elif name.casefold() in folded:
        problem = f"differs from stage {folded[name.casefold()]!r} in letter case only"
    if problem:
        loader.fail(f"stages.{name}", f"stage name {name!r} {problem}; choose another name")


def _check_seeds(cfg: RunConfig, loader: Loader) -> None:
    if isinstance(cfg.seeds, int) and cfg.seeds < 1:
        loader.fail("seeds", f"expected a number of seeds >= 1 or a list of seeds, got "
                    f"{cfg.seeds}")
    if isinstance(cfg.seeds, list):
        if not cfg.seeds:
            loader.fail("seeds", "expected at least one seed, got []")
        repeated = sorted({x for x in cfg.seeds if cfg.seeds.count(x) > 1})
        if repeated:
            loader.fail("seeds", f"seed(s) {repeated} given more than once: each seed is one "
                        "run directory")
    for seed in cfg.seed_list():
        problem = check_name(seed_run_name(cfg, seed))
        if problem:
            loader.fail("seeds", f"the run directory of seed {seed}: its name {problem}")


def _check_links(cfg: RunConfig, loader: Loader) -> None:
    names = list(cfg.stages)
    for i, (name, spec) in enumerate(cfg.stages.items()):
        earlier = names[:i]
        distill = getattr(spec, "distill", None)
        if distill is not None and distill.from_ not in earlier:
            loader.fail(f"stages.{name}.distill.from", f"{distill.from_!r} names no earlier "
                        f"stage{did_you_mean(distill.from_, earlier)}; the teacher must come "
                        f"from one of {earlier}")
        if spec.from_ is None:
            if stage_of(spec).needs_input:
                loader.fail(f"stages.{name}.from",
                            f"a {spec.type} stage needs an input stage; earlier stages: {earlier}")
            continue
        if spec.from_ not in earlier:
            hint = did_you_mean(spec.from_, earlier)
            what = "a later stage" if spec.from_ in names else "no stage"
            loader.fail(f"stages.{name}.from", f"{spec.from_!r} names {what}{hint}; "
                        f"a stage can only take its input from an earlier one: {earlier}")


def load_config(path: str | Path, overrides: list[str] | None = None) -> tuple[RunConfig, dict]:
    """Read, merge `base:`, apply --set overrides, validate. Returns (config, plain data)."""
    path = Path(path)
    data = read_yaml(path)
    data = apply_overrides(data, list(overrides or []), str(path))
    return parse(data, str(path)), data


__all__ = ["RunConfig", "LoggingConfig", "SEED_SUFFIX", "load_config", "parse", "seed_run_name"]
