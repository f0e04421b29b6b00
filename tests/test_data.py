"""Data: the fast path and the DataLoader path agree, augment as documented, shard and
resume exactly; ImageFolder trees, CIFAR-100 files, the decode cache, and one-line errors."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import TINY, deep_update
from pipeline import data as D
from pipeline.config import ConfigError, Loader
from pipeline.data import DataConfig, DataError, FolderLoader, ImageSet, TensorLoader
from pipeline.data import cache as data_cache
from pipeline.data.augment import Views
from pipeline.data.config import crop_mode
from pipeline.data.folder_loader import ArraySource

CPU = torch.device("cpu")
RAW = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)  # normalization that keeps 0-255 values


def data_cfg(**kw) -> DataConfig:
    return Loader("test.yaml").load(DataConfig, kw, "data")


def random_set(n: int, size: int = 8, seed: int = 0, labels: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(1, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) if labels is None else labels
    return ImageSet(images, labels, [str(i) for i in range(int(labels.max()) + 1)])


def folder_loader(data: ImageSet, batch_size: int, train: bool = True, seed: int = 0,
                  rank: int = 0, world_size: int = 1, workers: int = 0, **cfg) -> FolderLoader:
    cfg = data_cfg(dataset="synthetic", num_workers=workers, **cfg)
    size = data.images.shape[-1]
    views = Views(train, size, crop_mode(cfg), cfg.pad, cfg.flip, size, cfg.crop_scale)
    return FolderLoader(ArraySource(data, "mem"), batch_size, train, seed, cfg, CPU,
                        views=views, rank=rank, world_size=world_size, **RAW)


def tensor_loader(data: ImageSet, batch_size: int, train: bool = True, seed: int = 0,
                  **kw) -> TensorLoader:
    return TensorLoader(data, batch_size, train, seed, CPU, **RAW, **kw)


def epoch(loader, e: int = 0, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(e)
    return list(loader.iterate(start))


def rows(batches) -> list[tuple[bytes, int]]:
    """The (image bytes, label) pairs of an epoch, sorted: the epoch's content, order aside."""
    out = []
    for x, y in batches:
        for img, lab in zip(x.round().to(torch.uint8), y.tolist(), strict=True):
            out.append((img.numpy().tobytes(), lab))
    return sorted(out)


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb)
                                    for (xa, ya), (xb, yb) in zip(a, b, strict=True))


def write_tree(root: Path, classes=("ant", "bee", "cat"), per_class: int = 6, size=(12, 12),
               fmt: str = "png", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", 2)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.{fmt}")
    return root


# --------------------------------------------------------------------------- both paths agree


def test_fast_path_and_dataloader_path_give_the_same_epoch(tmp_path):
    """Same images and labels per epoch (order aside) from a small generated tree of PNGs of
    mixed sizes, through the real entry point, train (crop off) and eval."""
    root = write_tree(tmp_path / "tree", size=(10, 14))
    for i, c in enumerate(("ant", "bee")):  # other sizes: resized and center-cropped alike
        Image.fromarray(np.full((9, 20, 3), 40 * i + 30, np.uint8)).save(
            root / "train" / c / "wide.png")
    common = dict(dataset="imagefolder", root=str(root), image_size=8, train_crop="none",
                  flip=False, cache=False)
    fast = D.build_data(data_cfg(loader="tensor", **common), 5, 4, 0, CPU)
    slow = D.build_data(data_cfg(loader="dataloader", num_workers=0, **common), 5, 4, 0, CPU)
    assert isinstance(fast.train, TensorLoader) and isinstance(slow.train, FolderLoader)
    assert fast.num_classes == slow.num_classes == 3
    assert fast.input_size == slow.input_size == (3, 8, 8)
    for e in (0, 1):
        assert len(rows(epoch(fast.train, e))) == 20  # 20 images; no partial batch dropped
        assert rows(epoch(fast.train, e)) == rows(epoch(slow.train, e))
    assert rows(epoch(fast.test)) == rows(epoch(slow.test))
    assert len(rows(epoch(fast.test))) == 6


