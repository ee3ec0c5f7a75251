"""Data-parallel fine-tuning on a Ray cluster (`finetune.launcher: ray`): `finetune.processes` workers of a
Ray Train torch job, on as many machines as the cluster has.

The stage's process joins the run's cluster (`run.ray_address`, or a local one: tasks/ray_executor.py), checks
that it can hold `finetune.processes` workers of `run.ray_num_cpus` CPUs and `run.ray_num_gpus` GPUs each,
writes the same launch file as under torchrun (tasks/multigpu.py) and runs `ray.train.torch.TorchTrainer`.
Ray Train starts the workers and their torch process group (NCCL with GPUs, gloo without); each worker then
does what a torchrun process does (`multigpu.train_and_write`): trains its share of every step, and the
first one writes the model, metrics and per-example losses into the stage's artifact directory. So N Ray
workers take the same steps, and save the same weights, as N torchrun processes or one process accumulating
N times as many micro-batches; caching, checkpoints and resume are unchanged.

Every node must see the artifact directory at the same path (shared storage; paths are made absolute here,
since Ray Train runs each worker in a directory of its own) and have the project installed. A worker that
fails stops the job (unless `max_failures` restarts the whole group, which resumes from the stage's newest
checkpoint) and the launch raises its error; Ray Train's own storage directory, under the artifact
directory, is removed either way.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd

from tasks import multigpu
from tasks.config import EvaluateConfig, FinetuneConfig, RunConfig

STORAGE = "ray_train"  # Ray Train's storage_path, in the stage's out_dir while the job runs


def launch(mix_path: Path, cfg: FinetuneConfig, eval_cfg: EvaluateConfig, model_dir: Path, out_dir: Path,
           seed: int, data: dict[str, str], tokens_root: Path | None, run: RunConfig,
           max_failures: int = 0) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Run `finetune.finetune` as `cfg.processes` Ray Train workers; return what the first one produced (as
    `multigpu.launch` does), with `ray`: the host of each rank and the seconds the job took. `max_failures`:
    times Ray Train starts the whole worker group again after a failure (each start resumes from the newest
    checkpoint in `out_dir/checkpoints`)."""
    use_gpu = run.ray_num_gpus > 0
    if 0 < run.ray_num_gpus < 1:
        raise ValueError(f"finetune.launcher is ray with run.ray_num_gpus={run.ray_num_gpus:g}: a training worker "
                         f"needs a whole GPU of its own (NCCL puts one rank on a GPU); set it to 1, or 0 for CPU")
    if cfg.device == "cuda" and not use_gpu:
        raise ValueError("finetune.device is cuda but run.ray_num_gpus is 0: the Ray workers would get no GPU; "
                         "set run.ray_num_gpus: 1 (or finetune.device: auto / cpu)")
    if cfg.device == "cpu" and use_gpu:
        raise ValueError(f"finetune.device is cpu but run.ray_num_gpus is {run.ray_num_gpus:g}: each Ray worker "
                         f"would hold GPUs it does not use; set run.ray_num_gpus: 0 (or finetune.device: auto)")

    from tasks.ray_executor import connect

    resources = connect(run)
    check_capacity(cfg.processes, run, resources)

    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    # Workers run in directories of their own (and on other machines): every path absolute (the launch file
    # makes `finetune.chat_template` absolute too).
    out_dir = Path(out_dir).resolve()
    tokens_root = Path(tokens_root).resolve() if tokens_root else None
    worker_cfg = cfg.model_copy(update={"device": "cuda" if use_gpu else "cpu"})  # what Ray gives, not `auto`
    launch_file = multigpu.write_launch(Path(mix_path).resolve(), worker_cfg, eval_cfg, Path(model_dir).resolve(),
                                        out_dir, seed, data, tokens_root)
    config = {"request": json.loads(launch_file.read_text()), "gpu": use_gpu,
              "threads": os.environ.get("OMP_NUM_THREADS")}
    per_worker = {"CPU": run.ray_num_cpus, **({"GPU": run.ray_num_gpus} if use_gpu else {})}
    storage = out_dir / STORAGE
    trainer = TorchTrainer(
        _worker, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.processes, use_gpu=use_gpu,
                                               resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(name="finetune", storage_path=str(storage),
                                       failure_config=ray.train.FailureConfig(max_failures=max_failures)))
    done = False
    t0 = time.perf_counter()
    try:
        try:
            result = _fit(trainer)
        except ray.train.TrainingFailedError as exc:
            raise RuntimeError(f"finetune across {cfg.processes} Ray Train workers failed: "
                               f"{_cause(exc, out_dir)}") from exc
        if not (out_dir / multigpu.RESULT_STATS).is_file():
            raise RuntimeError(f"finetune across {cfg.processes} Ray Train workers ended without the first worker's "
                               f"results in {out_dir}: does every node see that directory (shared storage)?")
        per_example, stats = multigpu.read_results(out_dir)
        done = True
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        if not done:  # nothing of this launch's results is left to be taken for done
            multigpu._clean(out_dir, keep_launch_file=False)
    stats["ray"] = {"hosts": getattr(result, "return_value", None), "fit_seconds": time.perf_counter() - t0}
    return per_example, stats


