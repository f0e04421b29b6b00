"""The latency model: per layer, the time as a function of its input and output widths,
measured in the deployment runtime at the deployment batch size on this machine.

Built in two passes over the layers a pruning changes (`sites`):

1. the staircase: per channel group, its layers timed at a scan of its width (the other
   widths dense; at most 16 widths, a power-of-two step apart), the curve made
   monotone (isotonic regression) and its steps read off: the widths after which the time
   rises by more than `STEP_TOLERANCE` of the group's dense time. Those "fast widths" (the
   top of each stair) are the group's candidates: pruning within a stair buys nothing.
2. the grid: every layer timed at every pair of candidate widths of its input and output
   groups, so any choice of candidates is predicted from measured entries only; a layer
   with more than `GRID_LIMIT` pairs is timed at each candidate of one width with the
   other dense, and a pair is predicted as T(a, D) x T(D, b) / T(D, D) (time roughly a
   product of the two widths' channel blocks).

The predicted end-to-end time is `c0 + alpha x (sum of the layers' times)`, fitted to the
dense model and a half-width model measured whole (`calibrate`): the layers outside the
table and the runtime's fixed costs are in c0 and alpha.

Entries are cached on disk (`TableCache`), keyed by the machine (CPU name, GPU name),
backend, batch, precision, device, threads, layout and library versions, so a second
build (another run, another model sharing layer shapes) measures only what is new.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...atomic import atomic_write_text
from ...provenance import cpu_name
from ..groups import Group
from .backends import device_of, prepare
from .config import LatencyConfig
from .sites import Site, layer_input, layer_module
from .timing import interleaved_ms

log = logging.getLogger(__name__)

Key = str  # "<signature>|<cin>|<cout>"
Measure = Callable[[list[tuple[Site, int, int]]], dict[Key, float]]
STEP_TOLERANCE = 0.02  # a stair: the time rises by more than this share of the dense time
MAX_CANDIDATES = 24  # per group
GRID_LIMIT = 64  # width pairs timed per layer; beyond it the separable model
CHUNK_BYTES = 256 * 2**20  # inputs held at once while a chunk of entries is timed


def key(site: Site, cin: int, cout: int) -> Key:
    return f"{site.signature}|{cin}|{cout}"


def scan_widths(width: int, multiple: int = 1, points: int = 16) -> list[int]:
    """The widths a group is scanned at: a power-of-two step giving at most `points` widths
    (at 16: every width of a group up to 16 channels, every 4th of a 64-channel one);
    multiples of `multiple` (grouped convs)."""
    step = 1
    while width / step > points:
        step *= 2
    step = max(step, multiple) if step % multiple == 0 else step * multiple
    out = list(range(step, width, step)) + [width]
    return [w for w in out if w % multiple == 0]


def isotonic(y: list[float]) -> list[float]:
    """The non-decreasing sequence nearest `y` in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in y:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, n2 = blocks.pop()
            m1, n1 = blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    out: list[float] = []
    for m, n in blocks:
        out += [m] * int(n)
    return out


def stairs(widths: list[int], times: list[float], tolerance: float = STEP_TOLERANCE
           ) -> list[int]:
    """The fast widths of a scan: the last width of every stair of the monotone fit (the
    time rises by more than `tolerance` x the time at the widest after it), and the widest."""
    fit = isotonic(times)
    tol = tolerance * max(fit[-1], 1e-12)
    out, base = [], fit[0]
    for i in range(len(widths) - 1):
        if fit[i + 1] - base > tol:
            out.append(widths[i])
            base = fit[i + 1]
    return out + [widths[-1]]


def alignment(fast: list[list[int]], dense: list[int], share: float = 0.75) -> int:
    """The channel alignment the measured stairs show: the largest power of two (up to 64)
    that divides at least `share` of the fast widths below the dense ones; 1 when no group
    has a stair."""
    steps = [w for f, d in zip(fast, dense, strict=True) for w in f if w < d]
    if not steps:
        return 1
    best = 1
    for k in (2, 4, 8, 16, 32, 64):
        if sum(w % k == 0 for w in steps) >= share * len(steps):
            best = k
    return best


