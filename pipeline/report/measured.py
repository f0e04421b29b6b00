"""Latency a stage measured itself, in its own runtime (a prune or iterative stage with a
latency target writes `latency` into its summary): the rows' columns for it, and the x
value of the accuracy-vs-latency plot.

A summary's `latency` holds `backend`, `batch_size`, `device`, `dense_ms`, `ms`, `speedup`
and, with a target, `target_speedup` or `target_latency_ms` and `met`. Any stage kind that
writes this dict gets the columns and its point on the plot.
"""

from __future__ import annotations

COLUMNS = ["stage_latency_ms", "stage_speedup", "latency_target"]
LABELS = {"stage_latency_ms": "latency (ms, stage's runtime)",
          "stage_speedup": "speedup (stage's runtime)", "latency_target": "latency target"}


def add_measured(row: dict, summary: dict) -> None:
    """The stage's own measurement and target into its row (nothing when it has none)."""
    lat = summary.get("latency")
    if not isinstance(lat, dict) or lat.get("ms") is None:
        return
    row.update(stage_latency_ms=lat["ms"], stage_speedup=lat.get("speedup"),
               stage_dense_ms=lat.get("dense_ms"), target_speedup=lat.get("target_speedup"),
               target_latency_ms=lat.get("target_latency_ms"), target_met=lat.get("met"),
               stage_latency_backend=f"{lat.get('backend')} ({lat.get('device')}, batch "
                                     f"{lat.get('batch_size')})",
               latency_target=target_cell(lat))


def target_cell(lat: dict) -> str | None:
    """"1.5x: met" / "12.5 ms: missed (+8.1%)" / None without a target."""
    if lat.get("target_speedup") is not None:
        goal = f"{lat['target_speedup']:g}x"
    elif lat.get("target_latency_ms") is not None:
        goal = f"{lat['target_latency_ms']:g} ms"
    else:
        return None
    if lat.get("met"):
        return f"{goal}: met"
    share = (lat.get("missed_by") or {}).get("share")
    return f"{goal}: missed" + (f" (+{100 * share:.1f}% time)" if share is not None else "")


def note(rows: list[dict]) -> str:
    """The line under the table naming each stage's runtime."""
    where = sorted({f"{r['run']}/{r['stage']}: {r['stage_latency_backend']}" for r in rows
                    if r.get("stage_latency_backend")})
    if not where:
        return ""
    return ("Latency measured by the stage itself, dense and pruned side by side (median, "
            "warm-up discarded): " + "; ".join(where) + ".")


def plot_latency(rows: list[dict]) -> None:
    """`plot_latency_ms` of each completed row: compare's own measurement (`latency_ms`,
    one runtime for all) when taken, else the stage's (a baseline gets the dense time its
    pruned stage measured; a stage downstream with the same MACs shares its input's)."""
    if any(r.get("latency_ms") for r in rows):
        for r in rows:
            r["plot_latency_ms"] = r.get("latency_ms")
        return
    measured = {(r["run"], r["stage"]): r for r in rows if r.get("stage_latency_ms")}
    dense = {}
    for r in measured.values():
        if r.get("baseline"):
            dense.setdefault(r["baseline"], r.get("stage_dense_ms"))
    for r in rows:
        ms = r.get("stage_latency_ms") or dense.get(f"{r['run']}/{r['stage']}")
        if ms is None:  # same architecture as a measured stage of its run
            same = [m for m in measured.values() if m["run"] == r["run"]
                    and m.get("macs") and m.get("macs") == r.get("macs")]
            ms = same[0]["stage_latency_ms"] if same else None
        r["plot_latency_ms"] = ms


__all__ = ["COLUMNS", "LABELS", "add_measured", "note", "plot_latency", "target_cell"]
