"""The fast path for small images (CIFAR scale): the whole split as one uint8 tensor on
the training device, augmented there in batches.

The training images are zero-padded once, and each batch is an index_select and two
gathers that crop and flip at offsets drawn once per epoch. No DataLoader workers, no
per-image Python, no host synchronization (the lesson of Myrtle's "How to train your
ResNet").
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .batching import Batching, generator
from .images import ImageSet


class TensorLoader(Batching):
    """Batches from an in-memory uint8 tensor kept on the training device.

    Training images are zero-padded once; each batch gathers crops at per-image offsets,
    flipped or not, both drawn once per epoch for the whole split (a pure function of
    seed and epoch), then one fused normalization.
    """

    def __init__(self, data: ImageSet, batch_size: int, train: bool, seed: int,
                 device: torch.device, mean: Sequence[float], std: Sequence[float],
                 pad: int = 4, flip: bool = True, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False):
        super().__init__(len(data.labels), batch_size, train, seed, device, mean, std,
                         rank=rank, world_size=world_size, channels_last=channels_last)
        self.pad = pad if train else 0
        self.flip = flip and train
        self.height, self.width = data.images.shape[2:]
        images = data.images.to(self.device)
        if self.pad:
            images = torch.nn.functional.pad(images, (self.pad,) * 4)
        self.images = images.contiguous()
        self.labels = data.labels.to(self.device)
        self._rows = torch.arange(self.height, device=self.device)
        self._cols = torch.arange(self.width, device=self.device)

    def epoch_draws(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(crop offsets (n, 2) in [0, 2*pad], flip flags (n,)) by position in the epoch."""
        g = generator(self.seed, self.epoch, "augment")
        offsets = torch.randint(0, 2 * self.pad + 1, (self.n, 2), generator=g)
        flips = torch.rand(self.n, generator=g) < 0.5
        return offsets, flips

    def iterate(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of global batches start, start+1, ... of the current epoch."""
        order = self.epoch_order().to(self.device)
        augment = self.train and (self.pad > 0 or self.flip)
        if augment:
            offsets, flips = (t.to(self.device) for t in self.epoch_draws())
            if not self.flip:
                flips.zero_()
        for b in range(start, len(self)):
            lo, hi = self.shard(b)
            if hi <= lo:
                continue  # an eval batch smaller than the world: this rank has none of it
            idx = order[lo:hi]
            if augment:
                x = self._crop_flip(idx, offsets[lo:hi], flips[lo:hi])
            else:
                x = self.images.index_select(0, idx)
            yield self.normalize(x), self.labels.index_select(0, idx)

    def _crop_flip(self, idx: torch.Tensor, offsets: torch.Tensor,
                   flips: torch.Tensor) -> torch.Tensor:
        """Rows then columns gathered at per-image offsets from the padded images; a flip
        is the column index reversed, so it costs nothing extra. Three kernels, no sync."""
        n, c, h, w = len(idx), self.images.shape[1], self.height, self.width
        x = self.images.index_select(0, idx)  # (n, c, h + 2 pad, w + 2 pad)
        rows = (offsets[:, :1] + self._rows).view(n, 1, h, 1).expand(n, c, h, x.shape[3])
        x = x.gather(2, rows)
        cols = torch.where(flips.view(n, 1), w - 1 - self._cols, self._cols) + offsets[:, 1:]
        return x.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))
