"""Benchmark: the Self-Instruct novelty check, as the pipeline runs it, against the previous implementation and
rouge_score references.

A candidate instruction is dropped when its ROUGE-L F1 against any instruction already in the pool is above
the threshold (0.7); otherwise it joins the pool. The pool starts with the project's seed instructions
(data/seed_tasks.jsonl, 120 of them), as in the pipeline and in Alpaca. The candidates are checked one at
a time, in order; every method gets the same pool and the same candidates and must keep exactly the same
ones (`same_kept`):

- `ours`: what tasks/self_instruct.py runs for each candidate: `RougeIndex.most_similar(candidate)`, then
  `RougeIndex.add(candidate)` if it is kept (inverted index over tokens, overlap bounds, exact rapidfuzz LCS
  for the few entries that can still win; rouge_score's F1 arithmetic).
- `old_cdist`: the previous RougeIndex (`OldCdistIndex` here): one code point per distinct token, and per
  candidate one multi-threaded rapidfuzz `process.cdist` against the whole pool, then `np.argmax`.
- `alpaca`: stanford_alpaca's generate_instruction.py: the candidate tokenized with rouge_score's tokenizer,
  `rouge_scorer._score_lcs` against every pre-tokenized pool entry mapped over a fresh
  `multiprocessing.Pool` with one worker per core (Alpaca opens the pool per candidate), then the ten most
  similar and the mean score kept for the record, and a drop if the maximum is above the threshold.
- `serial_rouge_score`: a plain loop in one process, `RougeScorer(["rougeL"], use_stemmer=False).score(new,
  old)` for every pool entry, stopping at the first one above the threshold.
- `rouge_score_check` (with --scale): rouge_score's decision for each candidate against the pool it meets
  given ours' kept list, split over processes (`rouge_score_check` says why that decides `same_kept`).

Data: `instructions_from_seeds` (the default) perturbs the 120 seeds, so its vocabulary is tiny.
`realistic_instructions` (--data realistic, and --scale) is 100K-scale: 25 templates ("Write a ...",
"Given ..., classify ...") with clauses, content words Zipf-distributed over 50,000 made-up words, English
stop words from the templates (the, of and a are 20% of tokens), 5-40 tokens, and 30% planted near-duplicates
of earlier texts at a measured ROUGE-L F1 (quartiles 0.63 / 0.74 / 0.86; 59% of them above 0.7). Prints one JSON.

`--scale` on realistic_instructions(100000), 2 cores (AMD EPYC, Python 3.11, rouge_score 0.1.2, rapidfuzz
3.14), on a machine shared with other agents (1-minute load average 0.6 before, 1.8 after, most of it from
the rouge_score check's two processes at the end):

    n        kept     ours                      old_cdist        rouge_score_check
    5,000    3,716    -                         -                same_kept true (4.94M pairs, 2 processes, 105 s)
    20,000   14,325   4.65 s                    27.7 s           (same_kept true with old_cdist)
    100,000  67,021   51.8 s (0.52 ms/check)    -                -

The previous version of ours (a first round of 65,536 postings with no best F1 to prune with, batched LCS
on per-query code strings) took 89.4 s at 100K (load 1.9-2.2) and 10.8 s at 20K (load 2-3.7); run back to
back on the same 100K (load 0.5-0.95) it took 79.7 s and this one 50.1 s, keeping the same candidates; on
the same 1,500 queries against the pool at 90K candidates (61K entries) it takes ~1.16 ms a check, this one
~0.70-0.73. What
changed: a small first round (8,192 postings of the rarest lists) gives a best F1 from the 32 entries most
in common, so the second round counts only the lists that best still needs (at a 61K pool ~52K postings
sorted per check before); membership of the candidates in the frequent lists not counted is one bool per
entry (`_marks`) instead of a binary search; and the exact LCS is one rapidfuzz call per entry on token
id lists, with the F1 in Python floats (the same IEEE operations as rouge_score), instead of building
code strings for a batch. Leaving out, list by list, entries too long to reach the best saved fewer
postings than the filter cost. Ours grows with the postings of the query's rarer token lists, not with the
pool as such. On the seeds' data (tiny vocabulary), n=5000: ours 0.49 s, old_cdist 1.78 s,
same_kept true (load 0.5).

Earlier figures on the seeds' data, measured when `old_cdist` was ours (load average 6-8), seconds:

    n       kept   pairs in full scans   old_cdist   alpaca   serial_rouge_score   same_kept
    800     388    249K                  0.92        161      35                   true
    1000    494    361K                  1.19        222      40                   true
    2000    993    1.23M                 1.98        374      106                  true
    20000   9954   102M                  71.8        -        -                    (old_cdist only)

Alpaca's way is dominated by opening a process pool per candidate (~80-200 ms each here); the serial loop
grows with the pairs compared (~100 us a pair), so at n=5000 it would take over ten minutes.

    python benchmarks/novelty_filter.py                      # n=800: ours, old_cdist, alpaca, serial (~3 min)
    python benchmarks/novelty_filter.py --scale              # the table above (~4 minutes)
    python benchmarks/novelty_filter.py --n 20000 --data realistic --references old
    python benchmarks/novelty_filter.py --n 2000 --references serial
    python benchmarks/novelty_filter.py --input texts.json --no-seeds --kept-out kept.json
"""

from __future__ import annotations

import argparse
import bisect
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from importlib.metadata import version
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: tasks/ and tests/

from tasks.text import RougeIndex, rouge_f1_from_lcs, rouge_l_f1, rouge_tokens

ROOT = Path(__file__).resolve().parent.parent

REFERENCES = {
    "ours": "tasks.text.RougeIndex as tasks/self_instruct.py uses it: most_similar(candidate), then add(candidate) "
            "if kept, one candidate at a time (inverted index, overlap bounds, exact LCS for the few that can win)",
    "old_cdist": "the previous tasks.text.RougeIndex: each distinct token one code point, and for every candidate "
                 "one multi-threaded rapidfuzz process.cdist (LCSseq) against the whole pool, np.argmax; "
                 "rouge_score's F1 arithmetic",
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


# English function words with their approximate share of running text (per 1,000 words, after the Brown
# corpus / COCA counts), drawn between the template's own words.
STOP_WORDS = {
    "the": 60, "of": 29, "and": 27, "to": 25, "a": 22, "in": 19, "is": 10, "that": 10, "for": 9, "it": 9,
    "with": 7, "as": 7, "on": 6, "be": 6, "by": 5, "this": 5, "are": 5, "or": 4, "from": 4, "an": 4,
    "at": 4, "your": 3, "you": 3, "which": 3, "each": 2, "their": 2, "its": 2, "how": 2, "what": 2,
    "about": 2, "into": 2, "than": 1, "more": 1, "one": 1, "all": 1, "not": 1, "can": 1, "would": 1,
}
TEMPLATES = [
    "Write a {A} {N} about {NP}.", "Write {NUM} {N}s that {V} {NP}.", "Given {NP}, classify {NP} as {A} or {A}.",
    "Given the following {N}, classify it into one of {NUM} categories.", "Explain how {NP} {V}s {NP}.",
    "Explain why {NP} is {A}.", "Summarize the following {N} in {NUM} sentences.", "Translate the {N} into {LANG}.",
    "List {NUM} {N}s of {NP}.", "What is the difference between {NP} and {NP}?", "Generate a {N} for {NP}.",
    "Describe {NP} in the style of {NP}.", "Rewrite the {N} so that it {V}s {NP}.", "Create a {N} of {NP}.",
    "Given a {N}, find the {N} of {NP}.", "Classify the sentiment of the {N} as positive or negative.",
    "Suggest {NUM} ways to {V} {NP}.", "How can I {V} {NP}?", "Compose an email to {NP} about {NP}.",
    "Give an example of {NP} that {V}s {NP}.", "Is {NP} {A}? Answer yes or no.", "Find the {N} in {NP}.",
    "Edit the {N} to {V} {NP}.", "Design a {A} {N} to {V} {NP}.", "Identify the {N} of {NP}.",
]
NOUN_PHRASES = ["the {A} {N}", "a {N}", "the {N} of the {N}", "{N}s", "your {N}", "a {A} {N} for {N}s",
                "the {N} and the {N}", "this {N}", "an {A} {N} in the {N}", "{N}", "the {N}", "{A} {N}s"]
CLAUSES = [" in {NUM} sentences", " for a {A} audience", " and explain why", " using {NP}", " without {NP}",
           " so that it is {A} and {A}", " with {NP} and {NP}", " in the style of {NP}",
           ", then give {NUM} {N}s that {V} {NP}", " to {NP}", " that {V}s {NP} in the {N}", " for {NP}"]
LANGS = ["French", "Spanish", "German", "Japanese", "Hindi", "Arabic", "Portuguese", "Korean"]


def realistic_instructions(n: int, seed: int = 0, vocab_size: int = 50_000,
                           planted_share: float = 0.3) -> tuple[list[str], np.ndarray, np.ndarray]:
    """n instruction-like texts, 5-40 tokens: templates filled with Zipf-distributed made-up content words,
    and (after the first 100) a `planted_share` of near-duplicates of an earlier text, edited to a target
    ROUGE-L F1 drawn uniformly in [0.4, 1]. Returns the texts, each planted text's source index (-1 if
    none) and its measured ROUGE-L F1 to that source (NaN if none). Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    vocab = _pseudo_words(vocab_size, rng)
    zipf = 1.0 / (np.arange(vocab_size) + 2.7) ** 1.05  # Zipf-Mandelbrot: the shape of word frequencies
    cdf = np.cumsum(zipf) / zipf.sum()
    stop, stop_p = list(STOP_WORDS), np.array(list(STOP_WORDS.values()), dtype=float)
    stop_cdf = np.cumsum(stop_p) / stop_p.sum()
    draws = iter(np.searchsorted(cdf, rng.random(60 * n + 1000)).tolist())
    uniform = iter(rng.random(60 * n + 1000).tolist())

    def fill(template: str) -> str:
        out = template
        while "{" in out:
            out = (out.replace("{NP}", NOUN_PHRASES[int(next(uniform) * len(NOUN_PHRASES))], 1)
                   .replace("{N}", vocab[next(draws)], 1).replace("{A}", vocab[next(draws)], 1)
                   .replace("{V}", vocab[next(draws)], 1).replace("{NUM}", str(2 + int(next(uniform) * 9)), 1)
                   .replace("{LANG}", LANGS[int(next(uniform) * len(LANGS))], 1))
        return out

    texts, sources, similarity = [], np.full(n, -1), np.full(n, np.nan)
    for i in range(n):
        if i > 100 and next(uniform) < planted_share:
            j = int(next(uniform) * i)
            words = texts[j].rstrip(".?").split()
            target = 0.4 + 0.6 * next(uniform)
            for _ in range(max(0, round(1.5 * len(words) * (1 - target)))):
                op, pos = next(uniform), int(next(uniform) * len(words))
                if op < 0.4:
                    words[pos] = vocab[next(draws)]
                elif op < 0.7 and len(words) > 5:
                    del words[pos]
                else:
                    words.insert(pos, stop[int(np.searchsorted(stop_cdf, next(uniform)))])
            text = " ".join(words[:40]) + "."
            sources[i], similarity[i] = j, rouge_l_f1(texts[j], text)
        else:
            text = fill(TEMPLATES[int(next(uniform) * len(TEMPLATES))]).rstrip(".?")
            while next(uniform) < 0.55 and len(text.split()) < 30:
                text += fill(CLAUSES[int(next(uniform) * len(CLAUSES))])
            words = text.split()[:40]
            while len(words) < 5:
                words += fill(CLAUSES[0]).split()
            text = " ".join(words) + "."
        texts.append(text[0].upper() + text[1:])
    return texts, sources, similarity


def _pseudo_words(n: int, rng: np.random.Generator) -> list[str]:
    """n distinct pronounceable made-up words (not stop words), shorter ones more often among the first."""
    onsets = ["b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br",
              "ch", "cl", "cr", "dr", "fl", "gr", "pl", "pr", "sh", "sl", "sp", "st", "str", "th", "tr"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "io", "ou", "y"]
    codas = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "st", "ck"]
    words, seen = [], set(STOP_WORDS)
    while len(words) < n:
        syllables = 1 + min(int(rng.exponential(0.9 + len(words) / n * 1.5)), 4)
        w = "".join(onsets[rng.integers(len(onsets))] + vowels[rng.integers(len(vowels))] +
                    codas[rng.integers(len(codas))] for _ in range(syllables))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def ours_kept(pool_texts: Sequence[str], candidates: Sequence[str], threshold: float,
              index=RougeIndex) -> list[int]:
    """The pipeline's check (tasks/self_instruct.py, `generate_tasks`) with `index`: the indices of kept
    candidates."""
    pool = index(pool_texts)
    kept = []
    for i, item in enumerate(candidates):
        score, nearest = pool.most_similar(item)
        if score > threshold:
            continue
        _ = pool.texts[nearest] if nearest >= 0 else ""  # the pipeline records the nearest instruction
        kept.append(i)
        pool.add(item)
    return kept


class OldCdistIndex:
    """The previous tasks.text.RougeIndex, kept here as the reference: each distinct token one code point (so at
    most ~1.1M distinct tokens), every check one rapidfuzz cdist over the whole pool."""

    def __init__(self, texts: Sequence[str] = ()):
        self._vocab: dict[str, str] = {}
        self._encoded: list[str] = []
        self.texts: list[str] = []
        for text in texts:
            self.add(text)

    def encode(self, text: str) -> str:
        chars = []
        for token in rouge_tokens(text):
            ch = self._vocab.get(token)
            if ch is None:
                n = len(self._vocab) + 0x100
                ch = chr(n if n < 0xD800 else n + 0x800)
                self._vocab[token] = ch
            chars.append(ch)
        return "".join(chars)

    def add(self, text: str) -> None:
        self._encoded.append(self.encode(text))
        self.texts.append(text)

    def most_similar(self, text: str) -> tuple[float, int]:
        if not self._encoded:
            return 0.0, -1
        query = self.encode(text)
        lcs = process.cdist([query], self._encoded, scorer=LCSseq.similarity, dtype=np.int32, workers=-1)[0]
        lengths = np.fromiter((len(c) for c in self._encoded), dtype=np.int64, count=len(self._encoded))
        scores = rouge_f1_from_lcs(lcs, len(query), lengths)
        best = int(np.argmax(scores))
        return float(scores[best]), best


def old_kept(pool_texts: Sequence[str], candidates: Sequence[str], threshold: float) -> list[int]:
    """The same loop as `ours_kept` over the previous implementation."""
    return ours_kept(pool_texts, candidates, threshold, index=OldCdistIndex)


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


METHODS: dict[str, Callable[..., list[int]]] = {"ours": ours_kept, "old_cdist": old_kept, "alpaca": alpaca_kept,
                                                "serial_rouge_score": serial_kept}


_VERIFY: tuple = ()  # (pool tokens, candidate tokens, kept indices, threshold), shared with forked workers


def rouge_score_check(pool_texts: Sequence[str], candidates: Sequence[str], threshold: float, kept: Sequence[int],
                      processes: int = 2) -> dict:
    """rouge_score's own decision for every candidate, against the pool it meets when `kept` (ours' list) were
    the ones kept before it: rouge_score's tokenizer and `rouge_scorer._score_lcs` against each pool entry,
    stopping at the first F1 above the threshold. If every decision agrees, rouge_score's own greedy run
    keeps exactly `kept` (by induction over the candidates), and the candidates can be split over processes.
    A pair is skipped, without changing any decision, when its lengths alone bound F1 below the threshold:
    2 min(m, n) / (m + n) < threshold."""
    from rouge_score import rouge_scorer

    global _VERIFY
    tokenizer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)._tokenizer
    _VERIFY = ([tokenizer.tokenize(t) for t in pool_texts], [tokenizer.tokenize(t) for t in candidates],
               sorted(kept), threshold)
    # Forked processes inherit _VERIFY; each takes every processes-th candidate (pools grow along the run).
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_rouge_score_worker, args=(list(range(i, len(candidates), processes)), queue))
               for i in range(processes)]
    t0 = time.perf_counter()
    for worker in workers:
        worker.start()
    parts = [queue.get() for _ in workers]
    for part in parts:
        if isinstance(part, BaseException):
            raise RuntimeError("a rouge_score worker failed") from part
    results = [r for part in parts for r in part]
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - t0
    _VERIFY = ()
    keep = dict((i, k) for i, k, _ in results)
    theirs = [i for i in range(len(candidates)) if keep[i]]
    ours = set(kept)
    differ = [i for i in range(len(candidates)) if keep[i] != (i in ours)]
    return {"same_kept": theirs == sorted(kept), "kept": len(theirs),
            "first_disagreement": differ[0] if differ else None,
            "pairs_scored": sum(p for _, _, p in results), "processes": processes, "seconds": round(seconds, 1),
            "reference": f"rouge_score {version('rouge-score')}: its tokenizer and "
                         "rouge_scorer._score_lcs(pool entry, candidate) for every pair whose lengths allow F1 "
                         "above the threshold, stopping at the first above it; each candidate against the seeds "
                         "plus the candidates kept before it"}


def _rouge_score_worker(indices: list[int], queue) -> None:
    try:
        queue.put(_rouge_score_decide(indices))
    except BaseException as error:  # the parent waits on the queue: hand it the error, then fail here too
        queue.put(error)
        raise


def _rouge_score_decide(indices: list[int]) -> list[tuple[int, bool, int]]:
    """(candidate, kept by rouge_score, pairs scored) for each of `indices`."""
    from rouge_score import rouge_scorer

    pool_tokens, cand_tokens, kept, threshold = _VERIFY
    out = []
    for i in indices:
        tokens, m = cand_tokens[i], len(cand_tokens[i])
        before = pool_tokens + [cand_tokens[j] for j in kept[:bisect.bisect_left(kept, i)]]
        keep, pairs = True, 0
        for other in before:
            n = len(other)
            if m + n == 0 or 2 * min(m, n) / (m + n) < threshold - 1e-9:
                continue
            pairs += 1
            if rouge_scorer._score_lcs(other, tokens).fmeasure > threshold:
                keep = False
                break
        out.append((i, keep, pairs))
    return out


def realistic_summary(texts: Sequence[str], sources: np.ndarray, similarity: np.ndarray, threshold: float) -> dict:
    tokens = [rouge_tokens(t) for t in texts]
    lengths = np.array([len(t) for t in tokens])
    planted = sources >= 0
    counts: dict[str, int] = {}
    for toks in tokens:
        for t in toks:
            counts[t] = counts.get(t, 0) + 1
    total = int(lengths.sum())
    return {
        "generator": "realistic_instructions (benchmarks/novelty_filter.py), seed 0: 25 instruction templates "
                     "(\"Write a ...\", \"Given ..., classify ...\", \"Explain how ...\") with clauses appended, "
                     "content words drawn Zipf-Mandelbrot (s=1.05) from 50,000 made-up words, stop words from the "
                     "templates and edits; 30% of texts are planted near-duplicates of an earlier one (1.5 k "
                     "edits per token share of 1 - target, target uniform in [0.4, 1])",
        "distinct_tokens": len(counts), "tokens_per_text_mean": round(float(lengths.mean()), 1),
        "tokens_per_text_min_max": [int(lengths.min()), int(lengths.max())],
        "share_the_of_a": round(sum(counts.get(w, 0) for w in ("the", "of", "a")) / total, 3),
        "planted": int(planted.sum()),
        "planted_rouge_l_quartiles": [round(float(q), 3) for q in np.percentile(similarity[planted], [25, 50, 75])],
        "planted_above_threshold": int((similarity[planted] > threshold).sum()),
        "examples": list(texts[200:203]),
    }


def scale(n: int, old_n: int, verify_n: int, threshold: float, processes: int) -> dict:
    """The issue's figures on realistic instructions: ours on n, ours and the old cdist implementation on the
    first old_n, and ours against rouge_score on the first verify_n."""
    texts, sources, similarity = realistic_instructions(n)
    seeds = seed_instructions()
    out: dict = {"data": realistic_summary(texts, sources, similarity, threshold), "threshold": threshold,
                 "initial_pool": len(seeds)}
    t0 = time.perf_counter()
    kept = ours_kept(seeds, texts, threshold)
    seconds = time.perf_counter() - t0
    out["ours"] = {"n": n, "seconds": round(seconds, 2), "ms_per_check": round(1e3 * seconds / n, 3),
                   "kept": len(kept), "final_pool": len(seeds) + len(kept)}
    if old_n:
        cands = texts[:old_n]
        t0 = time.perf_counter()
        ours = ours_kept(seeds, cands, threshold)
        ours_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        old = old_kept(seeds, cands, threshold)
        old_s = time.perf_counter() - t0
        out["ours_vs_old_cdist"] = {"n": old_n, "seconds": {"ours": round(ours_s, 2), "old_cdist": round(old_s, 2)},
                                    "speedup": round(old_s / ours_s, 1), "kept": len(ours), "same_kept": ours == old,
                                    "reference": REFERENCES["old_cdist"]}
    if verify_n:
        cands = texts[:verify_n]
        out["rouge_score_check"] = {"n": verify_n, **rouge_score_check(seeds, cands, threshold,
                                                                         ours_kept(seeds, cands, threshold), processes)}
    return out


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
    source.add_argument("--n", type=int, help="candidate instructions to make (--data); default 800, or 100000 "
                                              "with --scale")
    source.add_argument("--input", type=Path, help="a JSON list of candidate strings, checked in order")
    parser.add_argument("--data", choices=["seeds", "realistic"], default="seeds",
                        help="candidates made from the project's seeds, or realistic_instructions")
    parser.add_argument("--scale", action="store_true",
                        help="the issue's figures: ours on --n realistic instructions (default 100000), ours and "
                             "old_cdist on the first --old-n, ours and rouge_score on the first --verify-n")
    parser.add_argument("--old-n", type=int, default=20000)
    parser.add_argument("--verify-n", type=int, default=5000)
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--references", default="old,alpaca,serial",
                        help="comma-separated: old, alpaca, serial, or none (only ours; for large n)")
    parser.add_argument("--processes", type=int, default=os.cpu_count(), help="Alpaca's worker processes")
    parser.add_argument("--no-seeds", action="store_true", help="start from an empty pool, not the seeds")
    parser.add_argument("--kept-out", type=Path, help="write ours' kept candidate indices as a JSON list")
    args = parser.parse_args()
    if args.scale:
        n = args.n or 100_000
        load = os.getloadavg()[0]
        result = scale(n, args.old_n, args.verify_n, args.threshold, args.processes or 2)
        result.update(cpu_cores=os.cpu_count(), load_avg_1m_before=round(load, 2),
                      load_avg_1m_after=round(os.getloadavg()[0], 2))
        print(json.dumps(result))
        return

    names = {"old": "old_cdist", "alpaca": "alpaca", "serial": "serial_rouge_score"}
    wanted = [r.strip() for r in args.references.split(",") if r.strip()]
    if wanted != ["none"] and not set(wanted) <= set(names):
        parser.error(f"--references {args.references!r}: expected a comma-separated subset of "
                     f"{sorted(names)}, or none")
    methods = ["ours"] + ([] if wanted == ["none"] else [names[r] for r in names if r in wanted])

    if args.input:
        candidates = json.loads(args.input.read_text())
    elif args.data == "realistic":
        candidates = realistic_instructions(args.n or 800)[0]
    else:
        candidates = instructions_from_seeds(args.n or 800)
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
