"""The report's files: compare.md (the table, the latency note, the provenance table, the
plots), compare.csv and compare.json, and where they go by default."""

from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_write_text
from . import measured
from .latency import latency_device_for
from .plots import plot_curves, plot_latency, plot_pareto
from .rows import Options
from .tables import columns_for, provenance_markdown, to_csv, to_json, to_markdown


def default_out(run_dirs: list[Path]) -> Path:
    """<run dir>/report for one run, ./reports for several."""
    return run_dirs[0] / "report" if len(run_dirs) == 1 else Path("reports")


def _markdown(rows: list[dict], run_dirs: list[Path], cols: list[str], options: Options,
              pngs: list[Path], command: str) -> str:
    md = [f"# compare: {', '.join(d.name for d in run_dirs)}", ""]
    if command:
        md += [f"`{command}`", ""]
    md += [to_markdown(rows, cols), ""]
    if measured.note(rows):
        md += [measured.note(rows), ""]
    if options.latency:
        md += [_latency_note(options), ""]
    if options.provenance:
        md += ["## Provenance", "", provenance_markdown(run_dirs), ""]
    for p in pngs:
        md += [f"![{p.stem}]({p.name})", ""]
    return "\n".join(md)


def _latency_note(options: Options) -> str:
    """What the latency column measured: backend, batch, device, memory format."""
    backend = options.latency_backend
    device = latency_device_for(backend, options.latency_device)
    what = {"torch": "the PyTorch model",
            "torchscript": "the model exported as a frozen TorchScript file (torch.jit, BN "
                           "folded; exported and verified for the measurement)",
            "onnxruntime": "the model exported to ONNX (BN folded) and run by onnxruntime's "
                           "CPU provider (exported and verified for the measurement)"}[backend]
    layout = ("onnxruntime picks its own memory layout" if backend == "onnxruntime" else
              f"in {options.latency_memory_format} memory format")
    return (f"Latency ({backend}): median forward time of one batch of "
            f"{options.latency_batch} through {what} on {device}, {layout}, measured on this "
            "machine; speedup against the run's baseline in the same backend.")


def _latency_axis(rows: list[dict], options: Options) -> str:
    """The latency plot's x label: compare's runtime, or the stages' own."""
    if options.latency:
        device = latency_device_for(options.latency_backend, options.latency_device)
        return (f"{options.latency_backend} latency (ms per batch of "
                f"{options.latency_batch}, {device})")
    backends = sorted({r["stage_latency_backend"] for r in rows
                       if r.get("stage_latency_backend")})
    return ("latency (ms per batch, " + (backends[0] if len(backends) == 1
                                          else "each stage's own runtime") + ")")


def write_report(rows: list[dict], run_dirs: list[Path], out: Path, options: Options,
                 plot: bool = False, command: str = "") -> list[Path]:
    """Write compare.md, compare.csv, compare.json (and the plots) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    cols = columns_for(rows, options)
    pngs: list[Path] = []
    if plot:
        pngs.append(plot_pareto(rows, out / "accuracy_vs_macs.png").path)
        measured.plot_latency(rows)  # compare's measurement, else the stages' own
        if options.latency or any(r.get("plot_latency_ms") for r in rows):
            pngs.append(plot_latency(rows, out / "accuracy_vs_latency.png",
                                     _latency_axis(rows, options)).path)
        for d in run_dirs:
            pngs.append(plot_curves(d, out / f"curves_{d.name}.png").path)
    written = []
    for name, text in (("compare.md", _markdown(rows, run_dirs, cols, options, pngs, command)),
                       ("compare.csv", to_csv(rows, cols)), ("compare.json", to_json(rows))):
        atomic_write_text(out / name, text if text.endswith("\n") else text + "\n")
        written.append(out / name)
    return written + pngs


__all__ = ["default_out", "write_report"]
