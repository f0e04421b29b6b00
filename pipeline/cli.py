"""Command line: `python -m pipeline run CONFIG ...` and `python -m pipeline compare RUN_DIR ...`.

Exit codes: 0 success, 1 a failure at run time (non-finite loss, ...), 2 a usage error
(bad config or override, missing data, a stage whose input does not exist).
"""

from __future__ import annotations

import argparse
import json
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Pruning and finetuning pipeline: pretrain -> prune -> recover, from one "
                    "YAML file.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,compare}")
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
    c = sub.add_parser("compare", help="tabulate the stages of one or more run directories",
                       description="One row per stage of each run directory (or glob).")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories or glob patterns")
    c.add_argument("--format", choices=["md", "csv", "json"], default="md")
    return p


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def cmd_run(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .pruning import PruningError
    from .runner import UsageError
    from .trainer import TrainingError

    try:
        if args.dry_run:
            from stages.plan import build_plan, format_text

            from .runconfig import load_config

            cfg, _ = load_config(args.config, args.overrides)
            plan = build_plan(cfg)
            print(json.dumps(plan, indent=2) if args.format == "json" else format_text(plan))
            return EXIT_OK
        from . import runner

        progress = {"on": True, "off": False}.get(args.progress or "", None)
        summaries = runner.run(args.config, args.overrides, stage=args.stage,
                               restart=args.restart, show_progress=progress)
    except (ConfigError, DataError, UsageError) as err:
        return _fail(str(err), EXIT_USAGE)
    except (TrainingError, CheckpointError, PruningError) as err:
        return _fail(str(err), EXIT_FAILED)
    except KeyboardInterrupt:
        return _fail("interrupted; run the same command again to resume", 130)
    import os

    if int(os.environ.get("RANK", 0)) == 0:
        if args.format == "json":
            print(json.dumps(summaries, indent=2, default=str))
        else:
            for s in summaries:
                top1 = s.get("top1")
                print(f"{s['stage']:<16} {s['type']:<9} {s['status']:<10} top-1 "
                      f"{'-' if top1 is None else f'{top1:.2f}'}")
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from . import report

    dirs = report.expand(args.runs)
    missing = [str(d) for d in dirs if not d.is_dir()]
    if not dirs or missing:
        return _fail(f"no such run directory: {', '.join(missing) or ' '.join(args.runs)}",
                     EXIT_USAGE)
    rows = report.collect([str(d) for d in dirs])
    out = {"md": report.to_markdown, "csv": report.to_csv, "json": report.to_json}[args.format]
    print(out(rows))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    return cmd_compare(args)
