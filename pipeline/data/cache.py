"""The fast path's decode of an ImageFolder split into one uint8 tensor, and the on-disk
cache of that tensor (next to the data, else in the user's cache folder), so the next run
starts in seconds. The cache is keyed by a fingerprint of the file list, so it never
serves stale images, and written atomically, so a crash or a concurrent writer cannot
leave a half file."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_save
from .augment import fit_square
from .folders import check_unreadable, list_image_folder, open_rgb, reason
from .images import ImageSet

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when the cached tensor's layout or decoding changes
SAY_DECODING_ABOVE = 5000  # images: a decode this long is announced in the log


def _decode_chunk(chunk: list[str], size: int) -> list[np.ndarray | str]:
    out: list[np.ndarray | str] = []
    for path in chunk:
        try:
            out.append(np.asarray(fit_square(open_rgb(path), size)))
        except Exception as err:  # unreadable, truncated, not an image: skip and count
            out.append(reason(err))
    return out


def decode_images(items: list[tuple[str, int]], size: int, classes: list[str], where: Path,
                  max_unreadable: float = 1.0, cached: bool = False) -> ImageSet:
    """Decode files into one uint8 NCHW tensor (threads: PIL releases the GIL to decode).
    `cached` only words the log line: whether the caller keeps the result for the next run."""
    n = len(items)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    keep = np.zeros(n, dtype=bool)
    bad: list[tuple[str, str]] = []
    step = 256
    chunks = [[p for p, _ in items[i:i + step]] for i in range(0, n, step)]
    workers = max(1, min(8, os.cpu_count() or 1))
    if n > SAY_DECODING_ABOVE:
        log.info("%s: decoding %d images to %dx%d (%s)", where, n, size, size,
                 "once; cached for the next run" if cached
                 else "data.cache is off: every run decodes again")
    with ThreadPoolExecutor(workers) as pool:
        for c, results in enumerate(pool.map(_decode_chunk, chunks, [size] * len(chunks))):
            for k, r in enumerate(results):
                i = c * step + k
                if isinstance(r, str):
                    bad.append((items[i][0], r))
                else:
                    images[i] = r
                    keep[i] = True
    check_unreadable(where, bad, n, max_unreadable)
    labels = torch.tensor([lab for _, lab in items], dtype=torch.long)[torch.from_numpy(keep)]
    imgs = torch.from_numpy(images[keep]).permute(0, 3, 1, 2).contiguous()
    return ImageSet(imgs, labels, classes, [p for p, _ in bad])


def _fingerprint(folder: Path, items: list[tuple[str, int]], classes: list[str],
                 size: int) -> str:
    """Names, class names, sizes and modification times of every file: a changed, added
    or removed image invalidates the cache."""
    h = hashlib.sha1(f"format={CACHE_FORMAT} size={size}\n".encode())
    prefix = os.path.join(str(folder), "")
    for path, label in items:
        st = os.stat(path)
        # the listing joins names onto `folder`: cutting the prefix is relpath, 3x faster
        rel = (path[len(prefix):] if path.startswith(prefix) and ".." not in path
               else os.path.relpath(path, folder))
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
        log.warning("%s: ignoring unreadable data cache (%s)", path, reason(err))
        return None


def _write_cache(paths: list[Path], data: ImageSet, fingerprint: str) -> Path | None:
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
    """An ImageFolder split as one uint8 tensor: decoded once, then read from the cache."""
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
    data = decode_images(items, size, classes, folder, max_unreadable, cached=use_cache)
    if use_cache:
        _write_cache(paths, data, fingerprint)
    return data
