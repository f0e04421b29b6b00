"""The registry of stage kinds: `type:` name -> `Stage`. Each kind registers itself with
`@register`; `stages/__init__.py` imports the kind modules so that all are registered."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.runspec import RunConfig

from .base import Stage, Trains

REGISTRY: dict[str, Stage] = {}


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make `cls` the stage of specs with `type: cls.kind` (a kind that
    trains must be a `Trains`: it says its lr schedule)."""
    if cls.trains and not issubclass(cls, Trains):
        raise TypeError(f"stage kind {cls.kind!r} trains but is no Trains subclass")
    if cls.kind in REGISTRY:
        raise ValueError(f"stage kind {cls.kind!r} registered twice")
    REGISTRY[cls.kind] = cls()
    return cls


def stage_of(spec: Any) -> Stage:
    """The stage kind of a loaded spec."""
    return REGISTRY[spec.type]


def upstream(run: RunConfig, name: str,
             wanted: Callable[[Stage, Any], bool]) -> str | None:
    """The nearest stage up the `from` chain of `name` (itself excluded) for which
    `wanted(stage, spec)` is true, or None."""
    seen: set[str] = set()
    cur = run.stages[name].from_
    while cur is not None and cur not in seen:
        seen.add(cur)
        spec = run.stages[cur]
        if wanted(stage_of(spec), spec):
            return cur
        cur = spec.from_
    return None


def upstream_training_stage(run: RunConfig, name: str) -> str | None:
    """Nearest stage up the `from` chain of `name` that trains."""
    return upstream(run, name, lambda stage, spec: stage.trains)


__all__ = ["REGISTRY", "register", "stage_of", "upstream", "upstream_training_stage"]
