"""Run directories read into rows: one row per stage, what the stage delivered.

A row holds run, stage, model, pruning method and ratio, top-1/top-5 (the test split) and the
change against the run's baseline, the validation split's top-1 and the split that chose a
training stage's best epoch when the run holds one out (`data.val_split`), params, MACs and
the MAC reduction, optionally the latency measured on this machine and the speedup, and the
size of the stage's model.pt. The baseline of a stage
is the dense model at the root of its `from` chain (the pretrain stage), unless one is given
(`Options.baseline`): a stage directory whose summary stands for the dense model of every run.

Stages that did not complete show their state ("running", "failed", "not run") and no
numbers, never zeros. Everything is read from the run directory (config.yaml, provenance.json,
<stage>/summary.json, metrics.csv, model.pt), so compare works on runs made elsewhere.
"""

from __future__ import annotations

import csv
import glob
import io
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages import REGISTRY, Stage

from ..errors import first_line
from ..provenance import read_provenance, stale_reasons
from ..quantize import artifact_latency_ms
from ..rundir import (
    MODEL_FILE,
    SUMMARY_FILE,
    chain,
    is_run_dir,
    read_config,
    read_summary,
    stage_specs,
)
from .latency import file_latency_ms, input_size_of, latency_device_for
from .measured import add_measured

log = logging.getLogger("pipeline")

COLUMNS = ["run", "stage", "type", "status", "model", "method", "ratio", "top1", "top5",
           "delta_top1", "params_m", "macs_m", "mac_reduction_pct", "size_mb", "epochs",
           "wall_seconds"]
LATENCY_COLUMNS = ["latency_ms", "speedup"]
VAL_COLUMNS = ["val_top1"]  # after top1, when a row has validation numbers (data.val_split)
# with a quantized stage: the model file's precision after the model, the change of top-1
# against the stage it was made from after delta_top1
QUANT_COLUMNS = ["precision", "delta_source"]
SPLIT_COLUMNS = ["best_split"]  # after epochs, likewise: the split that chose best.pt
TTA_COLUMNS = ["top1_tta"]  # after top1 (and val_top1), when a stage evaluated with tta: flip
PROVENANCE_COLUMNS = ["git_commit", "git_dirty", "python", "torch", "torchvision",
                      "torch_pruning", "device", "world_size", "seed", "config_hash", "command"]


def _kind(spec: dict) -> Stage | None:
    """The stage kind of a spec or summary read from a run directory (None: unknown)."""
    return REGISTRY.get(str(spec.get("type")))


def is_prune_stage(spec: dict) -> bool:
    """Whether a stage (its spec or summary: both carry `type`) removes filters."""
    kind = _kind(spec)
    return kind is not None and kind.prunes


def is_training_stage(spec: dict) -> bool:
    """Whether a stage (its spec or summary) trains a model, so it can be a dense baseline."""
    kind = _kind(spec)
    return kind is not None and kind.trains


def expand(paths: list[str]) -> list[Path]:
    """Run directories from paths or glob patterns (a pattern may match several)."""
    out: list[Path] = []
    for p in paths:
        matches = sorted(glob.glob(p)) if any(ch in p for ch in "*?[") else [p]
        for m in matches:
            path = Path(m)
            if path not in out and not (glob.has_magic(p) and not is_run_dir(path)):
                out.append(path)
    return out


def read_metrics(stage_dir: Path) -> list[dict[str, float]]:
    """The rows of a stage's metrics.csv as numbers (empty when absent)."""
    try:
        text = (stage_dir / "metrics.csv").read_text(encoding="utf-8")
        records = list(csv.DictReader(io.StringIO(text)))
    except (OSError, ValueError, csv.Error):  # ValueError: not UTF-8; csv.Error: NUL bytes
        return []
    rows = []
    for r in records:
        row = {}
        for k, v in r.items():
            try:
                row[k] = float(v)
            except (TypeError, ValueError):
                continue
        rows.append(row)
    return rows


