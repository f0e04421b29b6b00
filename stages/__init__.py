"""Stage kinds: each module has a `Config` dataclass and `run(config, context) -> summary`.

The registry maps the `type` of a stage spec to its module.
"""

from __future__ import annotations

from . import finetune, pretrain, prune, scratch

REGISTRY = {"pretrain": pretrain, "prune": prune, "finetune": finetune, "scratch": scratch}

__all__ = ["REGISTRY"]
