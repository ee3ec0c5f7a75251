"""`instructflow` command line: `run` the pipeline, `resume` a failed run, `serve` the deployments."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tasks.artifacts import STAGES
from tasks.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instructflow", description="Instruction-tuning data and training DAG.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the instruction-tuning flow")
    run.add_argument("--config", default="configs/default.yaml", help="YAML run profile")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set mix.seed=2 (repeatable)")
    run.add_argument("--until", choices=STAGES, default=None, metavar="STAGE",
                     help=f"stop after this stage ({', '.join(STAGES)}); e.g. --until mix: the data, no training")
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
    if summary.get("until"):
        console.print(f"stopped after [bold]{summary['until']}[/bold] (--until); its artifact: "
                      f"[bold]{summary['last_artifact']}[/bold]")
        console.print(f"finished in {seconds:.1f} s")
        return
    console.print(f"eval loss (mix's eval split): {summary['eval_loss_before']:.4f} (base) -> "
                  f"{summary['eval_loss_after']:.4f} (tuned)")
    if summary.get("heldout_loss"):
        console.print(f"held-out loss per reference token: {summary['heldout_loss']['base']:.4f} (base) -> "
                      f"{summary['heldout_loss']['tuned']:.4f} (tuned)")
    console.print(f"tuned model: [bold]{summary['model_path']}[/bold]")
    console.print(f"finished in {seconds:.1f} s")


def _prefect_advice() -> str:
    """What to do when Prefect itself did not start (no flow ran)."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        return (f"the Prefect server at {settings.api.url} (PREFECT_API_URL) did not answer: start it "
                f"(`prefect server start`), fix the address, or unset PREFECT_API_URL to use a temporary local one")
    return (f"Prefect's temporary local server did not start within "
            f"{settings.server.ephemeral.startup_timeout_seconds} s: raise "
            f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or run `prefect server start` in another "
            f"terminal and set PREFECT_API_URL=http://127.0.0.1:4200/api")


def prepare_local_prefect() -> None:
    """Without PREFECT_API_URL, each run starts Prefect's temporary server, which must answer within
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS. Its first start also creates and migrates its SQLite
    database, which alone takes about 20 s on two slow cores: that is done here first, outside the timeout,
    once per Prefect home."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    url = settings.server.database.connection_url.get_secret_value() if settings.server.database.connection_url else ""
    if settings.api.url or not url.startswith("sqlite"):
        return  # a real server, or a database someone else manages
    database = Path(url.split(":///", 1)[-1])
    if database.exists():
        return  # made before; a newer Prefect migrates it at start, within the timeout set in main()
    import anyio
    from prefect.server.database import provide_database_interface

    print(f"preparing Prefect's local database {database} (first run only, about half a minute)", file=sys.stderr,
          flush=True)
    anyio.run(provide_database_interface().create_db)


def _run_flow(config: str, overrides: list[str], run_id: str | None = None, until: str | None = None) -> int:
    try:
        cfg = load_config(config, overrides)  # fail fast, before Prefect starts
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    try:
        prepare_local_prefect()
    except Exception as exc:  # nothing has run: say what failed, not how to resume
        print(f"run not started: preparing Prefect's local database failed ({type(exc).__name__}: {exc}); "
              f"nothing ran. Check that PREFECT_HOME ({os.environ.get('PREFECT_HOME', '~/.prefect')}) is "
              f"writable, or set PREFECT_API_URL to a running Prefect server", file=sys.stderr)
        return 1
    from flows.pipeline import instruction_tuning

    t0 = time.perf_counter()
    try:
        state = instruction_tuning(config=config, overrides=overrides, run_id=run_id, until=until,
                                   return_state=True)
    except Exception as exc:  # Prefect did not start: there is no run and no run directory
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"run not started: {type(exc).__name__}: {first[:300]}", file=sys.stderr)
        print(f"nothing ran and no run directory was made; {_prefect_advice()}", file=sys.stderr)
        return 1
    if not state.is_completed():
        error = state.result(raise_on_failure=False)  # the flow's exception (it has logged the traceback)
        what = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else state.message or state.name
        print(f"run failed: {what}", file=sys.stderr)
        run_dir = _run_dir_of(cfg.run.runs_dir, state, run_id)
        if run_dir is not None:
            print(f"continue it with: instructflow resume {run_dir.name}"
                  + (f" --runs-dir {cfg.run.runs_dir}" if Path(cfg.run.runs_dir) != Path("data/runs") else "")
                  + f" (run directory {run_dir})", file=sys.stderr)
        else:
            print("it stopped before its run directory was made (nothing to resume): fix the cause above and "
                  "run again", file=sys.stderr)
        return 1
    _print_summary(state.result(), time.perf_counter() - t0)
    return 0


def _run_dir_of(runs_dir: str, state, run_id: str | None) -> Path | None:
    """The run directory of a flow run that failed: named after it (or the resumed run), if it was made."""
    if run_id is not None:
        return Path(runs_dir) / run_id
    flow_run_id = str(state.state_details.flow_run_id or "")
    found = sorted(Path(runs_dir).glob(f"*-{flow_run_id[:8]}")) if flow_run_id else []
    return found[-1] if found else None


def cmd_run(args: argparse.Namespace) -> int:
    return _run_flow(args.config, args.overrides, until=args.until)


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


# Prefect gives its temporary server 20 s to answer by default; a slow or busy machine needs more even
# with its database prepared (measured here: 8-9 s on two loaded cores), and a Prefect upgrade migrates at
# start. A user's own setting wins.
STARTUP_TIMEOUT_S = "600"


def _quiet_defaults() -> None:
    # No telemetry from the temporary Prefect server, and never a model hub: everything is local.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", STARTUP_TIMEOUT_S)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    _quiet_defaults()
    args = _parser().parse_args(argv)
    commands = {"run": cmd_run, "resume": cmd_resume, "serve": cmd_serve}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
