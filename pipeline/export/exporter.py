"""`export`: write a stage's network as an ONNX, TorchScript or torch.export file, proven
equal to the PyTorch model before anything is written.

The file is serialized in memory, loaded back from those bytes in its own runtime and run
on a random batch and on up to 256 of the run's test images next to the PyTorch model;
only when the logits agree within the tolerance (verify.py) are the bytes written
(atomically), with the run's provenance in the file or its `<file>.json` sidecar.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..atomic import atomic_open
from ..errors import PipelineError, first_line
from .formats import (
    DEFAULT_OPSET,
    FORMATS,
    INPUT_NAME,
    MAX_OPSET,
    MIN_OPSET,
    OUTPUT_NAME,
    ExportError,
    Runner,
    sidecar_path,
)
from .source import ExportSource, ExportUsageError, eval_images, load_source
from .target import check_batch, check_memory, check_target
from .timing import DTYPES
from .verify import Check, compare

PRECISIONS = tuple(DTYPES)
Cast = Callable[[torch.Tensor], torch.Tensor]
PREPROCESSING = "RGB scaled to [0, 1], minus mean, divided by std per channel; NCHW"


@dataclass(frozen=True)
class ExportOptions:
    """What `python -m pipeline export` is asked for."""

    format: str
    out: Path | None = None  # default: <stage dir>/model[.<precision>]<suffix>
    batch: int | None = 1  # None: a dynamic batch dimension
    opset: int | None = None  # ONNX only; default DEFAULT_OPSET
    precision: str = "fp32"
    channels_last: bool = False
    data_root: str | None = None  # where the run's data is now, if it moved
    eval_images: int = 256  # test images verified (at most)
    force: bool = False  # replace an existing file (never a run directory's own)

    def validate(self) -> None:
        """Raise ExportUsageError for an option combination that cannot be exported."""
        if self.format not in FORMATS:
            raise ExportUsageError(f"--format {self.format}: expected one of {list(FORMATS)}")
        if self.precision not in PRECISIONS:
            raise ExportUsageError(f"--precision {self.precision}: expected one of "
                                   f"{list(PRECISIONS)}")
        if self.batch is not None and self.batch < 1:
            raise ExportUsageError(f"--batch: expected a positive integer, got {self.batch}")
        check_batch(self.batch)
        if self.opset is not None and self.format != "onnx":
            raise ExportUsageError(f"--opset applies to --format onnx, not {self.format}")
        if self.opset is not None and not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ExportUsageError(f"--opset {self.opset}: expected an ONNX opset from "
                                   f"{MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})")
        problem = FORMATS[self.format].problem(self.precision, self.channels_last)
        if problem:
            raise ExportUsageError(problem)


@dataclass
class ExportResult:
    path: Path
    sidecar: Path | None
    metadata: dict
    checks: list[Check]
    notes: list[str] = field(default_factory=list)


def default_out(stage_dir: Path, options: ExportOptions) -> Path:
    precision = "" if options.precision == "fp32" else f".{options.precision}"
    return Path(stage_dir) / f"model{precision}{FORMATS[options.format].suffix}"


def _prepared(source: ExportSource, options: ExportOptions) -> tuple[nn.Module, Cast]:
    """The model in the export's precision and memory format, and the same for inputs."""
    dtype = DTYPES[options.precision]
    layout = torch.channels_last if options.channels_last else torch.contiguous_format
    model = source.model.eval().to(dtype=dtype, memory_format=layout)
    return model, lambda x: x.to(dtype).contiguous(memory_format=layout)