def snap(fast: list[int], dense: int, round_to: int | None) -> list[int]:
    """A group's candidates: its fast widths (rounded down to multiples of round_to when
    given), the dense width, at most MAX_CANDIDATES of them (thinned evenly)."""
    if round_to:
        fast = [w - w % round_to for w in fast if w >= round_to]
    cands = sorted(set(fast) | {dense})
    if len(cands) > MAX_CANDIDATES:
        pick = np.linspace(0, len(cands) - 1, MAX_CANDIDATES).round().astype(int)
        cands = sorted({cands[i] for i in pick} | {dense})
    return cands


@dataclass
class LatencyTable:
    """The measured model of one network's prunable layers (see the module docstring)."""

    sites: list[Site]
    names: list[str]  # group names, by group index
    dense: list[int]  # dense widths, by group index
    scans: list[dict[int, float]]  # per group: scanned width -> its layers' time (ms)
    fast: list[list[int]]  # per group: the stairs' widths
    candidates: list[list[int]]
    times: dict[Key, float]
    alignment: int = 1
    c0: float = 0.0
    alpha: float = 1.0
    build_seconds: float = 0.0
    measured: int = 0  # entries timed for this table (the others came from the cache)
    cached: int = 0
    touching: list[list[int]] = field(default_factory=list)  # group -> its sites' indices

    def __post_init__(self) -> None:
        self.touching = [[i for i, s in enumerate(self.sites)
                          if gi in (s.in_group, s.out_group)] for gi in range(len(self.dense))]

    def site_ms(self, i: int, widths: list[int]) -> float:
        s = self.sites[i]
        cin, cout = s.widths(widths)
        got = self.times.get(key(s, cin, cout))
        if got is not None:
            return got
        # not on the grid: the separable model from the layer's two one-width scans
        full = self.times[key(s, s.cin, s.cout)]
        return self.times[key(s, cin, s.cout)] * self.times[key(s, s.cin, cout)] / full

    def layer_sum(self, widths: list[int]) -> float:
        """The summed time (ms) of the table's layers at these group widths."""
        return sum(self.site_ms(i, widths) for i in range(len(self.sites)))

    def delta(self, widths: list[int], changes: dict[int, int]) -> float:
        """How the layer sum changes when the groups in `changes` take those widths."""
        new = list(widths)
        for g, w in changes.items():
            new[g] = w
        touched = sorted({i for g in changes for i in self.touching[g]})
        return sum(self.site_ms(i, new) - self.site_ms(i, widths) for i in touched)

    def predict_ms(self, widths: list[int]) -> float:
        """The predicted end-to-end time (ms) of the network at these widths."""
        return self.c0 + self.alpha * self.layer_sum(widths)

    def sum_for(self, ms: float) -> float:
        """The layer sum that predicts `ms` end to end."""
        return (ms - self.c0) / self.alpha

    def staircase(self, gi: int) -> list[dict]:
        """Group gi's stairs: each fast width with its layers' time (ms), narrow to wide."""
        scan = self.scans[gi]
        fit = dict(zip(sorted(scan), isotonic([scan[w] for w in sorted(scan)]), strict=True))
        return [{"width": w, "ms": round(fit[w], 5)} for w in self.fast[gi]]

    def describe(self) -> dict:
        """The table as latency.json keeps it: per group the stairs and candidates."""
        return {"alignment": self.alignment, "c0_ms": self.c0, "alpha": self.alpha,
                "build_seconds": round(self.build_seconds, 2), "entries_measured":
                self.measured, "entries_cached": self.cached, "layers": len(self.sites),
                "groups": {n: {"dense": d, "staircase": self.staircase(gi),
                               "candidates": self.candidates[gi]}
                           for gi, (n, d) in enumerate(zip(self.names, self.dense,
                                                            strict=True))}}


