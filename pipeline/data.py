"""Data sets and loaders.

Small images (CIFAR scale) take the fast path: the whole set is decoded once into one
uint8 tensor (cached on disk next to the data), kept on the training device, and
augmented in batches (pad-and-crop, flip) with one vectorised random draw per batch;
no DataLoader workers. This is the lesson of Myrtle's "How to train your ResNet".

Batches are global: batch b of epoch e is a fixed slice of a permutation seeded by
(seed, epoch); under DDP each rank takes its contiguous share of that global batch, so
the global batch is the same for any number of processes, and the data order's position
is just (epoch, batch index), which is what exact resume stores.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch

from .config import Invalid, opt

log = logging.getLogger(__name__)

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(RuntimeError):
    """Missing or unusable data: one line naming the path."""


@dataclass
class SyntheticConfig:
    num_classes: int = opt(10, "number of classes", min=2)
    train_size: int = opt(512, "training images", min=1)
    test_size: int = opt(256, "test images", min=1)
    image_size: int = opt(32, "height and width", min=8)


@dataclass
class DataConfig:
    dataset: Literal["cifar10", "cifar100", "imagefolder", "synthetic"] = opt(
        "cifar10", "cifar10/cifar100 (torchvision files or an ImageFolder tree under root), "
        "imagefolder (root/train and root/val or root/test), synthetic (generated, for tests)")
    root: str = opt("data", "data folder (relative paths are relative to the working directory)")
    download: bool = opt(False, "let torchvision download CIFAR into root when absent")
    train_samples: int | None = opt(
        None, "use a fixed, class-balanced, seeded subset of this many training images", min=1)
    test_samples: int | None = opt(
        None, "use a fixed, class-balanced, seeded subset of this many test images", min=1)
    loader: Literal["auto", "tensor", "dataloader"] = opt(
        "auto", "tensor = in-memory fast path; dataloader = torch DataLoader with workers; "
        "auto = tensor for images of 64 px or less")
    num_workers: int = opt(4, "DataLoader workers (dataloader path)", min=0)
    image_size: int | None = opt(None, "train crop / eval size; default 32 (CIFAR) or 224", min=8)
    resize_size: int | None = opt(None, "imagefolder eval: resize to this before the center "
                                  "crop (default image_size * 256/224)", min=8)
    pad: int = opt(4, "tensor path: zero padding before the random crop", min=0)
    flip: bool = opt(True, "random horizontal flip for training")
    cache: bool = opt(True, "cache the decoded uint8 tensor next to the data")
    synthetic: SyntheticConfig = opt(SyntheticConfig, "synthetic data set settings")

    def validate(self) -> None:
        if self.dataset == "imagefolder" and self.loader == "tensor" and (self.image_size or 0) > 64:
            raise Invalid("loader", "the tensor path is for small images (64 px or less)")


@dataclass
class ImageSet:
    """A decoded data split: uint8 NCHW images and int64 labels, on the CPU."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]


@dataclass
class DataBundle:
    train: "TensorLoader | FolderLoader"
    test: "TensorLoader | FolderLoader"
    num_classes: int
    input_size: tuple[int, int, int]
    description: str


# --------------------------------------------------------------------------- reading


def _resolve_root(cfg: DataConfig) -> Path:
    return Path(os.path.expanduser(cfg.root))


def synthetic_split(cfg: SyntheticConfig, train: bool, seed: int) -> ImageSet:
    """Learnable random images: a class-specific colour pattern plus noise."""
    n = cfg.train_size if train else cfg.test_size
    g = torch.Generator().manual_seed(1000 + seed * 2 + int(train))
    protos = torch.Generator().manual_seed(seed)
    centers = torch.randint(40, 216, (cfg.num_classes, 3, 4, 4), generator=protos).float()
    labels = torch.arange(n) % cfg.num_classes
    labels = labels[torch.randperm(n, generator=g)]
    s = cfg.image_size
    base = torch.nn.functional.interpolate(centers[labels], size=(s, s), mode="nearest")
    noise = torch.randn((n, 3, s, s), generator=g) * 40
    images = (base + noise).clamp(0, 255).to(torch.uint8)
    return ImageSet(images, labels.long(), [f"class{i}" for i in range(cfg.num_classes)])


