"""The run config loaded from a file: the stage mapping (each spec by its kind's `Config`)
and the checks across stages. Its dataclasses (`RunConfig`) are in `pipeline.runspec`,
below the stages that read them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages import REGISTRY, stage_of

from .config import Loader, apply_overrides, read_yaml
from .errors import did_you_mean, show_value
from .models import check_arch
from .runspec import SEED_SUFFIX, LoggingConfig, RunConfig, seed_run_name
from .safefs import check_name


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
