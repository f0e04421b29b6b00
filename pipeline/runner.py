"""Runs the stages of a config in order: skip what is complete, resume what was cut off.

Run directory:
  <out_dir>/<name>/config.yaml          the resolved config
  <out_dir>/<name>/log.txt              the run's log (rank 0)
  <out_dir>/<name>/<stage>/             checkpoints (last.pt, best.pt, model.pt),
                                        metrics.csv and summary.json per stage
A stage is complete when its summary.json says `"status": "completed"`; a completed
stage is only ever replaced by a successful re-run (`--restart` trains into
`<stage>.restart/` and swaps it in at the end).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stages import StageContext, stage_of

from . import distributed as D
from . import preemption, provenance
from .atomic import atomic_write_text
from .config import ConfigError, to_plain
from .data import describe
from .errors import UsageError, did_you_mean, first_line
from .preflight import preflight
from .restarts import RestartLedger
from .rng import configure_kernels
from .runconfig import RunConfig, load_config
from .rundir import CONFIG_FILE, is_complete, read_summary, write_json
from .runlock import RunLock, RunLocked
from .safefs import ensure_dir, open_append, refuse_link, remove_tree, replace
from .trainer import HookBase

log = logging.getLogger("pipeline")

def plain_config(cfg: RunConfig) -> dict:
    return to_plain(cfg)


def stage_hash_all(cfg: RunConfig) -> str:
    """Hash of every stage's result-determining settings (a `--restart`'s identity)."""
    return hashlib.sha256("".join(stage_hash(cfg, n) for n in cfg.stages).encode()
                          ).hexdigest()[:16]


def stage_hash(cfg: RunConfig, name: str) -> str:
    """Hash of everything that determines a stage's result: shared settings, its spec and
    the specs of every stage upstream of it."""
    plain = plain_config(cfg)
    chain, cur = [], name
    while cur is not None:
        chain.append({cur: plain["stages"][cur]})
        cur = cfg.stages[cur].from_
    spec = cfg.stages[name]
    distill = getattr(spec, "distill", None)
    if distill is not None:
        chain.append({"teacher": distill.from_})
    key = {"seed": cfg.seed, "data": plain["data"], "model": plain["model"],
           "precision": cfg.precision, "chain": chain}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _LogFileHandler(logging.FileHandler):
    """A FileHandler that refuses a symbolic link planted at the log file (O_NOFOLLOW)."""

    def _open(self):
        return open_append(self.baseFilename, encoding=self.encoding, errors=self.errors)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (pytest and notebooks swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(run_dir: Path | None, is_main: bool) -> None:
    logger = logging.getLogger("pipeline")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    h = _StderrHandler()
    h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(h)
    for name in ("pipeline.data", "pipeline.pruning"):
        logging.getLogger(name).setLevel(logging.INFO if is_main else logging.ERROR)
    if run_dir is not None and is_main:
        ensure_dir(run_dir)
        fh = _LogFileHandler(run_dir / "log.txt")
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(fh)


def run(config_path: str, overrides: list[str], stage: str | None = None,
        restart: bool = False, show_progress: bool | None = None,
        hooks: Sequence[HookBase] = ()) -> list[dict]:
    """Run (or resume) the pipeline; returns the summaries of the stages it ran or skipped.
    `hooks` go to the trainer of every training stage (fault injection, profiling). With
    `seeds:` the chain runs once per seed, one run directory each (`seed_runs`), and each
    summary says its `run`."""
    cfg, _ = load_config(config_path, overrides)
    check_stage(cfg, stage, config_path)
    info = D.env_info()
    device = D.resolve_device(cfg.device, info, config_path, cfg.distributed.backend)
    _check_precision(cfg, device, config_path)
    checked = preflight(cfg, config_path, device=device)  # every check, before any stage
    log.debug("preflight: %s", checked["_data"])
    D.init(info, device, cfg.distributed.timeout_minutes, cfg.distributed.backend)
    configure_kernels(device, cfg.deterministic)
    summaries = []
    try:
        for member in cfg.seed_runs():
            done = _run_one(member, config_path, overrides, info, device, stage, restart,
                            show_progress, hooks)
            if cfg.seeds is not None:
                done = [{"run": member.name, **s} for s in done]
            summaries += done
        return summaries
    finally:
        D.shutdown()


def _run_one(cfg: RunConfig, config_path: str, overrides: list[str], info, device,
             stage: str | None, restart: bool, show_progress: bool | None,
             hooks: Sequence[HookBase] = ()) -> list[dict]:
    """The stages of one run directory (one seed), under its lock."""
    num_classes, input_size = describe(cfg.data)
    run_dir = cfg.run_dir
    lock = RunLock(run_dir)
    try:
        problem = None
        if info.is_main:  # rank 0 holds the run directory for all ranks
            try:
                lock.acquire()
            except RunLocked as err:
                problem = str(err)
        problem = D.broadcast_object(problem)
        if problem:
            raise RunLocked(problem)
        setup_logging(run_dir, info.is_main)
        if lock.stale:
            log.warning("%s", lock.stale)
        names = [stage] if stage else list(cfg.stages)
        ledger = None
        with D.together():  # rank 0 writes; a failure there stops every rank
            if info.is_main:
                ensure_dir(run_dir)
                _write_config(cfg, run_dir / CONFIG_FILE)
                provenance.record_provenance(run_dir, cfg, config_path, overrides, device)
                if restart:
                    ledger = RestartLedger.open(run_dir, names, stage_hash_all(cfg))
                    if ledger.resumed:
                        log.info("taking up the stopped --restart of %s (done: %s)",
                                 ", ".join(names), ", ".join(ledger.done) or "none")
        if show_progress is None:
            show_progress = {"on": True, "off": False}.get(cfg.logging.progress)
        job = _Job(cfg, run_dir, device, info, config_path, show_progress, num_classes,
                   input_size, ledger, tuple(hooks))
        summaries = []
        with preemption.handle_signals():
            for name in names:
                signum = preemption.requested(device)  # all ranks agree
                if signum is not None:  # between stages: nothing to checkpoint
                    raise preemption.Preempted(
                        f"stopped on {preemption.name(signum)} before stage {name}; run the "
                        "same command to go on", signum)
                summaries.append(_run_stage(job, name, restart))
        return summaries
    finally:
        lock.release()


def check_stage(cfg: RunConfig, stage: str | None, config_path: str) -> None:
    """`--stage` must name a stage of the config (a usage error listing them)."""
    if stage is not None and stage not in cfg.stages:
        hint = did_you_mean(stage, cfg.stages)
        raise ConfigError(f"{config_path}: --stage {stage}: no such stage{hint}; stages: "
                          f"{list(cfg.stages)}")


def _check_precision(cfg: RunConfig, device, source: str) -> None:
    if device.type == "cuda":
        return
    if cfg.precision == "fp16":
        raise ConfigError(f"{source}: precision: fp16 needs CUDA; use bf16 on the CPU")
    for name, spec in cfg.stages.items():
        if getattr(spec, "precision", None) == "fp16":
            raise ConfigError(f"{source}: stages.{name}.precision: fp16 needs CUDA; use bf16 "
                              "on the CPU")


def _write_config(cfg: RunConfig, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(plain_config(cfg), sort_keys=False))


@dataclass
class _Job:
    """What every stage of one `run` call shares."""

    cfg: RunConfig
    run_dir: Path
    device: Any
    info: Any  # distributed.DistInfo
    source: str  # the config file, for the commands that error messages suggest
    show_progress: bool | None
    num_classes: int
    input_size: tuple
    ledger: RestartLedger | None = None  # rank 0's record of a --restart
    hooks: tuple = ()  # go to the trainer of every training stage


def _run_stage(job: _Job, name: str, restart: bool) -> dict:
    """Run, resume or skip stage `name`; with `restart`, run it afresh unless this restart
    already did (skip) or started it (resume), as rank 0's ledger says."""
    spec = job.cfg.stages[name]
    stage_dir = job.run_dir / name
    digest = stage_hash(job.cfg, name)
    ledger = job.ledger
    # rank 0 looks at the shared filesystem and decides for every rank (a stale NFS view
    # on another node must not make the ranks diverge)
    done, input_done, teacher_done, restarted, resuming = D.decide(lambda: (
        read_summary(stage_dir),
        spec.from_ is None or is_complete(job.run_dir / spec.from_),
        getattr(spec, "distill", None) is None
        or is_complete(job.run_dir / spec.distill.from_),
        ledger is not None and name in ledger.done,
        ledger is not None and name in ledger.started))
    restart = restart and not restarted
    if restarted and job.info.is_main:
        log.info("stage %s: already restarted by this --restart", name)
    completed = bool(done) and done.get("status") == "completed"
    if completed and not restart:
        _log_skip(job, name, done, digest)
        return done
    _require_inputs(job, name, spec, input_done, teacher_done)
    consumed = (provenance.input_record(job.run_dir, spec.from_)  # the input as this run uses it
                if job.info.is_main else None)
    work_dir = job.run_dir / f"{name}.restart" if completed else stage_dir
    _prepare_work_dir(job, name, work_dir, restart, resuming)
    ctx = StageContext(run=job.cfg, name=name, run_dir=job.run_dir, stage_dir=work_dir,
                       device=job.device, dist=job.info, source=job.source,
                       show_progress=job.show_progress,
                       extra={"num_classes": job.num_classes, "input_size": job.input_size},
                       hooks=job.hooks)
    log.info("stage %s [%s]%s: starting", name, spec.type,
             f" from {spec.from_}" if spec.from_ else "")
    t0 = time.time()
    try:
        result = stage_of(spec).run(spec, ctx)
    except preemption.Preempted as err:
        log.warning("%s", first_line(err))
        if job.info.is_main:
            write_json(work_dir / "summary.json", _ended(name, spec, digest, t0, err))
        raise
    except Exception as err:
        if job.info.is_main:
            with contextlib.suppress(OSError):  # a full disk: the error itself matters more
                write_json(work_dir / "summary.json", _ended(name, spec, digest, t0, err))
        raise
    summary = {**_head(name, spec, "completed"),
               "top1": result.pop("top1", None), "top5": result.pop("top5", None),
               "params": result.pop("params", None), "macs": result.pop("macs", None),
               "epochs": result.pop("epochs", getattr(spec, "epochs", 0)),
               "wall_seconds": round(time.time() - t0, 3), **result,
               "config_hash": digest, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _record(job, name, spec, work_dir, summary, consumed, restart)
    log.info("stage %s: completed in %.1fs (top-1 %s, params %s, MACs %s)", name,
             summary["wall_seconds"], _fmt(summary["top1"]), summary["params"], summary["macs"])
    return summary


def _head(name: str, spec, status: str) -> dict:
    """The keys every summary starts with, whatever became of the stage."""
    return {"stage": name, "type": spec.type, "from": spec.from_, "status": status}


def _ended(name: str, spec, digest: str, t0: float, err: BaseException) -> dict:
    """The summary of a stage stopped by a signal (`interrupted`) or an error (`failed`)."""
    status = "interrupted" if isinstance(err, preemption.Preempted) else "failed"
    return {**_head(name, spec, status), "error": first_line(err), "config_hash": digest,
            "wall_seconds": round(time.time() - t0, 3)}


def _log_skip(job: _Job, name: str, done: dict, digest: str) -> None:
    """Say why a completed stage is kept: a changed config or upstream, stale provenance,
    or nothing."""
    if done.get("config_hash") not in (None, digest):
        log.warning("stage %s: completed with a different config or upstream (hash %s, now "
                    "%s); keeping its results. Re-run it with --restart --stage %s",
                    name, done.get("config_hash"), digest, name)
    elif job.info.is_main and (stale := provenance.stale_reasons(done, job.run_dir)):
        log.warning("stage %s: already completed, but %s; keeping its results. Re-run it "
                    "with --restart --stage %s", name, "; ".join(stale), name)
    else:
        log.info("stage %s: already completed (top-1 %s); skipping", name,
                 _fmt(done.get("top1")))


def _require_inputs(job: _Job, name: str, spec, input_done: bool, teacher_done: bool) -> None:
    """A usage error naming the command to run first when the input or teacher is missing."""
    if not input_done:
        raise UsageError(
            f"stage '{name}' needs stage '{spec.from_}' to be completed first "
            f"({job.run_dir / spec.from_} has no completed summary): run "
            f"`python -m pipeline run {job.source} --stage {spec.from_}`")
    distill = getattr(spec, "distill", None)
    if distill is not None and not teacher_done:
        raise UsageError(f"stage '{name}' distills from stage '{distill.from_}', which is not "
                         f"completed: run `python -m pipeline run {job.source} --stage "
                         f"{distill.from_}` first")


def _prepare_work_dir(job: _Job, name: str, work_dir: Path, restart: bool,
                      resuming: bool) -> None:
    """Rank 0 makes the folder the stage writes into: afresh for a restart (never a
    completed stage: that one is swapped at the end), kept when a stopped restart resumes."""
    with D.together():
        if job.info.is_main:
            refuse_link(work_dir, "the stage's folder")
            if restart and not resuming and work_dir.exists():
                remove_tree(job.run_dir, work_dir)
            if restart and job.ledger is not None:
                job.ledger.start(name)
            ensure_dir(work_dir)
    if restart and resuming and job.info.is_main:
        log.info("stage %s: resuming its stopped --restart in %s", name, work_dir)


def _record(job: _Job, name: str, spec, work_dir: Path, summary: dict, consumed,
            restart: bool) -> None:
    """Rank 0 writes the completed summary with its provenance and swaps a restarted
    stage in place of the old one."""
    with D.together():
        if not job.info.is_main:
            return
        summary.update(provenance.stage_record(work_dir, job.run_dir, spec.from_, consumed))
        write_json(work_dir / "summary.json", summary)
        stage_dir = job.run_dir / name
        if work_dir != stage_dir:
            old = job.run_dir / f"{name}.old"
            if old.exists():
                remove_tree(job.run_dir, old)
            replace(job.run_dir, stage_dir, old)
            replace(job.run_dir, work_dir, stage_dir)
            remove_tree(job.run_dir, old)
        if restart and job.ledger is not None:
            job.ledger.finish(name)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


__all__ = ["run", "check_stage", "setup_logging", "stage_hash"]