def _list_image_folder(folder: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    if not folder.is_dir():
        raise DataError(f"{folder}: data folder not found")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{folder}: no class folders (expected {folder}/<class>/<image>)")
    items = []
    for idx, c in enumerate(classes):
        for p in sorted((folder / c).rglob("*")):
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
                items.append((p, idx))
    if not items:
        raise DataError(f"{folder}: no images found in its class folders")
    return items, classes


def _decode_folder(folder: Path, size: int) -> ImageSet:
    """Decode an ImageFolder split of small images into one uint8 tensor."""
    from PIL import Image

    items, classes = _list_image_folder(folder)
    images = np.empty((len(items), size, size, 3), dtype=np.uint8)
    labels = np.empty(len(items), dtype=np.int64)
    kept, bad = 0, []
    for path, label in items:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                images[kept] = np.asarray(im)
        except Exception:  # unreadable or truncated file: skip and count
            bad.append(path)
            continue
        labels[kept] = label
        kept += 1
    if bad:
        log.warning("%s: skipped %d unreadable image(s), e.g. %s", folder, len(bad), bad[0])
    if kept == 0:
        raise DataError(f"{folder}: none of the {len(items)} images could be read")
    imgs = torch.from_numpy(images[:kept]).permute(0, 3, 1, 2).contiguous()
    return ImageSet(imgs, torch.from_numpy(labels[:kept]), classes)


def _cache_path(folder: Path, size: int) -> Path:
    return folder.parent / ".pipeline_cache" / f"{folder.name}_{size}px.pt"


def _folder_fingerprint(folder: Path) -> str:
    items, _ = _list_image_folder(folder)
    h = hashlib.sha1()
    for p, label in items:
        h.update(f"{p.relative_to(folder)}:{label}:{p.stat().st_size}\n".encode())
    return h.hexdigest()


def load_small_folder(folder: Path, size: int, use_cache: bool) -> ImageSet:
    """Decode once, then reuse the uint8 tensor cached next to the data."""
    cache = _cache_path(folder, size)
    fingerprint = _folder_fingerprint(folder) if use_cache else ""
    if use_cache and cache.is_file():
        try:
            obj = torch.load(cache, weights_only=True)
            if obj.get("fingerprint") == fingerprint:
                return ImageSet(obj["images"], obj["labels"], list(obj["classes"]))
        except Exception:
            log.warning("%s: ignoring unreadable data cache", cache)
    data = _decode_folder(folder, size)
    if use_cache:
        from .checkpoint import atomic_save

        try:
            atomic_save({"fingerprint": fingerprint, "images": data.images,
                         "labels": data.labels, "classes": data.classes}, cache)
        except OSError as err:
            log.warning("%s: cannot write data cache (%s)", cache, err.strerror)
    return data


def _torchvision_cifar(cfg: DataConfig, train: bool) -> ImageSet:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if cfg.dataset == "cifar10" else torchvision.datasets.CIFAR100
    root = _resolve_root(cfg)
    try:
        ds = cls(str(root), train=train, download=cfg.download)
    except RuntimeError as err:
        hint = "" if cfg.download else " (set data.download: true, or point data.root at it)"
        raise DataError(f"{root}: {cfg.dataset} not found or corrupt: {err}{hint}") from None
    except Exception as err:
        raise DataError(f"{root}: cannot get {cfg.dataset}: {err}") from None
    images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.tensor(ds.targets, dtype=torch.long), list(ds.classes))


def _split_folder(root: Path, train: bool) -> Path:
    if train:
        return root / "train"
    for name in ("val", "test"):
        if (root / name).is_dir():
            return root / name
    return root / "val"


def balanced_subset(data: ImageSet, n: int, seed: int) -> ImageSet:
    """A fixed, class-balanced, seeded subset of n images (round-robin over classes)."""
    if n >= len(data.labels):
        return data
    g = torch.Generator().manual_seed(seed)
    per_class = []
    for c in torch.unique(data.labels).tolist():
        idx = torch.nonzero(data.labels == c).flatten()
        per_class.append(idx[torch.randperm(len(idx), generator=g)])
    order = []
    depth = max(len(ix) for ix in per_class)
    for k in range(depth):  # interleave so any prefix is balanced
        order.extend(int(ix[k]) for ix in per_class if k < len(ix))
    chosen = torch.tensor(sorted(order[:n]))
    return ImageSet(data.images[chosen], data.labels[chosen], data.classes)


def read_small_split(cfg: DataConfig, train: bool, seed: int) -> tuple[ImageSet, tuple, tuple]:
    """The split as uint8 tensors plus its normalization mean/std."""
    if cfg.dataset == "synthetic":
        data = synthetic_split(cfg.synthetic, train, seed)
        mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    else:
        root = _resolve_root(cfg)
        if cfg.dataset in ("cifar10", "cifar100") and not (root / "train").is_dir():
            data = _torchvision_cifar(cfg, train)
        else:
            if not root.is_dir():
                raise DataError(f"{root}: data folder not found (data.root)")
            data = load_small_folder(_split_folder(root, train), cfg.image_size or 32, cfg.cache)
        if cfg.dataset == "cifar100":
            mean, std = CIFAR100_MEAN, CIFAR100_STD
        elif cfg.dataset == "cifar10":
            mean, std = CIFAR10_MEAN, CIFAR10_STD
        else:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
    limit = cfg.train_samples if train else cfg.test_samples
    if limit is not None:
        data = balanced_subset(data, limit, seed)
    return data, mean, std


