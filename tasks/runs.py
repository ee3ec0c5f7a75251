"""Run records: `data/runs/<run_id>/` holds the resolved config and a manifest naming each stage's artifact."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.artifacts import Artifact, atomic_write_bytes, atomic_write_json, atomic_write_text
from tasks.config import Config
from tasks.locks import Lock, describe, holder_if_alive, me

LOCK = ".lock"  # in the run directory, held by the process running it


class RunBusy(RuntimeError):
    """The run is still running in a live process."""


def live_holder(run_dir: Path) -> dict[str, Any] | None:
    """The live process running the run in `run_dir`, if any (a killed one does not count)."""
    return holder_if_alive(Path(run_dir) / LOCK)


@dataclass
class StageRecord:
    stage: str
    key: str
    path: str
    reused: bool
    rows_in: int | None
    rows_out: int | None
    seconds: float | None  # what producing the artifact took (its own run, not this one if reused)
    dropped: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, stage: str, artifact: Artifact, reused: bool) -> "StageRecord":
        stats = artifact.stats()
        return cls(stage=stage, key=artifact.path.name, path=str(artifact.path), reused=reused,
                   rows_in=stats.get("rows_in"), rows_out=stats.get("rows_out"), seconds=stats.get("seconds"),
                   dropped=stats.get("dropped", {}))


@dataclass
class RunRecord:
    run_id: str
    path: Path
    config_path: str
    overrides: list[str]
    started_at: float
    attempt: int = 1
    until: str | None = None  # the last stage this run goes to (None: all of them)
    stages: list[StageRecord] = field(default_factory=list)
    earlier: dict[str, Any] = field(default_factory=dict)  # stages recorded by earlier attempts
    lock: Lock | None = field(default=None, repr=False, compare=False)

    @classmethod
    def start(cls, cfg: Config, config_path: str, overrides: list[str], flow_run_id: str | None = None,
              run_id: str | None = None, until: str | None = None) -> "RunRecord":
        """A new run directory, or the existing one of `run_id` (a resume) or of this flow run (a Prefect
        retry of it), continued as its next attempt."""
        runs_dir = Path(cfg.run.runs_dir).resolve()
        if run_id is None and flow_run_id:
            same_flow_run = sorted(runs_dir.glob(f"*-{str(flow_run_id)[:8]}"))
            run_id = same_flow_run[-1].name if same_flow_run else None
        if run_id is not None:
            if Path(run_id).name != run_id or run_id in (".", ".."):
                raise ValueError(f"run_id `{run_id}` must be a directory name under {runs_dir}")
            return cls.resume(runs_dir / run_id, until)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        run_id = f"{stamp}-{(str(flow_run_id) if flow_run_id else secrets.token_hex(4))[:8]}"
        path = runs_dir / run_id
        path.mkdir(parents=True, exist_ok=False)
        lock = _take(path, run_id)
        atomic_write_text(path / "config.yaml", cfg.to_yaml())
        record = cls(run_id, path, config_path, list(overrides), time.time(), until=until, lock=lock)
        record.save(status="running")
        return record

    @classmethod
    def resume(cls, path: Path, until: str | None = None) -> "RunRecord":
        """Continue the run in `path` as its next attempt (to its own last stage unless `until` says
        otherwise); refused while a live process still runs it."""
        manifest = read_manifest(path)
        lock = _take(path, manifest["run_id"])
        record = cls(manifest["run_id"], path, manifest["config"], list(manifest["overrides"]), time.time(),
                     attempt=int(manifest.get("attempt", 1)) + 1, until=until or manifest.get("until"),
                     earlier=dict(manifest.get("stages") or {}), lock=lock)
        record.save(status="running")
        return record

    def close(self) -> None:
        """Let the run directory go (the end of this attempt, finished or failed)."""
        if self.lock is not None:
            self.lock.release()

    def add(self, stage: StageRecord) -> None:
        self.stages.append(stage)
        self.save(status="running")

    def attach(self, source: Path, name: str) -> Path:
        """Copy a file an artifact holds (a report, say) into the run directory, where people look."""
        target = self.path / name
        atomic_write_bytes(target, source.read_bytes())
        return target

    def save(self, status: str, extra: dict[str, Any] | None = None) -> None:
        manifest = {"run_id": self.run_id, "status": status, "attempt": self.attempt, "config": self.config_path,
                    "overrides": self.overrides, "until": self.until, "started_at": time.strftime(
                        "%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started_at)),
                    "seconds": round(time.time() - self.started_at, 3),
                    "stages": {**self.earlier, **{s.stage: asdict(s) for s in self.stages}}, **(extra or {})}
        atomic_write_json(self.path / "manifest.json", manifest)


def _take(path: Path, run_id: str) -> Lock:
    lock = Lock(path / LOCK)
    if not lock.try_acquire(me(run_id)):
        raise RunBusy(f"run {run_id} is still running: {describe(live_holder(path))}; wait for it to end "
                      f"or stop it, then continue it")
    return lock


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no run here (no manifest.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
