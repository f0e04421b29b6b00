"""The rotating checkpoint files of one training stage, and which one a resume starts from.

Modelled on timm's `CheckpointSaver`: the trainer hands over a state dict (and whether
it is the best so far); the saver decides the files, and knows nothing about training.

Files in the stage folder:
  * last.pt, the newest checkpoint, replaced atomically;
  * last.prev.pt, the one before it: a crash while writing, or a corrupt newest file,
    falls back to it;
  * best.pt, the best epoch's. It is written before last.pt, so a crash in between
    resumes from the older last.pt and redoes the epoch: best.pt never lags behind the
    best epoch a checkpoint records. When both are written, last.pt is a hard link to
    best.pt (one serialization, one fsync); files are only ever replaced, never written
    in place, so the link is safe;
  * *.corrupt, an unreadable checkpoint moved out of the rotation (kept for inspection).

Only rank 0 touches the files; the other ranks wait for it, and learn of its failure
(`distributed.together`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from . import checkpoint as ckpt
from . import distributed as D
from .errors import first_line
from .safefs import replace

log = logging.getLogger("pipeline")


class CheckpointSaver:
    """last.pt / last.prev.pt / best.pt of the stage `stage` in `folder`.

    `required`: keys every checkpoint of this kind holds; a file lacking one is treated
    as unreadable (e.g. a plain model file dropped in as last.pt).
    """

    def __init__(self, folder: Path, dist: D.DistInfo, *, stage: str,
                 required: tuple[str, ...] = ()):
        self.folder, self.dist, self.stage, self.required = Path(folder), dist, stage, required
        self._peeked: dict[Path, dict] = {}  # states `peek` read, handed to `resume`

    @property
    def last_path(self) -> Path:
        return self.folder / "last.pt"

    @property
    def prev_path(self) -> Path:
        return self.folder / "last.prev.pt"

    @property
    def best_path(self) -> Path:
        return self.folder / "best.pt"

    def save(self, state: dict, best: bool = False) -> None:
        """Write `state` as last.pt (the previous one kept as last.prev.pt) and, with
        `best`, as best.pt too. Called on every rank; only rank 0 writes."""
        with D.together():  # a failed write (disk full) on rank 0 stops every rank
            if self.dist.is_main:
                self._write(state, best)

    def _write(self, state: dict, best: bool) -> None:
        """Rank 0: every new file is complete on disk before an old one is replaced, so a
        failed write (disk full, I/O error) leaves last.pt, last.prev.pt and best.pt as
        they were."""
        if best:
            ckpt.save(state, self.best_path)
            new = self.best_path
        else:
            new = self.folder / ".last.pt.next"
            ckpt.save(state, new)
        try:
            if self.last_path.exists():
                replace(self.folder, self.last_path, self.prev_path)
            if new != self.best_path:
                replace(self.folder, new, self.last_path)
            elif not ckpt.link(self.best_path, self.last_path):
                ckpt.save(state, self.last_path)
        except OSError as err:  # the newest good file is then last.prev.pt (or best.pt)
            raise ckpt.CheckpointWriteError(f"{self.last_path}: cannot put the checkpoint in "
                                            f"place ({err.strerror})") from None

    def resume(self, problem: Callable[[dict], str | None],
               restore: Callable[[dict], None]) -> Path | None:
        """Hand the newest good checkpoint (last.pt, else last.prev.pt) to `restore` on
        every rank and return its path; None when there is none to resume from.

        An unreadable file is reported in one line and moved aside; a readable one that
        `problem(state)` rejects (other batch size, other widths), or that `restore`
        cannot take, is a CheckpointError: resuming it would silently train something
        else.
        """
        found = None
        with D.together():
            if self.dist.is_main:
                found = self._find(problem)
        path, error = D.broadcast_object(found[:2] if found else (None, None))
        if error:
            raise ckpt.CheckpointError(error)
        if path is None:
            return None
        with D.together():
            state = found[2] if found else ckpt.load(Path(path))
            try:
                restore(state)
            except (KeyError, RuntimeError, ValueError, TypeError) as err:
                raise ckpt.CheckpointError(f"{path}: cannot resume from it "
                                           f"({first_line(err)}); {self._restart_hint()}"
                                           ) from None
        return Path(path)

    def _find(self, problem: Callable[[dict], str | None]
              ) -> tuple[str | None, str | None, dict | None] | None:
        """Rank 0: (path, None, state) of the newest good checkpoint, (None, error, None)
        for an incompatible one, None when there is none."""
        corrupt = []
        for path in (self.last_path, self.prev_path):
            if not path.exists():
                continue
            try:
                state = self._load(path)
            except ckpt.CheckpointError as err:
                log.warning("%s; falling back to an older checkpoint", first_line(err))
                corrupt.append(path)
                continue
            reason = problem(state)
            if reason:
                return None, f"{path}: cannot resume: {reason}; {self._restart_hint()}", None
            _set_aside(corrupt)
            return str(path), None, state
        if corrupt:
            log.warning("stage %s: no readable checkpoint left; starting the stage afresh",
                        self.stage)
            _set_aside(corrupt)
        return None

    def peek(self, key: str):
        """Rank 0's value of `key` in the newest readable checkpoint (None when there is
        none, or it lacks the key), on every rank. Read before the trainer is set up (e.g.
        the precision a stage started with); `resume` reuses the state read here."""
        value = None
        if self.dist.is_main:
            for path in (self.last_path, self.prev_path):
                if not path.exists():
                    continue
                try:
                    state = self._load(path)
                except ckpt.CheckpointError:
                    continue  # resume reports it and falls back
                self._peeked[path] = state
                value = state.get(key)
                break
        return D.broadcast_object(value)

    def _load(self, path: Path) -> dict:
        if path in self._peeked:
            return self._peeked.pop(path)
        state = ckpt.load(path)
        missing = [k for k in self.required if k not in state]
        if missing:
            raise ckpt.CheckpointError(f"{path}: not a trainer checkpoint (lacks "
                                       f"{missing[0]!r})")
        return state

    def _restart_hint(self) -> str:
        return f"start the stage afresh with `--restart --stage {self.stage}`"


def _set_aside(paths: list[Path]) -> None:
    """Move corrupt checkpoints out of the rotation (kept for inspection)."""
    for p in paths:
        replace(p.parent, p, p.with_name(p.name + ".corrupt"))


__all__ = ["CheckpointSaver"]
