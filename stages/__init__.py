"""Stage kinds: each module defines one `Stage` subclass (its `Config` dataclass and its
`run`), registered under its `type:` name. Importing this package registers them all."""

from __future__ import annotations

# each module registers its kind; this order is the order kinds are documented in
from . import pretrain, sensitivity, prune, finetune, iterative, rewind, scratch, quantize  # noqa: F401  # isort: skip
from .base import Preflight, Stage, StageContext, StageInputError
from .registry import REGISTRY, stage_of, upstream_training_stage

__all__ = ["Preflight", "REGISTRY", "Stage", "StageContext", "StageInputError", "stage_of",
           "upstream_training_stage"]
