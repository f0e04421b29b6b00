"""One fake of the trainer's loader interface (`pipeline.trainer.TrainLoader`) for the
tests that drive the real Trainer on batches held in memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


class FakeLoader:
    """`TrainLoader` over fixed batches, or over `make(epoch, index)` for batches that
    change with the epoch; yields them in `memory_format` (which the trainer sets)."""

    def __init__(self, batches: Sequence[Batch] | None = None, *,
                 make: Callable[[int, int], Batch] | None = None, steps: int | None = None):
        if (batches is None) == (make is None):
            raise ValueError("give batches or make (with steps)")
        self.batches, self.make = batches, make
        self.steps = len(batches) if batches is not None else int(steps or 0)
        self.epoch = 0
        self.memory_format = torch.contiguous_format

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def iterate(self, start: int = 0) -> Iterator[Batch]:
        for b in range(start, self.steps):
            x, y = self.batches[b] if self.batches is not None else self.make(self.epoch, b)
            yield (x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x), y

    def __iter__(self) -> Iterator[Batch]:  # an evaluation loader too
        return self.iterate(0)


def random_batches(n_batches: int, batch: int = 16, classes: int = 4, size: int = 16,
                   seed: int = 0, learnable: bool = False) -> list[Batch]:
    """`n_batches` random image batches (3 x size x size); `learnable`: the label shifts
    the pixels, so a model can fit it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches, batch, 3, size, size, generator=g)
    y = torch.randint(classes, (n_batches, batch), generator=g)
    if learnable:
        x += y.view(n_batches, batch, 1, 1, 1).float()
    return [(x[b], y[b]) for b in range(n_batches)]
