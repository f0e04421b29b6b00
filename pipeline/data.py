"""Data sets and loaders.

Two ways to feed the training step, behind one loader interface:

* The fast path (`TensorLoader`, small images, CIFAR scale): the whole split is decoded
  once into one uint8 tensor (cached on disk next to the data, so the next run starts in
  seconds), moved to the training device once, and augmented there in batches: the
  training images are zero-padded once, and each batch is an index_select and two
  gathers that crop and flip at offsets drawn once per epoch. No DataLoader workers, no
  per-image Python, no host synchronization.
  This is the lesson of Myrtle's "How to train your ResNet".
* The DataLoader path (`FolderLoader`, large images): torch DataLoader workers decode and
  augment (ImageNet presets: RandomResizedCrop + flip; resize + center crop to evaluate),
  hand uint8 batches over in pinned memory, and the normalization runs on the device.
  The workers persist across epochs.

Both share the batching contract the trainer's exact resume relies on. Batches are
global: batch b of epoch e is a fixed slice of a permutation seeded by (seed, epoch);
under DDP each rank takes its contiguous share of that global batch, so the global batch
is the same for any number of processes. Augmentation is a function of (seed, epoch,
position in the epoch) too, never of worker count, rank or where an iteration started,
so `iterate(start)` after a restart yields exactly what the first run would have.

Loader interface (both classes): `len()` (global batches per epoch), `set_epoch(e)`,
`iterate(start_batch)` yielding (float images NCHW normalized, int64 labels) on the
device for this rank's share of each global batch, `num_samples`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .config import Invalid, opt
from .errors import UsageError

log = logging.getLogger(__name__)

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SYNTHETIC_MEAN, SYNTHETIC_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SMALL_IMAGE_MAX = 64  # auto: images up to this size take the fast path
CACHE_FORMAT = 2  # bump when the cached tensor's layout or decoding changes


class DataError(UsageError):
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
        "cifar10", "cifar10/cifar100 (torchvision files, or an ImageFolder tree root/train + "
        "root/test), imagefolder (root/train and root/val or root/test, one folder per "
        "class), synthetic (generated, for tests)")
    root: str = opt("data", "data folder (relative paths are relative to the working directory)")
    download: bool = opt(False, "let torchvision download CIFAR into root when absent")
    train_samples: int | None = opt(
        None, "use a fixed, class-balanced, seeded subset of this many training images", min=1)
    test_samples: int | None = opt(
        None, "use a fixed, class-balanced, seeded subset of this many test images", min=1)
    loader: Literal["auto", "tensor", "dataloader"] = opt(
        "auto", "tensor = in-memory fast path on the training device; dataloader = torch "
        "DataLoader with workers; auto = tensor for CIFAR/synthetic and for imagefolder "
        f"images of image_size {SMALL_IMAGE_MAX} or less, else dataloader")
    num_workers: int = opt(4, "DataLoader workers per process (dataloader path)", min=0)
    pin_memory: bool = opt(True, "dataloader path: pinned host memory for batches (CUDA only)")
    persistent_workers: bool = opt(
        True, "dataloader path: keep the workers alive across epochs (no start-up per epoch)")
    prefetch_factor: int = opt(2, "dataloader path: batches each worker prepares ahead", min=1)
    image_size: int | None = opt(
        None, "train crop and eval size; default 32 for CIFAR, 224 for imagefolder; the fast "
        "path resizes (shorter side) and center-crops imagefolder images to it once", min=8)
    resize_size: int | None = opt(None, "imagefolder eval (ImageNet preset): resize the shorter "
                                  "side to this before the center crop (default image_size * "
                                  "256/224)", min=8)
    train_crop: Literal["auto", "pad", "resized", "none"] = opt(
        "auto", "training crop: pad = zero-pad by `pad` and crop back (CIFAR); resized = "
        "RandomResizedCrop (ImageNet preset, dataloader path only); none = the eval view; "
        "auto = resized for imagefolder on the dataloader path, else pad")
    crop_scale: float = opt(0.08, "resized crop: smallest area fraction of the crop", gt=0, max=1)
    pad: int = opt(4, "pad crop: zero padding on each side before the random crop", min=0)
    flip: bool = opt(True, "random horizontal flip for training")
    mean: list[float] | None = opt(None, "normalization mean per channel (0-1 scale); default "
                                   "the data set's (CIFAR-10, CIFAR-100 or ImageNet values)")
    std: list[float] | None = opt(None, "normalization std per channel; default the data set's")
    max_unreadable: float = opt(
        0.1, "unreadable image files are skipped with a warning; more than this fraction of "
        "a split is an error (probably the wrong folder)", min=0, max=1)
    cache: bool = opt(True, "fast path: cache the decoded uint8 tensor (root/.pipeline_cache)")
    cache_dir: str | None = opt(
        None, "where the decoded tensor is cached when root is read-only (default "
        "$XDG_CACHE_HOME/pipeline-data or ~/.cache/pipeline-data)")
    synthetic: SyntheticConfig = opt(SyntheticConfig, "synthetic data set settings")

    def validate(self) -> None:
        if self.loader == "tensor" and self.train_crop == "resized":
            raise Invalid("train_crop", "the tensor path does 'pad' or 'none' crops; use "
                          "loader: dataloader for RandomResizedCrop")
        if self.loader == "tensor" and (self.image_size or 0) > SMALL_IMAGE_MAX:
            raise Invalid("loader", f"the tensor path is for small images ({SMALL_IMAGE_MAX} px "
                          "or less); use loader: dataloader")
        if self.dataset == "imagefolder" and self.loader == "tensor" and not self.image_size:
            raise Invalid("image_size", "set the size the tensor path decodes imagefolder "
                          "images to (e.g. 32 or 64)")
        for key in ("mean", "std"):
            v = getattr(self, key)
            if v is not None and (len(v) != 3 or (key == "std" and min(v) <= 0)):
                raise Invalid(key, f"expected 3 numbers{' > 0' if key == 'std' else ''}, got {v}")


@dataclass
class ImageSet:
    """A decoded data split: uint8 NCHW images and int64 labels, on the CPU."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    skipped: list[str] = field(default_factory=list)  # unreadable files left out


