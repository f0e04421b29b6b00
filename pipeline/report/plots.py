"""The plots of `compare --plot`: top-1 against MACs of every completed model (with the
Pareto front), the same against measured latency when there is one, and the training
curves of a run. Each returns a `Plot`: the PNG it wrote and
the points it drew, read back from the figure, by series."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import atomic_open
from ..rundir import read_summary, stage_specs
from .rows import is_prune_stage, read_metrics

Points = list[tuple[float, float]]


@dataclass
class Plot:
    """A written figure: its file, and the (x, y) points of each named series drawn in it.

    Series of the accuracy-vs-MACs plot: "<run>/<stage>" (one model), "<run>/<stage> link"
    (baseline to pruned model), "pareto front". Of the curves: "top1/<stage>" (per epoch, or
    the pruned model before recovery), "train_loss/<stage>", "test_loss/<stage>"."""

    path: Path
    series: dict[str, Points]


def _pyplot():
    import matplotlib  # lazy: only --plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _drawn(fig: Any) -> dict[str, Points]:
    """The points of every artist given a gid (scatter offsets, line data), by gid."""
    out: dict[str, Points] = {}
    for ax in fig.axes:
        for artist in ax.collections:
            if artist.get_gid() is not None:
                out[artist.get_gid()] = [(float(x), float(y)) for x, y in artist.get_offsets()]
        for line in ax.lines:
            if line.get_gid() is not None:
                out[line.get_gid()] = [(float(x), float(y)) for x, y in line.get_xydata()]
    return out


def _save(plt: Any, fig: Any, path: Path) -> Plot:
    fig.tight_layout()
    with atomic_open(path, "wb") as f:  # a planted link is replaced, never written through
        fig.savefig(f, dpi=120, format="png")
    series = _drawn(fig)
    plt.close(fig)
    return Plot(path, series)


def _label_offsets(points: list[dict], step: float = 9.0, x: str = "macs_m"
                   ) -> dict[int, float]:
    """Vertical label offset (points) of each row's point: labels of points that nearly
    coincide (within 3% of the axes' spans; pruned models of one width share their MACs)
    are stacked instead of drawn over each other."""
    if not points:
        return {}
    xs, ys = [r[x] for r in points], [r["top1"] for r in points]
    dx, dy = 0.03 * (max(xs) - min(xs)) or 1e-9, 0.03 * (max(ys) - min(ys)) or 1e-9
    order = sorted(points, key=lambda r: -r["top1"])  # highest first, the next ones below
    return {id(r): 4.0 - step * sum(abs(r[x] - p[x]) <= dx
                                    and abs(r["top1"] - p["top1"]) <= dy for p in order[:i])
            for i, r in enumerate(order)}


def pareto_front(points: Points) -> Points:
    """Points not beaten by another with fewer or equal MACs and higher top-1, by MACs."""
    front: Points = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def _draw_run(ax: Any, run: str, mine: list[dict], color: str, label_y: dict[int, float],
              x: str = "macs_m") -> None:
    """One run's models (x: the row key of the horizontal axis): its baseline starred, the
    others joined to it."""
    base = next((r for r in mine if r.get("baseline") == f"{run}/{r['stage']}"), None)
    paths: dict[str, list[dict]] = {}
    for r in mine:
        if r.get("path_of"):
            paths.setdefault(r["path_of"], []).append(r)
    for owner, steps in paths.items():  # rounds: a path from the star to the stage's model
        end = next((r for r in mine if r["stage"] == owner), None)
        pts = ([base] if base is not None else []) + steps + ([end] if end else [])
        ax.plot([p[x] for p in pts], [p["top1"] for p in pts], color=color, lw=1,
                ls="-.", marker=".", alpha=0.7, gid=f"{run}/{owner} path")
    for r in mine:
        if r.get("path_of"):
            continue
        gid = f"{run}/{r['stage']}"
        if r is base:
            ax.scatter(r[x], r["top1"], marker="*", s=180, color=color, zorder=3,
                       label=f"{run} ({r['stage']}, dense)", gid=gid)
        else:
            ax.scatter(r[x], r["top1"], s=40, color=color, zorder=3, gid=gid)
            if base is not None:
                ax.plot([base[x], r[x]], [base["top1"], r["top1"]],
                        color=color, alpha=0.3, lw=1, gid=f"{gid} link")
        ax.annotate(r["stage"], (r[x], r["top1"]), textcoords="offset points",
                    xytext=(5, label_y[id(r)]), fontsize=8, color=color)
    if base is None and mine:
        ax.scatter([], [], color=color, label=run)


def plot_pareto(rows: list[dict], path: Path) -> Plot:
    """Top-1 against MACs: every completed model, each run's baseline starred, the pruned
    models joined to their baseline, and the Pareto front (best top-1 at no more MACs)."""
    return _front_plot(rows, path, "macs_m", "MACs per image (millions, conv + linear)",
                       "Accuracy against computation")


def _front_plot(rows: list[dict], path: Path, x: str, xlabel: str, title: str) -> Plot:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    done = [r for r in rows if r.get("status") == "completed" and r.get("top1") is not None
            and r.get(x)]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    label_y = _label_offsets(done, x=x)
    for i, run in enumerate(dict.fromkeys(r["run"] for r in done)):
        _draw_run(ax, run, [r for r in done if r["run"] == run], colors[i % len(colors)],
                  label_y, x)
    front = pareto_front([(r[x], r["top1"]) for r in done])
    if len(front) > 1:
        xs, ys = zip(*front, strict=True)
        ax.step(xs, ys, where="post", color="gray", ls="--", lw=1, label="Pareto front",
                gid="pareto front")
    values = [r[x] for r in done]
    if values and max(values) / min(values) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    held_out = any(r.get("val_top1") is not None for r in rows)  # data.val_split: name the split
    ax.set_ylabel("test top-1 (%)" if held_out else "top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if done:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no completed stage yet", ha="center", transform=ax.transAxes)
    return _save(plt, fig, path)


def plot_latency(rows: list[dict], path: Path, xlabel: str | None = None) -> Plot:
    """Top-1 against measured latency: each completed row's `plot_latency_ms` (see
    `measured.plot_latency`: compare's own measurement, else the one a stage with a latency
    target took in its runtime), or its `latency_ms`. fp32 models as dots (each run's
    baseline starred), quantized ones as diamonds joined to the model they were made from,
    and the Pareto front (best top-1 at no more time). Series: "<run>/<stage>" per model,
    "<run>/<stage> from" per quantized model's link, "pareto front"."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for r in rows:
        r.setdefault("plot_latency_ms", r.get("latency_ms"))
    done = [r for r in rows if r.get("status") == "completed" and r.get("top1") is not None
            and r.get("plot_latency_ms")]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(dict.fromkeys(r["run"] for r in done)):
        _draw_latency_run(ax, run, {r["stage"]: r for r in done if r["run"] == run},
                          colors[i % len(colors)])
    if any(r.get("artifact") for r in done):
        ax.scatter([], [], marker="D", color="gray", label="int8 (its own runtime)")
    front = pareto_front([(r["plot_latency_ms"], r["top1"]) for r in done])
    if len(front) > 1:
        xs, ys = zip(*front, strict=True)
        ax.step(xs, ys, where="post", color="gray", ls="--", lw=1, label="Pareto front",
                gid="pareto front")
    ax.set_xlabel(xlabel or _latency_label(done))
    held_out = any(r.get("val_top1") is not None for r in rows)  # data.val_split: name the split
    ax.set_ylabel("test top-1 (%)" if held_out else "top-1 (%)")
    ax.set_title("Accuracy against latency")
    ax.grid(alpha=0.3)
    if done:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no latency measured (compare --latency, or a latency target)",
                ha="center", transform=ax.transAxes)
    return _save(plt, fig, path)


