"""`compare`: what the runs delivered, as tables (markdown, CSV, JSON) and plots.

One row per stage of each run directory: run, stage, model, pruning method and ratio,
top-1/top-5 and the change against the run's baseline, params, MACs and the MAC
reduction, optionally the latency measured on this machine and the speedup, and the size
of the stage's model.pt. The baseline of a stage is the dense model at the root of its
`from` chain (the pretrain stage), unless one is given (`baseline=`): a stage directory
whose summary stands for the dense model of every run.

Stages that did not complete show their state ("running", "failed", "not run") and no
numbers, never zeros. Everything is read from the run directory (config.yaml, provenance.json,
<stage>/summary.json, metrics.csv, model.pt), so compare works on runs made elsewhere.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .provenance import read_provenance, stale_reasons
from .rundir import chain, is_run_dir, read_config, read_summary, stage_specs

log = logging.getLogger("pipeline")

COLUMNS = ["run", "stage", "type", "status", "model", "method", "ratio", "top1", "top5",
           "delta_top1", "params_m", "macs_m", "mac_reduction_pct", "size_mb", "epochs",
           "wall_seconds"]
LATENCY_COLUMNS = ["latency_ms", "speedup"]
PROVENANCE_COLUMNS = ["git_commit", "git_dirty", "python", "torch", "torchvision",
                      "torch_pruning", "device", "world_size", "seed", "config_hash", "command"]
LABELS = {"top1": "top-1 (%)", "top5": "top-5 (%)", "delta_top1": "Δ top-1",
          "params_m": "params (M)", "macs_m": "MACs (M)", "mac_reduction_pct": "MACs -%",
          "size_mb": "model.pt (MB)", "wall_seconds": "wall (s)", "speedup": "speedup",
          "torch_pruning": "torch-pruning", "config_hash": "config hash",
          "git_commit": "commit", "git_dirty": "dirty", "world_size": "ranks"}
TRAINING = ("pretrain", "finetune", "scratch")


# --------------------------------------------------------------------------- reading runs


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


def stage_names(run_dir: Path) -> list[str]:
    return list(stage_specs(run_dir))


def read_metrics(stage_dir: Path) -> list[dict[str, float]]:
    """The rows of a stage's metrics.csv as numbers (empty when absent)."""
    try:
        text = (stage_dir / "metrics.csv").read_text()
    except OSError:
        return []
    rows = []
    for r in csv.DictReader(io.StringIO(text)):
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


# --------------------------------------------------------------------------- rows


@dataclass
class Baseline:
    """The dense model a stage is compared with."""

    summary: dict
    model_path: Path | None
    label: str


@dataclass
class Options:
    latency: bool = False
    latency_batch: int = 32
    latency_device: str | None = None
    latency_memory_format: str = "channels_last"
    baseline: Path | None = None
    provenance: bool = False
    _latency_cache: dict = field(default_factory=dict)


def _baseline_for(run_dir: Path, specs: dict[str, dict], name: str,
                  given: Baseline | None) -> Baseline | None:
    if given is not None:
        return given
    names = chain(specs, name)
    root = names[-1]
    s = read_summary(run_dir / root)
    if s and s.get("status") == "completed" and s.get("type") in TRAINING and \
            specs[root].get("from") is None:
        return Baseline(s, run_dir / root / "model.pt", f"{run_dir.name}/{root}")
    return None


def _prune_spec(specs: dict[str, dict], run_dir: Path, name: str) -> tuple[str, Any]:
    """(method, ratio) of the nearest prune stage up the chain (inclusive)."""
    for n in chain(specs, name):
        spec = specs[n]
        if spec.get("type") != "prune":
            continue
        s = read_summary(run_dir / n) or {}
        method = s.get("method", spec.get("method"))
        if spec.get("layer_ratios"):
            ratio: Any = "per layer"
        elif spec.get("target_macs_reduction") is not None:
            ratio = f"MACs -{100 * spec['target_macs_reduction']:g}%"
        else:
            ratio = s.get("ratio", spec.get("ratio"))
        return str(method), ratio
    return "-", None


