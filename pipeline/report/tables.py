"""The rows as tables: markdown (labelled, formatted cells), CSV and JSON (raw values), and
the provenance table (one row per run: how it was made).

When a row has validation numbers (`data.val_split`), the tables say which split each number
comes from: a `val_top1` column follows top-1, the top-1/top-5 headers name the test split,
and the split that chose each training stage's best epoch is the CSV's `best_split` column
and a note under the markdown table. Without one, the columns and headers are as before."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from ..provenance import read_provenance
from . import measured
from .rows import (
    COLUMNS,
    LATENCY_COLUMNS,
    PROVENANCE_COLUMNS,
    QUANT_COLUMNS,
    SPLIT_COLUMNS,
    TTA_COLUMNS,
    VAL_COLUMNS,
    Options,
)
from .seeds import STD_COLUMNS, significance_note

LABELS = {"top1": "top-1 (%)", "top5": "top-5 (%)", "val_top1": "val top-1 (%)",
          "top1_tta": "top-1 flip TTA (%)", "n": "n (seeds)",
          "delta_top1": "Δ top-1", "delta_source": "Δ top-1 vs input",
          "params_m": "params (M)", "macs_m": "MACs (M)", "mac_reduction_pct": "MACs -%",
          "size_mb": "model.pt (MB)", "wall_seconds": "wall (s)", "speedup": "speedup",
          "torch_pruning": "torch-pruning", "config_hash": "config hash",
          "git_commit": "commit", "git_dirty": "dirty", "world_size": "ranks",
          **measured.LABELS}
TEST_LABELS = {"top1": "top-1 (%, test)", "top5": "top-5 (%, test)"}  # beside a val column


def has_val(rows: list[dict]) -> bool:
    """Whether any row has validation numbers (its run holds out `data.val_split`)."""
    return any(r.get("val_top1") is not None for r in rows)


def columns_for(rows: list[dict], options: Options | None = None) -> list[str]:
    """The table's columns: latency before the model size when measured, `val_top1` after
    top-1 and `best_split` after epochs when a row has validation numbers, `top1_tta` after
    those when a stage evaluated with flip TTA, a note column when a row has one."""
    cols = list(COLUMNS)
    if options is not None and options.latency:
        cols[cols.index("size_mb"):cols.index("size_mb")] = LATENCY_COLUMNS
    if any(r.get("stage_latency_ms") is not None for r in rows):
        cols[cols.index("size_mb"):cols.index("size_mb")] = measured.COLUMNS
    if any(r.get("artifact") for r in rows):  # a quantized stage: precision, vs its input
        cols.insert(cols.index("model") + 1, QUANT_COLUMNS[0])
        cols.insert(cols.index("delta_top1") + 1, QUANT_COLUMNS[1])
    if has_val(rows):
        cols[cols.index("top1") + 1:cols.index("top1") + 1] = VAL_COLUMNS
        cols[cols.index("epochs") + 1:cols.index("epochs") + 1] = SPLIT_COLUMNS
    if any(r.get("top1_tta") is not None for r in rows):  # plain top-1 stays the headline
        at = cols.index("val_top1" if "val_top1" in cols else "top1") + 1
        cols[at:at] = TTA_COLUMNS
    if any("n" in r for r in rows):  # runs aggregated over seeds: n, then <col>_std
        cols.insert(cols.index("status") + 1, "n")
        for c in [c for c in STD_COLUMNS if c in cols]:
            extra = [f"{c}_std"] + (["delta_exceeds_2se"] if c == "delta_top1" else [])
            cols[cols.index(c) + 1:cols.index(c) + 1] = extra
    if any(r.get("note") for r in rows):
        cols.append("note")
    return cols


def _merged(col: str) -> bool:
    """Columns the markdown shows inside another cell (± std, the 2-SE mark)."""
    return col.endswith("_std") or col == "delta_exceeds_2se"


def _cell(col: str, r: dict) -> str:
    """A markdown cell: the value, "± std" when aggregated over seeds, "*" on a change
    beyond two standard errors."""
    text = _cell_for(col, r.get(col))
    std = r.get(f"{col}_std")
    if std is not None and text != "-":
        text += f" ± {std:.2f}"
    if col == "delta_top1" and r.get("delta_exceeds_2se"):
        text += " *"
    return text


def _label(col: str, rows: list[dict], columns: list[str]) -> str:
    if col == "size_mb" and "precision" in columns:  # int8 rows: the artifact's size
        return "model file (MB)"
    if col in TEST_LABELS and "val_top1" in columns:
        return TEST_LABELS[col]
    if col == "latency_ms":
        r = next((r for r in rows if r.get("latency_device")), None)
        if r is not None:
            return (f"{r.get('latency_backend') or 'torch'} latency (ms, {r['latency_device']}, "
                    f"batch {r['latency_batch']})")
        return "latency (ms)"
    return LABELS.get(col, col)


def _cell_for(col: str, v: Any) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if col in ("delta_top1", "delta_source"):
        return f"{v:+.2f}"
    if col in ("params_m", "macs_m"):
        return f"{v:.3f}" if v < 100 else f"{v:.1f}"
    if col in ("wall_seconds",):
        return f"{v:.0f}"
    if col in ("speedup", "stage_speedup"):
        return f"{v:.2f}x"
    if col in ("latency_ms", "stage_latency_ms"):
        return f"{v:.3g}"
    if col == "ratio" and isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, float):
        return f"{v:.2f}" if math.isfinite(v) else str(v)
    return str(v).replace("|", "\\|")


def split_note(rows: list[dict]) -> str:
    """The split that chose each training stage's best epoch (best.pt), for the markdown
    table: one split for all ("best epoch chosen on: val"), else each split with its runs
    (a run's stages named when they differ)."""
    by_run: dict[str, dict[str, list[str]]] = {}
    for r in rows:
        if r.get("best_split"):
            by_run.setdefault(r["run"], {}).setdefault(r["best_split"], []).append(r["stage"])
    splits = sorted({s for run in by_run.values() for s in run})
    if len(splits) <= 1:
        return f"best epoch chosen on: {splits[0]}" if splits else ""
    where: dict[str, list[str]] = {s: [] for s in splits}
    for run, stages in by_run.items():
        for split, names in stages.items():
            where[split] += [run] if len(stages) == 1 else [f"{run}/{n}" for n in names]
    return "best epoch chosen on: " + "; ".join(f"{s} ({', '.join(where[s])})" for s in splits)


def to_markdown(rows: list[dict], columns: list[str] | None = None) -> str:
    """A markdown table, missing numbers as "-"; with a validation column, the note of the
    split that chose each training stage's best epoch under it."""
    columns = [c for c in columns or columns_for(rows)
               if c not in SPLIT_COLUMNS and not _merged(c)]
    lines = ["| " + " | ".join(_label(c, rows, columns) for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(c, r) for c in columns) + " |")
    for note in (split_note(rows) if "val_top1" in columns else "", significance_note(rows)):
        if note:
            lines += ["", note]
    return "\n".join(lines)


def provenance_markdown(run_dirs: list[Path]) -> str:
    """One row per run: code version, library versions, device, seed, config hash, command."""
    cols = PROVENANCE_COLUMNS
    lines = ["| run | " + " | ".join(LABELS.get(c, c) for c in cols) + " |",
             "|" + "|".join("---" for _ in range(len(cols) + 1)) + "|"]
    for d in run_dirs:
        p = read_provenance(d) or {}
        vals = []
        for c in cols:
            v = p.get(c)
            if c == "git_commit" and v:
                v = v[:10]
            if c == "command" and v:
                v = f"`{v}`"
            vals.append(_cell_for(c, v))
        lines.append(f"| {d.name} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def to_csv(rows: list[dict], columns: list[str] | None = None) -> str:
    """CSV with the raw values, missing numbers as empty cells."""
    columns = columns or columns_for(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    return buf.getvalue()


def to_json(rows: list[dict]) -> str:
    """The rows as they are (every key, missing numbers as null)."""
    return json.dumps(rows, indent=2, default=str)


__all__ = ["LABELS", "TEST_LABELS", "has_val", "columns_for", "split_note", "to_markdown",
           "provenance_markdown", "to_csv", "to_json"]
