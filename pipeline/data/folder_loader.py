"""The DataLoader path for large images: torch DataLoader workers decode and augment
(`augment`), hand uint8 batches over in pinned memory, and the normalization runs on the
device. The workers persist across epochs; unreadable files are dropped from their batch
and reported once with a count."""

from __future__ import annotations

import random
import signal
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .. import distributed as D
from .augment import Views, apply_views
from .batching import Batching, mix
from .config import DataConfig, DataError
from .folders import check_unreadable, open_rgb, reason
from .images import ImageSet


class FileSource:
    """Images as files on disk (an ImageFolder split)."""

    def __init__(self, items: list[tuple[str, int]], where: Path):
        self.paths = [p for p, _ in items]
        self.labels = [lab for _, lab in items]
        self.where = where

    def __len__(self) -> int:
        return len(self.paths)

    def open(self, i: int):
        return open_rgb(self.paths[i])

    def name(self, i: int) -> str:
        return self.paths[i]


class ArraySource:
    """Images already decoded (synthetic, torchvision CIFAR) as uint8 NCHW."""

    def __init__(self, data: ImageSet, where: str):
        self.images = data.images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = data.labels.tolist()
        self.where = where

    def __len__(self) -> int:
        return len(self.labels)

    def open(self, i: int):
        from PIL import Image

        return Image.fromarray(self.images[i])

    def name(self, i: int) -> str:
        return f"{self.where}[{i}]"


class _AugmentedDataset(torch.utils.data.Dataset):
    """Items are (index, epoch, position): the augmentation of a sample depends only on
    (seed, epoch, position in the epoch), never on which worker or rank draws it."""

    def __init__(self, source: FileSource | ArraySource, views: Views, seed: int):
        self.source, self.views, self.seed = source, views, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int, int]):
        i, epoch, pos = key
        rng = random.Random(mix(self.seed, epoch, pos, "view")) if self.views.train else None
        try:
            img = self.source.open(i)
        except Exception as err:  # unreadable file: the batch goes on without it
            return None, self.source.labels[i], self.source.name(i), reason(err)
        return apply_views(img, self.views, rng), self.source.labels[i], None, None


def ignore_stop_signals(_worker_id: int) -> None:
    """A DataLoader worker leaves SIGTERM and SIGUSR1 to the main process: SLURM signals
    every process of the job step, and a worker dying on it would make the main process
    fail ("DataLoader worker exited unexpectedly") before it checkpoints and exits 143."""
    for name in ("SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def _collate(samples: list) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    good = [s for s in samples if s[0] is not None]
    bad = [(s[2], s[3]) for s in samples if s[0] is None]
    x = torch.stack([s[0] for s in good]) if good else torch.empty(0, dtype=torch.uint8)
    y = torch.tensor([s[1] for s in good], dtype=torch.long)
    return x, y, bad


class _BatchPlan:
    """The DataLoader's batch sampler: reads the loader's epoch and start batch each time
    the DataLoader starts an iteration, so one DataLoader (and its persistent workers)
    serves every epoch."""

    def __init__(self, owner: FolderLoader):
        # weak: no reference cycle, so a dropped loader stops its workers right away
        self._owner = weakref.ref(owner)

    @property
    def owner(self) -> FolderLoader:
        owner = self._owner()
        if owner is None:
            raise RuntimeError("the FolderLoader of this DataLoader was freed")
        return owner

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        o = self.owner
        order = o.epoch_order().tolist()
        for b in range(o._start, len(o)):
            lo, hi = o.shard(b)
            if hi > lo:
                yield [(o.indices[order[p]], o.epoch, p) for p in range(lo, hi)]

    def __len__(self) -> int:
        o = self.owner
        return sum(1 for b in range(o._start, len(o)) if o.shard(b)[1] > o.shard(b)[0])


class FolderLoader(Batching):
    """The DataLoader path: workers decode and augment, uint8 batches travel (pinned) to
    the device, normalization runs there. Unreadable files are dropped from their batch
    and reported once with a count; the workers persist across epochs."""

    def __init__(self, source: FileSource | ArraySource, batch_size: int, train: bool,
                 seed: int, cfg: DataConfig, device: torch.device, mean: Sequence[float],
                 std: Sequence[float], views: Views, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False, indices: torch.Tensor | None = None):
        from torchvision.transforms import functional  # noqa: F401  (import once, before
        # the workers fork, rather than in each of them)

        self.source = source
        self.indices = (indices if indices is not None else torch.arange(len(source))).tolist()
        super().__init__(len(self.indices), batch_size, train, seed, device, mean, std,
                         rank=rank, world_size=world_size, channels_last=channels_last)
        self.cfg, self.views = cfg, views
        self.dataset = _AugmentedDataset(source, views, seed)
        self._start = 0
        self._loader: torch.utils.data.DataLoader | None = None
        self._bad: dict[str, str] = {}
        self._reported = 0

    def _dataloader(self) -> torch.utils.data.DataLoader:
        if self._loader is None:
            workers = self.cfg.num_workers
            self._loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=_BatchPlan(self), num_workers=workers,
                collate_fn=_collate, pin_memory=self.cfg.pin_memory and self.device.type == "cuda",
                persistent_workers=self.cfg.persistent_workers and workers > 0,
                prefetch_factor=self.cfg.prefetch_factor if workers > 0 else None,
                worker_init_fn=ignore_stop_signals if workers > 0 else None)
        return self._loader

    def iterate(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of global batches start, start+1, ... of the current epoch."""
        self._start = start
        if start >= len(self):
            return
        loader = self._dataloader()
        remaining = len(loader.batch_sampler)
        for x, y, bad in loader:
            remaining -= 1
            if bad:
                self._bad.update(bad)
                if len(y) == 0:
                    raise DataError(f"{bad[0][0]}: unreadable image ({bad[0][1]}); every image "
                                    f"of a batch of {len(bad)} from {self.source.where} is")
            if remaining == 0:  # before the last batch: the consumer may stop after it
                self._report_unreadable()
            x = x.to(self.device, non_blocking=True)
            yield self.normalize(x), y.to(self.device, non_blocking=True)

    def _report_unreadable(self) -> None:
        """Warn about, or fail on, the unreadable files of the split so far, counted over
        all ranks (each rank reads its own share): every rank decides alike, at the same
        batch (a collective under torchrun, once per pass)."""
        bad = list(self._bad.items())
        shares = D.all_gather_object((len(bad), bad[:1])) if self.world_size > 1 else [
            (len(bad), bad[:1])]
        count = sum(c for c, _ in shares)
        if count == self._reported:
            return
        self._reported = count
        example = next(e for _, e in shares if e)
        check_unreadable(self.source.where, example, self.n, self.cfg.max_unreadable,
                         count=count)

    def probe(self, count: int = 16) -> None:
        """Decode a few files spread over the split: fail early, in one line, when most
        of them are unreadable (the wrong folder, an undownloaded LFS tree...)."""
        picks = sorted({self.indices[i * self.n // count] for i in range(min(count, self.n))})
        bad = []
        for i in picks:
            try:
                self.source.open(i)
            except Exception as err:
                bad.append((self.source.name(i), reason(err)))
        if bad and len(bad) * 2 > len(picks):
            raise DataError(f"{bad[0][0]}: unreadable image ({bad[0][1]}); {len(bad)} of "
                            f"{len(picks)} sampled images in {self.source.where} are unreadable")

    def close(self) -> None:
        """Stop the persistent workers now (they also stop when the loader is freed)."""
        self._loader = None
