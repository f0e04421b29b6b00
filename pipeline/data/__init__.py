"""Data sets and loaders.

Two ways to feed the training step, behind one loader interface (`batching`):

* The fast path (`tensor_loader.TensorLoader`, small images, CIFAR scale): the whole
  split is decoded once into one uint8 tensor (`cache`: cached on disk next to the data,
  so the next run starts in seconds), moved to the training device once, and augmented
  there in batches.
* The DataLoader path (`folder_loader.FolderLoader`, large images): torch DataLoader
  workers decode and augment (`augment`: ImageNet presets, RandomResizedCrop + flip to
  train, resize + center crop to evaluate), hand uint8 batches over in pinned memory, and
  the normalization runs on the device.

Both share the batching contract the trainer's exact resume relies on: batch b of epoch e
is the same images, augmented the same way, for any number of processes and after any
restart. `sources` reads the data sets (synthetic, torchvision CIFAR, ImageFolder trees,
listed by `folders`); `config` holds the `data:` section; `build.build_data` puts it
together for a stage.

Modules: config, folders, images, augment, cache, sources, batching, tensor_loader,
folder_loader, build.
"""

from .build import DataBundle, build_data
from .cache import cache_paths, load_small_folder
from .config import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    IMAGENET_STD,
    SYNTHETIC_MEAN,
    SYNTHETIC_STD,
    DataConfig,
    DataError,
    SyntheticConfig,
    input_size,
    normalization,
    use_tensor_path,
)
from .folder_loader import FolderLoader
from .folders import class_names, list_image_folder
from .images import ImageSet
from .sources import check_available, describe, read_split
from .tensor_loader import TensorLoader

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "IMAGENET_STD", "SYNTHETIC_MEAN",
    "SYNTHETIC_STD", "DataBundle", "DataConfig",
    "DataError", "FolderLoader", "ImageSet", "SyntheticConfig", "TensorLoader", "build_data",
    "cache_paths", "check_available", "class_names", "describe", "input_size",
    "list_image_folder", "load_small_folder", "normalization", "read_split", "use_tensor_path",
]
