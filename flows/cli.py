"""`instructflow` command line: `run` the pipeline, `resume` a failed run, `serve` the deployments."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tasks.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instructflow", description="Instruction-tuning data and training DAG.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the instruction-tuning flow")
    run.add_argument("--config", default="configs/default.yaml", help="YAML run profile")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set mix.seed=2 (repeatable)")
    resume = sub.add_parser("resume", help="continue a failed run: finished stages are reused, the rest run")
    resume.add_argument("run_id", help="a directory name under the runs directory, e.g. 20261127T081500-1a2b3c4d")
    resume.add_argument("--runs-dir", default="data/runs", help="where the run directories are")
    serve = sub.add_parser("serve", help="serve prefect.yaml's deployments from this machine (no worker needed)")
    serve.add_argument("names", nargs="*", help="deployments to serve (default: all of prefect.yaml's)")
    serve.add_argument("--limit", type=int, default=1, help="flow runs at once on this machine")
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


def _run_flow(config: str, overrides: list[str], run_id: str | None = None) -> int:
    try:
        load_config(config, overrides)  # fail fast, before Prefect starts
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from flows.pipeline import instruction_tuning

    t0 = time.perf_counter()
    try:
        summary = instruction_tuning(config=config, overrides=overrides, run_id=run_id)
    except Exception as exc:  # the flow has logged the traceback; the user gets one line
        print(f"run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        if run_id is None:
            print("continue it with: instructflow resume <run_id> (the run directory printed above)", file=sys.stderr)
        return 1
    _print_summary(summary, time.perf_counter() - t0)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    return _run_flow(args.config, args.overrides)


def cmd_resume(args: argparse.Namespace) -> int:
    """Run the flow again with the run's own resolved config, into the same run directory: the artifacts
    of finished stages are found by their keys and reused; the failed stage continues from its parts."""
    from tasks.locks import describe
    from tasks.runs import live_holder, read_manifest

    run_dir = Path(args.runs_dir) / args.run_id
    try:
        manifest = read_manifest(run_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"resume: {exc}", file=sys.stderr)
        return 2
    if manifest.get("status") == "completed":
        print(f"run {args.run_id} completed already; its model: {manifest.get('model_path')}")
        return 0
    holder = live_holder(run_dir)
    if holder is not None:  # a killed run holds nothing: it is continued below
        print(f"resume: run {args.run_id} is still running: {describe(holder)}; wait for it to end or stop it, "
              f"then resume it", file=sys.stderr)
        return 2
    done = [name for name in manifest.get("stages", {})]
    print(f"resuming run {args.run_id} (attempt {manifest.get('attempt', 1) + 1}); "
          f"finished before: {', '.join(done) or 'none'}")
    # The run's own resolved config, with the runs directory where this command found the run.
    return _run_flow(str(run_dir / "config.yaml"), [f"run.runs_dir={Path(args.runs_dir).resolve()}"],
                     run_id=args.run_id)


def cmd_serve(args: argparse.Namespace) -> int:
    from prefect import serve

    from flows.deployments import ROOT, DeploymentError, runner_deployments

    try:
        deployments = runner_deployments(args.names or None)
    except DeploymentError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 2
    os.chdir(ROOT)  # the deployments' `config` parameters are paths relative to the project
    serve(*deployments, limit=args.limit)
    return 0


def _quiet_defaults() -> None:
    # No telemetry from the temporary Prefect server, and never a model hub: everything is local.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    _quiet_defaults()
    args = _parser().parse_args(argv)
    commands = {"run": cmd_run, "resume": cmd_resume, "serve": cmd_serve}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