def test_both_paths_see_the_same_labels_in_the_same_order_with_augmentation():
    data = random_set(40, labels=torch.arange(40) % 4)
    fast, slow = tensor_loader(data, 8), folder_loader(data, 8)
    a, b = epoch(fast, 3), epoch(slow, 3)
    assert sorted(torch.cat([y for _, y in a]).tolist()) == sorted(
        torch.cat([y for _, y in b]).tolist())
    assert [y.tolist() for _, y in a] == [y.tolist() for _, y in b]  # same order too


# --------------------------------------------------------------------------- augmentation


def crop_and_flip_of(out: torch.Tensor, src: torch.Tensor, pad: int) -> tuple[int, int, bool]:
    """The (dy, dx, flipped) with which `out` was cut from `src` padded by `pad`."""
    _, h, w = src.shape
    padded = torch.nn.functional.pad(src, (pad,) * 4)
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            view = padded[:, dy:dy + h, dx:dx + w]
            for flip in (False, True):
                if torch.equal(out, view.flip(2) if flip else view):
                    return dy, dx, flip
    raise AssertionError("output is not a crop of the padded image")


@pytest.mark.parametrize("make", [tensor_loader, folder_loader], ids=["tensor", "dataloader"])
def test_crops_stay_inside_the_padded_image_and_flip_half_the_time(make):
    data = random_set(300, size=6)  # label i = image i, so each output names its source
    loader = make(data, 64, pad=2)
    seen, flips, offsets = 0, 0, set()
    for x, y in epoch(loader):
        for img, i in zip(x.round().to(torch.uint8), y.tolist(), strict=True):
            dy, dx, flip = crop_and_flip_of(img, data.images[i], 2)
            seen, flips = seen + 1, flips + flip
            offsets.add((dy, dx))
    assert seen == 300
    assert 0.4 < flips / seen < 0.6
    assert len(offsets) == 25  # every one of the (2 pad + 1)^2 positions occurs


def test_normalization_uses_the_dataset_statistics():
    data = ImageSet(torch.full((4, 3, 4, 4), 128, dtype=torch.uint8), torch.zeros(4).long(), ["a"])
    mean, std = D.normalization(data_cfg(dataset="cifar10"))
    x, _ = next(iter(TensorLoader(data, 4, False, 0, CPU, mean, std)))
    expected = (128 / 255 - torch.tensor(mean)) / torch.tensor(std)
    assert torch.allclose(x[0, :, 0, 0], expected, atol=1e-5)
    assert D.normalization(data_cfg(dataset="cifar100"))[0] == D.CIFAR100_MEAN
    assert D.normalization(data_cfg(dataset="imagefolder"))[1] == D.IMAGENET_STD
    assert D.normalization(data_cfg(mean=[0.1, 0.2, 0.3]))[0] == (0.1, 0.2, 0.3)


# --------------------------------------------------------------------------- order, shards, resume


@pytest.mark.parametrize("make", [tensor_loader, folder_loader], ids=["tensor", "dataloader"])
def test_same_seed_same_order_and_augmentation(make):
    data = random_set(50)
    a, b, other = make(data, 16), make(data, 16), make(data, 16, seed=1)
    assert same_batches(epoch(a, 0), epoch(b, 0))
    assert same_batches(epoch(a, 1), epoch(b, 1))
    assert not same_batches(epoch(a, 0), epoch(a, 1))
    assert not same_batches(epoch(a, 0), epoch(other, 0))


