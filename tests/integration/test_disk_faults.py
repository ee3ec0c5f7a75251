"""A full disk and a read-only output directory, made real with small tmpfs mounts: the user gets one
clear line naming the place and the config key, nothing half-written is marked done, and after the disk
is fixed a re-run continues from the finished stages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.artifacts import STAGES, Artifact, stage_dirname
from tests.conftest import ROOT


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs: room for the data stages, not for the tuned model (about 70 MB for the tiny Gemma,
    whose 262K-token embedding dominates)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    try:
        _mount("-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount_point))
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {getattr(exc, 'stderr', exc)}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def run_cli(tiny_model_dir, disk: Path) -> subprocess.CompletedProcess:
    sets = [f"llm.model={tiny_model_dir}", f"run.artifacts_dir={disk / 'artifacts'}", f"run.runs_dir={disk / 'runs'}",
            f"seeds.path={ROOT / 'data' / 'seed_tasks.jsonl'}", "quality.judge.enabled=false"]
    args = [sys.executable, "-m", "flows.cli", "run", "--config", str(ROOT / "configs" / "tiny.yaml")]
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(args + [x for s in sets for x in ("--set", s)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def finished(disk: Path) -> dict[str, bool]:
    return {stage: any(Artifact(d).is_done(verify=True) for d in (disk / "artifacts" / stage_dirname(stage)).glob("*"))
            for stage in STAGES}


def test_a_full_disk_stops_with_one_line_and_a_rerun_continues(tiny_model_dir, small_disk):
    first = run_cli(tiny_model_dir, small_disk)
    assert first.returncode == 1, first.stderr[-2000:]
    (message,) = [line for line in first.stderr.splitlines() if line.startswith("run failed:")]
    assert "StorageError: finetune: cannot write" in message and "no space left" in message
    assert "`run.artifacts_dir`" in message and "Traceback" not in first.stderr.split("run failed:")[-1]
    assert finished(small_disk) == {**{s: True for s in list(STAGES)[:5]}, "finetune": False, "evaluate": False}
    (run_dir,) = (small_disk / "runs").iterdir()
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "failed"

    _mount("-o", "remount,size=400m", str(small_disk))  # more space: the same command continues
    second = run_cli(tiny_model_dir, small_disk)
    assert second.returncode == 0, second.stderr[-2000:]
    assert all(finished(small_disk).values())
    run_dirs = sorted((small_disk / "runs").iterdir())
    manifest = json.loads((run_dirs[-1] / "manifest.json").read_text())
    assert [s for s, r in manifest["stages"].items() if not r["reused"]] == ["finetune", "evaluate"]


def test_a_read_only_output_directory_is_named_before_any_stage(tiny_model_dir, small_disk):
    (small_disk / "artifacts").mkdir()
    _mount("-o", "remount,ro", str(small_disk))
    result = run_cli(tiny_model_dir, small_disk)
    assert result.returncode == 1
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("run failed:")]
    assert message == (f"run failed: StorageError: `run.artifacts_dir`: cannot write to "
                       f"{small_disk / 'artifacts'} (Read-only file system)")
    assert list((small_disk / "artifacts").iterdir()) == []
