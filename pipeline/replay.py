"""Evaluating many variants of one model that differ from it only inside one submodule.

A sensitivity sweep prunes one group at a time and evaluates each result: every layer
before the pruned block computes exactly what the dense model computes. `PrefixReplay`
records, once per block, the dense model's input to that block for every evaluation batch,
and evaluates a variant by replaying those inputs into the block (a forward pre-hook)
while the layers before it run on a tiny stand-in image; on ResNet-56 this skips half the
network on average. The results are the plain evaluation's (the block and everything
after it see the same tensors), and each block is checked before it is used: on the first
batch the replayed dense model must give the logits of the plain one, the block must be
called once per forward, and nothing computed before it may reach the output another way
(a skip connection around the block would carry the stand-in's values and fail the
check). Where a check fails, the activations would exceed the memory budget, or the
model's changes are not inside one submodule, the caller evaluates the plain way.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from . import distributed as D
from .modes import eval_mode
from .trainer import autocast_context, evaluate

log = logging.getLogger("pipeline")

STAND_IN_SIDES = (1, 2, 4, 8, 16)  # stand-in image sizes tried, smallest first


def _state_of(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in itertools.chain(m.named_parameters(recurse=False),
                                             m.named_buffers(recurse=False)) if v is not None}


def changed_modules(dense: nn.Module, variant: nn.Module) -> list[str]:
    """Names of the modules whose own parameters or buffers differ (shape or values) between
    `dense` and `variant`, or that exist in only one of them."""
    ours = dict(dense.named_modules())
    out = []
    seen = set()
    for name, mv in variant.named_modules():
        seen.add(name)
        md = ours.get(name)
        if md is None or type(md) is not type(mv):
            out.append(name)
            continue
        a, b = _state_of(md), _state_of(mv)
        if a.keys() != b.keys() or any(a[k].shape != b[k].shape or not torch.equal(a[k], b[k])
                                       for k in a):
            out.append(name)
    out += [n for n in ours if n not in seen]
    return out


def enclosing(names: Iterable[str]) -> list[str]:
    """The submodules that contain every name, deepest first (the root, "", excluded)."""
    parts = [n.split(".") for n in names]
    if not parts or any(p == [""] for p in parts):
        return []
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return [".".join(common[:i]) for i in range(len(common), 0, -1)]


class PrefixReplay:
    """Replays the dense model's input to one submodule (see the module docstring).

    `loader` yields the evaluation batches (the same ones, in the same order, each time it
    is iterated); `budget_bytes` caps the recorded activations of one submodule. `local`:
    the loader is this process's whole split and it evaluates alone (a sweep whose groups
    are shared out among the ranks): no collective."""

    def __init__(self, dense: nn.Module, loader, device: torch.device, precision: str,
                 budget_bytes: float, prepare: Callable[[nn.Module], nn.Module] = lambda m: m,
                 local: bool = False):
        self.dense, self.loader, self.device = dense, loader, device
        self.precision, self.budget = precision, budget_bytes
        self.prepare = prepare  # moves a model to the device / memory format evaluated in
        self.name: str | None = None  # the submodule whose inputs are held
        self.inputs: list[torch.Tensor] = []
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []  # stand-in, labels
        self.refused: set[str] = set()
        self.local = local  # this process evaluates alone: no rank to agree with

    # ----------------------------------------------------------------- recording

    def _record(self, name: str) -> bool:
        """Record `name`'s inputs over the loader and check the replay on the first batch."""
        self.name, self.inputs, self.batches = None, [], []
        model = self.prepare(copy.deepcopy(self.dense))
        target = model.get_submodule(name)
        held: list[torch.Tensor] = []
        shapes: list[tuple[torch.Tensor, torch.Tensor]] = []  # (a 1x1 stand-in, labels)
        first: list[tuple[torch.Tensor, torch.Tensor]] = []
        size = [0]

        def keep(_m, args, kwargs):
            if kwargs or len(args) != 1 or not torch.is_tensor(args[0]):
                raise _NotReplayable("takes other than one tensor")
            x = args[0]
            size[0] += x.numel() * x.element_size()
            if size[0] > self.budget:
                raise _NotReplayable("over the memory budget")
            held.append(x.detach().clone())

        handle = target.register_forward_pre_hook(keep, with_kwargs=True)
        try:
            with torch.no_grad(), eval_mode(model):
                for x, y in self.loader:
                    with autocast_context(self.device, self.precision):
                        logits = model(x)
                    if not first:
                        first.append((x, logits.float()))
                    shapes.append((_stand_in(x, 1), y))
        except _NotReplayable as e:
            log.debug("replay: %s %s", name, e)
            return False
        finally:
            handle.remove()
        if not first or len(held) != len(shapes):
            return False  # no batch, or called more (or less) than once per forward
        self.inputs = held
        x, expected = first[0]
        side = self._stand_in_side(model, target, x, expected)
        if side is None:
            self.inputs = []
            return False
        self.batches = [(_stand_in(x, side), y) for x, y in shapes]
        self.name = name
        return True

    def _stand_in_side(self, model, target, x, expected) -> int | None:
        """The smallest stand-in image side with which the replayed dense model gives the
        plain logits on the first batch (None: none does)."""
        for side in [s for s in STAND_IN_SIDES if s < min(x.shape[2:], default=0)]:
            try:
                got = self._forward(model, target, _stand_in(x, side), [self.inputs[0]])
            except (RuntimeError, ValueError, IndexError, _NotReplayable):
                continue
            if got is not None and got.shape == expected.shape and torch.allclose(
                    got, expected, rtol=1e-4, atol=1e-5):
                return side
        return None

    def _forward(self, model, target, x, inputs: list[torch.Tensor]):
        it = iter(inputs)

        def swap(_m, _args):
            try:
                return (next(it),)
            except StopIteration:
                raise _NotReplayable("called more than once per forward") from None

        handle = target.register_forward_pre_hook(swap)
        try:
            with torch.no_grad(), eval_mode(model), autocast_context(self.device, self.precision):
                return model(x).float()
        finally:
            handle.remove()

    # ----------------------------------------------------------------- evaluating

    def evaluate(self, variant: nn.Module) -> dict | None:
        """`variant`'s metrics by replay, or None where it cannot be replayed (the caller
        then evaluates the plain way). Every rank takes the same branch."""
        names = enclosing(changed_modules(self.dense, variant))
        usable = next((n for n in names if n not in self.refused and
                       _has(variant, n)), None)
        ok = usable is not None and (usable == self.name or self._record_checked(usable, names))
        if not ok or self.name is None:
            return None
        model = self.prepare(copy.deepcopy(variant))
        target = model.get_submodule(self.name)
        it = iter(self.inputs)
        handle = target.register_forward_pre_hook(lambda _m, _a: (next(it),))
        try:
            return evaluate(model, self.batches, self.device, self.precision,
                            reduce=not self.local)
        finally:
            handle.remove()

    def _record_checked(self, first: str, names: list[str]) -> bool:
        """Record the deepest usable submodule of `names` (from `first` on), agreed by every
        rank; False when none passes."""
        for name in names[names.index(first):]:
            if name in self.refused:
                continue
            ok = torch.tensor([1.0 if self._record(name) else 0.0], device=self.device)
            if not self.local:
                D.all_reduce_min(ok)
            if ok.item() == 1.0:
                log.info("sensitivity: replaying the dense activations into %s", name)
                return True
            self.refused.add(name)
            self.name, self.inputs, self.batches = None, [], []
        return False


class _NotReplayable(Exception):
    pass


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _stand_in(x: torch.Tensor, side: int) -> torch.Tensor:
    """A zero image batch of the same batch size and channels at `side` x `side`."""
    shape = (*x.shape[:2], *([side] * (x.dim() - 2)))
    fmt = torch.channels_last if x.dim() == 4 and x.is_contiguous(
        memory_format=torch.channels_last) and not x.is_contiguous() else torch.contiguous_format
    return torch.zeros(shape, dtype=x.dtype, device=x.device).contiguous(memory_format=fmt)
