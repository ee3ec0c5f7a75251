"""The flow on a real local Ray cluster (2 CPUs): model work in shards, each a Prefect task run on Prefect's
Ray task runner, one shard's worker killed mid-way and retried alone; the rows equal a one-process run's."""

import asyncio
import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import instruction_tuning
from tasks.artifacts import DRILL_ENV, stage_dirname
from tasks.config import RunConfig

ray = pytest.importorskip("ray", reason="the extra `ray` is not installed")
pytest.importorskip("prefect_ray", reason="the extra `ray` is not installed")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Prefect test server and a local Ray cluster of 2 CPUs, for the module. The failure drill is set
    before the cluster starts, so its workers have it: the worker running quality's scoring shard 2 kills
    itself (SIGKILL) right after its first checkpoint part, once."""
    from tasks.ray_executor import connect

    root = tmp_path_factory.mktemp("ray-flow")
    os.environ[DRILL_ENV] = f"{root}/ray/artifacts/{stage_dirname('quality')}/*/parts/shard-0001@1"
    try:
        with prefect_test_harness(server_startup_timeout=120):
            resources = connect(RunConfig(ray_local_cpus=2))
            assert resources["CPU"] == 2
            yield root
    finally:
        ray.shutdown()
        os.environ.pop(DRILL_ENV, None)


def _task_runs(flow_run_id) -> dict[str, str]:
    async def read():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run.state.name for run in asyncio.run(read())}


def _artifact(root: Path, stage: str) -> Path:
    (path,) = (root / "artifacts" / stage_dirname(stage)).iterdir()
    return path


def _run(root: Path, model: Path, executor: str, extra: list[str], until: str | None = None):
    overrides = [f"llm.model={model}", f"run.artifacts_dir={root / 'artifacts'}", f"run.runs_dir={root / 'runs'}",
                 f"seeds.path={ROOT / 'data' / 'seed_tasks.jsonl'}", f"run.executor={executor}",
                 "quality.checkpoint_every=4", *extra]
    state = instruction_tuning(config=str(ROOT / "configs" / "tiny.yaml"), overrides=overrides, until=until,
                               return_state=True)
    assert state.is_completed(), state.message
    return state.result(), _task_runs(state.state_details.flow_run_id)


def test_flow_on_ray_gives_the_rows_of_one_process_with_a_killed_shard_retried_alone(cluster, tiny_model_dir):
    # 1. The whole flow on the cluster: Evol-Instruct's chains, the judge and DEITA/IFD in shards, and
    #    training as a Ray Train job of 2 workers.
    on_ray = cluster / "ray"
    summary, runs = _run(on_ray, tiny_model_dir, "ray", ["finetune.launcher=ray", "finetune.processes=2"])
    assert [s["stage"] for s in summary["stages"]][-1] == "evaluate"

    # Shards are task runs of their own; the killed one crashed and its retry completed; no other ran twice.
    shard_runs = {name: state for name, state in runs.items() if " shard " in name}
    scoring = {name: state for name, state in shard_runs.items() if name.startswith("quality shard")}
    crashed = [name for name, state in scoring.items() if state == "Crashed"]
    assert len(crashed) == 1 and crashed[0].startswith("quality shard 2/"), scoring
    assert scoring[crashed[0] + " retry 1"] == "Completed"
    assert [n for n in shard_runs if "retry" in n] == [crashed[0] + " retry 1"]
    assert all(state == "Completed" for name, state in shard_runs.items() if name not in crashed)
    assert any(name.startswith("evol_instruct shard") for name in shard_runs)

    quality_dir = _artifact(on_ray, "quality")
    stats = json.loads((quality_dir / "stats.json").read_text())
    shards = stats["scorer_shards"]["shards"]
    assert stats["scorer_shards"]["attempts"] == shards + 1 and stats["resumed_checkpoints"] == 0
    # The killed shard kept the part it wrote before dying and continued after it: each chunk scored once.
    per_shard = {s["shard"].split(" (")[0]: s for s in stats["scorer_shards"]["per_shard"]}
    killed = per_shard[crashed[0].split(" (")[0]]
    assert killed["attempts"] == 2 and killed["chunks_restored"] == 1 and killed["chunks_scored"] >= 1
    assert all(s["chunks_restored"] == 0 for s in per_shard.values() if s is not killed)
    rows = stats["rows_in"]
    assert sum(s["chunks_scored"] + s["chunks_restored"] for s in per_shard.values()) == -(-rows // 4)

    # 2. The same stages in one process, from the same seeds and Self-Instruct artifacts.
    local = cluster / "local"
    for stage in ("seeds", "self_instruct"):
        src = _artifact(on_ray, stage)
        shutil.copytree(src, local / "artifacts" / stage_dirname(stage) / src.name)
    _, local_runs = _run(local, tiny_model_dir, "local", [], until="quality")
    assert not any(" shard " in name for name in local_runs)

    # The executor is operational: the same artifact keys, and the same rows in the same order.
    for stage in ("evol_instruct", "quality"):
        assert _artifact(local, stage).name == _artifact(on_ray, stage).name
        sharded = pq.read_table(_artifact(on_ray, stage) / "data.parquet")
        alone = pq.read_table(_artifact(local, stage) / "data.parquet")
        assert sharded.equals(alone), stage
    scores = pq.read_table(quality_dir / "data.parquet").column("score_ifd").to_pylist()
    assert sum(s == s for s in scores) > rows // 2  # real scores, not all NaN

    # Training ran on Ray Train with 2 workers.
    finetune_stats = json.loads((_artifact(on_ray, "finetune") / "stats.json").read_text())
    assert finetune_stats["launcher"] == "ray" and len(finetune_stats["ray"]["hosts"]) == 2
