"""Benchmark: the mix stage's sampling on a large synthetic table, for each mode. Prints one JSON object.

    python benchmarks/mix.py --rows 1000000 [--reference]

Rows carry 11 categories of very different sizes, three origins (seed, self_instruct, evol rounds 1-2), a
quality score and `keep`. Each mode draws half of the kept rows (cot share 0.1, eval 1%). `--reference`
also times the straightforward pandas way for the proportional mode (the per-category loop of the seed
document's create_instruction_mix: `groupby(...).sample(n)` per category) on the same table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tasks.config import MixConfig  # noqa: E402
from tasks.mix import largest_remainder, mix_rows  # noqa: E402

CATEGORIES = ["qa", "open_generation", "classification", "math", "rewriting", "reasoning", "coding",
              "summarization", "translation", "extraction", "dialog"]


def synthetic(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    sizes = rng.dirichlet(np.full(len(CATEGORIES), 0.6))  # uneven, as real category counts are
    origin = rng.choice(["seed", "self_instruct", "evol"], n, p=[0.05, 0.55, 0.40])
    return pd.DataFrame({
        "id": pd.RangeIndex(n).astype(str),
        "category": pd.Categorical.from_codes(rng.choice(len(CATEGORIES), n, p=sizes), CATEGORIES).astype(str),
        "origin": origin,
        "round": np.where(origin == "evol", rng.integers(1, 3, n), 0).astype(float),
        "evol_operation": np.where(origin == "evol", rng.choice(["deepen", "increase_reasoning"], n), None),
        "score_total": rng.random(n),
        "keep": rng.random(n) < 0.9,
    }).assign(round=lambda d: d["round"].where(d["origin"] == "evol"))


def reference_proportional(df: pd.DataFrame, total: int, seed: int) -> int:
    kept = df[df["keep"]]
    sizes = kept.groupby("category").size().to_dict()
    counts = largest_remainder(total, {k: float(v) for k, v in sizes.items()})
    parts = [g.sample(n=counts[name], random_state=seed) for name, g in kept.groupby("category")]
    return len(pd.concat(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reference", action="store_true")
    args = parser.parse_args()
    df = synthetic(args.rows)
    total = int(df["keep"].sum()) // 2
    common = dict(total=total, eval_fraction=0.01, min_eval=100, seed=1, cot_share=0.1)
    modes = {
        "weights": MixConfig(mode="weights", weights={c: 1.0 + i for i, c in enumerate(CATEGORIES)}, **common),
        "proportional": MixConfig(mode="proportional", cap=total // 8, **common),
        "temperature": MixConfig(mode="temperature", temperature=3.0, **common),
        "proportional_quality_weighted": MixConfig(mode="proportional", quality_weight="score_total", **common),
        "weights_with_replacement": MixConfig(mode="weights", source_by="origin", replace=True, **common,
                                              weights={"seed": 2.0, "self_instruct": 1.0, "evol_r1": 1.0,
                                                       "evol_r2": 1.0}),
    }
    result: dict = {"rows": args.rows, "kept": int(df["keep"].sum()), "modes": {}}
    for name, cfg in modes.items():
        t0 = time.perf_counter()
        mixed = mix_rows(df, cfg)
        seconds = time.perf_counter() - t0
        result["modes"][name] = {"rows": len(mixed.train) + len(mixed.eval), "train": len(mixed.train),
                                 "seconds": round(seconds, 3)}
    if args.reference:
        t0 = time.perf_counter()
        rows = reference_proportional(df, total, seed=1)
        result["reference_proportional"] = {"rows": rows, "seconds": round(time.perf_counter() - t0, 3)}
    result["max_seconds"] = max(m["seconds"] for m in result["modes"].values())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
