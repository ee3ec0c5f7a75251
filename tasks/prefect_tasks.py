"""One thin Prefect task per stage. Each takes paths and returns the path of its artifact.

The task's cache key is the artifact key (plus the artifacts directory), and results are persisted, so a
repeated run shows every reused stage as `Cached` in Prefect. The flow passes `refresh_cache` when the
artifact behind a cache record has gone, so a deleted artifact is rebuilt rather than returned.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import Any

from prefect import task
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from tqdm import tqdm

from tasks import ray_executor
from tasks.config import Config
from tasks.stages import execute

log = logging.getLogger(__name__)


def _cache_key(stage: str):
    def key_fn(context: Any, parameters: dict[str, Any]) -> str:
        where = hashlib.sha256(str(parameters["artifacts_dir"]).encode()).hexdigest()[:8]
        return f"instructflow-{stage}-{parameters['key']}-{where}"
    return key_fn


def _publish_stats(stage: str, stats: dict[str, Any]) -> None:
    """The stage's stats.json in the Prefect UI: its scalar figures, and its drops per reason."""
    slug = stage.replace("_", "-")
    rows = [{"metric": k, "value": v} for k, v in stats.items() if isinstance(v, (int, float, str)) and k != "key"]
    usage = stats.get("usage") or stats.get("usage_this_attempt") or {}
    rows += [{"metric": f"usage.{k}", "value": v} for k, v in usage.items() if isinstance(v, int)]
    create_table_artifact(key=f"{slug}-stats", table=rows, description=f"{stage}: figures from stats.json")
    drops = [{"reason": reason, "rows": count} for reason, count in sorted(stats.get("dropped", {}).items())]
    if drops:
        create_table_artifact(key=f"{slug}-drops", table=drops, description=f"{stage}: rows dropped, per reason")
    # Per-item figures (dicts of dicts in stats.json) as one table each.
    for field, column, what in (("operations", "operation", "pass rate per operation"),
                                ("rounds", "round", "pass rate per round"),
                                ("sources", "source", "requested and achieved share per source"),
                                ("scores", "score", "distribution per score column")):
        figures = stats.get(field)
        if isinstance(figures, dict) and figures and all(isinstance(v, dict) for v in figures.values()):
            table = [{column: name, **values} for name, values in figures.items()]
            create_table_artifact(key=f"{slug}-{field.replace('_', '-')}", table=table, description=f"{stage}: {what}")


class StageProgress:
    """A progress artifact for a running stage, fed from the stage's own progress bars.

    The stage logic knows nothing of Prefect; it shows tqdm bars. While the stage runs, a thread reads the
    outermost live bar every `every` seconds and updates the artifact (percent, and "desc n/total" as its
    description), so the UI shows generation, scoring or training advancing.
    """

    def __init__(self, stage: str, every: float = 3.0):
        self.stage = stage
        self.every = every
        self.id = None
        try:
            self.id = create_progress_artifact(0.0, key=f"{stage.replace('_', '-')}-progress",
                                               description=f"{stage}: starting")
        except Exception as exc:  # no progress shown is no reason to fail the stage
            log.warning("%s: no progress artifact: %s", stage, exc)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"{stage}-progress", daemon=True)

    def __enter__(self) -> "StageProgress":
        if self.id is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if exc[0] is None:
            self._update(100.0, f"{self.stage}: done")

    @staticmethod
    def outermost_bar() -> tuple[str, int, int, str] | None:
        """(description, done, total, postfix) of the outermost live bar, read under tqdm's own lock. The
        work engine's postfix says how the endpoint is used (in flight, requests/s, tokens/s)."""
        with tqdm.get_lock():
            bars = [b for b in tqdm._instances if b.total and not b.disable]  # type: ignore[attr-defined]
            bar = min(bars, key=lambda b: abs(b.pos), default=None)
            if bar is None:
                return None
            return (bar.desc, bar.n, bar.total, getattr(bar, "postfix", None) or "")

    def _update(self, percent: float, description: str) -> None:
        if self.id is None:
            return
        try:
            update_progress_artifact(self.id, percent, description=description)
        except Exception as exc:  # progress is for people; the stage goes on, and the log says why it stopped
            log.warning("%s: progress artifact not updated: %s", self.stage, exc)

    def _watch(self) -> None:
        last = None
        while not self._stop.wait(self.every):
            try:
                now = self.outermost_bar()
            except Exception as exc:  # a bar closing under us: skip this look, keep watching
                log.debug("%s: progress bars unreadable: %s", self.stage, exc)
                continue
            if now is not None and now != last:
                last = now
                desc, done, total, postfix = now
                self._update(min(100.0, 100.0 * done / total),
                             f"{self.stage}: {desc} {done}/{total}" + (f" ({postfix})" if postfix else ""))


def _stage_task(stage: str, retries: int):
    # log_prints off: stages log through `logging`, and with it on, the disassembly that dill captures
    # internally while `datasets` fingerprints a table (mix exports) leaked into the run's logs.
    @task(name=stage, task_run_name=f"{stage} [{{key}}]", tags=["instructflow", f"stage:{stage}"],
          retries=retries, retry_delay_seconds=5, cache_key_fn=_cache_key(stage), persist_result=True,
          result_serializer="json", log_prints=False)
    def run(key: str, config: dict[str, Any], inputs: dict[str, str], artifacts_dir: str,
            run_id: str | None = None) -> str:
        cfg = Config.model_validate(config)
        # run.executor: ray: the stage's in-process model work in shards, each a task run on the Ray cluster
        sharding = ray_executor.sharding(cfg.run) if cfg.run.executor == "ray" else None
        with StageProgress(stage):
            artifact = execute(stage, cfg, inputs, run_id=run_id, sharding=sharding)
        if artifact.path.name != key:
            raise RuntimeError(f"{stage}: planned artifact {key} but wrote {artifact.path.name}; "
                               f"the stage's code changed during the run")
        _publish_stats(stage, artifact.stats())
        # Reports beside the data: report.md (quality, evaluate), mask_report.md (finetune: what was trained).
        for name, what in (("report", "report"), ("mask_report", "trained tokens of sample examples")):
            report = artifact.path / f"{name}.md"
            if report.exists():
                create_markdown_artifact(key=f"{stage.replace('_', '-')}-{name.replace('_', '-')}",
                                         markdown=report.read_text(), description=f"{stage}: {what}")
        return str(artifact.path)
    return run


seeds = _stage_task("seeds", retries=0)
self_instruct = _stage_task("self_instruct", retries=1)
evol_instruct = _stage_task("evol_instruct", retries=1)
quality = _stage_task("quality", retries=0)
mix = _stage_task("mix", retries=0)
finetune = _stage_task("finetune", retries=1)
evaluate = _stage_task("evaluate", retries=1)
