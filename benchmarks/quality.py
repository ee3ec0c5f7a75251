"""Benchmark: the quality stage's scorers at scale. Prints one JSON object.

    python benchmarks/quality.py [--heuristic-rows 1000000] [--minhash-rows 100000] [--model-rows 64]
                                 [--reference-rows 20000] [--model bundled] [--device auto] [--batch-size 16]

- `heuristic_1m_s`: the five heuristic scores over 1M Alpaca-like rows (column-wise, compiled scans).
  Beside it, the row-by-row way (a Python loop with regular expressions, the shape of the seed document's
  DataQualityChecker) on `--reference-rows` of the same rows, with the largest difference between the two.
- `minhash_100k_s`: MinHash-LSH near-duplicate clustering of 100K rows, a third of them planted copies of
  another row with one word changed; `planted_found` is the share of those copies clustered with their
  original, `false_merges` the distinct rows wrongly clustered together. Beside it, a plain-Python MinHash (per row and per permutation) on `--reference-rows // 10` rows.
- `ifd_rows_per_s`, `deita_rows_per_s`: the local scoring model (the bundled Gemma 3 270M by default) on
  `--model-rows` rows, on the GPU when there is one; `device` says which.

Rows are built from the project's seed tasks with words drawn from their text, so lengths and word shapes
look like instruction data (instruction ~12 words, output ~45). Compilation is warmed up first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tasks.config import QualityConfig  # noqa: E402
from tasks.dedup import near_duplicates  # noqa: E402
from tasks.quality import heuristic_scores  # noqa: E402
from tests.unit.test_quality import reference_scores  # noqa: E402  (the row-by-row definitions)


def synthetic(n: int, seed: int = 0) -> pa.Table:
    """n rows: seed-task instructions and outputs with about a third of their words redrawn."""
    seeds = [json.loads(line) for line in (ROOT / "data" / "seed_tasks.jsonl").read_text().splitlines() if line]
    examples = [(s["instruction"], i.get("input", ""), i["output"]) for s in seeds for i in s["instances"]]
    vocab = np.array(" ".join(" ".join(e) for e in examples).split())
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(examples), n)
    fresh = vocab[rng.integers(0, len(vocab), (n, 3))]
    cols = {"instruction": [], "input": [], "output": []}
    for k, i in enumerate(pick):
        instruction, input, output = examples[i]
        cols["instruction"].append(f"{instruction} {fresh[k, 0]}")
        cols["input"].append(input)
        cols["output"].append(f"{fresh[k, 1]} {output} {fresh[k, 2]}.")
    return pa.table({name: pa.array(values, pa.large_string()) for name, values in cols.items()})


def bench_heuristics(rows: int, reference_rows: int) -> dict:
    cfg = QualityConfig()
    table = synthetic(rows)
    heuristic_scores(table.slice(0, 1000), cfg)  # compile (or load the compiled cache)
    t0 = time.perf_counter()
    scores = heuristic_scores(table, cfg)
    seconds = time.perf_counter() - t0
    subset = table.slice(0, reference_rows).to_pylist()
    total_weight = sum(cfg.weights.values())
    t0 = time.perf_counter()
    reference = np.array([sum(w * row[f"score_{k}"] for k, w in cfg.weights.items()) / total_weight
                          for row in (reference_scores(r["instruction"], r["input"], r["output"], cfg)
                                     for r in subset)])
    ref_seconds = time.perf_counter() - t0
    return {"heuristic_rows": rows, "heuristic_1m_s": round(seconds * 1_000_000 / rows, 3),
            "heuristic_rows_per_s": round(rows / seconds),
            "reference_rows": reference_rows, "reference_rows_per_s": round(reference_rows / ref_seconds),
            "reference_1m_s_extrapolated": round(ref_seconds * 1_000_000 / reference_rows, 1),
            "heuristic_speedup": round((ref_seconds / reference_rows) / (seconds / rows), 1),
            "max_abs_diff_vs_reference": float(np.abs(scores["score_total"][:reference_rows] - reference).max())}


def _planted(n: int) -> tuple[pa.Array, np.ndarray]:
    """n texts: distinct ones of 20-80 words drawn from the seeds' vocabulary, and a third of n planted
    copies of one of them with one word changed: Jaccard of 3-shingles (w-5)/(w+1) for w words, 0.71 to 0.93."""
    seeds = (ROOT / "data" / "seed_tasks.jsonl").read_text()
    vocab = np.array(sorted(set(re.findall(r"[a-z]+", seeds.lower()))))
    rng = np.random.default_rng(1)
    distinct = n - n // 3
    lengths = rng.integers(20, 81, distinct)
    words = vocab[rng.integers(0, len(vocab), int(lengths.sum()))]
    texts = [" ".join(chunk) for chunk in np.split(words, np.cumsum(lengths)[:-1])]
    originals = rng.integers(0, distinct, n // 3)
    for i in originals:
        copy = texts[i].split()
        copy[rng.integers(0, len(copy))] = "zzz"
        texts.append(" ".join(copy))
    return pa.array(texts, pa.large_string()), originals


def reference_minhash(texts: list[str], num_perm: int = 128, k: int = 3) -> np.ndarray:
    """Signatures one row and one permutation at a time, in plain Python."""
    mask = (1 << 64) - 1
    rng = np.random.default_rng(0)
    a = [int(x) | 1 for x in rng.integers(1, 2**63, num_perm)]
    b = [int(x) for x in rng.integers(0, 2**63, num_perm)]
    out = np.zeros((len(texts), num_perm), np.uint32)
    for row, text in enumerate(texts):
        words = re.findall(r"[a-z0-9\x80-\U0010ffff]+", text.lower())
        shingles = {hash(tuple(words[i:i + k])) & mask for i in range(max(len(words) - k + 1, 1))}
        for p in range(num_perm):
            out[row, p] = min(((a[p] * x + b[p]) & mask) >> 32 for x in shingles)
    return out


def bench_minhash(rows: int, reference_rows: int) -> dict:
    texts, originals = _planted(rows)
    near_duplicates(texts.slice(0, 1000), 0.7)  # compile
    t0 = time.perf_counter()
    found = near_duplicates(texts, 0.7)
    seconds = time.perf_counter() - t0
    first_copy = rows - rows // 3
    found_share = float(np.mean(found.label[first_copy + np.arange(len(originals))] == found.label[originals]))
    false_merges = int(first_copy - len(np.unique(found.label[:first_copy])))
    subset = texts.slice(0, reference_rows).to_pylist()
    t0 = time.perf_counter()
    reference_minhash(subset)
    ref_seconds = time.perf_counter() - t0
    return {"minhash_rows": rows, "minhash_100k_s": round(seconds * 100_000 / rows, 3),
            "planted_copies": len(originals), "planted_found": round(found_share, 4),
            "false_merges": false_merges, "clusters": int((np.bincount(found.label) > 1).sum()), "bands": found.bands,
            "rows_per_band": found.per_band,
            "minhash_reference_rows": reference_rows,
            "minhash_reference_100k_s_extrapolated": round(ref_seconds * 100_000 / reference_rows, 1),
            "minhash_signature_speedup_vs_reference": round((ref_seconds / reference_rows) / (seconds / rows), 1)}


def bench_models(rows: int, model: str, device: str, batch_size: int) -> dict:
    from tasks.llm.models import resolve_model
    from tasks.llm.transformers_backend import TransformersLLM
    from tasks.model_scores import deita_scores, ifd_scores

    table = synthetic(rows, seed=3)
    args = [table.column(c).to_pylist() for c in ("instruction", "input", "output")]
    llm = TransformersLLM(resolve_model(model), device=device, batch_size=batch_size)
    deita_scores(*(a[:2] for a in args), llm)  # warm-up
    t0 = time.perf_counter()
    deita_scores(*args, llm)
    deita_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ifd_scores(*args, llm, max_length=512)
    ifd_s = time.perf_counter() - t0
    return {"model": model, "device": str(llm.device), "dtype": str(llm.dtype).removeprefix("torch."),
            "model_rows": rows, "batch_size": batch_size, "deita_rows_per_s": round(rows / deita_s, 2), "ifd_rows_per_s": round(rows / ifd_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heuristic-rows", type=int, default=1_000_000)
    parser.add_argument("--minhash-rows", type=int, default=100_000)
    parser.add_argument("--reference-rows", type=int, default=20_000)
    parser.add_argument("--model-rows", type=int, default=64, help="0 skips the model-based scores")
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per forward pass of the scoring model")
    args = parser.parse_args()
    result = {"cpu_cores": os.cpu_count()}
    result.update(bench_heuristics(args.heuristic_rows, args.reference_rows))
    result.update(bench_minhash(args.minhash_rows, max(args.reference_rows // 10, 100)))
    if args.model_rows:
        result.update(bench_models(args.model_rows, args.model, args.device, args.batch_size))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
