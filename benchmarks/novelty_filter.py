"""Benchmark: the Self-Instruct novelty filter (ROUGE-L F1 > 0.7 against any kept instruction is dropped).

Ours (tasks.text.novelty_filter: rapidfuzz LCS in C++, blocks of queries, exact rouge_score arithmetic) against
the reference done as the Alpaca code does it: rouge_score's `_score_lcs` of each new instruction against every
kept one, mapped over a process pool with one worker per core. Prints one JSON object.

    python benchmarks/novelty_filter.py --n 5000 --reference
    python benchmarks/novelty_filter.py --input texts.json --kept-out kept.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tasks.text import novelty_filter  # noqa: E402


def instructions_from_seeds(n: int, seed: int = 0) -> list[str]:
    """n instructions made from the project's seeds: each a seed instruction with some words dropped,
    swapped for words of other seeds, or extended, so that near-duplicates and novel ones both occur."""
    rng = np.random.default_rng(seed)
    seeds = [json.loads(line)["instruction"] for line in (ROOT / "data" / "seed_tasks.jsonl").read_text().splitlines()
             if line.strip()]
    vocab = sorted({w for s in seeds for w in s.split()})
    out = []
    for _ in range(n):
        words = seeds[rng.integers(len(seeds))].split()
        for _ in range(rng.integers(1, 6)):
            op = rng.integers(3)
            pos = int(rng.integers(len(words)))
            if op == 0 and len(words) > 3:
                del words[pos]
            elif op == 1:
                words[pos] = vocab[rng.integers(len(vocab))]
            else:
                words.insert(pos, vocab[rng.integers(len(vocab))])
        out.append(" ".join(words))
    return out


def reference_filter(texts: list[str], threshold: float) -> list[int]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept_tokens: list[list[str]] = []
    kept: list[int] = []
    with Pool(os.cpu_count()) as pool:
        for i, text in enumerate(texts):
            tokens = scorer._tokenizer.tokenize(text)
            scores = pool.map(partial(rouge_scorer._score_lcs, tokens), kept_tokens) if kept_tokens else []
            if all(s.fmeasure <= threshold for s in scores):
                kept.append(i)
                kept_tokens.append(tokens)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--n", type=int, default=5000, help="instructions made from the project's seeds")
    source.add_argument("--input", type=Path, help="a JSON list of strings, filtered in order")
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--reference", action="store_true", help="also run the rouge_score way")
    parser.add_argument("--kept-out", type=Path, help="write the kept indices as a JSON list")
    args = parser.parse_args()

    texts = json.loads(args.input.read_text()) if args.input else instructions_from_seeds(args.n)
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        parser.error(f"{args.input}: expected a JSON list of strings")
    t0 = time.perf_counter()
    mask, _, _ = novelty_filter(texts, args.threshold)
    ours_s = time.perf_counter() - t0
    kept = np.flatnonzero(mask).tolist()
    result = {"n": len(texts), "kept": len(kept), "ours_s": round(ours_s, 4)}
    if args.reference:
        t0 = time.perf_counter()
        reference = reference_filter(texts, args.threshold)
        result["reference_s"] = round(time.perf_counter() - t0, 3)
        result["speedup"] = round(result["reference_s"] / max(ours_s, 1e-9), 1)
        result["decisions_match"] = reference == kept
    if args.kept_out:
        args.kept_out.write_text(json.dumps(kept))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
