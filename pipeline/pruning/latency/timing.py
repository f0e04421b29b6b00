"""Wall time of prepared runners, measured side by side (the project's shared timing,
`pipeline.timing`): warm-up runs discarded, interleaved rounds, the median kept."""

from __future__ import annotations

from ...timing import interleaved_ms, median_ms, summary

__all__ = ["interleaved_ms", "median_ms", "summary"]
