"""The batching contract both loaders share, which the trainer's exact resume relies on.

Batches are global: batch b of epoch e is a fixed slice of a permutation seeded by
(seed, epoch); under DDP each rank takes its contiguous share of that global batch, so the
global batch is the same for any number of processes. Augmentation is drawn from seeds of
(seed, epoch, position in the epoch) too (`mix`), never of worker count, rank or where an
iteration started, so `iterate(start)` after a restart yields what the first run would have.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import torch


def mix(*parts: int | str) -> int:
    """A 63-bit seed from a tuple: distinct tuples give unrelated seeds (no arithmetic
    collisions such as epoch 1 batch 0 == epoch 0 batch 10007)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def generator(*parts: int | str) -> torch.Generator:
    """A torch generator seeded by `mix(*parts)`."""
    return torch.Generator().manual_seed(mix(*parts))


def _share(n: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous share [lo, hi) of a global batch of n samples."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def _num_batches(n: int, batch_size: int, train: bool, world_size: int) -> int:
    """Training drops a last partial batch too small to give every rank 2 samples (BN);
    evaluation keeps every sample."""
    full, rest = divmod(n, batch_size)
    if not train:
        return full + (1 if rest else 0)
    return full + (1 if rest >= 2 * world_size or full == 0 else 0)


class Batching:
    """Epoch order, length and sharding shared by both loaders.

    Loader interface: `len()` (global batches per epoch), `set_epoch(e)`,
    `iterate(start_batch)` yielding (float images NCHW normalized, int64 labels) on the
    device for this rank's share of each global batch, `num_samples`.
    """

    def __init__(self, n: int, batch_size: int, train: bool, seed: int, device: torch.device,
                 mean: Sequence[float], std: Sequence[float], rank: int = 0, world_size: int = 1,
                 channels_last: bool = False):
        self.n = n
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        self.device = torch.device(device)
        m = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        # (x/255 - mean) / std = x * scale + offset, one fused addcmul per batch
        self.scale, self.offset = 1 / (255 * s), -m / s
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order (and augmentation) `iterate` yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return _num_batches(self.n, self.batch_size, self.train, self.world_size)

    @property
    def num_samples(self) -> int:
        """Images in the split (all ranks together)."""
        return self.n

    def epoch_order(self) -> torch.Tensor:
        """The epoch's permutation of the split (identity for evaluation)."""
        if not self.train:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=generator(self.seed, self.epoch, "order"))

    def shard(self, b: int) -> tuple[int, int]:
        """Positions [lo, hi) in the epoch order of this rank's share of global batch b."""
        start = b * self.batch_size
        lo, hi = _share(min(self.batch_size, self.n - start), self.rank, self.world_size)
        return start + lo, start + hi

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate(0)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images on the device -> float, normalized, in the loader's memory format."""
        x = torch.addcmul(self.offset, x.float(), self.scale)
        return x.contiguous(memory_format=self.memory_format)

    def iterate(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError
