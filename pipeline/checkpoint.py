"""Checkpoints: plain dicts, written atomically, read without executing code.

Two kinds share one schema:
  model      {"schema", "kind": "model", "arch", "state_dict", "meta"}: a network
             (dense or pruned: the pruned widths are the state dict's shapes), what a
             stage hands to the next, and what `pipeline.load_model` rebuilds;
  trainer    the above plus optimizer, scaler, EMA, epoch, global step, best metric,
             RNG states and the data order's position: what exact resume needs.

`save()` adds a content digest (blake2b over every key and tensor byte) that `load()`
checks: torch's zip reader notices a truncated file but not flipped bytes inside a
tensor, and a silently corrupt `last.pt` must not be resumed from.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .atomic import atomic_open, fsync_dir
from .errors import PipelineError, first_line
from .safefs import remove_file, replace

SCHEMA_VERSION = 1


class CheckpointError(PipelineError):
    """A checkpoint that is missing, truncated, corrupt or of an unknown schema."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def state_dict_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the plain module's state dict: no `module.` / `_orig_mod.` prefix."""
    return {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, I/O error): the previous file is kept
    and the partial one removed."""


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: a crash
    leaves either the old file or the new one, never half of one. A failed write (ENOSPC,
    EIO, ...) removes the temporary file, leaves `path` as it was and raises one
    CheckpointWriteError line naming the path and the bytes the file needs."""
    path = Path(path)
    try:
        with atomic_open(path, "wb") as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as err:  # torch's zip writer wraps a failed write
        os_err = err if isinstance(err, OSError) else _os_error_in(err)
        if os_err is None and not _looks_like_io(err):
            raise
        why = os_err.strerror if os_err is not None and os_err.strerror else first_line(err)
        raise CheckpointWriteError(
            f"{path}: cannot write the checkpoint ({why}); it needs about "
            f"{payload_bytes(obj):,} bytes, {_free_bytes(path.parent)} free; the previous "
            f"file is kept") from None


def payload_bytes(obj: Any) -> int:
    """The bytes of the tensors in a checkpoint dict (what its file needs, near enough)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    return 0


def _os_error_in(err: BaseException) -> OSError | None:
    seen = err
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _looks_like_io(err: BaseException) -> bool:
    text = str(err).lower()
    return any(w in text for w in ("write", "space", "i/o", "stream"))


def _free_bytes(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free:,} bytes"
    except OSError:
        return "unknown bytes"


def link(src: Path, dst: Path) -> bool:
    """Atomically make `dst` a hard link to the checkpoint `src`; False where the file
    system has no hard links (the caller then writes a copy)."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    try:
        if tmp.is_symlink() or tmp.exists():
            remove_file(dst.parent, tmp)
        os.link(src, tmp)
        replace(dst.parent, tmp, dst)
    except OSError:
        try:
            remove_file(dst.parent, tmp)
        except OSError:
            pass
        return False
    fsync_dir(dst.parent)
    return True


def digest(obj: Any) -> str:
    """A content hash of a checkpoint dict: keys, numbers, strings and tensor bytes."""
    h = hashlib.blake2b(digest_size=16)
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: hashlib._Hash, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for k, v in obj.items():
            h.update(f"{k!r}:".encode())
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)};".encode())
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def save(payload: dict, path: Path) -> None:
    """Atomically write a pipeline checkpoint dict with its content digest."""
    body = {k: v for k, v in payload.items() if k != "digest"}
    atomic_save({**body, "digest": digest(body)}, path)


