"""A first run on a fresh machine: an empty home directory, no Prefect database, no server. The command line
prepares Prefect's database before the temporary server's startup clock runs, gives that server time on a
slow machine, and a failure before the flow starts never points at a run directory that does not exist."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tests.servers import free_port


def fresh_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a new user: an empty home, none of Prefect's or the caches' settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_") and k not in ("XDG_CACHE_HOME", "INSTRUCTFLOW_CACHE")}
    return {**env, "HOME": str(home), "HF_HUB_OFFLINE": "1", **extra}


def cli(tmp_path: Path, env: dict[str, str], *sets: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "flows.cli", "run", "--config", str(ROOT / "configs" / "tiny.yaml"),
            "--set", f"run.artifacts_dir={tmp_path / 'artifacts'}", "--set", f"run.runs_dir={tmp_path / 'runs'}"]
    return subprocess.run(args + [x for s in sets for x in ("--set", s)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_a_first_run_with_an_empty_home_gets_past_prefect_start(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    missing = tmp_path / "not-there.jsonl"  # the run gets past startup, then stops at its first stage
    result = cli(tmp_path, fresh_env(home), f"seeds.path={missing}")
    assert result.returncode == 1, result.stderr[-3000:]

    database = home / ".prefect" / "prefect.db"
    log = result.stderr  # the command's own messages and Prefect's log, in order
    assert f"preparing Prefect's local database {database}" in log, log[-2000:]
    assert log.index("preparing Prefect's local database") < log.index("Starting temporary server") \
        < log.index("run directory:")  # prepared before the server's startup clock runs
    assert database.is_file()

    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "failed"
    errors = [line for line in result.stderr.splitlines() if line.startswith(("run failed:", "continue it with:"))]
    assert len(errors) == 2 and str(missing) in errors[0], result.stderr[-3000:]
    assert errors[1].startswith(f"continue it with: instructflow resume {run_dir.name} --runs-dir {tmp_path / 'runs'}")

    # Prepared once: the next run does not prepare again.
    again = cli(tmp_path, fresh_env(home), f"seeds.path={missing}")
    assert again.returncode == 1 and "preparing Prefect's local database" not in again.stderr


def test_a_failure_before_the_flow_starts_says_what_to_do_and_points_at_no_run(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    api = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    result = cli(tmp_path, fresh_env(home, PREFECT_API_URL=api), f"seeds.path={ROOT / 'data' / 'seed_tasks.jsonl'}")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()[-2:]
    assert lines[0].startswith("run not started: RuntimeError: Failed to reach API at")
    assert lines[1].startswith("nothing ran and no run directory was made; the Prefect server at "
                               f"{api} (PREFECT_API_URL) did not answer")
    assert "instructflow resume" not in result.stderr and not (tmp_path / "runs").exists()


def test_the_temporary_server_gets_a_startup_timeout_unless_the_user_set_one(monkeypatch):
    from flows import cli as cli_module

    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    cli_module._quiet_defaults()
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == cli_module.STARTUP_TIMEOUT_S == "600"
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "45")
    cli_module._quiet_defaults()
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "45"
