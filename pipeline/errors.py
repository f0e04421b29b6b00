"""The one error family of the pipeline: every user-facing failure is a `PipelineError`
that carries its exit code; the CLI catches it once and prints its first line.

Exit codes: 1 a failure at run time (non-finite loss, an unreadable checkpoint, pruning
that cannot be done), 2 a usage error (bad config or override, missing data, a stage
whose input does not exist).
"""

from __future__ import annotations

import difflib
import reprlib

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class PipelineError(Exception):
    """A failure the user is told about in one line; `exit_code` is what the CLI returns."""

    exit_code = EXIT_FAILED


class UsageError(PipelineError):
    """A user mistake found before or while running (a stage's missing input, ...)."""

    exit_code = EXIT_USAGE


MESSAGE_LIMIT = 2000  # characters of an error line, at most


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (at most MESSAGE_LIMIT characters), or its
    type name when it has none."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= MESSAGE_LIMIT else line[:MESSAGE_LIMIT - 3] + "..."


_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxdict, _SHOW.maxlist, _SHOW.maxtuple, _SHOW.maxset = 2, 4, 4, 4, 4
_SHOW.maxstring, _SHOW.maxother, _SHOW.maxlong = 60, 60, 40


def show_value(value: object, limit: int = 60) -> str:
    """A value as an error message shows it: its repr, bounded in size and in the work it
    takes (a huge or deeply shared structure, such as a YAML alias bomb, is not expanded),
    with newlines and control characters escaped so the message stays one line."""
    text = _SHOW.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def did_you_mean(word: str, choices, prefix: str = " ", cutoff: float = 0.6) -> str:
    """` (did you mean 'x'?)` for the closest of `choices`, or '' when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1,
                                    cutoff=cutoff)
    return f"{prefix}(did you mean '{close[0]}'?)" if close else ""


__all__ = ["PipelineError", "UsageError", "first_line", "did_you_mean", "show_value",
           "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE"]