def _draw_latency_run(ax, run: str, mine: dict[str, dict], color) -> None:
    """One run's points on the latency plot, a quantized model linked to its source."""
    for r in mine.values():
        gid, int8 = f"{run}/{r['stage']}", bool(r.get("artifact"))
        base, x = r.get("baseline") == gid, r["plot_latency_ms"]
        ax.scatter(x, r["top1"], color=color, zorder=3, gid=gid,
                   marker="*" if base else ("D" if int8 else "o"), s=180 if base else 40,
                   label=f"{run} ({r['stage']}, dense)" if base else None)
        src = mine.get(r.get("source")) if int8 else None
        if src is not None:
            ax.plot([src["plot_latency_ms"], x], [src["top1"], r["top1"]], color=color,
                    ls=":", lw=1, gid=f"{gid} from")
        ax.annotate(r["stage"], (x, r["top1"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8, color=color)


def _latency_label(done: list[dict]) -> str:
    """The x label when the caller names no runtime: compare's, from the rows."""
    r0 = next((r for r in done if not r.get("artifact")), None)
    what = (f"{r0.get('latency_backend') or 'torch'}, batch {r0.get('latency_batch')}"
            if r0 else "its runtime")
    return f"latency per batch (ms; fp32: {what}; int8: its runtime)"


def _series(x: list[float], rows: list[dict], key: str) -> tuple[list, list]:
    """(x, values) of the rows that hold `key` (epochs without a test pass are skipped)."""
    pts = [(xi, r[key]) for xi, r in zip(x, rows, strict=True) if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(run_dir: Path, path: Path) -> Plot:
    """Top-1 and loss per epoch of every training stage of a run, each stage drawn from
    where its input ends (finetune and scratch continue after the pretrain epochs)."""
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    ends: dict[str, float] = {}
    drawn = 0
    for name, spec in stage_specs(run_dir).items():
        rows = read_metrics(run_dir / name)
        up = spec.get("from")
        start = ends.get(up, 0.0) if up else 0.0
        if not rows:
            ends[name] = start
            s = read_summary(run_dir / name) or {}
            if is_prune_stage(spec) and s.get("top1") is not None:
                a1.scatter([start], [s["top1"]], marker="x", s=60, color="black", zorder=3,
                           label=f"{name} (before recovery)", gid=f"top1/{name}")
                drawn += 1
            continue
        x = [start + r.get("epoch", i) + 1 for i, r in enumerate(rows)]
        ends[name] = x[-1]
        line = a1.plot(*_series(x, rows, "top1"), marker=".", label=name, gid=f"top1/{name}")[0]
        c = line.get_color()
        a2.plot(*_series(x, rows, "train_loss"), color=c, marker=".", label=f"{name} train",
                gid=f"train_loss/{name}")
        a2.plot(*_series(x, rows, "test_loss"), color=c, ls="--", marker=".",
                label=f"{name} test", gid=f"test_loss/{name}")
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
    return _save(plt, fig, path)


__all__ = ["Plot", "pareto_front", "plot_pareto", "plot_latency", "plot_curves"]