def stage_state(stage_dir: Path, spec: dict) -> tuple[str, str]:
    """(status, note) of a stage without a completed summary."""
    s = read_summary(stage_dir)
    path = stage_dir / SUMMARY_FILE
    if s is None and path.is_file():  # another user's file of mode 0600, or damaged
        why = "not readable by this user" if not os.access(path, os.R_OK) else "not JSON"
        return "unreadable", f"{path}: {why}"
    if s is not None and s.get("status") == "failed":
        return "failed", str(s.get("error", ""))
    if s is not None and s.get("status") not in (None, "completed"):
        return str(s["status"]), ""
    if not stage_dir.is_dir() or not any(stage_dir.iterdir()):
        return "not run", ""
    done = len(read_metrics(stage_dir))
    epochs = spec.get("epochs")
    note = f"{done} of {epochs} epochs done" if epochs else ""
    age = time.time() - max(p.stat().st_mtime for p in stage_dir.iterdir())
    if age > 3600:
        note += (", " if note else "") + f"last write {age / 3600:.1f} h ago (interrupted?)"
    return "running", note


@dataclass
class Baseline:
    """The dense model a stage is compared with."""

    summary: dict
    model_path: Path | None
    label: str


@dataclass
class Options:
    """What `compare` adds to the rows: latency (batch, device, memory format, backend: torch,
    onnxruntime or torchscript), a given baseline stage directory, the provenance columns."""

    latency: bool = False
    latency_batch: int = 32
    latency_device: str | None = None
    latency_memory_format: str = "channels_last"
    latency_backend: str = "torch"
    baseline: Path | None = None
    provenance: bool = False
    _latency_cache: dict = field(default_factory=dict)


def _baseline_for(run_dir: Path, specs: dict[str, dict], name: str,
                  given: Baseline | None) -> Baseline | None:
    if given is not None:
        return given
    root = chain(specs, name)[-1]
    s = read_summary(run_dir / root)
    if s and s.get("status") == "completed" and is_training_stage(s) and \
            specs[root].get("from") is None:
        return Baseline(s, run_dir / root / MODEL_FILE, f"{run_dir.name}/{root}")
    return None


def _given_baseline(options: Options) -> Baseline | None:
    """Options.baseline as a Baseline, when that stage completed."""
    if options.baseline is None:
        return None
    s = read_summary(options.baseline)
    if s is None or s.get("status") != "completed":
        return None
    return Baseline(s, options.baseline / MODEL_FILE,
                    f"{options.baseline.parent.name}/{options.baseline.name}")


def _prune_spec(specs: dict[str, dict], run_dir: Path, name: str) -> tuple[str, Any]:
    """(method, ratio) of the nearest prune stage up the chain (inclusive)."""
    for n in chain(specs, name):
        spec = specs[n]
        if not is_prune_stage(spec):
            continue
        s = read_summary(run_dir / n) or {}
        method = s.get("method", spec.get("method"))
        if spec.get("layer_ratios"):
            ratio: Any = "per layer"
        elif spec.get("target_macs_reduction") is not None:
            ratio = f"MACs -{100 * spec['target_macs_reduction']:g}%"
        elif spec.get("target_speedup") is not None:
            ratio = f"{spec['target_speedup']:g}x faster"
        elif spec.get("target_latency_ms") is not None:
            ratio = f"<= {spec['target_latency_ms']:g} ms"
        else:
            ratio = s.get("ratio", spec.get("ratio"))
        return str(method), ratio
    return "-", None


def rows_for(run_dir: Path, options: Options | None = None) -> list[dict]:
    """One row per stage of a run directory."""
    options = options or Options()
    specs = stage_specs(run_dir)
    arch = (read_config(run_dir).get("model") or {}).get("arch")
    given = _given_baseline(options)
    prov = read_provenance(run_dir) or {}
    rows = []
    for name, spec in specs.items():
        stage_dir = run_dir / name
        s = read_summary(stage_dir)
        row: dict[str, Any] = dict.fromkeys(COLUMNS + (LATENCY_COLUMNS if options.latency
                                                       else []))
        row.update({"run": run_dir.name, "stage": name,
                    "type": (s or {}).get("type") or spec.get("type", ""), "model": arch})
        row["method"], row["ratio"] = _prune_spec(specs, run_dir, name)
        if not s or s.get("status") != "completed":
            row["status"], row["note"] = stage_state(stage_dir, spec)
        else:
            base = _baseline_for(run_dir, specs, name, given)
            _add_results(row, run_dir, specs, name, s, base, prov, options)
            rows += _sub_rows(row, s, base)
        rows.append(row)
    if options.provenance:
        for row in rows:
            row.update({k: prov.get(k) for k in PROVENANCE_COLUMNS})
            if row.get("git_commit"):
                row["git_commit"] = row["git_commit"][:10]
    return rows


