"""Benchmark: the Self-Instruct novelty check, as the pipeline runs it, against two rouge_score references.

A candidate instruction is dropped when its ROUGE-L F1 against any instruction already in the pool is above
the threshold (0.7); otherwise it joins the pool. The pool starts with the project's seed instructions
(data/seed_tasks.jsonl, 120 of them), as in the pipeline and in Alpaca. The candidates are checked one at
a time, in order; all three methods get the same pool and the same candidates:

- `ours`: what tasks/self_instruct.py runs for each candidate: `RougeIndex.most_similar(candidate)`, then
  `RougeIndex.add(candidate)` if it is kept (rapidfuzz LCS in C++ over token strings, rouge_score's F1
  arithmetic).
- `alpaca`: stanford_alpaca's generate_instruction.py: the candidate tokenized with rouge_score's tokenizer,
  `rouge_scorer._score_lcs` against every pre-tokenized pool entry mapped over a fresh
  `multiprocessing.Pool` with one worker per core (Alpaca opens the pool per candidate), then the ten most
  similar and the mean score kept for the record, and a drop if the maximum is above the threshold.
- `serial_rouge_score`: a plain loop in one process, `RougeScorer(["rougeL"], use_stemmer=False).score(new,
  old)` for every pool entry, stopping at the first one above the threshold.

The three must keep exactly the same candidates (`same_kept`). Prints one JSON object.

Measured on 2 cores (AMD EPYC, Python 3.11, rouge_score 0.1.2, rapidfuzz 3.14), pool of 120 seeds, on a machine
shared with other jobs (1-minute load average 6-8 before each run), so every figure is inflated, by an amount
that varies: an earlier n=1000 run at a lighter load took 0.98 s, 88 s and 46 s. Seconds for the whole run:

    n       kept   pairs in full scans   ours     alpaca   serial_rouge_score   same_kept
    800     388    249K                  0.92     161      35                   true
    1000    494    361K                  1.19     222      40                   true
    2000    993    1.23M                 1.98     374      106                  true
    5000    2470   6.80M                 6.78     -        -                    (ours only)
    20000   9954   102M                  71.8     -        -                    (ours only)

Alpaca's way is dominated by opening a process pool per candidate (~80-200 ms each here); the serial loop
grows with the pairs compared (~100 us a pair), so at n=5000 it would take over ten minutes.

    python benchmarks/novelty_filter.py                      # n=800, all three (~2-3 minutes)
    python benchmarks/novelty_filter.py --n 20000 --references none
    python benchmarks/novelty_filter.py --n 2000 --references serial
    python benchmarks/novelty_filter.py --input texts.json --no-seeds --kept-out kept.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: tasks/ and tests/

from tasks.text import RougeIndex

ROOT = Path(__file__).resolve().parent.parent

REFERENCES = {
    "ours": "tasks.text.RougeIndex as tasks/self_instruct.py uses it: most_similar(candidate), then add(candidate) "
            "if kept, one candidate at a time",
    "alpaca": "stanford_alpaca generate_instruction.py: rouge_scorer._score_lcs of the candidate against every "
              "pre-tokenized pool entry, mapped over a multiprocessing.Pool opened per candidate with one worker "
              "per core; top-10 most similar and mean score recorded; dropped if the max F1 > threshold",
    "serial_rouge_score": "one process: rouge_scorer.RougeScorer(['rougeL'], use_stemmer=False).score(new, old) "
                          "for every pool entry, stopping at the first F1 > threshold",
}


def seed_instructions() -> list[str]:
    lines = (ROOT / "data" / "seed_tasks.jsonl").read_text().splitlines()
    return [json.loads(line)["instruction"] for line in lines if line.strip()]


def instructions_from_seeds(n: int, seed: int = 0) -> list[str]:
    """n instructions made from the project's seeds: each a seed instruction with 1 to (its word count) words
    dropped, swapped for words of other seeds, or inserted. About half pass the check at 0.7, so the pool
    grows as it does over a long run, and near-duplicates of the seeds and of each other occur throughout."""
    rng = np.random.default_rng(seed)
    seeds = seed_instructions()
    vocab = sorted({w for s in seeds for w in s.split()})
    out = []
    for _ in range(n):
        words = seeds[rng.integers(len(seeds))].split()
        for _ in range(rng.integers(1, len(words) + 1)):
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


def ours_kept(pool_texts: Sequence[str], candidates: Sequence[str], threshold: float) -> list[int]:
    """The pipeline's check (tasks/self_instruct.py, `generate_tasks`): the indices of kept candidates."""
    pool = RougeIndex(pool_texts)
    kept = []
    for i, item in enumerate(candidates):
        score, nearest = pool.most_similar(item)
        if score > threshold:
            continue
        _ = pool.texts[nearest] if nearest >= 0 else ""  # the pipeline records the nearest instruction
        kept.append(i)
        pool.add(item)
    return kept


def alpaca_kept(pool_texts: Sequence[str], candidates: Sequence[str], threshold: float,
                processes: int | None = None) -> list[int]:
    """The check as stanford_alpaca's generate_instruction.py does it (a pool of processes per candidate)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    processes = processes or os.cpu_count() or 1
    all_texts = list(pool_texts)
    all_tokens = [scorer._tokenizer.tokenize(t) for t in all_texts]
    kept = []
    for i, text in enumerate(candidates):
        tokens = scorer._tokenizer.tokenize(text)
        with Pool(processes) as workers:
            scores = workers.map(partial(rouge_scorer._score_lcs, tokens), all_tokens)
        f1 = [s.fmeasure for s in scores]
        _ = {all_texts[j]: f1[j] for j in np.argsort(f1)[-10:][::-1]}  # Alpaca's most_similar_instructions
        if max(f1, default=0.0) > threshold:
            continue
        _ = float(np.mean(f1)) if f1 else 0.0  # Alpaca's avg_similarity_score
        kept.append(i)
        all_texts.append(text)
        all_tokens.append(tokens)
    return kept


def serial_kept(pool_texts: Sequence[str], candidates: Sequence[str], threshold: float) -> list[int]:
    """A plain rouge_score loop in one process."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pool = list(pool_texts)
    kept = []
    for i, text in enumerate(candidates):
        if all(scorer.score(text, old)["rougeL"].fmeasure <= threshold for old in pool):
            kept.append(i)
            pool.append(text)
    return kept


METHODS: dict[str, Callable[..., list[int]]] = {"ours": ours_kept, "alpaca": alpaca_kept,
                                                "serial_rouge_score": serial_kept}


def compare(pool_texts: Sequence[str], candidates: Sequence[str], threshold: float,
            methods: Sequence[str] = tuple(METHODS), processes: int | None = None) -> dict:
    """Run each method on the same pool and candidates; times, kept counts, and whether all kept the same."""
    if set(methods) - {"ours"}:
        import rouge_score.rouge_scorer  # noqa: F401  (its import, nltk's included, takes seconds: not timed)
    kept: dict[str, list[int]] = {}
    seconds: dict[str, float] = {}
    for name in methods:
        extra = {"processes": processes} if name == "alpaca" else {}
        t0 = time.perf_counter()
        kept[name] = METHODS[name](pool_texts, candidates, threshold, **extra)
        seconds[name] = time.perf_counter() - t0
    n = len(candidates)
    first = kept[methods[0]]
    pool_sizes = len(pool_texts) + np.searchsorted(first, np.arange(n))  # the pool each candidate meets
    result = {
        "n": n, "threshold": threshold, "initial_pool": len(pool_texts), "final_pool": len(pool_texts) + len(first),
        "pairs_in_full_scans": int(pool_sizes.sum()),
        "processes": (processes or os.cpu_count()) if "alpaca" in methods else None,
        "kept": {name: len(k) for name, k in kept.items()},
        "same_kept": all(k == first for k in kept.values()) if len(kept) > 1 else None,
        "seconds": {name: round(s, 3) for name, s in seconds.items()},
        "instructions_per_s": {name: round(n / s, 1) if s > 0 else None for name, s in seconds.items()},
        "ours_speedup": {name: round(s / seconds["ours"], 1) for name, s in seconds.items()
                         if name != "ours" and "ours" in seconds and seconds["ours"] > 0},
        "reference": {name: REFERENCES[name] for name in methods},
    }
    return {**result, "kept_indices": kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--n", type=int, default=800, help="candidate instructions made from the project's seeds")
    source.add_argument("--input", type=Path, help="a JSON list of candidate strings, checked in order")
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--references", default="alpaca,serial",
                        help="comma-separated: alpaca, serial, or none (only ours; for large n)")
    parser.add_argument("--processes", type=int, default=os.cpu_count(), help="Alpaca's worker processes")
    parser.add_argument("--no-seeds", action="store_true", help="start from an empty pool, not the seeds")
    parser.add_argument("--kept-out", type=Path, help="write ours' kept candidate indices as a JSON list")
    args = parser.parse_args()

    names = {"alpaca": "alpaca", "serial": "serial_rouge_score"}
    wanted = [r.strip() for r in args.references.split(",") if r.strip()]
    if wanted != ["none"] and not set(wanted) <= set(names):
        parser.error(f"--references {args.references!r}: expected a comma-separated subset of "
                     f"{sorted(names)}, or none")
    methods = ["ours"] + ([] if wanted == ["none"] else [names[r] for r in names if r in wanted])

    candidates = json.loads(args.input.read_text()) if args.input else instructions_from_seeds(args.n)
    if not isinstance(candidates, list) or not all(isinstance(t, str) for t in candidates):
        parser.error(f"--input {args.input}: expected a JSON list of strings")
    pool = [] if args.no_seeds else seed_instructions()
    load = os.getloadavg()[0]  # other work on the machine skews every figure; say how much there was
    result = compare(pool, candidates, args.threshold, methods, args.processes)
    kept = result.pop("kept_indices")
    result["cpu_cores"] = os.cpu_count()
    result["load_avg_1m_before"] = round(load, 2)
    if args.kept_out:
        args.kept_out.write_text(json.dumps(kept["ours"]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
