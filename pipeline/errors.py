"""The one error family of the pipeline: every user-facing failure is a `PipelineError`
that carries its exit code; the CLI catches it once and prints its first line.

Exit codes: 1 a failure at run time (non-finite loss, an unreadable checkpoint, pruning
that cannot be done), 2 a usage error (bad config or override, missing data, a stage
whose input does not exist).
"""

from __future__ import annotations

import difflib

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class PipelineError(Exception):
    """A failure the user is told about in one line; `exit_code` is what the CLI returns."""

    exit_code = EXIT_FAILED


class UsageError(PipelineError):
    """A user mistake found before or while running (a stage's missing input, ...)."""

    exit_code = EXIT_USAGE


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def did_you_mean(word: str, choices, prefix: str = " ", cutoff: float = 0.6) -> str:
    """` (did you mean 'x'?)` for the closest of `choices`, or '' when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1,
                                    cutoff=cutoff)
    return f"{prefix}(did you mean '{close[0]}'?)" if close else ""


__all__ = ["PipelineError", "UsageError", "first_line", "did_you_mean",
           "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE"]