@pytest.mark.parametrize("make", [tensor_loader, folder_loader], ids=["tensor", "dataloader"])
@pytest.mark.parametrize("train", [True, False])
def test_rank_shards_partition_each_global_batch(make, train):
    data = random_set(45)
    whole = epoch(make(data, 16, train=train), 2)
    shards = [epoch(make(data, 16, train=train, rank=r, world_size=2), 2) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == len(whole) == 3
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *shards, strict=True):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
        assert abs(len(y0) - len(y1)) <= 1


def test_training_drops_only_a_tiny_last_batch_and_eval_keeps_everything():
    data = random_set(33)
    assert len(tensor_loader(data, 16)) == 2  # 33 = 16 + 16 + 1: the lone image is dropped
    assert len(tensor_loader(data, 16, train=False)) == 3
    labels = [y for r in (0, 1) for _, y in epoch(
        tensor_loader(data, 16, train=False, rank=r, world_size=2))]
    assert sorted(torch.cat(labels).tolist()) == list(range(33))


@pytest.mark.parametrize("make", [tensor_loader, folder_loader], ids=["tensor", "dataloader"])
def test_iterate_from_a_batch_resumes_exactly(make):
    data = random_set(70)
    full = epoch(make(data, 16), 4)
    restarted = make(data, 16)  # a fresh process after a crash
    assert same_batches(epoch(restarted, 4, start=2), full[2:])
    assert epoch(restarted, 4, start=len(full)) == []


def test_dataloader_workers_persist_and_stay_deterministic():
    data = random_set(48)
    ref = folder_loader(data, 16)
    loader = folder_loader(data, 16, workers=2, persistent_workers=True)
    first = epoch(loader, 0)
    workers = list(loader._dataloader()._iterator._workers)
    second = epoch(loader, 1)
    resumed = epoch(loader, 1, start=1)
    loader.set_epoch(2)
    for k, _ in enumerate(loader.iterate(0)):  # stop at the last batch, as the trainer does
        if k + 1 == len(loader):
            break
    assert same_batches(epoch(loader, 0), first)  # the abandoned iteration left no residue
    assert loader._dataloader()._iterator._workers == workers  # the same processes
    assert all(w.is_alive() for w in workers)
    assert same_batches(first, epoch(ref, 0)) and same_batches(second, epoch(ref, 1))
    assert same_batches(resumed, second[1:])
    loader.close()  # dropping the loader (no reference cycle) stops them at once
    for w in workers:
        w.join(timeout=5)
    assert not any(w.is_alive() for w in workers)


def test_fast_path_keeps_the_images_on_the_training_device():
    data = random_set(8)
    loader = tensor_loader(data, 4)
    assert loader.images.device == CPU and loader.images.dtype == torch.uint8
    if torch.cuda.is_available():
        gpu = TensorLoader(data, 4, True, 0, torch.device("cuda"), **RAW)
        x, y = next(iter(gpu))
        assert gpu.images.is_cuda and x.is_cuda and y.is_cuda


# --------------------------------------------------------------------------- folders and errors


