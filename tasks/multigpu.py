"""Data-parallel fine-tuning: with `finetune.processes: N` the finetune stage runs itself under torchrun.

The stage writes a launch file into its artifact directory and runs

    python -m torch.distributed.run --standalone --nproc-per-node N -m tasks.multigpu <artifact>/launch.json

Each process trains on the GPU of its local rank (NCCL), or on the CPU (gloo) when there is no GPU or
`finetune.device` is `cpu`; the first process writes the model, metrics and per-example eval losses, and
the stage commits the artifact as with one process, so caching, checkpoints and resume are unchanged.
The same command runs by hand with any launch file, and across machines with torchrun's `--nnodes` and
`--rdzv-endpoint` in place of `--standalone` (every machine must see the artifact directory).
"""

from __future__ import annotations

import collections
import ctypes
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.artifacts import atomic_write_json, atomic_write_parquet
from tasks.config import EvaluateConfig, FinetuneConfig

LAUNCH = "launch.json"
RESULT_ROWS = "launch.per_example.parquet"
RESULT_STATS = "launch.stats.json"
ERRORS = "launch.error.*"  # one per failed process: "rank N: ExceptionType: message"


def command(processes: int, launch_file: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "-m", "tasks.multigpu", str(launch_file)]


# torchrun stops its workers on SIGTERM; Linux sends it one if the stage's process dies first (kill -9
# included), so no orphan keeps writing into an artifact a re-run is about to use. prctl is looked up here,
# not in the forked child, where loading a library could deadlock.
_PRCTL = ctypes.CDLL("libc.so.6", use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def launch(mix_path: Path, cfg: FinetuneConfig, eval_cfg: EvaluateConfig, model_dir: Path, out_dir: Path,
           seed: int, data: dict[str, str], tokens_root: Path | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Run `finetune.finetune` in `cfg.processes` processes; return what the first one produced."""
    import torch

    gpus = torch.cuda.device_count() if cfg.device != "cpu" else 0
    if gpus and cfg.processes > gpus:
        raise ValueError(f"finetune.processes is {cfg.processes} but this machine has {gpus} GPUs; "
                         f"set it to at most {gpus} (or finetune.device=cpu)")
    launch_file = write_launch(mix_path, cfg, eval_cfg, model_dir, out_dir, seed, data, tokens_root)
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // cfg.processes))
    env = {**os.environ, "OMP_NUM_THREADS": threads}  # share the cores, do not oversubscribe them
    tail: collections.deque[str] = collections.deque(maxlen=40)
    proc = subprocess.Popen(command(cfg.processes, launch_file), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, preexec_fn=_die_with_parent)
    try:
        for line in proc.stdout or ():  # pass the processes' progress through, keep the end for an error
            sys.stdout.write(line)
            tail.append(line)
        code = proc.wait()
    finally:
        if proc.poll() is None:  # the stage was interrupted: stop the processes, forcibly if they linger
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if code != 0 or not (out_dir / RESULT_STATS).is_file():
        errors = [p.read_text() for p in sorted(out_dir.glob(ERRORS))]
        cause = "\n".join(errors) if errors else f"its last lines:\n{''.join(tail).rstrip()}"
        _clean(out_dir, keep_launch_file=True)
        raise RuntimeError(f"finetune across {cfg.processes} processes failed (torchrun exit {code}): {cause}")
    return read_results(out_dir)


def write_launch(mix_path: Path, cfg: FinetuneConfig, eval_cfg: EvaluateConfig, model_dir: Path, out_dir: Path,
                 seed: int, data: dict[str, str], tokens_root: Path | None = None) -> Path:
    """The launch file every process reads (`out_dir/launch.json`); the results of an earlier launch go.
    The whole `finetune` section travels (its template settings included); a relative
    `finetune.chat_template` is made absolute here, where it was meant, since a Ray worker runs elsewhere."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.chat_template:
        cfg = cfg.model_copy(update={"chat_template": str(Path(cfg.chat_template).resolve())})
    launch_file = out_dir / LAUNCH
    _clean(out_dir, keep_launch_file=False)
    atomic_write_json(launch_file, {"mix": str(mix_path), "finetune": cfg.model_dump(mode="json"),
                                    "evaluate": eval_cfg.model_dump(mode="json"), "model_dir": str(model_dir),
                                    "out_dir": str(out_dir), "seed": seed, "data": data,
                                    "tokens_root": str(tokens_root) if tokens_root else None})
    return launch_file


def read_results(out_dir: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """What the first process wrote; the launch's own files go."""
    per_example = pd.read_parquet(out_dir / RESULT_ROWS)
    stats = json.loads((out_dir / RESULT_STATS).read_text())
    _clean(out_dir, keep_launch_file=False)
    return per_example, stats


def _clean(out_dir: Path, keep_launch_file: bool) -> None:
    for path in [out_dir / RESULT_ROWS, out_dir / RESULT_STATS, *out_dir.glob(ERRORS)]:
        path.unlink(missing_ok=True)
    if not keep_launch_file:  # kept after a failure, to rerun the command by hand
        (out_dir / LAUNCH).unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    """One torchrun process: join the group, train, and (first process) write the results."""
    import torch
    import torch.distributed as dist

    if len(argv) != 1:
        print("usage: torchrun --nproc-per-node N -m tasks.multigpu <launch.json>", file=sys.stderr)
        return 2
    request = json.loads(Path(argv[0]).read_text())
    gpu = torch.cuda.is_available() and FinetuneConfig.model_validate(request["finetune"]).device != "cpu"
    dist.init_process_group("nccl" if gpu else "gloo")
    try:
        train_and_write(request)
    finally:
        dist.destroy_process_group()
    return 0


def train_and_write(request: dict[str, Any]) -> None:
    """One process of a group that has joined its process group (torchrun's, or Ray Train's: tasks/ray_train.py):
    train; the first process writes the results. A failure leaves `launch.error.<rank>` and is raised."""
    import torch.distributed as dist

    from tasks.finetune import finetune

    cfg = FinetuneConfig.model_validate(request["finetune"])
    eval_cfg = EvaluateConfig.model_validate(request["evaluate"])
    out_dir = Path(request["out_dir"])
    rank = dist.get_rank()
    try:
        tokens_root = request.get("tokens_root")
        per_example, stats = finetune(pq.read_table(request["mix"]), cfg, eval_cfg, Path(request["model_dir"]),
                                      out_dir, request["seed"], request["data"], tokens_root and Path(tokens_root))
        if rank == 0:
            atomic_write_parquet(out_dir / RESULT_ROWS, pa.Table.from_pandas(per_example, preserve_index=False))
            atomic_write_json(out_dir / RESULT_STATS, stats)
        dist.barrier()
    except Exception as exc:  # the launcher reports the cause, not torchrun's summary; the traceback follows
        (out_dir / ERRORS.replace("*", str(rank))).write_text(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