class TableCache:
    """Measured entries on disk, one JSON file per machine x runtime set-up (`cache_key`);
    None as the folder: nothing is read or written."""

    def __init__(self, folder: Path | None, cfg: LatencyConfig, write: bool = True):
        self.key = cache_key(cfg)
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:12]
        self.path = None if folder is None else Path(folder) / (
            f"{cfg.backend}-b{cfg.batch_size}-{cfg.precision}-{digest}.json")
        self.write = write and folder is not None
        self.entries: dict[Key, float] = {}
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                if data.get("key") == self.key:
                    self.entries = {k: float(v) for k, v in data["entries"].items()}
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("latency cache %s unreadable: measuring anew", self.path)

    def save(self) -> None:
        if not self.write or self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({"key": self.key, "entries": self.entries}))


def gpu_name(cfg: LatencyConfig) -> str | None:
    dev = device_of(cfg)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else None


def cache_key(cfg: LatencyConfig) -> dict:
    """What a measured entry depends on besides the layer: machine, runtime and set-up."""
    versions = {"torch": torch.__version__}
    if cfg.backend in ("onnxruntime", "tensorrt"):
        try:
            mod = __import__(cfg.backend)
            versions[cfg.backend] = getattr(mod, "__version__", "?")
        except ImportError:
            pass
    return {"cpu": cpu_name(), "gpu": gpu_name(cfg), "backend": cfg.backend,
            "batch": cfg.batch_size, "precision": cfg.precision,
            "device": device_of(cfg).type, "threads": cfg.threads or torch.get_num_threads(),
            "channels_last": cfg.channels_last, "versions": versions}


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/prune-pipeline/latency (~/.cache when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "prune-pipeline" / "latency"


def backend_measure(cfg: LatencyConfig) -> Measure:
    """A Measure timing stand-alone layers in cfg's runtime: chunks of entries prepared
    together and timed in interleaved rounds (median of cfg.table_runs)."""
    def measure(entries: list[tuple[Site, int, int]]) -> dict[Key, float]:
        out: dict[Key, float] = {}
        chunk: list[tuple[Site, int, int]] = []
        held = 0
        for e in entries + [None]:  # type: ignore[list-item]
            size = 0 if e is None else cfg.batch_size * e[1] * 4 * _positions(e[0])
            if chunk and (e is None or held + size > CHUNK_BYTES or len(chunk) >= 16):
                runners = {key(*c): prepare(layer_module(*c).eval(),
                                            layer_input(c[0], c[1], cfg.batch_size), cfg)
                           for c in chunk}
                res = interleaved_ms(runners, cfg.table_runs, warmup=1)
                out.update({k: v["median_ms"] for k, v in res.items()})
                chunk, held = [], 0
            if e is not None:
                chunk.append(e)
                held += size
        return out
    return measure


def _positions(site: Site) -> int:
    where = site.signature.partition("@")[2]
    return int(np.prod([int(v) for v in where.split("x")])) if where else 1


def _measure_missing(entries: set[tuple[Site, int, int]], cache: TableCache,
                     measure: Measure) -> int:
    missing = {key(*e): e for e in entries if key(*e) not in cache.entries}
    todo = sorted(missing.values(), key=lambda e: (e[0].signature, e[1], e[2]))
    if todo:
        cache.entries.update(measure(todo))
        cache.save()
    return len(todo)


def _scan_entries(sites: list[Site], gi: int, widths: list[int], dense: list[int]
                  ) -> list[set[tuple[Site, int, int]]]:
    """Per scanned width of group gi: the entries of its layers at that width."""
    out = []
    for w in widths:
        at = list(dense)
        at[gi] = w
        out.append({(s, *s.widths(at)) for s in sites if gi in (s.in_group, s.out_group)})
    return out


def build_table(sites: list[Site], groups: list[Group], cfg: LatencyConfig,
                cache: TableCache, round_to: int | str | None = None,
                measure: Measure | None = None) -> LatencyTable:
    """Measure the staircases and the candidate grid (see the module docstring).
    `round_to`: an int snaps the candidates to its multiples, "auto" to the measured
    alignment. `measure` replaces the runtime (tests: a known staircase)."""
    t0 = time.perf_counter()
    measure = measure or backend_measure(cfg)
    dense = [g.channels for g in groups]
    multiples = [g.channel_groups for g in groups]
    scans_w = [scan_widths(d, m, cfg.scan_points) for d, m in zip(dense, multiples, strict=True)]
    per_width = [_scan_entries(sites, gi, scans_w[gi], dense) for gi in range(len(groups))]
    measured = _measure_missing({e for pw in per_width for es in pw for e in es}, cache,
                                measure)
    scans, fast = [], []
    for gi in range(len(groups)):
        ms = [_group_ms(sites, gi, w, dense, cache) for w in scans_w[gi]]
        scans.append(dict(zip(scans_w[gi], ms, strict=True)))
        fast.append(stairs(scans_w[gi], ms))
    align = alignment(fast, dense)
    step = align if round_to == "auto" else round_to if isinstance(round_to, int) else None
    cands = [snap(f, d, step) for f, d in zip(fast, dense, strict=True)]
    grid = set()
    for s in sites:
        ins = cands[s.in_group] if s.in_group is not None else [s.cin]
        outs = cands[s.out_group] if s.out_group is not None else [s.cout]
        if s.depthwise:
            grid |= {(s, w, w) for w in outs}
        elif len(ins) * len(outs) <= GRID_LIMIT:
            grid |= {(s, a, b) for a in ins for b in outs}
        else:
            grid |= {(s, a, s.cout) for a in ins} | {(s, s.cin, b) for b in outs}
    measured += _measure_missing(grid, cache, measure)
    total = len({key(*e) for e in grid} | {key(*e) for pw in per_width for es in pw
                                           for e in es})
    table = LatencyTable(sites=sites, names=[g.name for g in groups], dense=dense,
                         scans=scans, fast=fast, candidates=cands, times=dict(cache.entries),
                         alignment=align, build_seconds=time.perf_counter() - t0,
                         measured=measured, cached=max(0, total - measured))
    log.info("latency table: %d layers, %d groups, %d entries measured, %d from the cache, "
             "%.1f s; measured alignment %d", len(sites), len(groups), measured,
             table.cached, table.build_seconds, align)
    return table


def _group_ms(sites: list[Site], gi: int, w: int, dense: list[int], cache: TableCache) -> float:
    at = list(dense)
    at[gi] = w
    return sum(cache.entries[key(s, *s.widths(at))] for s in sites
               if gi in (s.in_group, s.out_group))


def calibrate(table: LatencyTable, dense_ms: float, half_ms: float, half: list[int]) -> None:
    """Fit c0 and alpha of `predict_ms` to the dense model and the model at widths `half`,
    both measured end to end; with no usable difference (noise), alpha = dense / sum, c0 0."""
    s_d, s_h = table.layer_sum(table.dense), table.layer_sum(half)
    alpha = (dense_ms - half_ms) / (s_d - s_h) if s_d - s_h > 1e-9 else 0.0
    if alpha > 0 and dense_ms - alpha * s_d > -0.5 * dense_ms:
        table.alpha, table.c0 = alpha, dense_ms - alpha * s_d
    else:
        table.alpha, table.c0 = dense_ms / max(s_d, 1e-12), 0.0


__all__ = ["LatencyTable", "Measure", "TableCache", "alignment", "backend_measure",
           "build_table", "cache_key", "calibrate", "isotonic", "key", "scan_widths", "snap",
           "stairs", "user_cache_dir"]