def load(path: Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with weights_only=True; any failure is a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    obj = _torch_load(path, map_location, "checkpoint")
    if not isinstance(obj, dict) or not isinstance(obj.get("schema"), int):
        raise CheckpointError(f"{path}: not a pipeline checkpoint (no schema version)")
    if obj["schema"] > SCHEMA_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint schema {obj['schema']} is newer than this code's {SCHEMA_VERSION}")
    stored = obj.pop("digest", None)
    if stored is not None and stored != digest(obj):
        raise CheckpointError(f"{path}: corrupt checkpoint (content digest mismatch)")
    return obj


_ZIP_HEAD, _ZIP_END = b"PK\x03\x04", b"PK\x05\x06"  # a zip's first bytes and end record
_REFUSED_GLOBAL = re.compile(r"unsupported GLOBAL ([\w.]+)", re.IGNORECASE)
_BOILERPLATE = ("Weights only load failed", "Check the documentation", "Please file an issue")


def _torch_load(path: Path, map_location: Any, what: str) -> Any:
    """torch.load(weights_only=True) whose failure is one CheckpointError line saying why:
    empty, truncated, not a checkpoint, or refused (what the pickle asks to run)."""
    problem = _damage(path)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    try:
        with warnings.catch_warnings():  # torch's note on an unusual pickle protocol
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refused: {_refusal(err)} (not a plain {what}; "
                              "nothing in it was run)") from None
    except Exception as err:  # zip errors, pickle errors of damaged data, I/O...
        text = first_line(err).split(". This is an internal", 1)[0]
        raise CheckpointError(f"{path}: unreadable {what} ({text[:160]})") from None


def _damage(path: Path) -> str | None:
    """Why a file cannot be a torch checkpoint, seen from its size and ends (or None)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(max(0, size - 65_557))  # the end record sits in the last 64 KiB + 22 bytes
            tail = f.read()
    except OSError as err:
        return f"cannot read ({err.strerror or first_line(err)})"
    if size == 0:
        return "empty file (0 bytes)"
    if head != _ZIP_HEAD:
        return None if head[:1] == b"\x80" else (  # a pickle starts with its protocol
            "not a torch checkpoint (neither a zip archive nor a pickle)")
    end = tail.rfind(_ZIP_END)
    # the end record: 22 bytes, the last two the length of a comment that follows it
    if end < 0 or len(tail) < end + 22 or \
            len(tail) < end + 22 + int.from_bytes(tail[end + 20:end + 22], "little"):
        return f"truncated: the zip archive's end record is missing ({size:,} bytes on disk)"
    return None


def _refusal(err: Exception) -> str:
    """What a weights_only unpickler refused, in a few words."""
    text = str(err)
    found = _REFUSED_GLOBAL.search(text)
    if found:
        module, _, name = found.group(1).rpartition(".")
        module = {"posix": "os", "nt": "os"}.get(module, module)
        return f"it asks to import {module}.{name}" if module else f"it asks to import {name}"
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and not ln.strip().startswith(_BOILERPLATE)]
    detail = lines[0].removeprefix("WeightsUnpickler error:").strip() if lines else ""
    return f"its pickle asks for more than tensors and plain data ({detail[:120]})" if detail \
        else "its pickle asks for more than tensors and plain data"


def payload_parts(ckpt: Any, source: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The `arch` and `state_dict` of a model checkpoint dict, checked to be what a
    network can be rebuilt from (a hand-made dict may lack them or hold anything)."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{source}: not a pipeline checkpoint (expected a mapping)")
    for key in ("arch", "state_dict"):
        if key not in ckpt:
            raise CheckpointError(f"{source}: checkpoint lacks {key!r} (a model checkpoint "
                                  "holds arch, state_dict and meta)")
    arch, sd = ckpt["arch"], ckpt["state_dict"]
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        raise CheckpointError(f"{source}: arch: expected a mapping with the model's name, "
                              f"got {_brief(arch)}")
    classes = arch.get("num_classes")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise CheckpointError(f"{source}: arch.num_classes: expected a positive integer, "
                              f"got {_brief(classes)}")
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in sd.items()):
        raise CheckpointError(f"{source}: state_dict: expected a mapping of parameter names "
                              f"to tensors, got {_brief(sd)}")
    return arch, sd


def misfit(expected: dict[str, torch.Tensor], stored: dict[str, torch.Tensor]) -> str:
    """How a stored state dict differs from a network's: missing, unexpected and
    differently shaped keys, counted, the first of each named."""
    missing = [k for k in expected if k not in stored]
    extra = [k for k in stored if k not in expected]
    shaped = [k for k in expected if k in stored and stored[k].shape != expected[k].shape]
    parts = [f"{len(keys)} {what} ({keys[0]}{', ...' if len(keys) > 1 else ''})"
             for what, keys in (("missing", missing), ("unexpected", extra),
                                ("of another shape", shaped)) if keys]
    return ", ".join(parts) or "the tensors do not load"


def _brief(value: Any) -> str:
    if isinstance(value, dict):
        return f"a mapping of {len(value)} entries"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def model_payload(model: nn.Module, arch: dict, meta: dict | None = None) -> dict:
    """The `model` checkpoint dict of a network; the trainer's state extends it."""
    return {"schema": SCHEMA_VERSION, "kind": "model", "arch": dict(arch),
            "state_dict": state_dict_of(model), "meta": dict(meta or {})}


def save_model(path: Path, model: nn.Module, arch: dict, meta: dict | None = None) -> None:
    """Write a stage's output network (unwrapped from DDP / torch.compile) as model.pt."""
    save(model_payload(model, arch, meta), path)


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A plain state dict from a local weights file (e.g. torchvision's .pth), or the
    `state_dict` of a pipeline checkpoint; loaded with weights_only=True."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: pretrained weights file not found (model.pretrained)")
    obj = _torch_load(p, "cpu", "weights file")
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p}: expected a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}