def rows_for(run_dir: Path, options: Options | None = None) -> list[dict]:
    """One row per stage of a run directory."""
    options = options or Options()
    specs = stage_specs(run_dir)
    cfg = read_config(run_dir)
    arch = (cfg.get("model") or {}).get("arch")
    given = None
    if options.baseline is not None:
        s = read_summary(options.baseline)
        if s is not None and s.get("status") == "completed":
            given = Baseline(s, options.baseline / "model.pt",
                             f"{options.baseline.parent.name}/{options.baseline.name}")
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
            rows.append(row)
            continue
        row["status"] = "completed"
        base = _baseline_for(run_dir, specs, name, given)
        top1, macs = s.get("top1"), s.get("macs")
        row.update(top1=top1, top5=s.get("top5"), params=s.get("params"), macs=macs,
                   params_m=_m(s.get("params")), macs_m=_m(macs), epochs=s.get("epochs"),
                   wall_seconds=s.get("wall_seconds"), finished=s.get("finished"),
                   size_mb=_size_mb(stage_dir / "model.pt"),
                   baseline=base.label if base else None)
        if base is not None and top1 is not None and base.summary.get("top1") is not None:
            row["delta_top1"] = top1 - base.summary["top1"]
        dense_macs = base.summary.get("macs") if base else None
        if not dense_macs:  # no dense baseline: the MACs before the nearest pruning
            dense_macs = next((read_summary(run_dir / n) or {}).get("macs_before")
                              for n in chain(specs, name) if specs[n].get("type") == "prune")
        if macs and dense_macs:
            row["mac_reduction_pct"] = 100 * (1 - macs / dense_macs)
        notes = _notes(run_dir, specs, name, s, prov)
        if notes:
            row["note"] = "; ".join(notes)
        if options.latency:
            _add_latency(row, run_dir, stage_dir, base, options)
        rows.append(row)
    if options.provenance:
        for row in rows:
            row.update({k: prov.get(k) for k in PROVENANCE_COLUMNS})
            if row.get("git_commit"):
                row["git_commit"] = row["git_commit"][:10]
    return rows


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


def collect(paths: list[str], options: Options | None = None) -> list[dict]:
    rows = []
    for run_dir in expand(paths):
        rows.extend(rows_for(run_dir, options))
    return rows


# --------------------------------------------------------------------------- latency


def input_size_of(run_dir: Path) -> tuple[int, int, int]:
    """(C, H, W) the run's models take, from its resolved data config."""
    from .config import Loader
    from .data import DataConfig, input_size

    data = read_config(run_dir).get("data") or {}
    try:
        return tuple(input_size(Loader(str(run_dir / "config.yaml")).load(DataConfig, data,
                                                                          "data")))
    except Exception:  # an older or foreign config: the usual sizes
        if data.get("dataset") == "synthetic":
            s = data.get("image_size") or (data.get("synthetic") or {}).get("image_size", 32)
        else:
            s = data.get("image_size") or (224 if data.get("dataset") == "imagefolder" else 32)
        return (3, int(s), int(s))


def latency_device(requested: str | None) -> str:
    import torch

    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def measure_latency(model_path: Path, input_size: tuple[int, ...], batch: int, device: str,
                    memory_format: str = "channels_last", min_seconds: float = 1.0,
                    min_runs: int = 10) -> float:
    """Median wall time (ms) of one forward pass of a batch through the model in model_path
    (loaded with pipeline.load_model, eval mode, no autograd), weights and input in
    memory_format: "channels_last" (NHWC, the fast path of oneDNN on CPU and of cuDNN under
    AMP, where a pruned net's MAC savings show) or "contiguous" (NCHW)."""
    import torch

    from .checkpoint import load_model

    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    dev = torch.device(device)
    model = load_model(model_path).to(dev).eval()
    x = torch.randn((batch, *input_size), device=dev)
    if x.dim() == 4:
        model, x = model.to(memory_format=fmt), x.contiguous(memory_format=fmt)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    times: list[float] = []
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        sync()
        start = time.perf_counter()
        while len(times) < min_runs or (time.perf_counter() - start < min_seconds
                                        and len(times) < 1000):
            t0 = time.perf_counter()
            model(x)
            sync()
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _add_latency(row: dict, run_dir: Path, stage_dir: Path, base: Baseline | None,
                 options: Options) -> None:
    device = latency_device(options.latency_device)
    row["latency_batch"], row["latency_device"] = options.latency_batch, device
    row["latency_memory_format"] = options.latency_memory_format
    size = input_size_of(run_dir)

    def lat(path: Path) -> float | None:
        key = (str(path), size)
        if key not in options._latency_cache:
            value = None
            if path.is_file():
                try:
                    value = measure_latency(path, size, options.latency_batch, device,
                                            options.latency_memory_format)
                except Exception as err:  # report the row without latency, say why
                    log.warning("latency of %s not measured: %s", path, err)
            options._latency_cache[key] = value
        return options._latency_cache[key]

    mine = lat(stage_dir / "model.pt")
    row["latency_ms"] = mine
    if base is not None and base.model_path is not None and mine:
        ref = lat(base.model_path)
        if ref:
            row["speedup"] = ref / mine


