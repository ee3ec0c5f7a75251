"""`instructflow` command line: `run` the pipeline (more subcommands grow here)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from tasks.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instructflow", description="Instruction-tuning data and training DAG.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the instruction-tuning flow")
    run.add_argument("--config", default="configs/default.yaml", help="YAML run profile")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set mix.seed=2 (repeatable)")
    return parser


def _print_summary(summary: dict, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"run directory: [bold]{summary['run_dir']}[/bold]")
    table = Table(title="stages")
    for column in ("stage", "rows in", "rows out", "seconds", "reused"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for s in summary["stages"]:
        table.add_row(s["stage"], str(s["rows_in"]), str(s["rows_out"]),
                      f"{s['seconds']:.1f}" if s["seconds"] is not None else "-", "yes" if s["reused"] else "no")
    console.print(table)
    console.print(f"eval loss: {summary['eval_loss_before']:.4f} (base) -> {summary['eval_loss_after']:.4f} (tuned)")
    console.print(f"tuned model: [bold]{summary['model_path']}[/bold]")
    console.print(f"finished in {seconds:.1f} s")


def cmd_run(args: argparse.Namespace) -> int:
    try:
        load_config(args.config, args.overrides)  # fail fast, before Prefect starts
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from flows.pipeline import instruction_tuning

    t0 = time.perf_counter()
    try:
        summary = instruction_tuning(config=args.config, overrides=args.overrides)
    except Exception as exc:  # the flow has logged the traceback; the user gets one line
        print(f"run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    _print_summary(summary, time.perf_counter() - t0)
    return 0


def _quiet_defaults() -> None:
    # No telemetry from the temporary Prefect server, and never a model hub: everything is local.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    _quiet_defaults()
    args = _parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