def metadata_for(source: ExportSource, options: ExportOptions) -> dict:
    """The provenance and input contract written into (or beside) the file."""
    meta = {**source.provenance(), "format": options.format, "precision": options.precision,
            "batch": options.batch or "dynamic", "input_name": INPUT_NAME,
            "output_name": OUTPUT_NAME, "input_size": list(source.input_size),
            "input_dtype": str(DTYPES[options.precision]).removeprefix("torch."),
            "memory_format": "channels_last" if options.channels_last else "contiguous",
            "mean": list(source.mean), "std": list(source.std),
            "preprocessing": PREPROCESSING, "num_classes": int(source.arch["num_classes"]),
            "torch": torch.__version__, "exported": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if options.format == "onnx":
        meta["opset"] = DEFAULT_OPSET if options.opset is None else options.opset
    return meta


def _random(n: int, size: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn((n, *size), generator=torch.Generator().manual_seed(seed))


def export_stage(stage_dir: str | Path, options: ExportOptions) -> ExportResult:
    """Export RUN_DIR/STAGE's model.pt as asked, verify it, and write it (see the module
    docstring). ExportUsageError (exit 2) for bad input, ExportError (exit 1) when the
    export or its verification fails; either way nothing is written."""
    options.validate()
    fmt = FORMATS[options.format]
    fmt.require()
    source = load_source(stage_dir, options.data_root)
    out = Path(options.out) if options.out else default_out(source.stage_dir, options)
    if out.is_dir():
        raise ExportUsageError(f"--out {out}: is a directory; give a file name")
    check_target(out, options.force)
    if fmt.sidecar:
        check_target(sidecar_path(out), options.force, "--out's sidecar")
    model, cast = _prepared(source, options)
    check_memory(model, cast(_random(1, source.input_size, seed=0)), options.batch)
    meta = metadata_for(source, options)
    example = cast(_random(options.batch or 2, source.input_size, seed=0))
    try:
        data = fmt.serialize(model, example, options.batch is None, options.opset, meta)
        run = fmt.runner(data)
    except PipelineError:
        raise
    except Exception as err:  # the exporter's or the runtime's own failure, in one line
        raise ExportError(f"{fmt.name} export of {source.stage_dir} failed: "
                          f"{first_line(err)}") from None
    checks, notes = _verify(source, options, model, run, cast)
    failed = [c for c in checks if not c.passed]
    if failed:
        raise ExportError(f"verification failed, nothing written: {failed[0].line()}")
    sidecar = sidecar_path(out) if fmt.sidecar else None
    _write(out, data, sidecar, meta)
    return ExportResult(out, sidecar, meta, checks, notes)


# a place the user named that cannot take the file: a usage error (exit 2), not a failure
_USAGE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR,
                 errno.ENAMETOOLONG, errno.ENOENT}


def _write(out: Path, data: bytes, sidecar: Path | None, meta: dict) -> None:
    """Write the file (and its sidecar) atomically; a failure names the file asked for
    (not the temporary one), the reason and, on a full disk, the space it needs. A
    sidecar that cannot be written takes a file this export created with it."""
    created = not out.exists()
    for path, body in ((out, data), (sidecar, (json.dumps(meta, indent=2) + "\n").encode())):
        if path is None:
            continue
        try:
            with atomic_open(path, "wb") as f:
                f.write(body)
        except OSError as err:
            if path != out and created:
                with contextlib.suppress(OSError):
                    out.unlink()
            why = err.strerror or first_line(err)
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                why += f"; it needs {len(body):,} bytes, {_free(path.parent)} free"
            cls = ExportUsageError if err.errno in _USAGE_ERRNOS else ExportError
            raise cls(f"{path}: cannot write the export ({why})") from None


def _free(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free:,} bytes"
    except OSError:
        return "unknown bytes"


def _verify(source: ExportSource, options: ExportOptions, model: nn.Module, run: Runner,
            cast: Cast) -> tuple[list[Check], list[str]]:
    """The random-batch check and, when the run's data is here, the test-image check."""
    batch, precision = options.batch, options.precision
    n = batch or 3  # dynamic: not the example's 2
    random_x = cast(_random(n, source.input_size, seed=1))
    checks = [compare(f"a random batch of {n}", model, run, random_x, batch, precision)]
    images, note = eval_images(source, options.eval_images) if options.eval_images else (
        None, "test images not requested")
    if images is None:
        return checks, [f"{note}; verified on random inputs only"]
    checks.append(compare(note, model, run, cast(images), batch, precision))
    return checks, []


__all__ = ["ExportOptions", "ExportResult", "export_stage", "default_out", "metadata_for",
           "PRECISIONS"]