# --------------------------------------------------------------------------- tables


def columns_for(rows: list[dict], options: Options | None = None) -> list[str]:
    cols = list(COLUMNS)
    if options is not None and options.latency:
        cols[cols.index("size_mb"):cols.index("size_mb")] = LATENCY_COLUMNS
    if any(r.get("note") for r in rows):
        cols.append("note")
    return cols


def _label(col: str, rows: list[dict]) -> str:
    if col == "latency_ms":
        r = next((r for r in rows if r.get("latency_device")), None)
        if r is not None:
            return f"latency (ms, {r['latency_device']}, batch {r['latency_batch']})"
        return "latency (ms)"
    return LABELS.get(col, col)


def _cell_for(col: str, v: Any) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if col == "delta_top1":
        return f"{v:+.2f}"
    if col in ("params_m", "macs_m"):
        return f"{v:.3f}" if v < 100 else f"{v:.1f}"
    if col in ("wall_seconds",):
        return f"{v:.0f}"
    if col == "speedup":
        return f"{v:.2f}x"
    if col == "latency_ms":
        return f"{v:.3g}"
    if col == "ratio" and isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, float):
        return f"{v:.2f}" if math.isfinite(v) else str(v)
    return str(v).replace("|", "\\|")


def to_markdown(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or columns_for(rows)
    lines = ["| " + " | ".join(_label(c, rows) for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell_for(c, r.get(c)) for c in columns) + " |")
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
    columns = columns or columns_for(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    return buf.getvalue()


def to_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2, default=str)


# --------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label_offsets(points: list[dict], step: float = 9.0) -> dict[int, float]:
    """Vertical label offset (points) of each row's point: labels of points that nearly
    coincide (within 3% of the axes' spans; pruned models of one width share their MACs)
    are stacked instead of drawn over each other."""
    if not points:
        return {}
    xs, ys = [r["macs_m"] for r in points], [r["top1"] for r in points]
    dx, dy = 0.03 * (max(xs) - min(xs)) or 1e-9, 0.03 * (max(ys) - min(ys)) or 1e-9
    order = sorted(points, key=lambda r: -r["top1"])  # highest first, the next ones below
    return {id(r): 4.0 - step * sum(abs(r["macs_m"] - p["macs_m"]) <= dx
                                    and abs(r["top1"] - p["top1"]) <= dy for p in order[:i])
            for i, r in enumerate(order)}


def plot_pareto(rows: list[dict], path: Path) -> Path:
    """Top-1 against MACs: every completed model, each run's baseline starred, the pruned
    models joined to their baseline, and the Pareto front (best top-1 at no more MACs)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    done = [r for r in rows if r.get("status") == "completed" and r.get("top1") is not None
            and r.get("macs_m")]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    runs = list(dict.fromkeys(r["run"] for r in done))
    label_y = _label_offsets(done)
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        mine = [r for r in done if r["run"] == run]
        base = next((r for r in mine if r.get("baseline") == f"{run}/{r['stage']}"), None)
        for r in mine:
            if r is base:
                ax.scatter(r["macs_m"], r["top1"], marker="*", s=180, color=color, zorder=3,
                           label=f"{run} ({r['stage']}, dense)")
            else:
                ax.scatter(r["macs_m"], r["top1"], s=40, color=color, zorder=3)
                if base is not None:
                    ax.plot([base["macs_m"], r["macs_m"]], [base["top1"], r["top1"]],
                            color=color, alpha=0.3, lw=1)
            ax.annotate(r["stage"], (r["macs_m"], r["top1"]), textcoords="offset points",
                        xytext=(5, label_y[id(r)]), fontsize=8, color=color)
        if base is None and mine:
            ax.scatter([], [], color=color, label=run)
    front = pareto_front([(r["macs_m"], r["top1"]) for r in done])
    if len(front) > 1:
        xs, ys = zip(*front, strict=True)
        ax.step(xs, ys, where="post", color="gray", ls="--", lw=1, label="Pareto front")
    macs = [r["macs_m"] for r in done]
    if macs and max(macs) / min(macs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("MACs per image (millions, conv + linear)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Accuracy against computation")
    ax.grid(alpha=0.3)
    if done:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no completed stage yet", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by another with fewer or equal MACs and higher top-1, by MACs."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def _series(x: list[float], rows: list[dict], key: str) -> tuple[list, list]:
    """(x, values) of the rows that hold `key` (epochs without a test pass are skipped)."""
    pts = [(xi, r[key]) for xi, r in zip(x, rows, strict=True) if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(run_dir: Path, path: Path) -> Path:
    """Top-1 and loss per epoch of every training stage of a run, each stage drawn from
    where its input ends (finetune and scratch continue after the pretrain epochs)."""
    plt = _pyplot()
    specs = stage_specs(run_dir)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    ends: dict[str, float] = {}
    drawn = 0
    for name, spec in specs.items():
        rows = read_metrics(run_dir / name)
        up = spec.get("from")
        start = ends.get(up, 0.0) if up else 0.0
        if not rows:
            ends[name] = start
            s = read_summary(run_dir / name) or {}
            if spec.get("type") == "prune" and s.get("top1") is not None:
                a1.scatter([start], [s["top1"]], marker="x", s=60, color="black", zorder=3,
                           label=f"{name} (before recovery)")
                drawn += 1
            continue
        x = [start + r.get("epoch", i) + 1 for i, r in enumerate(rows)]
        ends[name] = x[-1]
        line = a1.plot(*_series(x, rows, "top1"), marker=".", label=name)[0]
        c = line.get_color()
        a2.plot(*_series(x, rows, "train_loss"), color=c, marker=".", label=f"{name} train")
        a2.plot(*_series(x, rows, "test_loss"), color=c, ls="--", marker=".",
                label=f"{name} test")
        drawn += 1
    a1.set_title(f"{run_dir.name}: test top-1")
    a1.set_ylabel("top-1 (%)")
    a2.set_title(f"{run_dir.name}: loss")
    a2.set_ylabel("cross-entropy")
    for ax in (a1, a2):
        ax.set_xlabel("epoch (stages continue from their input)")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- report files


def default_out(run_dirs: list[Path]) -> Path:
    """<run dir>/report for one run, ./reports for several."""
    return run_dirs[0] / "report" if len(run_dirs) == 1 else Path("reports")


def write_report(rows: list[dict], run_dirs: list[Path], out: Path, options: Options,
                 plot: bool = False, command: str = "") -> list[Path]:
    """Write compare.md, compare.csv, compare.json (and the plots) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    cols = columns_for(rows, options)
    written = []
    pngs: list[Path] = []
    if plot:
        pngs.append(plot_pareto(rows, out / "accuracy_vs_macs.png"))
        for d in run_dirs:
            pngs.append(plot_curves(d, out / f"curves_{d.name}.png"))
    md = [f"# compare: {', '.join(d.name for d in run_dirs)}", ""]
    if command:
        md += [f"`{command}`", ""]
    md += [to_markdown(rows, cols), ""]
    if options.latency:
        md += [f"Latency: median forward time of one batch of {options.latency_batch} on "
               f"{latency_device(options.latency_device)} in {options.latency_memory_format} "
               "memory format, measured on this machine; speedup against the run's baseline.",
               ""]
    if options.provenance:
        md += ["## Provenance", "", provenance_markdown(run_dirs), ""]
    for p in pngs:
        md += [f"![{p.stem}]({p.name})", ""]
    for name, text in (("compare.md", "\n".join(md)), ("compare.csv", to_csv(rows, cols)),
                       ("compare.json", to_json(rows))):
        (out / name).write_text(text if text.endswith("\n") else text + "\n")
        written.append(out / name)
    return written + pngs


__all__ = ["COLUMNS", "Options", "expand", "collect", "rows_for", "to_markdown", "to_csv",
           "to_json", "plot_pareto", "plot_curves", "write_report", "measure_latency",
           "provenance_markdown", "pareto_front", "default_out"]
