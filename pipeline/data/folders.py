"""ImageFolder trees on disk (root/train and root/val or root/test, one folder per class):
listing them, opening their files, and counting the unreadable ones."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import first_line
from .config import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def reason(err: BaseException) -> str:
    """Why an image could not be read: the error's first line, at most 160 characters."""
    return first_line(err)[:160]


def class_names(folder: Path) -> list[str]:
    """The class subfolders of an ImageFolder split, sorted (label k = k-th name)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: data folder not found")
    classes = sorted(e.name for e in os.scandir(folder)
                     if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{folder}: no class folders (expected {folder}/<class>/<image>)")
    return classes


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(folder: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
    return out


def has_image(folder: Path) -> bool:
    """Whether any image file lies under `folder`; stops at the first one (reads only the
    start of a large class folder's listing)."""
    subdirs = []
    try:
        with os.scandir(folder) as entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    subdirs.append(e.path)
                elif _is_image(e.name):
                    return True
    except OSError:
        return False
    return any(has_image(Path(d)) for d in sorted(subdirs))


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


def split_folders(root: Path, split: str = "auto") -> tuple[Path, Path]:
    """root/train and root/val (or root/test; `split` names one), or a one-line error
    naming what is missing."""
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found (data.root)")
    train = root / "train"
    if not train.is_dir():
        raise DataError(f"{root}: no train/ folder (expected {root}/train/<class>/<image> and "
                        "val/ or test/ beside it)")
    if split != "auto":
        if not (root / split).is_dir():
            raise DataError(f"{root}: no {split}/ folder beside train/ (the split asked for)")
        return train, root / split
    for name in ("val", "test"):
        if (root / name).is_dir():
            return train, root / name
    raise DataError(f"{root}: no val/ or test/ folder beside train/")


def open_rgb(path: str):
    """The image at `path` as an RGB PIL image, fully decoded (raises if unreadable)."""
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")  # decodes now: truncated files raise here


def check_unreadable(where: Path | str, bad: list[tuple[str, str]], total: int,
                     limit: float, count: int | None = None) -> None:
    """Warn about the (path, reason) of unreadable files, or fail when more than `limit`
    of the `total` files of a split are unreadable. `count`: how many there are in all
    (over every rank) when `bad` lists only some of them."""
    n = len(bad) if count is None else count
    if not n or not bad:
        return
    if n == total or n > limit * total:
        raise DataError(f"{bad[0][0]}: unreadable image ({bad[0][1]}); {n} of {total} "
                        f"images in {where} are unreadable, more than data.max_unreadable "
                        f"({limit:g})")
    log.warning("%s: skipped %d unreadable image(s) of %d, e.g. %s (%s)", where, n, total,
                bad[0][0], bad[0][1])
