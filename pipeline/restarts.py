"""What a `--restart` has done so far, so that the same command resumes it after a stop.

`run --restart` runs the named stage (or every stage) afresh. A restart that is stopped
(SIGTERM, SIGUSR1, Ctrl-C, a crash) is taken up again by the same command: the stages it
already restarted are kept, and the stage it was in resumes from its checkpoint in
`<stage>.restart/` (or `<stage>/`, for a stage that had not completed) instead of being
wiped. `<run dir>/restart.json` records the restart: the stages asked for, the hash of
the resolved config, which of them were started and which are done; it is removed when
the last one is done. A `--restart` with another config or other stages starts afresh.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .rundir import read_json, write_json
from .safefs import remove_file

LEDGER_FILE = "restart.json"


@dataclass
class RestartLedger:
    """The restart of `stages` of a run whose resolved config hashes to `config_hash`;
    only rank 0 reads and writes it."""

    run_dir: Path
    stages: list[str]
    config_hash: str
    started: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    resumed: bool = False  # an earlier, stopped restart of the same command

    @property
    def path(self) -> Path:
        return Path(self.run_dir) / LEDGER_FILE

    @classmethod
    def open(cls, run_dir: Path, stages: list[str], config_hash: str) -> RestartLedger:
        """The stopped restart of the same stages and config, or a new one (written)."""
        ledger = cls(Path(run_dir), list(stages), config_hash)
        old = read_json(ledger.path) or {}
        if old.get("stages") == ledger.stages and old.get("config_hash") == config_hash:
            ledger.started = [str(s) for s in old.get("started") or [] if s in stages]
            ledger.done = [str(s) for s in old.get("done") or [] if s in stages]
            ledger.resumed = True
        ledger.save()
        return ledger

    def save(self) -> None:
        write_json(self.path, {"stages": self.stages, "config_hash": self.config_hash,
                               "started": self.started, "done": self.done})

    def start(self, stage: str) -> bool:
        """Record that `stage` is being restarted; True when it was already started by
        this restart (then its work folder holds the checkpoints to resume from)."""
        if stage in self.started:
            return True
        self.started.append(stage)
        self.save()
        return False

    def finish(self, stage: str) -> None:
        """Record `stage` as restarted; the ledger is removed once every stage is."""
        if stage not in self.done:
            self.done.append(stage)
        if all(s in self.done for s in self.stages):
            if self.path.exists():
                remove_file(self.run_dir, self.path)
        else:
            self.save()


__all__ = ["LEDGER_FILE", "RestartLedger"]
