"""Switching a module between train and eval mode for a moment, and back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.nn as nn


@contextlib.contextmanager
def set_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Put `model` (and its children) in train (True) or eval (False) mode inside the block;
    restore the mode it had afterwards, also when the block raises."""
    was_training = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was_training)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients for every parameter: a model that is only evaluated (a
    distillation teacher, an EMA copy). Returns `model`."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def eval_mode(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """`with eval_mode(model):` BatchNorm uses its running statistics, dropout is off."""
    return set_mode(model, False)


__all__ = ["set_mode", "eval_mode", "freeze"]
