"""`compare`: what the runs delivered, as tables (markdown, CSV, JSON) and plots.

    rows.py     run directories read into rows, one per stage (baseline, state, notes)
    tables.py   the rows as markdown, CSV and JSON; the provenance table
    plots.py    accuracy against MACs (and measured latency) with the Pareto front;
                training curves
    measured.py latency a stage measured in its own runtime: columns, plot values
    latency.py  the forward time of a model on this machine, in PyTorch or exported to
                onnxruntime/TorchScript (also used by benchmarks/)
    files.py    the report files and where they go
"""

from ..rundir import is_run_dir
from .files import default_out, write_report
from .latency import LATENCY_BACKENDS, check_backend, measure_latency
from .plots import Plot, pareto_front, plot_accuracy_latency, plot_curves, plot_pareto
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
from .tables import columns_for, provenance_markdown, to_csv, to_json, to_markdown

__all__ = ["COLUMNS", "PROVENANCE_COLUMNS", "Options", "expand", "is_run_dir", "rows_for",
           "read_metrics", "is_prune_stage", "is_training_stage", "columns_for", "to_markdown",
           "to_csv", "to_json", "provenance_markdown", "Plot", "plot_pareto",
           "plot_accuracy_latency", "plot_curves",
           "pareto_front", "measure_latency", "LATENCY_BACKENDS", "check_backend", "write_report",
           "default_out"]