@dataclass
class DataBundle:
    train: TensorLoader | FolderLoader
    test: TensorLoader | FolderLoader
    num_classes: int
    input_size: tuple[int, int, int]
    description: str


# --------------------------------------------------------------------------- helpers


def _mix(*parts: int | str) -> int:
    """A 63-bit seed from a tuple: distinct tuples give unrelated seeds (no arithmetic
    collisions such as epoch 1 batch 0 == epoch 0 batch 10007)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _generator(*parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(_mix(*parts))


def _resolve_root(cfg: DataConfig) -> Path:
    return Path(os.path.expanduser(cfg.root))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:160]


def normalization(cfg: DataConfig) -> tuple[tuple, tuple]:
    """The (mean, std) used to normalize, on the 0-1 scale."""
    default = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
               "synthetic": (SYNTHETIC_MEAN, SYNTHETIC_STD)}.get(
        cfg.dataset, (IMAGENET_MEAN, IMAGENET_STD))
    return tuple(cfg.mean or default[0]), tuple(cfg.std or default[1])


# --------------------------------------------------------------------------- folders


def class_names(folder: Path) -> list[str]:
    """The class subfolders of an ImageFolder split, sorted (label k = k-th name)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: data folder not found")
    classes = sorted(e.name for e in os.scandir(folder)
                     if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{folder}: no class folders (expected {folder}/<class>/<image>)")
    return classes


def _images_under(folder: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                   if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
    return out


def list_image_folder(folder: Path, classes: Sequence[str] | None = None,
                      require_all: bool = True) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) for every image file of a split, and the class names.

    `classes` (the training split's) fixes the label of each class name, so an eval
    split that lacks a class still maps the others right; a class folder it does not
    know is an error. `require_all`: every class folder must hold an image.
    """
    here = class_names(folder)
    if classes is None:
        classes = here
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in here if c not in index]
    if unknown:
        raise DataError(f"{folder / unknown[0]}: class folder not among the training classes "
                        f"({len(unknown)} such folder(s))")
    items: list[tuple[str, int]] = []
    for c in here:
        files = _images_under(folder / c)
        if not files and require_all:
            raise DataError(f"{folder / c}: class folder has no images "
                            f"({', '.join(IMAGE_EXTENSIONS[:3])}, ...)")
        items.extend((p, index[c]) for p in files)
    if not items:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...) in its "
                        f"{len(here)} class folder(s)")
    return items, list(classes)


def split_folders(root: Path) -> tuple[Path, Path]:
    """root/train and root/val (or root/test), or a one-line error naming what is missing."""
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found (data.root)")
    train = root / "train"
    if not train.is_dir():
        raise DataError(f"{root}: no train/ folder (expected {root}/train/<class>/<image> and "
                        "val/ or test/ beside it)")
    for name in ("val", "test"):
        if (root / name).is_dir():
            return train, root / name
    raise DataError(f"{root}: no val/ or test/ folder beside train/")


def _open_rgb(path: str):
    """The image at `path` as an RGB PIL image, fully decoded (raises if unreadable)."""
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")  # decodes now: truncated files raise here


def fit_square(img, size: int):
    """Resize the shorter side to `size` and center-crop to size x size (no-op when the
    image already has that size). The one resize both paths use for small images."""
    from torchvision.transforms import functional as TF

    if img.size == (size, size):
        return img
    if min(img.size) != size:
        img = TF.resize(img, size, antialias=True)
    return TF.center_crop(img, [size, size])


def _check_unreadable(where: Path | str, bad: list[tuple[str, str]], total: int,
                      limit: float) -> None:
    if not bad:
        return
    if len(bad) == total or len(bad) > limit * total:
        raise DataError(f"{bad[0][0]}: unreadable image ({bad[0][1]}); {len(bad)} of {total} "
                        f"images in {where} are unreadable, more than data.max_unreadable "
                        f"({limit:g})")
    log.warning("%s: skipped %d unreadable image(s) of %d, e.g. %s (%s)", where, len(bad), total,
                bad[0][0], bad[0][1])


# --------------------------------------------------------------------------- fast-path decode


def _decode_chunk(chunk: list[str], size: int) -> list[np.ndarray | str]:
    out: list[np.ndarray | str] = []
    for path in chunk:
        try:
            out.append(np.asarray(fit_square(_open_rgb(path), size)))
        except Exception as err:  # unreadable, truncated, not an image: skip and count
            out.append(_first_line(err))
    return out


def decode_images(items: list[tuple[str, int]], size: int, classes: list[str], where: Path,
                  max_unreadable: float = 1.0) -> ImageSet:
    """Decode files into one uint8 NCHW tensor (threads: PIL releases the GIL to decode)."""
    n = len(items)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    keep = np.zeros(n, dtype=bool)
    bad: list[tuple[str, str]] = []
    step = 256
    chunks = [[p for p, _ in items[i:i + step]] for i in range(0, n, step)]
    workers = max(1, min(8, os.cpu_count() or 1))
    if n > 5000:
        log.info("%s: decoding %d images to %dx%d (once; cached for the next run)", where, n,
                 size, size)
    with ThreadPoolExecutor(workers) as pool:
        for c, results in enumerate(pool.map(_decode_chunk, chunks, [size] * len(chunks))):
            for k, r in enumerate(results):
                i = c * step + k
                if isinstance(r, str):
                    bad.append((items[i][0], r))
                else:
                    images[i] = r
                    keep[i] = True
    _check_unreadable(where, bad, n, max_unreadable)
    labels = torch.tensor([lab for _, lab in items], dtype=torch.long)[torch.from_numpy(keep)]
    imgs = torch.from_numpy(images[keep]).permute(0, 3, 1, 2).contiguous()
    return ImageSet(imgs, labels, classes, [p for p, _ in bad])


def _fingerprint(folder: Path, items: list[tuple[str, int]], classes: list[str],
                 size: int) -> str:
    """Names, class names, sizes and modification times of every file: a changed, added
    or removed image invalidates the cache."""
    h = hashlib.sha1(f"format={CACHE_FORMAT} size={size}\n".encode())
    for path, label in items:
        st = os.stat(path)
        rel = os.path.relpath(path, folder)
        h.update(f"{rel}\0{classes[label]}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_paths(folder: Path, size: int, cache_dir: str | None = None) -> list[Path]:
    """Where the decoded tensor of a split is looked for, in order: next to the data, then
    the per-user fallback (for read-only data folders)."""
    name = f"{folder.name}_{size}px.pt"
    primary = folder.parent / ".pipeline_cache" / name
    base = Path(os.path.expanduser(cache_dir)) if cache_dir else Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pipeline-data"
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]
    return [primary, base / f"{folder.parent.name}-{key}" / name]


def _read_cache(path: Path, fingerprint: str) -> ImageSet | None:
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, weights_only=True, mmap=True)
        if obj.get("format") != CACHE_FORMAT or obj.get("fingerprint") != fingerprint:
            return None
        return ImageSet(obj["images"], obj["labels"], list(obj["classes"]),
                        list(obj.get("skipped", [])))
    except Exception as err:
        log.warning("%s: ignoring unreadable data cache (%s)", path, _first_line(err))
        return None


def _write_cache(paths: list[Path], data: ImageSet, fingerprint: str) -> Path | None:
    from .checkpoint import atomic_save  # temp file + fsync + os.replace

    payload = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "images": data.images,
               "labels": data.labels, "classes": data.classes, "skipped": data.skipped}
    errors = []
    for path in paths:
        try:
            atomic_save(payload, path)
            return path
        except OSError as err:
            errors.append(f"{path.parent}: {err.strerror or err}")
    log.warning("cannot write the data cache (%s); the next run decodes again",
                "; ".join(errors))
    return None


def load_small_folder(folder: Path, size: int, use_cache: bool = True,
                      classes: Sequence[str] | None = None, max_unreadable: float = 0.1,
                      cache_dir: str | None = None) -> ImageSet:
    """An ImageFolder split as one uint8 tensor: decoded once, then read from the cache.

    The cache (next to the data, else in the user's cache folder) is keyed by a
    fingerprint of the file list, so it never serves stale images; it is written
    atomically, so a crash or a concurrent writer cannot leave a half file.
    """
    items, classes = list_image_folder(folder, classes, require_all=classes is None)
    fingerprint = _fingerprint(folder, items, classes, size) if use_cache else ""
    paths = cache_paths(folder, size, cache_dir)
    if use_cache:
        for path in paths:
            data = _read_cache(path, fingerprint)
            if data is not None:
                if data.skipped:
                    log.warning("%s: skipped %d unreadable image(s) of %d, e.g. %s", folder,
                                len(data.skipped), len(items), data.skipped[0])
                log.debug("%s: decoded images read from %s", folder, path)
                return data
    data = decode_images(items, size, classes, folder, max_unreadable)
    if use_cache:
        _write_cache(paths, data, fingerprint)
    return data


def _torchvision_cifar(cfg: DataConfig, train: bool) -> ImageSet:
    import torchvision

    sets = torchvision.datasets
    cls = sets.CIFAR10 if cfg.dataset == "cifar10" else sets.CIFAR100
    root = _resolve_root(cfg)
    try:
        ds = cls(str(root), train=train, download=cfg.download)
    except RuntimeError as err:
        hint = "" if cfg.download else " (set data.download: true, or point data.root at it)"
        raise DataError(f"{root}: {cfg.dataset} not found or corrupt: {_first_line(err)}"
                        f"{hint}") from None
    except Exception as err:
        raise DataError(f"{root}: cannot read {cfg.dataset}: {_first_line(err)}") from None
    images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.tensor(ds.targets, dtype=torch.long), list(ds.classes))


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


def balanced_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of a fixed, class-balanced, seeded subset of n samples."""
    if n >= len(labels):
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    per_class = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        per_class.append(idx[torch.randperm(len(idx), generator=g)].tolist())
    order: list[int] = []
    for k in range(max(len(ix) for ix in per_class)):  # interleave so any prefix is balanced
        order.extend(ix[k] for ix in per_class if k < len(ix))
    return torch.tensor(sorted(order[:n]), dtype=torch.long)


def balanced_subset(data: ImageSet, n: int, seed: int) -> ImageSet:
    """A fixed, class-balanced, seeded subset of n images (round-robin over classes)."""
    if n >= len(data.labels):
        return data
    chosen = balanced_indices(data.labels, n, seed)
    return ImageSet(data.images[chosen], data.labels[chosen], data.classes, data.skipped)


def _small_size(cfg: DataConfig) -> int:
    if cfg.dataset == "synthetic":
        return cfg.image_size or cfg.synthetic.image_size
    return cfg.image_size or 32


def read_split(cfg: DataConfig, train: bool, seed: int,
               classes: Sequence[str] | None = None) -> ImageSet:
    """A whole split decoded to uint8 (synthetic, torchvision CIFAR, or a small-image tree),
    reduced to the configured class-balanced subset."""
    if cfg.dataset == "synthetic":
        data = synthetic_split(cfg.synthetic, train, seed)
        if cfg.image_size and cfg.image_size != cfg.synthetic.image_size:
            data.images = torch.nn.functional.interpolate(
                data.images.float(), size=(cfg.image_size,) * 2, mode="bilinear",
                antialias=True).round().clamp(0, 255).to(torch.uint8)
    else:
        root = _resolve_root(cfg)
        if cfg.dataset in ("cifar10", "cifar100") and not (root / "train").is_dir():
            data = _torchvision_cifar(cfg, train)
        else:
            train_dir, eval_dir = split_folders(root)
            data = load_small_folder(train_dir if train else eval_dir, _small_size(cfg),
                                     cfg.cache, classes, cfg.max_unreadable, cfg.cache_dir)
    limit = cfg.train_samples if train else cfg.test_samples
    if limit is not None:
        data = balanced_subset(data, limit, seed)
    return data


# --------------------------------------------------------------------------- batching


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


class _Batching:
    """Epoch order, length and sharding shared by both loaders."""

    n: int
    batch_size: int
    train: bool
    seed: int
    rank: int
    world_size: int
    epoch: int

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
        return torch.randperm(self.n, generator=_generator(self.seed, self.epoch, "order"))

    def shard(self, b: int) -> tuple[int, int]:
        """Positions [lo, hi) in the epoch order of this rank's share of global batch b."""
        start = b * self.batch_size
        lo, hi = _share(min(self.batch_size, self.n - start), self.rank, self.world_size)
        return start + lo, start + hi

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate(0)

    def iterate(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError


# --------------------------------------------------------------------------- fast path


class TensorLoader(_Batching):
    """Batches from an in-memory uint8 tensor kept on the training device.

    Training images are zero-padded once; each batch gathers crops at per-image offsets,
    flipped or not, both drawn once per epoch for the whole split (a pure function of
    seed and epoch), then one fused normalization.
    """

    def __init__(self, data: ImageSet, batch_size: int, train: bool, seed: int,
                 device: torch.device, mean: Sequence[float], std: Sequence[float],
                 pad: int = 4, flip: bool = True, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False):
        device = torch.device(device)
        self.n = len(data.labels)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        self.device = device
        self.pad = pad if train else 0
        self.flip = flip and train
        self.height, self.width = data.images.shape[2:]
        images = data.images.to(device)
        if self.pad:
            images = torch.nn.functional.pad(images, (self.pad,) * 4)
        self.images = images.contiguous()
        self.labels = data.labels.to(device)
        m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        # (x/255 - mean) / std = x * scale + offset, one fused addcmul per batch
        self.scale, self.offset = 1 / (255 * s), -m / s
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._rows = torch.arange(self.height, device=device)
        self._cols = torch.arange(self.width, device=device)

    def epoch_draws(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(crop offsets (n, 2) in [0, 2*pad], flip flags (n,)) by position in the epoch."""
        g = _generator(self.seed, self.epoch, "augment")
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
            yield self._normalize(x), self.labels.index_select(0, idx)

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

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.offset, x.float(), self.scale)
        return x.contiguous(memory_format=self.memory_format)


# --------------------------------------------------------------------------- DataLoader path


class _FileSource:
    """Images as files on disk (an ImageFolder split)."""

    def __init__(self, items: list[tuple[str, int]], where: Path):
        self.paths = [p for p, _ in items]
        self.labels = [lab for _, lab in items]
        self.where = where

    def __len__(self) -> int:
        return len(self.paths)

    def open(self, i: int):
        return _open_rgb(self.paths[i])

    def name(self, i: int) -> str:
        return self.paths[i]


class _ArraySource:
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


@dataclass(frozen=True)
class _Views:
    """What a worker does to one image: the training crop or the eval view."""

    train: bool
    size: int
    crop: str  # pad | resized | none
    pad: int
    flip: bool
    resize: int
    scale_min: float


def _resized_crop_box(rng: random.Random, width: int, height: int,
                      scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from `rng` (top, left, h, w)."""
    import math

    area = width * height
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    ratio_in = width / height  # fallback: the whole image, center crop to a valid ratio
    if ratio_in < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif ratio_in > 4 / 3:
        h, w = height, int(round(height * (4 / 3)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _apply_views(img, views: _Views, rng: random.Random | None) -> torch.Tensor:
    """One image -> uint8 CHW tensor of views.size; deterministic given `rng`'s seed."""
    from torchvision.transforms import functional as TF

    s = views.size
    if views.train and views.crop == "resized":
        top, left, h, w = _resized_crop_box(rng, *img.size, (views.scale_min, 1.0))
        img = TF.resized_crop(img, top, left, h, w, [s, s], antialias=True)
    elif views.crop == "resized":  # ImageNet eval view
        img = TF.center_crop(TF.resize(img, views.resize, antialias=True), [s, s])
    else:
        img = fit_square(img, s)
    x = TF.pil_to_tensor(img)
    if views.train and views.crop == "pad" and views.pad:
        p = views.pad
        dy, dx = rng.randint(0, 2 * p), rng.randint(0, 2 * p)
        x = torch.nn.functional.pad(x, (p, p, p, p))[:, dy:dy + s, dx:dx + s]
    if views.train and views.flip and rng.random() < 0.5:
        x = x.flip(2)
    return x.contiguous()


class _AugmentedDataset(torch.utils.data.Dataset):
    """Items are (index, epoch, position): the augmentation of a sample depends only on
    (seed, epoch, position in the epoch), never on which worker or rank draws it."""

    def __init__(self, source: _FileSource | _ArraySource, views: _Views, seed: int):
        self.source, self.views, self.seed = source, views, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int, int]):
        i, epoch, pos = key
        rng = random.Random(_mix(self.seed, epoch, pos, "view")) if self.views.train else None
        try:
            img = self.source.open(i)
        except Exception as err:  # unreadable file: the batch goes on without it
            return None, self.source.labels[i], self.source.name(i), _first_line(err)
        return _apply_views(img, self.views, rng), self.source.labels[i], None, None


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


class FolderLoader(_Batching):
    """The DataLoader path: workers decode and augment, uint8 batches travel (pinned) to
    the device, normalization runs there. Unreadable files are dropped from their batch
    and reported once with a count; the workers persist across epochs."""

    def __init__(self, source: _FileSource | _ArraySource, batch_size: int, train: bool,
                 seed: int, cfg: DataConfig, device: torch.device, mean: Sequence[float],
                 std: Sequence[float], views: _Views, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False, indices: torch.Tensor | None = None):
        from torchvision.transforms import functional  # noqa: F401  (import once, before
        # the workers fork, rather than in each of them)

        self.source = source
        self.indices = (indices if indices is not None else torch.arange(len(source))).tolist()
        self.n = len(self.indices)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        self.device = torch.device(device)
        self.cfg, self.views = cfg, views
        self.dataset = _AugmentedDataset(source, views, seed)
        m = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.scale, self.offset = 1 / (255 * s), -m / s
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._start = 0
        self._loader: torch.utils.data.DataLoader | None = None
        self._bad: dict[str, str] = {}
        self._reported = 0

    @property
    def labels(self) -> list[int]:
        return [self.source.labels[i] for i in self.indices]

    def _dataloader(self) -> torch.utils.data.DataLoader:
        if self._loader is None:
            workers = self.cfg.num_workers
            self._loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=_BatchPlan(self), num_workers=workers,
                collate_fn=_collate, pin_memory=self.cfg.pin_memory and self.device.type == "cuda",
                persistent_workers=self.cfg.persistent_workers and workers > 0,
                prefetch_factor=self.cfg.prefetch_factor if workers > 0 else None)
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
            x = torch.addcmul(self.offset, x.float(), self.scale)
            yield (x.contiguous(memory_format=self.memory_format),
                   y.to(self.device, non_blocking=True))

    def _report_unreadable(self) -> None:
        if len(self._bad) == self._reported:
            return
        self._reported = len(self._bad)
        bad = list(self._bad.items())
        _check_unreadable(self.source.where, bad, self.n, self.cfg.max_unreadable)

    def probe(self, count: int = 16) -> None:
        """Decode a few files spread over the split: fail early, in one line, when most
        of them are unreadable (the wrong folder, an undownloaded LFS tree...)."""
        picks = sorted({self.indices[i * self.n // count] for i in range(min(count, self.n))})
        bad = []
        for i in picks:
            try:
                self.source.open(i)
            except Exception as err:
                bad.append((self.source.name(i), _first_line(err)))
        if bad and len(bad) * 2 > len(picks):
            raise DataError(f"{bad[0][0]}: unreadable image ({bad[0][1]}); {len(bad)} of "
                            f"{len(picks)} sampled images in {self.source.where} are unreadable")

    def close(self) -> None:
        """Stop the persistent workers now (they also stop when the loader is freed)."""
        self._loader = None


# --------------------------------------------------------------------------- entry points


def use_tensor_path(cfg: DataConfig) -> bool:
    if cfg.loader != "auto":
        return cfg.loader == "tensor"
    if cfg.train_crop == "resized":
        return False
    if cfg.dataset in ("cifar10", "cifar100", "synthetic"):
        return (cfg.image_size or 32) <= SMALL_IMAGE_MAX
    return (cfg.image_size or 224) <= SMALL_IMAGE_MAX


def _crop_mode(cfg: DataConfig) -> str:
    if cfg.train_crop != "auto":
        return cfg.train_crop
    return "resized" if cfg.dataset == "imagefolder" and not use_tensor_path(cfg) else "pad"


def input_size(cfg: DataConfig) -> tuple[int, int, int]:
    """(C, H, W) of the batches: image_size, else the data's native size for small-image
    sets and 224 for imagefolder on the DataLoader path."""
    if cfg.dataset == "imagefolder" and not use_tensor_path(cfg):
        s = cfg.image_size or 224
    else:
        s = _small_size(cfg)
    return (3, s, s)


@contextlib.contextmanager
def _rank_zero_first() -> Iterator[None]:
    """Under DDP the first process of each node reads (and caches) the data before the
    others, which then find the cache instead of decoding too."""
    import torch.distributed as dist

    active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if active and not first:
        dist.barrier()
    try:
        yield
    finally:
        if active and first:
            dist.barrier()


def build_data(cfg: DataConfig, batch_size: int, eval_batch_size: int, seed: int,
               device: torch.device, rank: int = 0, world_size: int = 1,
               channels_last: bool = False) -> DataBundle:
    """Train and test loaders for one stage (batch sizes are global): the fast path for
    small images, the DataLoader path otherwise (see `use_tensor_path`)."""
    kw = dict(seed=seed, device=torch.device(device), rank=rank, world_size=world_size,
              channels_last=channels_last)
    build = _build_tensor if use_tensor_path(cfg) else _build_dataloader
    bundle = build(cfg, batch_size, eval_batch_size, **kw)
    log.info("data: %s", bundle.description)
    return bundle


def _build_tensor(cfg: DataConfig, batch_size: int, eval_batch_size: int, seed: int,
                  device: torch.device, **kw) -> DataBundle:
    with _rank_zero_first():
        train = read_split(cfg, True, seed)
        test = read_split(cfg, False, seed, classes=train.classes)
    mean, std = normalization(cfg)
    pad = cfg.pad if _crop_mode(cfg) == "pad" else 0
    tl = TensorLoader(train, batch_size, True, seed, device, mean, std, pad=pad, flip=cfg.flip,
                      **kw)
    vl = TensorLoader(test, eval_batch_size, False, seed, device, mean, std, pad=0, flip=False,
                      **kw)
    nc = cfg.synthetic.num_classes if cfg.dataset == "synthetic" else len(train.classes)
    nc = max(nc, int(train.labels.max()) + 1)
    shape = tuple(train.images.shape[1:])
    where = "" if device.type == "cpu" else f" on {device}"
    desc = f"{cfg.dataset} ({tl.n} train / {vl.n} test, {shape}, in memory{where})"
    return DataBundle(tl, vl, nc, shape, desc)


def _build_dataloader(cfg: DataConfig, batch_size: int, eval_batch_size: int, seed: int,
                      device: torch.device, **kw) -> DataBundle:
    root = _resolve_root(cfg)
    if cfg.dataset == "imagefolder" or (cfg.dataset != "synthetic" and (root / "train").is_dir()):
        train_dir, eval_dir = split_folders(root)
        items, classes = list_image_folder(train_dir)
        test_items, _ = list_image_folder(eval_dir, classes, require_all=False)
        train_src: _FileSource | _ArraySource = _FileSource(items, train_dir)
        test_src: _FileSource | _ArraySource = _FileSource(test_items, eval_dir)
        where = str(root)
        labels = (torch.tensor(train_src.labels), torch.tensor(test_src.labels))
        limits = (cfg.train_samples, cfg.test_samples)
        train_idx, test_idx = (None if n is None else balanced_indices(lab, n, seed)
                               for lab, n in zip(labels, limits, strict=True))
    else:  # decoded in memory already (synthetic, torchvision CIFAR): subsets applied
        train_set, test_set = read_split(cfg, True, seed), read_split(cfg, False, seed)
        classes = train_set.classes
        train_src, test_src = _ArraySource(train_set, "train"), _ArraySource(test_set, "test")
        where = cfg.dataset if cfg.dataset == "synthetic" else str(root)
        train_idx = test_idx = None
    crop, s = _crop_mode(cfg), input_size(cfg)[1]
    views = dict(size=s, crop=crop, pad=cfg.pad, flip=cfg.flip, scale_min=cfg.crop_scale,
                 resize=cfg.resize_size or int(round(s * 256 / 224)))
    mean, std = normalization(cfg)
    common = dict(cfg=cfg, device=device, mean=mean, std=std, **kw)
    tl = FolderLoader(train_src, batch_size, True, seed, views=_Views(True, **views),
                      indices=train_idx, **common)
    vl = FolderLoader(test_src, eval_batch_size, False, seed, views=_Views(False, **views),
                      indices=test_idx, **common)
    tl.probe()
    vl.probe()
    desc = (f"{cfg.dataset} {where} ({tl.n} train / {vl.n} test, {crop} crop {s}px, "
            f"DataLoader x{cfg.num_workers} workers)")
    return DataBundle(tl, vl, len(classes), (3, s, s), desc)


def describe(cfg: DataConfig) -> tuple[int, tuple[int, int, int]]:
    """(number of classes, input size C,H,W) without decoding any image."""
    if cfg.dataset == "synthetic":
        return cfg.synthetic.num_classes, input_size(cfg)
    root = _resolve_root(cfg)
    if cfg.dataset in ("cifar10", "cifar100") and not (root / "train").is_dir():
        return (10 if cfg.dataset == "cifar10" else 100), input_size(cfg)
    train_dir, _ = split_folders(root)
    return len(class_names(train_dir)), input_size(cfg)


def _has_image(folder: Path) -> bool:
    for _, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
               for f in filenames):
            return True
    return False


def check_available(cfg: DataConfig) -> None:
    """Fail early, in one line naming the path, when the data cannot be found (before any
    stage runs). Cheap: looks at folders, not at every image."""
    if cfg.dataset == "synthetic":
        return
    root = _resolve_root(cfg)
    if cfg.dataset in ("cifar10", "cifar100") and not (root / "train").is_dir():
        base = "cifar-10-batches-py" if cfg.dataset == "cifar10" else "cifar-100-python"
        if not (root / base).is_dir() and not cfg.download:
            raise DataError(f"{root}: no {cfg.dataset} found (expected {root}/train/<class>/ "
                            f"images or torchvision's {base}/; set data.download: true to fetch)")
        return
    train_dir, eval_dir = split_folders(root)
    train_classes = class_names(train_dir)
    for folder in (train_dir, eval_dir):
        classes = class_names(folder)
        if not any(_has_image(folder / c) for c in classes):
            raise DataError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...) in "
                            f"its {len(classes)} class folder(s)")
    unknown = sorted(set(class_names(eval_dir)) - set(train_classes))
    if unknown:
        raise DataError(f"{eval_dir / unknown[0]}: class folder not among the training classes")
