"""`compare`: one row per stage of each run directory, in markdown, CSV or JSON."""

from __future__ import annotations

import csv
import glob
import io
import json
from pathlib import Path

from .runner import read_summary

COLUMNS = ["run", "stage", "type", "status", "top1", "top5", "delta_top1", "params_m",
           "macs_m", "mac_reduction_pct", "epochs", "wall_seconds"]


def expand(paths: list[str]) -> list[Path]:
    """Run directories from paths or glob patterns (a pattern may match several)."""
    out: list[Path] = []
    for p in paths:
        matches = sorted(glob.glob(p)) if any(ch in p for ch in "*?[") else [p]
        for m in matches:
            path = Path(m)
            if path not in out:
                out.append(path)
    return out


def stage_names(run_dir: Path) -> list[str]:
    """Stages in config order (from config.yaml), else those with a summary."""
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        return list(cfg.get("stages", {}))
    except (OSError, ValueError, AttributeError):
        return sorted(p.parent.name for p in run_dir.glob("*/summary.json"))


def _baseline(run_dir: Path, names: list[str]) -> dict | None:
    for n in names:
        s = read_summary(run_dir / n)
        if s and s.get("type") == "pretrain" and s.get("status") == "completed":
            return s
    return None


def rows_for(run_dir: Path) -> list[dict]:
    names = stage_names(run_dir)
    base = _baseline(run_dir, names)
    rows = []
    for n in names:
        s = read_summary(run_dir / n) or {"stage": n, "status": "not run"}
        complete = s.get("status") == "completed"
        row = {"run": run_dir.name, "stage": n, "type": s.get("type", ""),
               "status": s.get("status", "not run")}
        if complete:
            top1 = s.get("top1")
            row.update(top1=top1, top5=s.get("top5"),
                       params_m=_m(s.get("params")), macs_m=_m(s.get("macs")),
                       epochs=s.get("epochs"), wall_seconds=s.get("wall_seconds"))
            if base is not None and top1 is not None and base.get("top1") is not None:
                row["delta_top1"] = top1 - base["top1"]
            if base is not None and s.get("macs") and base.get("macs"):
                row["mac_reduction_pct"] = 100 * (1 - s["macs"] / base["macs"])
        rows.append(row)
    return rows


def _m(x) -> float | None:
    return None if x is None else x / 1e6


def collect(paths: list[str]) -> list[dict]:
    rows = []
    for run_dir in expand(paths):
        rows.extend(rows_for(run_dir))
    return rows


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:+.2f}" if False else f"{v:.2f}"
    return str(v)


def _cell_for(col: str, v) -> str:
    if v is None:
        return "-"
    if col == "delta_top1":
        return f"{v:+.2f}"
    if col in ("params_m", "macs_m"):
        return f"{v:.3f}"
    if col == "wall_seconds":
        return f"{v:.0f}"
    return _cell(v)


def to_markdown(rows: list[dict], columns: list[str] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell_for(c, r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def to_csv(rows: list[dict], columns: list[str] = COLUMNS) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    return buf.getvalue()


def to_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2)
