"""Shards on a Ray cluster, each a Prefect task on Prefect's Ray task runner (`run.executor: ray`).

The flow process joins the cluster at `run.ray_address`, or starts a local one, once per process
(`connect`). A stage's shards (tasks/shards.py) are submitted through `prefect_ray.RayTaskRunner`, each
as a Prefect task run named for its stage, index and rows, asking Ray for `run.ray_num_cpus` CPUs and
`run.ray_num_gpus` GPUs. Ray never re-runs a shard by itself (max_retries 0): when one fails or its
worker dies, this process marks its task run Crashed (a dead worker cannot) and submits that shard
alone again, which continues from the parts it wrote. When all are done, the stage gets their results
and the Prefect UI a table of them (`<stage>-shards`: rows, seconds, attempts, host).

Workers report their task runs to the flow's Prefect API: PREFECT_API_URL when set, else the flow
process's own ephemeral server (a local cluster reaches it on loopback; a remote cluster needs a real
server, so set PREFECT_API_URL). Every node must see `run.artifacts_dir` (shared storage) and have the
project installed (`pip install 'instructflow[ray]'`, the compose file's `ray` profile does).

Ray 2.60 and prefect-ray 0.6 are the pair this is tested with (the extra `ray` pins them).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from prefect import task

from tasks.config import RunConfig
from tasks.shards import Shard, Sharding, run_shard

log = logging.getLogger(__name__)

_LOCK = threading.Lock()


def prefect_api_url() -> str:
    """The Prefect API this process reports to: PREFECT_API_URL, else its ephemeral server (started)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url:
        return url
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one the ephemeral client uses in this process
    server.start()
    return server.api_url


def connect(run: RunConfig) -> dict[str, float]:
    """Join the cluster at `run.ray_address` (else RAY_ADDRESS), or start a local one of `run.ray_local_cpus`
    CPUs, unless this process is connected already; the cluster's resources (CPU, GPU, ...)."""
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("run.executor is `ray` but Ray is not installed here: pip install "
                           "'instructflow[ray]' (Ray and prefect-ray, the pinned pair)") from exc
    with _LOCK:
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home from offline machines
            # Workers report to this flow's Prefect API, get this process's INSTRUCTFLOW_* settings (the
            # model cache, a failure drill), and keep quiet progress bars: Ray relays every worker's output
            # here, and the shards' own bar in this process says how far they are.
            env = {"PREFECT_API_URL": prefect_api_url(), "RAY_USAGE_STATS_ENABLED": "0", "TQDM_DISABLE": "1",
                   **{k: v for k, v in os.environ.items() if k.startswith("INSTRUCTFLOW_")}}
            common = dict(runtime_env={"env_vars": env}, namespace="instructflow", configure_logging=False,
                          log_to_driver=True)
            # The profile's address, else RAY_ADDRESS (Ray's own variable; the compose stack sets it).
            address = run.ray_address or os.environ.get("RAY_ADDRESS") or None
            if address:
                log.info("joining the Ray cluster at %s", address)
                try:
                    ray.init(address=address, **common)
                except (ConnectionError, RuntimeError) as exc:
                    where = "run.ray_address" if run.ray_address else "RAY_ADDRESS"
                    raise RuntimeError(f"{where}: no Ray cluster answers at {address}: {exc}") from exc
            else:
                os.environ.pop("RAY_ADDRESS", None)  # set but empty: ray.init would read it as an address
                cpus = run.ray_local_cpus or os.cpu_count() or 1
                log.info("starting a local Ray cluster of %d CPUs", cpus)
                # Results are small dicts (rows travel through shared storage), so a small object store. The
                # dashboard (on 127.0.0.1:8265) stays: Ray Train's controller reads state through it.
                ray.init(num_cpus=cpus, object_store_memory=128 * 2**20, **common)
        return {k: float(v) for k, v in ray.cluster_resources().items()}


def slots(run: RunConfig) -> int:
    """Shards the cluster can run at once with what each asks for."""
    resources = connect(run)
    fit = resources.get("CPU", 0.0) / run.ray_num_cpus
    if run.ray_num_gpus:
        fit = min(fit, resources.get("GPU", 0.0) / run.ray_num_gpus)
    if fit < 1:
        raise RuntimeError(f"the Ray cluster has {resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} "
                           f"GPUs; a shard asks for run.ray_num_cpus={run.ray_num_cpus:g} and "
                           f"run.ray_num_gpus={run.ray_num_gpus:g}: no shard could ever start")
    return int(fit)


@task(name="shard", tags=["instructflow", "shard"], retries=0, log_prints=False, persist_result=False)
def shard_task(stage: str, index: int, fn: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """One shard of a stage's model work, on a Ray worker."""
    return run_shard(fn, kwargs)


def _mark_crashed(task_run_id: Any, message: str) -> None:
    """A worker that died cannot report its task run's end; say it here, so the UI does not show it running."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            client.set_task_run_state(task_run_id, Crashed(message=message), force=True)
    except Exception as exc:  # the UI stays behind; the shard is retried all the same
        log.warning("could not mark task run %s crashed: %s", task_run_id, exc)


def run_shards(run: RunConfig, shards: list[Shard]) -> list[dict[str, Any]]:
    """Run the shards on the cluster; each one's result, in order. A shard that fails runs again alone, up
    to `run.ray_shard_retries` times; past that, the others are stopped and the failure is raised."""
    import ray
    from prefect_ray import RayTaskRunner
    from prefect_ray.context import remote_options
    from tqdm.auto import tqdm

    if not shards:
        return []
    connect(run)
    results: dict[int, dict[str, Any]] = {}
    attempts = {s.index: 0 for s in shards}
    options = {"num_cpus": run.ray_num_cpus, "num_gpus": run.ray_num_gpus, "max_retries": 0}
    stage = shards[0].stage
    with RayTaskRunner() as runner, tqdm(total=sum(s.last - s.first for s in shards), desc=f"{stage} shards",
                                         unit=shards[0].unit, leave=False) as bar:
        def submit(shard: Shard):
            attempts[shard.index] += 1
            name = shard.name + (f" retry {attempts[shard.index] - 1}" if attempts[shard.index] > 1 else "")
            with remote_options(**options):
                return runner.submit(shard_task.with_options(task_run_name=name),
                                     {"stage": shard.stage, "index": shard.index, "fn": shard.fn,
                                      "kwargs": shard.kwargs})

        running = {submit(s): s for s in shards}
        try:
            while running:
                ready, _ = ray.wait([f.wrapped_future for f in running], num_returns=1)
                future = next(f for f in running if f.wrapped_future == ready[0])
                shard = running.pop(future)
                future.wait()
                state = future.state
                if state.is_completed():
                    results[shard.index] = {"shard": shard.name, **future.result(), "attempts": attempts[shard.index]}
                    bar.update(shard.last - shard.first)
                    continue
                cause = state.message or state.name
                if state.is_crashed():
                    _mark_crashed(future.task_run_id, f"{shard.name}: {cause}")
                if attempts[shard.index] > run.ray_shard_retries:
                    raise RuntimeError(f"{shard.name} failed {attempts[shard.index]} times; the last: {cause}. "
                                       f"What the shards finished is kept: run again to continue")
                log.warning("%s failed (%s); running it again, alone", shard.name, cause)
                running[submit(shard)] = shard
        finally:
            for future in running:  # stopping early: no shard goes on writing behind a re-run
                ray.cancel(future.wrapped_future, force=True)
    _publish(stage, shards, results)
    return [results[s.index] for s in shards]


def _publish(stage: str, shards: list[Shard], results: dict[int, dict[str, Any]]) -> None:
    from prefect.artifacts import create_table_artifact

    table = [{"shard": s.name, "items": s.last - s.first, "seconds": results[s.index]["seconds"],
              "attempts": results[s.index]["attempts"], "host": results[s.index]["host"]} for s in shards]
    try:
        create_table_artifact(key=f"{stage.replace('_', '-')}-shards", table=table,
                              description=f"{stage}: the shards on Ray (items, seconds, attempts, host)")
    except Exception as exc:  # the figures are in stats.json too
        log.warning("%s: no shard table in the UI: %s", stage, exc)


def sharding(run: RunConfig) -> Sharding:
    """What a stage needs to shard its work on the run's cluster."""
    return Sharding(run=lambda shards: run_shards(run, shards), count=lambda: run.ray_shards or 2 * slots(run))