# --------------------------------------------------------------------------- tensor loader


def _batch_seed(seed: int, epoch: int, batch: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + batch) % (2**63 - 1)


class TensorLoader:
    """Batches from an in-memory uint8 tensor, augmented on the device.

    Iterating yields (images float32 normalized NCHW, labels) for this rank's share of
    each global batch. `set_epoch(e)` selects the epoch's order; `iterate(start)` skips
    the first `start` global batches (exact resume).
    """

    def __init__(self, data: ImageSet, batch_size: int, train: bool, seed: int,
                 device: torch.device, mean: tuple, std: tuple, pad: int = 4, flip: bool = True,
                 rank: int = 0, world_size: int = 1, channels_last: bool = False):
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.n = len(self.labels)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.device, self.pad, self.flip = device, pad, flip
        self.rank, self.world_size = rank, world_size
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest >= max(2 * self.world_size, 1) or full == 0 else 0)

    @property
    def num_samples(self) -> int:
        return self.n

    def _order(self) -> torch.Tensor:
        if not self.train:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(_batch_seed(self.seed, self.epoch, -1))
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate(0)

    def iterate(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()
        for b in range(start, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            lo, hi = _share(len(idx), self.rank, self.world_size)
            if self.train:
                yield self._train_batch(idx, b, lo, hi)
            else:
                sel = idx[lo:hi].to(self.device)
                x = self.images.index_select(0, sel)
                yield self._normalize(x), self.labels.index_select(0, sel)

    def _train_batch(self, idx: torch.Tensor, b: int, lo: int, hi: int):
        g = torch.Generator().manual_seed(_batch_seed(self.seed, self.epoch, b))
        n = len(idx)
        # one draw per batch for the whole global batch; each rank keeps its share
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g)[lo:hi]
        flips = (torch.rand(n, generator=g) < 0.5)[lo:hi]
        sel = idx[lo:hi].to(self.device)
        x = self.images.index_select(0, sel)
        if self.pad:
            x = random_crop(x, offsets.to(self.device), self.pad)
        if self.flip:
            f = flips.to(self.device).view(-1, 1, 1, 1)
            x = torch.where(f, x.flip(3), x)
        return self._normalize(x), self.labels.index_select(0, sel)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format)


