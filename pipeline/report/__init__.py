"""`compare`: what the runs delivered, as tables (markdown, CSV, JSON) and plots.

    rows.py     run directories read into rows, one per stage (baseline, state, notes)
    tables.py   the rows as markdown, CSV and JSON; the provenance table
    plots.py    accuracy against MACs with the Pareto front; against latency (compare's
                or a stage's own measurement, quantized models linked); training curves
    measured.py latency a stage measured in its own runtime: columns, plot values
    seeds.py    runs that differ only in seed aggregated into mean ± std, and which
                differences exceed two standard errors
    latency.py  the forward time of a model on this machine, in PyTorch or exported to
                onnxruntime/TorchScript (also used by benchmarks/)
    files.py    the report files and where they go
"""

from ..rundir import is_run_dir
from .files import default_out, write_report
from .latency import LATENCY_BACKENDS, check_backend, measure_latency
from .plots import Plot, pareto_front, plot_curves, plot_latency, plot_pareto
from .rows import (
    COLUMNS,
    PROVENANCE_COLUMNS,
    Options,
    expand,
    is_prune_stage,
    is_training_stage,
    read_metrics,
    rows_for,
)
from .seeds import aggregate, exceeds_two_se, mean_std, paired_exceeds_two_se, seed_groups
from .tables import columns_for, provenance_markdown, to_csv, to_json, to_markdown

__all__ = ["COLUMNS", "PROVENANCE_COLUMNS", "Options", "expand", "is_run_dir", "rows_for",
           "read_metrics", "is_prune_stage", "is_training_stage", "columns_for", "to_markdown",
           "to_csv", "to_json", "provenance_markdown", "Plot", "plot_pareto", "plot_curves",
           "plot_latency", "pareto_front", "measure_latency", "LATENCY_BACKENDS", "check_backend",
           "write_report", "default_out", "aggregate", "seed_groups", "mean_std",
           "exceeds_two_se", "paired_exceeds_two_se"]