def one_line_error(fn, *args, **kw) -> str:
    with pytest.raises(DataError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_and_empty_folders_are_one_line_errors_naming_the_path(tmp_path):
    def check(root):
        return one_line_error(D.check_available, data_cfg(dataset="imagefolder", root=str(root)))

    assert str(tmp_path / "absent") in check(tmp_path / "absent")
    (tmp_path / "a").mkdir()
    assert "no train/ folder" in check(tmp_path / "a")
    (tmp_path / "a" / "train").mkdir()
    assert "no val/ or test/" in check(tmp_path / "a")
    (tmp_path / "a" / "val").mkdir()
    assert "no class folders" in check(tmp_path / "a")
    (tmp_path / "a" / "train" / "cat").mkdir()
    (tmp_path / "a" / "train" / "cat" / "notes.txt").write_text("no images here")
    (tmp_path / "a" / "val" / "cat").mkdir()
    msg = check(tmp_path / "a")
    assert "no images" in msg and str(tmp_path / "a" / "train") in msg
    tree = write_tree(tmp_path / "b")
    (tree / "train" / "dog").mkdir()
    msg = one_line_error(D.list_image_folder, tree / "train")
    assert "dog: class folder has no images" in msg


def test_eval_labels_follow_the_training_classes(tmp_path):
    root = write_tree(tmp_path / "t", classes=("a", "b", "c"))
    for f in (root / "val" / "a").iterdir():  # val without class a must not shift b, c
        f.unlink()
    (root / "val" / "a").rmdir()
    items, classes = D.list_image_folder(root / "val", D.class_names(root / "train"),
                                         require_all=False)
    assert classes == ["a", "b", "c"] and {lab for _, lab in items} == {1, 2}
    (root / "val" / "zebra").mkdir()
    Image.new("RGB", (4, 4)).save(root / "val" / "zebra" / "z.png")
    msg = one_line_error(D.check_available, data_cfg(dataset="imagefolder", root=str(root)))
    assert "zebra" in msg and "not among the training classes" in msg


def test_unreadable_images_are_skipped_and_counted_in_both_paths(tmp_path, caplog):
    root = write_tree(tmp_path / "t", per_class=8)
    (root / "train" / "bee" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    Image.new("L", (12, 12), 99).save(root / "train" / "cat" / "gray.png")  # grayscale is fine
    common = dict(dataset="imagefolder", root=str(root), image_size=8, cache=False,
                  train_crop="none", flip=False)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        fast = D.build_data(data_cfg(loader="tensor", **common), 50, 50, 0, CPU)
    warn = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warn) == 1 and "skipped 1 unreadable image(s) of 26" in warn[0]
    assert "broken.png" in warn[0]
    caplog.clear()
    slow = D.build_data(data_cfg(loader="dataloader", num_workers=0, **common), 50, 50, 0, CPU)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        a, b = rows(epoch(fast.train)), rows(epoch(slow.train))
        rows(epoch(slow.train, 1))  # reported once, not every epoch
    warn = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warn) == 1 and "broken.png" in warn[0] and "1 unreadable" in warn[0]
    assert a == b and len(a) == 25


def test_a_folder_of_unreadable_files_is_an_error(tmp_path):
    root = write_tree(tmp_path / "t", classes=("a", "b"), per_class=3)
    for f in (root / "train").rglob("*.png"):
        f.write_bytes(b"not an image")
    for loader in ("tensor", "dataloader"):
        msg = one_line_error(D.build_data, data_cfg(
            dataset="imagefolder", root=str(root), image_size=8, loader=loader, cache=False),
            4, 4, 0, CPU)
        assert "unreadable image" in msg and str(root / "train") in msg


# --------------------------------------------------------------------------- the decode cache


def test_cache_is_reused_invalidated_and_falls_back_when_read_only(tmp_path, monkeypatch):
    root = write_tree(tmp_path / "t")
    folder = root / "train"
    first = D.load_small_folder(folder, 8, cache_dir=str(tmp_path / "user"))
    primary, fallback = D.cache_paths(folder, 8, str(tmp_path / "user"))
    assert primary.is_file() and not fallback.exists()
    assert not list(primary.parent.glob("*.tmp"))  # written atomically

    def no_decode(*a, **k):
        raise AssertionError("decoded again")

    with monkeypatch.context() as m:
        m.setattr(data_cache, "decode_images", no_decode)
        again = D.load_small_folder(folder, 8, cache_dir=str(tmp_path / "user"))
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)

    Image.new("RGB", (12, 12), (1, 2, 3)).save(folder / "ant" / "new.png")  # data changed
    grown = D.load_small_folder(folder, 8, cache_dir=str(tmp_path / "user"))
    assert len(grown.labels) == len(first.labels) + 1

    # a read-only data folder: the cache goes to the user's folder instead
    real_save = data_cache.atomic_save

    def read_only(obj, path):
        if root in Path(path).parents:
            raise PermissionError(13, "Read-only file system")
        real_save(obj, path)

    primary.unlink()
    monkeypatch.setattr(data_cache, "atomic_save", read_only)
    D.load_small_folder(folder, 8, cache_dir=str(tmp_path / "user"))
    assert fallback.is_file() and not primary.exists()
    monkeypatch.setattr(data_cache, "decode_images", no_decode)
    assert len(D.load_small_folder(folder, 8, cache_dir=str(tmp_path / "user")).labels) == 19


