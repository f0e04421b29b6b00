"""Command line: `python -m pipeline run CONFIG ...`, `python -m pipeline compare RUN_DIR ...`,
`python -m pipeline export RUN_DIR/STAGE ...` and `python -m pipeline eval RUN_DIR/STAGE ...`.

Exit codes: 0 success, 1 a failure at run time (non-finite loss, ...), 2 a usage error
(bad config or override, missing data, a stage whose input does not exist).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import report, runner
from .distributed import env_info, joined, resolve_device
from .errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, PipelineError, UsageError, first_line
from .evaluate import PRECISIONS, SPLITS, EvalOptions, evaluate_stage
from .evaluate import format_text as format_eval
from .export import DEFAULT_OPSET, FORMATS, MAX_OPSET, MIN_OPSET, ExportOptions, export_stage
from .export.target import MAX_FIXED_BATCH
from .plan import build_plan, format_text
from .preemption import Preempted
from .preflight import preflight
from .provenance import command_line
from .runconfig import load_config
from .safefs import refuse_link
from .trainer import HookBase


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Pruning and finetuning pipeline: pretrain -> prune -> recover, from one "
                    "YAML file.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,compare,export,eval}")
    r = sub.add_parser("run", help="run (or resume) the stages of a config",
                       description="Run the stages of CONFIG in order. Completed stages are "
                       "skipped, an interrupted stage resumes from its last checkpoint.")
    r.add_argument("config", help="YAML config file")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key, the value parsed as YAML "
                        "(e.g. --set stages.pretrain.epochs=1); repeatable")
    r.add_argument("--stage", help="run only this stage (its input stage must be complete)")
    r.add_argument("--restart", action="store_true",
                   help="run the named stage (or all stages) afresh instead of resuming/skipping")
    r.add_argument("--dry-run", action="store_true",
                   help="validate and print the resolved plan without training")
    r.add_argument("--format", choices=["text", "json"], default="text",
                   help="output format of --dry-run and of the final summary")
    r.add_argument("--progress", choices=["auto", "on", "off"], default=None,
                   help="per-epoch progress bar (default: the config's logging.progress)")
    c = sub.add_parser(
        "compare", help="tabulate (and plot) the stages of one or more run directories",
        description="One row per stage of each run directory (or glob): model, pruning "
        "method and ratio, top-1/top-5 and the change against the run's baseline, params, "
        "MACs, MAC reduction, model.pt size; optionally measured latency and speedup. Prints "
        "the table and writes compare.md, compare.csv and compare.json (and the plots) into "
        "--out.")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories or glob patterns "
                   "(quote globs: 'checkpoints/cifar10_*')")
    c.add_argument("--format", choices=["md", "csv", "json"], default="md",
                   help="what is printed (all three are written)")
    c.add_argument("--out", metavar="DIR", help="where the report files go (default: "
                   "<run dir>/report for one run, ./reports for several)")
    c.add_argument("--latency", action="store_true",
                   help="measure each stage's model.pt forward time on this machine and the "
                        "speedup over the run's baseline")
    c.add_argument("--latency-batch", type=int, default=32, metavar="N",
                   help="batch size of the latency measurement (default 32)")
    c.add_argument("--latency-device", metavar="DEVICE",
                   help="device of the latency measurement (default: cuda when present, "
                        "else cpu)")
    c.add_argument("--latency-memory-format", choices=["channels_last", "contiguous"],
                   default="channels_last",
                   help="memory format of weights and input in the latency measurement "
                        "(default channels_last, NHWC: the fast convolution path on CPU and "
                        "GPU; contiguous: NCHW)")
    c.add_argument("--latency-backend", choices=list(report.LATENCY_BACKENDS), default="torch",
                   help="what --latency times: torch (the PyTorch model, default), onnxruntime "
                        "(the model exported to ONNX, run by onnxruntime's CPU provider) or "
                        "torchscript (a frozen torch.jit file); the exported forms are written "
                        "to a temporary file, verified, and timed on the CPU")
    c.add_argument("--plot", action="store_true",
                   help="also write accuracy_vs_macs.png and curves_<run>.png")
    c.add_argument("--provenance", action="store_true",
                   help="also show each run's code version, library versions, device, seed, "
                        "config hash and command")
    c.add_argument("--each-seed", action="store_true",
                   help="one row per run even for runs that differ only in seed (default: "
                        "such runs are aggregated into mean ± std over the seeds, with n)")
    c.add_argument("--baseline", metavar="STAGE_DIR",
                   help="the dense model every run is compared with (a completed stage "
                        "directory), instead of each run's own pretrain stage")
    _add_export_parser(sub)
    _add_eval_parser(sub)
    return p


def _add_eval_parser(sub) -> None:
    v = sub.add_parser(
        "eval", help="evaluate a stage's model on the run's test set (or other data)",
        description="Evaluate RUN_DIR/STAGE's model.pt (dense or pruned, loaded with "
        "weights_only) on the run's configured test set: top-1, top-5, loss and the number "
        "of images. Under `torchrun --nproc_per_node N` the processes share the work and "
        "each image is counted once.")
    v.add_argument("stage", metavar="RUN_DIR/STAGE", help="a completed stage directory")
    v.add_argument("--checkpoint", metavar="FILE",
                   help="evaluate this checkpoint of the stage instead (best.pt, last.pt, ...)")
    v.add_argument("--data-root", metavar="DIR",
                   help="evaluate on this data folder instead of the config's data.root")
    v.add_argument("--split", choices=list(SPLITS),
                   help="the ImageFolder split beside train/ (default: the run's data.eval_split)")
    v.add_argument("--batch-size", type=int, default=256, metavar="N",
                   help="global evaluation batch (default 256)")
    v.add_argument("--precision", choices=list(PRECISIONS),
                   help="autocast precision (default: the run's precision)")
    v.add_argument("--device", default="auto",
                   help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    v.add_argument("--tta", choices=["none", "flip"], default="none",
                   help="test-time augmentation: flip also reports top1_tta/top5_tta, each "
                        "image scored by the mean of its logits and its mirror image's")
    v.add_argument("--format", choices=["text", "json"], default="text",
                   help="output format (json keys: top1, top5, test_loss, images, "
                        "checkpoint, ...)")


def _add_export_parser(sub) -> None:
    e = sub.add_parser(
        "export", help="write a stage's model as ONNX, TorchScript or a torch.export program",
        description="Export RUN_DIR/STAGE's model.pt (eval mode, dense or pruned) for "
        "deployment, carrying the run's provenance. The file is loaded back in its own "
        "runtime and checked against the PyTorch model on a random batch and up to 256 test "
        "images before it is written; a mismatch writes nothing and exits 1.")
    e.add_argument("stage", metavar="RUN_DIR/STAGE", help="a completed stage directory")
    e.add_argument("--format", required=True, choices=list(FORMATS),
                   help="onnx (onnxruntime), torchscript (torch.jit) or exported "
                        "(torch.export program, .pt2)")
    e.add_argument("--out", metavar="FILE", help="output file (default: "
                   "RUN_DIR/STAGE/model[.PRECISION].onnx|.torchscript.pt|.pt2)")
    e.add_argument("--batch", type=int, metavar="N",
                   help="fixed batch size of the input (default 1)")
    e.add_argument("--dynamic-batch", action="store_true",
                   help="a variable batch dimension instead of a fixed one")
    e.add_argument("--opset", type=int, metavar="N",
                   help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})")
    e.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="weights, input and output precision (default fp32; onnx: fp32/fp16)")
    e.add_argument("--channels-last", action="store_true",
                   help="weights and input in NHWC memory format (torchscript, exported)")
    e.add_argument("--data-root", metavar="DIR",
                   help="where the run's data set is now, if not at its config's data.root")
    e.add_argument("--force", action="store_true",
                   help="replace an existing output file (a run directory's own files, such "
                        "as model.pt, config.yaml or summary.json, are never replaced)")


def _fail(message: str, code: int, all_ranks: bool = True) -> int:
    # under torchrun rank 0 speaks for errors every rank raised; an error of one rank
    # alone is printed by that rank (torchrun then stops the others)
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        print(f"error: {message}", file=sys.stderr)
    elif not all_ranks:
        print(f"error: rank {rank}: {message}", file=sys.stderr)
    return code


def cmd_run(args: argparse.Namespace) -> int:
    if args.dry_run:
        cfg, _ = load_config(args.config, args.overrides)
        runner.check_stage(cfg, args.stage, args.config)
        resolve_device(cfg.device, env_info(), args.config)
        plan = build_plan(cfg, preflight(cfg, args.config, need_data=False))
        print(json.dumps(plan, indent=2) if args.format == "json" else format_text(plan))
        return EXIT_OK
    progress = {"on": True, "off": False}.get(args.progress or "", None)
    summaries = runner.run(args.config, args.overrides, stage=args.stage,
                           restart=args.restart, show_progress=progress,
                           hooks=getattr(args, "hooks", ()))
    if int(os.environ.get("RANK", 0)) == 0:
        if args.format == "json":
            print(json.dumps(summaries, indent=2, default=str))
        else:
            for s in summaries:
                top1 = s.get("top1")
                print((f"{s['run']:<24} " if "run" in s else "") +
                      f"{s['stage']:<16} {s['type']:<9} {s['status']:<10} top-1 "
                      f"{'-' if top1 is None else f'{top1:.2f}'}")
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    dirs = report.expand(args.runs)
    missing = [str(d) for d in dirs if not d.is_dir()]
    if not dirs or missing:
        return _fail(f"no such run directory: {', '.join(missing) or ' '.join(args.runs)}",
                     EXIT_USAGE)
    not_runs = [str(d) for d in dirs if not report.is_run_dir(d)]
    if not_runs:
        return _fail(f"not a run directory (no config.yaml and no <stage>/summary.json): "
                     f"{', '.join(not_runs)}", EXIT_USAGE)
    if not 1 <= args.latency_batch <= MAX_FIXED_BATCH:
        return _fail(f"--latency-batch: expected an integer in [1, {MAX_FIXED_BATCH}], got "
                     f"{args.latency_batch}", EXIT_USAGE)
    out = Path(args.out) if args.out else report.default_out(dirs)
    if not args.out:  # <run dir>/report: a link planted there would carry the files away
        refuse_link(out, "the report folder")
    if args.latency:
        report.check_backend(args.latency_backend, args.latency_device)
    baseline = Path(args.baseline) if args.baseline else None
    if baseline is not None and not (baseline / "summary.json").is_file():
        return _fail(f"--baseline {baseline}: not a stage directory (no summary.json)",
                     EXIT_USAGE)
    options = report.Options(latency=args.latency, latency_batch=args.latency_batch,
                             latency_device=args.latency_device,
                             latency_memory_format=args.latency_memory_format,
                             latency_backend=args.latency_backend, baseline=baseline,
                             provenance=args.provenance)
    rows = []
    for d in dirs:
        rows.extend(report.rows_for(d, options))
    if not args.each_seed:
        rows = report.aggregate(rows, dirs)
    cols = report.columns_for(rows, options)
    if args.format == "md":
        print(report.to_markdown(rows, cols))
        if args.provenance:
            print()
            print(report.provenance_markdown(dirs))
    elif args.format == "csv":
        print(report.to_csv(rows, cols + (report.PROVENANCE_COLUMNS if args.provenance
                                          else [])), end="")
    else:
        print(report.to_json(rows))
    try:
        written = report.write_report(rows, dirs, out, options, plot=args.plot,
                                      command=command_line())
    except OSError as err:
        return _fail(f"--out {out}: cannot write the report ({err.strerror})", EXIT_FAILED)
    print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    if args.batch is not None and args.dynamic_batch:
        raise UsageError("--batch and --dynamic-batch exclude each other; give one")
    options = ExportOptions(format=args.format, out=args.out,
                            batch=None if args.dynamic_batch else (
                                1 if args.batch is None else args.batch),
                            opset=args.opset, precision=args.precision,
                            channels_last=args.channels_last, data_root=args.data_root,
                            force=args.force)
    result = export_stage(args.stage, options)
    meta = result.metadata
    print(f"exported {meta['run']}/{meta['stage']} ({meta['model']}, {meta['num_classes']} "
          f"classes, input {'x'.join(map(str, meta['input_size']))}) as {meta['format']} "
          f"{meta['precision']}, batch {meta['batch']}"
          + (f", opset {meta['opset']}" if "opset" in meta else ""))
    for check in result.checks:
        print(f"verified on {check.line()}")
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {result.path}" + (f" and {result.sidecar}" if result.sidecar else ""))
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    options = EvalOptions(checkpoint=args.checkpoint, data_root=args.data_root,
                          split=args.split, batch_size=args.batch_size,
                          precision=args.precision, device=args.device, tta=args.tta)
    result = evaluate_stage(args.stage, options)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(result, indent=2) if args.format == "json" else format_eval(result))
    return EXIT_OK


COMMANDS = {"run": cmd_run, "compare": cmd_compare, "export": cmd_export, "eval": cmd_eval}


def main(argv: list[str] | None = None, hooks: Sequence[HookBase] = ()) -> int:
    """The CLI; `hooks` (trainer callbacks) go to every training stage of `run`."""
    args = build_parser().parse_args(argv)
    args.hooks = tuple(hooks)
    try:
        return COMMANDS[args.command](args)
    except Preempted as err:  # checkpointed; the same command resumes
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"{'note' if err.exit_code == 0 else 'stopped'}: {first_line(err)}",
                  file=sys.stderr)
        return err.exit_code
    except PipelineError as err:  # every user-facing failure, with its exit code
        return _fail(first_line(err), err.exit_code, getattr(err, "all_ranks", not joined()))
    except OSError as err:  # disk full, I/O error, permissions: the path and the reason
        where = f"{err.filename}: " if err.filename else ""
        return _fail(f"{where}{err.strerror or first_line(err)}", EXIT_FAILED)
    except KeyboardInterrupt:
        return _fail("interrupted; run the same command again to resume", 130)