def _sub_rows(row: dict, s: dict, base: Baseline | None) -> list[dict]:
    """The stage kind's extra rows (an iterative stage's rounds), each tagged `path_of`."""
    kind = _kind(s)
    out = []
    for extra in (kind.report_rows(s) if kind is not None else []):
        r = {**row, "stage": f"{row['stage']}/{extra['stage']}", "path_of": row["stage"],
             "note": None, "size_mb": None, "wall_seconds": None, "latency_ms": None,
             "speedup": None}
        macs = extra.get("macs")
        r.update(top1=extra.get("top1"), top5=extra.get("top5"), val_top1=extra.get("val_top1"),
                 best_split=None, macs=macs,
                 params=extra.get("params"), params_m=_m(extra.get("params")), macs_m=_m(macs),
                 epochs=extra.get("epochs"), ratio=extra.get("ratio"), delta_top1=None)
        if base is not None and r["top1"] is not None and base.summary.get("top1") is not None:
            r["delta_top1"] = r["top1"] - base.summary["top1"]
        dense = (base.summary.get("macs") if base else None) or s.get("macs_before")
        r["mac_reduction_pct"] = 100 * (1 - macs / dense) if macs and dense else None
        out.append(r)
    return out


def _add_results(row: dict, run_dir: Path, specs: dict[str, dict], name: str, s: dict,
                 base: Baseline | None, prov: dict, options: Options) -> None:
    """The numbers of a completed stage (summary `s`) and their change against `base`."""
    stage_dir = run_dir / name
    row["status"] = "completed"
    top1, macs = s.get("top1"), s.get("macs")
    row.update(top1=top1, top5=s.get("top5"), val_top1=s.get("val_top1"),
               top1_tta=s.get("top1_tta"), best_split=s.get("best_split"),
               params=s.get("params"), macs=macs,
               params_m=_m(s.get("params")), macs_m=_m(macs), epochs=s.get("epochs"),
               wall_seconds=s.get("wall_seconds"), finished=s.get("finished"),
               size_mb=_size_mb(stage_dir / MODEL_FILE),
               baseline=base.label if base else None)
    if base is not None and top1 is not None and base.summary.get("top1") is not None:
        row["delta_top1"] = top1 - base.summary["top1"]
    dense_macs = base.summary.get("macs") if base else None
    if not dense_macs:  # no dense baseline: the MACs before the nearest pruning
        dense_macs = next((read_summary(run_dir / n) or {}).get("macs_before")
                          for n in chain(specs, name) if is_prune_stage(specs[n]))
    if macs and dense_macs:
        row["mac_reduction_pct"] = 100 * (1 - macs / dense_macs)
    add_measured(row, s)
    row["precision"] = "fp32"  # model.pt; a quantized stage's artifact below
    if s.get("artifact"):
        _add_quantized(row, run_dir, stage_dir, s)
    notes = _notes(run_dir, specs, name, s, prov)
    if notes:
        row["note"] = "; ".join(notes)
    if options.latency:
        _add_latency(row, run_dir, stage_dir, base, options)


def _add_quantized(row: dict, run_dir: Path, stage_dir: Path, s: dict) -> None:
    """A quantized stage's row: its artifact's precision and size, its backend, and its
    top-1 against the stage it was made from (that stage's summary as it is now)."""
    row.update(precision=s.get("precision", "int8"), artifact=s["artifact"],
               quantize_backend=s.get("backend"), source=s.get("source"),
               size_mb=_size_mb(stage_dir / s["artifact"]))
    src = (read_summary(run_dir / s["source"]) or {}) if s.get("source") else {}
    if row["top1"] is not None and src.get("top1") is not None:
        row["delta_source"] = row["top1"] - src["top1"]