def _share(n: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous share [lo, hi) of a global batch of n samples."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def random_crop(x: torch.Tensor, offsets: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad by `pad` and crop back to the input size at per-image (dy, dx) offsets."""
    n, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # (n, h)
    cols = offsets[:, 1:2] + torch.arange(w, device=x.device)  # (n, w)
    bidx = torch.arange(n, device=x.device).view(n, 1, 1)
    out = xp.permute(0, 2, 3, 1)[bidx, rows.view(n, h, 1), cols.view(n, 1, w)]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- folder loader


class FolderLoader:
    """DataLoader over an ImageFolder split (large images), global-batch sharded by rank."""

    def __init__(self, folder: Path, batch_size: int, train: bool, seed: int, cfg: DataConfig,
                 device: torch.device, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False, limit: int | None = None):
        import torchvision
        from torchvision import transforms as T

        size = cfg.image_size or 224
        resize = cfg.resize_size or int(round(size * 256 / 224))
        norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        if train:
            tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip() if cfg.flip
                            else T.Lambda(lambda x: x), T.ToTensor(), norm])
        else:
            tf = T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), norm])
        _, classes = _list_image_folder(folder)
        self.dataset = torchvision.datasets.ImageFolder(
            str(folder), transform=tf, loader=_safe_pil_loader, is_valid_file=_is_image)
        self.classes = classes
        indices = list(range(len(self.dataset)))
        if limit is not None and limit < len(indices):
            labels = torch.tensor(self.dataset.targets)
            # balanced_subset selects rows; let the "images" be the indices themselves
            marker = ImageSet(torch.arange(len(labels)).view(-1, 1), labels, classes)
            indices = sorted(balanced_subset(marker, limit, seed).images.flatten().tolist())
        self.indices = indices
        self.n = len(indices)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size, self.device = rank, world_size, device
        self.num_workers = cfg.num_workers
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return TensorLoader.__len__(self)  # same batching rule

    @property
    def num_samples(self) -> int:
        return self.n

    def __iter__(self):
        return self.iterate(0)

    def iterate(self, start: int = 0):
        if self.train:
            g = torch.Generator().manual_seed(_batch_seed(self.seed, self.epoch, -1))
            order = [self.indices[i] for i in torch.randperm(self.n, generator=g).tolist()]
        else:
            order = list(self.indices)
        batches = []
        for b in range(start, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            lo, hi = _share(len(idx), self.rank, self.world_size)
            batches.append(idx[lo:hi])
        if not batches:
            return
        g = torch.Generator().manual_seed(_batch_seed(self.seed, self.epoch, start))
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=batches, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", generator=g,
            persistent_workers=False)
        for x, y in loader:
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            yield x, y.to(self.device, non_blocking=True)


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _safe_pil_loader(path: str):
    """PIL loader that turns an unreadable file into a black image (counted, warned once)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except Exception:
        log.warning("%s: unreadable image replaced by a black image", path)
        return Image.new("RGB", (32, 32))


# --------------------------------------------------------------------------- entry point


def use_tensor_path(cfg: DataConfig) -> bool:
    if cfg.loader != "auto":
        return cfg.loader == "tensor"
    if cfg.dataset in ("cifar10", "cifar100", "synthetic"):
        return True
    return (cfg.image_size or 224) <= 64


def build_data(cfg: DataConfig, batch_size: int, eval_batch_size: int, seed: int,
               device: torch.device, rank: int = 0, world_size: int = 1,
               channels_last: bool = False) -> DataBundle:
    """Train and test loaders for one stage (batch sizes are global)."""
    if use_tensor_path(cfg):
        train, mean, std = read_small_split(cfg, True, seed)
        test, _, _ = read_small_split(cfg, False, seed)
        kw = dict(device=device, mean=mean, std=std, rank=rank, world_size=world_size,
                  channels_last=channels_last, seed=seed)
        tl = TensorLoader(train, batch_size, True, pad=cfg.pad, flip=cfg.flip, **kw)
        vl = TensorLoader(test, eval_batch_size, False, pad=0, flip=False, **kw)
        nc = len(train.classes) if cfg.dataset != "synthetic" else cfg.synthetic.num_classes
        nc = max(nc, int(train.labels.max()) + 1)
        size = tuple(train.images.shape[1:])
        desc = f"{cfg.dataset} ({len(train.labels)} train / {len(test.labels)} test, in memory)"
        return DataBundle(tl, vl, nc, size, desc)
    root = _resolve_root(cfg)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found (data.root)")
    kw = dict(cfg=cfg, device=device, rank=rank, world_size=world_size,
              channels_last=channels_last, seed=seed)
    tl = FolderLoader(_split_folder(root, True), batch_size, True, limit=cfg.train_samples, **kw)
    vl = FolderLoader(_split_folder(root, False), eval_batch_size, False,
                      limit=cfg.test_samples, **kw)
    size = cfg.image_size or 224
    desc = f"{cfg.dataset} {root} ({tl.n} train / {vl.n} test, DataLoader)"
    return DataBundle(tl, vl, len(tl.classes), (3, size, size), desc)


def describe(cfg: DataConfig) -> tuple[int, tuple[int, int, int]]:
    """(number of classes, input size C,H,W) without decoding the images."""
    if cfg.dataset == "synthetic":
        s = cfg.synthetic.image_size
        return cfg.synthetic.num_classes, (3, s, s)
    root = _resolve_root(cfg)
    if cfg.dataset in ("cifar10", "cifar100"):
        size = cfg.image_size or 32
        if (root / "train").is_dir():
            _, classes = _list_image_folder(root / "train")
            return len(classes), (3, size, size)
        return (10 if cfg.dataset == "cifar10" else 100), (3, size, size)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found (data.root)")
    _, classes = _list_image_folder(root / "train")
    size = cfg.image_size or (32 if use_tensor_path(cfg) else 224)
    return len(classes), (3, size, size)


def check_available(cfg: DataConfig) -> None:
    """Fail early, in one line, when the data cannot be found (before any stage runs)."""
    if cfg.dataset == "synthetic":
        return
    root = _resolve_root(cfg)
    if (root / "train").is_dir():
        _list_image_folder(root / "train")
        _list_image_folder(_split_folder(root, False))
        return
    if cfg.dataset in ("cifar10", "cifar100"):
        base = "cifar-10-batches-py" if cfg.dataset == "cifar10" else "cifar-100-python"
        if not (root / base).is_dir() and not cfg.download:
            raise DataError(f"{root}: no {cfg.dataset} found (expected {root}/train/<class>/ "
                            f"images or torchvision's {base}/; set data.download: true to fetch)")
        return
    raise DataError(f"{root}: expected {root}/train/<class>/<image> (data.root)")