def capacity(run: RunConfig) -> int:
    """Training workers of `run.ray_num_cpus` CPUs and `run.ray_num_gpus` GPUs the cluster's nodes can hold
    at once (a worker lives on one node)."""
    import ray

    fit = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        n = math.floor(have.get("CPU", 0.0) / run.ray_num_cpus + 1e-9)
        if run.ray_num_gpus:
            n = min(n, math.floor(have.get("GPU", 0.0) / run.ray_num_gpus + 1e-9))
        fit += n
    return fit


def check_capacity(processes: int, run: RunConfig, resources: dict[str, float]) -> None:
    fit = capacity(run)
    if fit < processes:
        raise RuntimeError(
            f"finetune.processes is {processes} but the Ray cluster ({resources.get('CPU', 0):g} CPUs, "
            f"{resources.get('GPU', 0):g} GPUs) can hold only {fit} training workers of run.ray_num_cpus="
            f"{run.ray_num_cpus:g} CPUs and run.ray_num_gpus={run.ray_num_gpus:g} GPUs each; lower "
            f"finetune.processes, run.ray_num_cpus or run.ray_num_gpus, or add nodes to the cluster")


def _fit(trainer):
    """`trainer.fit()`, with this process's Ctrl-C handler back afterwards. Ray Train (2.60) installs its own
    for the job, in the main thread, and leaves it there, where it would swallow later Ctrl-Cs (it aborts a job
    that has ended). During the job, Ctrl-C aborts it (the workers stop, the checkpoints stay) and raises
    KeyboardInterrupt here, where Ray's handler would exit the process."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    register = getattr(trainer, "_register_sigint_handler", None)
    if main and register is not None:
        def register_and_raise(controller):
            register(controller)
            abort = signal.getsignal(signal.SIGINT)

            def handler(signum, frame):
                try:
                    if callable(abort):
                        abort(signum, frame)  # waits for the controller to stop the workers
                except SystemExit:
                    pass
                raise KeyboardInterrupt("finetune on Ray Train: stopped")
            signal.signal(signal.SIGINT, handler)

        trainer._register_sigint_handler = register_and_raise
    try:
        return trainer.fit()
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def _cause(exc: Exception, out_dir: Path) -> str:
    """Each failed rank's error, "rank N: Type: message": from Ray Train, and from the error files of ranks
    that caught theirs (multigpu.ERRORS)."""
    causes: dict[int, str] = {}
    for path in out_dir.glob(multigpu.ERRORS):
        rank = path.name.rsplit(".", 1)[-1]
        if rank.isdigit():
            causes[int(rank)] = path.read_text()
    for rank, error in sorted((getattr(exc, "worker_failures", None) or {}).items()):
        causes.setdefault(int(rank), f"rank {rank}: {type(error).__name__}: {error}")
    if not causes:
        return f"{type(exc).__name__}: {exc}"
    return "\n".join(causes[r] for r in sorted(causes))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _worker(config: dict[str, Any]) -> list[str]:
    """One Ray Train worker, in the process group Ray Train set up: train, the first worker writes the
    results; each rank's host, for rank 0's return value."""
    import torch
    import torch.distributed as dist

    # The cores of this machine shared by the job's workers on it (as under torchrun), or OMP_NUM_THREADS as
    # the stage's process had it; Ray itself sets 1 thread per CPU asked for.
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(int(config["threads"] or max(1, _cores() // local)))
    if config["gpu"]:  # finetune takes the GPU of LOCAL_RANK: make that the one Ray gave this worker
        import ray.train.torch

        os.environ["LOCAL_RANK"] = str(ray.train.torch.get_device().index)
    multigpu.train_and_write(config["request"])
    hosts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return hosts