def _notes(run_dir: Path, specs: dict, name: str, s: dict, prov: dict) -> list[str]:
    """Why a completed stage's numbers may not belong with the others."""
    notes = [f"stale: {r}" for r in stale_reasons(s, run_dir, code=s.get("code") or {})]
    up = specs[name].get("from")
    mine = (s.get("code") or {}).get("git_commit")
    if up:
        theirs = ((read_summary(run_dir / up) or {}).get("code") or {}).get("git_commit")
        if mine and theirs and mine != theirs:
            notes.append(f"code at {mine[:10]}, its input '{up}' at {theirs[:10]}")
    return notes


def _m(x) -> float | None:
    return None if x is None else x / 1e6


def _size_mb(path: Path) -> float | None:
    try:
        return path.stat().st_size / 1e6
    except OSError:
        return None


def _add_latency(row: dict, run_dir: Path, stage_dir: Path, base: Baseline | None,
                 options: Options) -> None:
    """The stage model's latency and its speedup against the baseline's; each model file is
    measured once (options keeps the results: many rows share a baseline). With an
    exported backend each model is exported (verified) to a temporary file and timed in
    that runtime."""
    backend = options.latency_backend
    device = latency_device_for(backend, options.latency_device)
    row["latency_batch"], row["latency_device"] = options.latency_batch, device
    row["latency_memory_format"] = options.latency_memory_format
    row["latency_backend"] = backend
    size = input_size_of(run_dir)

    def lat(path: Path) -> float | None:
        key = (str(path), size, backend)
        if key not in options._latency_cache:
            options._latency_cache[key] = file_latency_ms(
                path, size, options.latency_batch, device, options.latency_memory_format,
                backend)
        return options._latency_cache[key]

    if row.get("artifact"):  # int8: timed in its own runtime
        _add_artifact_latency(row, stage_dir, base, options, size, lat)
        return
    mine = lat(stage_dir / MODEL_FILE)
    row["latency_ms"] = mine
    if base is not None and base.model_path is not None and mine:
        ref = lat(base.model_path)
        if ref:
            row["speedup"] = ref / mine


def _add_artifact_latency(row: dict, stage_dir: Path, base: Baseline | None, options: Options,
                          size: tuple, lat) -> None:
    """The int8 artifact's latency on its backend (onnxruntime CPU, or pt2e compiled); the
    speedup against the baseline when --latency-backend times the baseline in that same
    runtime (onnxruntime), else none: two runtimes are not compared."""
    backend = row["quantize_backend"]
    path = stage_dir / row["artifact"]
    row["latency_backend"], row["latency_device"] = f"{backend} int8", "cpu"
    key = (str(path), size, backend)
    if key not in options._latency_cache:
        try:
            options._latency_cache[key] = artifact_latency_ms(path, backend,
                                                              options.latency_batch, size)
        except Exception as err:  # report the row without latency, say why
            log.warning("latency of %s (%s) not measured: %s", path, backend, first_line(err))
            options._latency_cache[key] = None
    mine = row["latency_ms"] = options._latency_cache[key]
    if mine:
        row["note"] = "; ".join(filter(None, [row.get("note"), f"latency: {backend} int8"]))
    if mine and base is not None and base.model_path is not None and \
            options.latency_backend == backend:
        ref = lat(base.model_path)
        if ref:
            row["speedup"] = ref / mine


__all__ = ["COLUMNS", "LATENCY_COLUMNS", "QUANT_COLUMNS", "VAL_COLUMNS", "SPLIT_COLUMNS",
           "TTA_COLUMNS",
           "PROVENANCE_COLUMNS",
           "is_prune_stage", "is_training_stage", "expand", "read_metrics", "stage_state",
           "Baseline", "Options", "rows_for"]