def test_a_corrupt_cache_is_ignored(tmp_path, caplog):
    root = write_tree(tmp_path / "t")
    first = D.load_small_folder(root / "train", 8, cache_dir=str(tmp_path / "user"))
    primary = D.cache_paths(root / "train", 8)[0]
    primary.write_bytes(primary.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        again = D.load_small_folder(root / "train", 8, cache_dir=str(tmp_path / "user"))
    assert torch.equal(again.images, first.images)
    assert any("ignoring unreadable data cache" in r.getMessage() for r in caplog.records)


def test_the_decode_log_says_whether_the_images_are_cached(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(data_cache, "SAY_DECODING_ABOVE", 0)
    root = write_tree(tmp_path / "t")
    for use_cache, words in ((False, "data.cache is off"), (True, "cached for the next run")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pipeline.data"):
            D.load_small_folder(root / "train", 8, use_cache=use_cache,
                                cache_dir=str(tmp_path / "user"))
        said = [r.getMessage() for r in caplog.records if "decoding" in r.getMessage()]
        assert len(said) == 1 and words in said[0], said
    assert D.cache_paths(root / "train", 8)[0].is_file()


# --------------------------------------------------------------------------- CIFAR, config


def fake_cifar100(root: Path, monkeypatch, n_train: int = 200, n_test: int = 100) -> None:
    """torchvision's CIFAR-100 python files, with its md5 checks turned off."""
    import torchvision.datasets.cifar as tv_cifar

    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "fine_labels": (np.arange(n) % 100).tolist()}
        (base / name).write_bytes(pickle.dumps(entry))
    (base / "meta").write_bytes(pickle.dumps(
        {"fine_label_names": [f"c{i}" for i in range(100)]}))
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)


def test_cifar100_from_torchvision_files(tmp_path, monkeypatch):
    fake_cifar100(tmp_path, monkeypatch)
    cfg = data_cfg(dataset="cifar100", root=str(tmp_path))
    D.check_available(cfg)
    assert D.describe(cfg) == (100, (3, 32, 32))
    bundle = D.build_data(cfg, 64, 50, 0, CPU)
    assert bundle.num_classes == 100 and isinstance(bundle.train, TensorLoader)
    assert bundle.train.num_samples == 200 and bundle.test.num_samples == 100
    x, y = next(iter(bundle.train))
    assert x.shape == (64, 3, 32, 32) and y.max() < 100
    missing = one_line_error(D.check_available, data_cfg(dataset="cifar10", root=str(tmp_path)))
    assert "cifar-10-batches-py" in missing and "download" in missing


def test_config_rejects_impossible_combinations():
    with pytest.raises(ConfigError, match="data.train_crop"):
        data_cfg(loader="tensor", train_crop="resized")
    with pytest.raises(ConfigError, match="data.image_size"):
        data_cfg(dataset="imagefolder", loader="tensor")
    with pytest.raises(ConfigError, match="data.std"):
        data_cfg(std=[0.2, 0.2])
    assert D.use_tensor_path(data_cfg(dataset="imagefolder", image_size=64))
    assert not D.use_tensor_path(data_cfg(dataset="imagefolder"))
    assert D.input_size(data_cfg(dataset="imagefolder", image_size=160)) == (3, 160, 160)


# --------------------------------------------------------------------------- end to end


def mixed_tree(root: Path) -> Path:
    """JPEG and PNG files of mixed sizes, one grayscale and one corrupt file."""
    rng = np.random.default_rng(1)
    sizes = [(40, 30), (64, 64), (50, 70), (33, 33)]
    for split, count in (("train", 8), ("val", 3)):
        for k, c in enumerate(("n01", "n02", "n03")):
            (root / split / c).mkdir(parents=True)
            for i in range(count):
                w, h = sizes[(i + k) % len(sizes)]
                base = np.full((h, w, 3), 60 + 60 * k, np.uint8)
                img = Image.fromarray(np.clip(base + rng.integers(0, 40, (h, w, 3)), 0, 255)
                                      .astype(np.uint8))
                img.save(root / split / c / f"{i}.{'jpg' if i % 2 else 'png'}")
    Image.new("L", (45, 45), 128).save(root / "train" / "n01" / "gray.jpg")
    (root / "train" / "n02" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.mark.parametrize("loader", ["dataloader", "tensor"])
def test_imagefolder_tree_trains_through_the_cli(tmp_path, cli, loader):
    root = mixed_tree(tmp_path / "tree")
    cfg = deep_update(TINY, {
        "out_dir": str(tmp_path / "runs"),
        "data": {"dataset": "imagefolder", "root": str(root), "image_size": 32,
                 "loader": loader, "num_workers": 1},
    })
    del cfg["data"]["synthetic"]
    cfg["stages"] = {"pretrain": {**TINY["stages"]["pretrain"], "epochs": 1, "batch_size": 8}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    code, out, err = cli("run", path)
    assert code == 0, err
    assert "skipped 1 unreadable image(s) of 26" in err and "corrupt.jpg" in err
    if loader == "dataloader":  # the ImageNet presets: RandomResizedCrop, resize + center crop
        assert "resized crop 32px" in err
    run_dir = tmp_path / "runs" / "tiny"
    summary = json.loads((run_dir / "pretrain" / "summary.json").read_text())
    assert summary["status"] == "completed"
    import pipeline

    model = pipeline.load_model(run_dir / "pretrain" / "model.pt")
    assert model.fc.out_features == 3  # the number of classes comes from the data


# --------------------------------------------------------------------------- real CIFAR-10


@pytest.mark.realdata
def test_real_cifar10_tree_counts_and_classes(real_cifar10):
    cfg = data_cfg(dataset="cifar10", root=str(real_cifar10))
    D.check_available(cfg)
    assert D.describe(cfg) == (10, (3, 32, 32))
    items, classes = D.list_image_folder(real_cifar10 / "test")
    assert len(items) == 10_000 and classes[0] == "airplane"


# --------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int, init: str, root: str, out: str) -> None:
    import torch.distributed as dist

    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        cfg = data_cfg(dataset="imagefolder", root=root, image_size=8, loader="tensor")
        bundle = D.build_data(cfg, 8, 8, 0, CPU, rank=rank, world_size=world)
        bundle.train.set_epoch(1)
        torch.save([y for _, y in bundle.train], f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_share_one_decode_and_partition_the_batches(tmp_path):
    """Two gloo processes: the first decodes and caches while the other waits, then both
    take their halves of the same global batches."""
    import torch.multiprocessing as mp

    root = write_tree(tmp_path / "t", per_class=7)
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_ddp_worker, args=(2, init, str(root), str(tmp_path)), nprocs=2, join=True)
    shards = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    cfg = data_cfg(dataset="imagefolder", root=str(root), image_size=8, loader="tensor")
    whole = D.build_data(cfg, 8, 8, 0, CPU).train
    whole.set_epoch(1)
    expected = [y for _, y in whole]
    assert len(shards[0]) == len(shards[1]) == len(expected) == 3
    for y, y0, y1 in zip(expected, *shards, strict=True):
        assert torch.equal(torch.cat([y0, y1]), y)
    assert D.cache_paths(root / "train", 8)[0].is_file()
