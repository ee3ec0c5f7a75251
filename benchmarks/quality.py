"""Benchmark: the quality stage's scorers at scale, each beside the way a good engineer would do it without
this project. Prints one JSON object.

    python benchmarks/quality.py [--heuristic-rows 1000000] [--reference-rows 20000] [--minhash-rows 100000]
                                 [--model-rows 8] [--model bundled] [--device auto] [--batch-size 16]

- Heuristics (`heuristic_1m_s`): the five heuristic scores over 1M Alpaca-like rows (column-wise, compiled
  scans). Beside it, the row-by-row way (a Python loop with regular expressions, the shape of the seed
  document's DataQualityChecker) on `--reference-rows` of the same rows, with the largest difference.
- MinHash (`minhash`): ours (tasks/dedup.py `near_duplicates` with the DedupConfig defaults, as
  tasks/quality.py calls it) against datasketch on the same rows: `MinHash` with the same num_perm over the
  same word shingles (as byte strings, datasketch's default SHA-1 hashing), `MinHashLSH` at the same
  threshold, each row queried against the index, candidates kept if `MinHash.jaccard` reaches the threshold
  (as datasketch's documentation advises; `datasketch_unverified` keeps every LSH candidate), clusters as
  connected components (scipy). A third of the rows are planted copies whose true Jaccard similarity
  (exact, over the shingle sets) spreads over 0.5-0.95 in equal numbers per bin: `merged_share_by_jaccard`
  is each method's share of pairs clustered together per bin (recall at and above the threshold, merges
  below it), `false_merges` the joins of unrelated rows.
- IFD and DEITA (`models`): ours (tasks/model_scores.py through tasks/llm/transformers_backend.py: batched,
  output layer only where a score is read) against the straightforward Hugging Face way on the same rows:
  IFD from two `model(input_ids, labels)` calls per row (conditioned on the Alpaca prompt, and after BOS
  alone) with labels masked on the prompt; DEITA from one `model(**inputs)` call per prompt (two per row),
  the last position's logits over the six score tokens. `*_max_abs_diff` says how far apart they are.

Rows are built from the project's seed tasks with words drawn from their text, so lengths and word shapes
look like instruction data (instruction ~12 words, output ~45). Compilation is warmed up first.

Measured on 2 cores (AMD EPYC, CPU float32, datasketch 2.0, torch 2.13, transformers 5.24), on a machine shared
with other jobs (1-minute load average 3-7), so every figure is inflated by a varying amount:
- default run (7.5 min): heuristics 5.5 s per 1M rows, row by row 92 s (16.6x, identical scores); MinHash on
  100K rows 3.1 s, datasketch 74 s (23.6x; MinHash 32 s, LSH 31 s, shingling 10 s), LSH bands (14, 9) for
  both; share of planted pairs merged, ours / datasketch verified / datasketch unverified, per true Jaccard:
  0.50-0.60 0.001 / 0.000 / 0.070, 0.65-0.70 0.16 / 0.16 / 0.34, 0.70-0.75 0.47 / 0.46 / 0.55,
  0.80-0.90 0.96 / 0.96 / 0.96, 0.90-0.95 1.0 for all; no false merges. 8 model rows: DEITA 0.29 rows/s
  against 0.07 (4.1x), IFD 0.21 against 0.08 (2.6x; one partial batch), scores within 5e-6.
- `--heuristic-rows 0 --minhash-rows 300000 --model-rows 24` (24 min): MinHash 12.8 s against 316 s (24.6x),
  the same recall curve; DEITA 0.22 against 0.05 rows/s (4.5x), IFD 0.34 against 0.08 (4.0x), within 7e-6.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: tasks/ and tests/

from tasks.config import DedupConfig, QualityConfig
from tasks.dedup import near_duplicates
from tasks.quality import heuristic_scores
from tests.unit.test_quality import reference_scores  # the row-by-row definitions

ROOT = Path(__file__).resolve().parent.parent


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


# --- MinHash: ours against datasketch ------------------------------------------------------------------------

JACCARD_BINS = (0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9, 0.95)  # finer near the default threshold, 0.7
_SHINGLE_WORD = re.compile(rb"[A-Za-z0-9\x80-\xff]+")


def shingle_set(text: str, k: int) -> set[bytes]:
    """The word k-shingles that tasks/textscan.py `shingle_hashes` hashes, as byte strings: words are runs of
    ASCII letters and digits or of non-ASCII bytes, ASCII-lowercased; a text of fewer than k words (but some)
    is one shingle of all of them, a text without words has none."""
    words = _SHINGLE_WORD.findall(text.encode().lower())  # bytes.lower() lowercases ASCII only, as the scan
    if len(words) < k:
        return {b" ".join(words)} if words else set()
    return {b" ".join(words[i:i + k]) for i in range(len(words) - k + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def bin_labels(bins: tuple[float, ...] = JACCARD_BINS) -> list[str]:
    return [f"{lo:.2f}-{hi:.2f}" for lo, hi in itertools.pairwise(bins)]


def planted(rows: int, shingle_size: int = 3, bins: tuple[float, ...] = JACCARD_BINS,
            seed: int = 1) -> tuple[list[str], np.ndarray, np.ndarray]:
    """`rows` texts: unrelated ones of 30-100 words drawn from the seeds' vocabulary, then a third of `rows`
    copies of distinct ones among them, edited to a true Jaccard similarity of their shingle sets inside one
    of `bins`'s intervals [lo, hi) (the same number of copies per interval, a uniform target inside it).

    A copy gets m words replaced, k apart inside the text (each replacement changes k shingles), and t words
    appended (one new shingle each): Jaccard (S - k m) / (S + k m + t) for S = w - k + 1 shingles.
    Returns the texts, the (original, copy) row pairs, and each pair's exact Jaccard.
    """
    k = shingle_size
    seeds = (ROOT / "data" / "seed_tasks.jsonl").read_text()
    vocab = np.array(sorted(set(re.findall(r"[a-z]+", seeds.lower()))))
    rng = np.random.default_rng(seed)
    copies = rows // 3
    distinct = rows - copies
    lengths = rng.integers(30, 101, distinct)
    words = vocab[rng.integers(0, len(vocab), int(lengths.sum()))]
    texts = [list(chunk) for chunk in np.split(words, np.cumsum(lengths)[:-1])]
    originals = rng.choice(distinct, copies, replace=False)
    n_bins = len(bins) - 1
    for c, i in enumerate(originals):
        lo, hi = bins[c % n_bins], bins[c % n_bins + 1]
        target = rng.uniform(lo, hi)
        w = len(texts[i])
        s = w - k + 1
        m = int(s * (1 - target) / (k * (1 + target)))
        kept = s - k * m
        # t appended words: lo <= kept / (s + k m + t) < hi
        t_min = max(0, int(np.floor(kept / hi - s - k * m)) + 1)
        t_max = int(np.floor(kept / lo - s - k * m))
        t = int(np.clip(round(kept / target - s - k * m), t_min, t_max))
        copy = list(texts[i])
        for p in rng.choice(np.arange(k - 1, w - k + 1, k), m, replace=False):
            copy[p] = vocab[(np.searchsorted(vocab, copy[p]) + 1 + rng.integers(len(vocab) - 1)) % len(vocab)]
        copy += list(vocab[rng.integers(0, len(vocab), t)])
        texts.append(copy)
    pairs = np.stack([originals, distinct + np.arange(copies)], axis=1)
    texts = [" ".join(t) for t in texts]
    true = np.array([jaccard(shingle_set(texts[a], k), shingle_set(texts[b], k)) for a, b in pairs])
    return texts, pairs, true


def datasketch_clusters(texts: list[str], threshold: float, shingle_size: int, num_perm: int) -> dict:
    """Near-duplicate clusters the datasketch way: MinHash per row, MinHashLSH, a query per row."""
    from datasketch import MinHash, MinHashLSH
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    def cluster(pairs: np.ndarray) -> np.ndarray:
        graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(texts), len(texts)))
        return connected_components(graph, directed=False)[1]

    seconds = {}
    t0 = time.perf_counter()
    sets = [shingle_set(t, shingle_size) for t in texts]
    seconds["shingles"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    hashes = MinHash.bulk(sets, num_perm=num_perm)
    seconds["minhash"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    with lsh.insertion_session() as session:
        for i, m in enumerate(hashes):
            if sets[i]:  # a row without words is nobody's duplicate (as in ours)
                session.insert(i, m)
    found = [(i, j) for i, m in enumerate(hashes) if sets[i] for j in lsh.query(m) if j > i]
    candidates = np.array(found, np.int64).reshape(-1, 2)
    seconds["lsh_index_and_query"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    verified = np.array([hashes[i].jaccard(hashes[j]) >= threshold for i, j in candidates], bool)
    label = cluster(candidates[verified] if len(candidates) else candidates)
    seconds["verify_and_cluster"] = time.perf_counter() - t0
    return {"label": label, "label_unverified": cluster(candidates), "candidates": len(candidates),
            "linked": int(verified.sum()), "bands": [lsh.b, lsh.r], "seconds": seconds}


def false_merges(label: np.ndarray, family: np.ndarray) -> int:
    """Joins of unrelated rows: per cluster, the number of distinct families in it less one, summed."""
    per_cluster = np.unique(np.stack([label, family], axis=1), axis=0)[:, 0]
    return int(len(per_cluster) - len(np.unique(per_cluster)))


def merged_by_bin(label: np.ndarray, pairs: np.ndarray, true: np.ndarray,
                  bins: tuple[float, ...] = JACCARD_BINS) -> list[float | None]:
    """Per Jaccard bin [lo, hi), the share of planted pairs whose rows share a cluster."""
    together = label[pairs[:, 0]] == label[pairs[:, 1]]
    which = np.digitize(true, bins) - 1
    return [round(float(together[which == b].mean()), 4) if (which == b).any() else None
            for b in range(len(bins) - 1)]


def compare_minhash(texts: list[str], pairs: np.ndarray, true: np.ndarray, cfg: DedupConfig) -> dict:
    """Ours and datasketch on the same texts; timings, recall per Jaccard bin, false merges."""
    column = pa.array(texts, pa.large_string())
    near_duplicates(column.slice(0, 1000), cfg.threshold, cfg.shingle_size, cfg.num_perm)  # compile
    t0 = time.perf_counter()
    ours = near_duplicates(column, cfg.threshold, cfg.shingle_size, cfg.num_perm)
    ours_s = time.perf_counter() - t0
    reference = datasketch_clusters(texts, cfg.threshold, cfg.shingle_size, cfg.num_perm)
    reference_s = sum(reference["seconds"].values())
    family = np.arange(len(texts))
    family[pairs[:, 1]] = pairs[:, 0]
    labels = {"ours": ours.label, "datasketch": reference["label"],
              "datasketch_unverified": reference["label_unverified"]}
    which = np.digitize(true, JACCARD_BINS) - 1
    merged = {name: merged_by_bin(label, pairs, true) for name, label in labels.items()}
    by_bin = {name: {"pairs": int((which == b).sum()), **{m: merged[m][b] for m in labels}}
              for b, name in enumerate(bin_labels())}
    return {
        "rows": len(texts), "threshold": cfg.threshold, "shingle_size": cfg.shingle_size, "num_perm": cfg.num_perm,
        "seconds": {"ours": round(ours_s, 3), "datasketch": round(reference_s, 3)},
        "rows_per_s": {"ours": round(len(texts) / ours_s), "datasketch": round(len(texts) / reference_s)},
        "ours_100k_s": round(ours_s * 100_000 / len(texts), 3),
        "speedup": round(reference_s / ours_s, 1),
        "datasketch_seconds_by_step": {k: round(v, 3) for k, v in reference["seconds"].items()},
        "bands_rows_per_band": {"ours": [ours.bands, ours.per_band], "datasketch": reference["bands"]},
        "candidate_pairs": {"ours": ours.candidates, "datasketch": reference["candidates"]},
        "linked_pairs": {"ours": len(ours.pairs), "datasketch": reference["linked"]},
        "planted_pairs": len(pairs),
        "merged_share_by_jaccard": by_bin,
        "false_merges": {name: false_merges(label, family) for name, label in labels.items()},
        "reference": "datasketch: MinHash.bulk over the same word shingles (byte strings, default SHA-1 hash, "
                     f"num_perm={cfg.num_perm}), MinHashLSH(threshold={cfg.threshold}) with an insertion session, "
                     "one query per row, candidates verified with MinHash.jaccard >= threshold (unverified: every "
                     "LSH candidate), scipy connected components; timed from the texts, shingling included",
    }


def bench_minhash(rows: int) -> dict:
    cfg = QualityConfig().dedup
    texts, pairs, true = planted(rows, cfg.shingle_size)
    return compare_minhash(texts, pairs, true, cfg)


# --- IFD and DEITA: ours against one Hugging Face forward per row ---------------------------------------------

def straightforward_ifd(model, tokenizer, instructions, inputs, outputs, max_length: int) -> np.ndarray:
    """(rows, 2) conditioned and direct mean response-token losses, one `model(input_ids, labels)` call each."""
    import torch

    from tasks.prompts import alpaca_prompt

    out = np.zeros((len(outputs), 2))
    with torch.inference_mode():
        for row, (instruction, input, output) in enumerate(zip(instructions, inputs, outputs)):
            response = tokenizer(output.strip(), add_special_tokens=False)["input_ids"]
            for col, prompt in enumerate((alpaca_prompt(instruction, input or ""), "")):
                prompt_ids = tokenizer(prompt)["input_ids"]  # with BOS
                if len(prompt_ids) + len(response) > max_length:
                    raise ValueError(f"row {row}: {len(prompt_ids) + len(response)} tokens, over {max_length}")
                ids = torch.tensor([prompt_ids + response], device=model.device)
                labels = ids.clone()
                labels[0, :len(prompt_ids)] = -100
                out[row, col] = float(model(input_ids=ids, labels=labels).loss)
    return out


def straightforward_deita(model, tokenizer, prompts: list[str]) -> np.ndarray:
    """(prompts, 6) log-probabilities of the score tokens, one `model(**inputs)` call per prompt."""
    import torch

    from tasks.model_scores import SCORE_TOKENS

    ids = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in SCORE_TOKENS]
    rows = []
    with torch.inference_mode():
        for prompt in prompts:
            logits = model(**tokenizer(prompt, return_tensors="pt").to(model.device)).logits[0, -1].float()
            rows.append(torch.log_softmax(logits, dim=-1)[ids].cpu().numpy())
    return np.stack(rows)


def bench_models(rows: int, model: str, device: str, batch_size: int, max_length: int = 512) -> dict:
    from tasks.llm.models import resolve_model
    from tasks.llm.transformers_backend import TransformersLLM
    from tasks.model_scores import DEITA_COMPLEXITY, DEITA_QUALITY, _query, deita_scores, expected_score, ifd_scores

    table = synthetic(rows, seed=3)
    instructions, inputs, outputs = (table.column(c).to_pylist() for c in ("instruction", "input", "output"))
    llm = TransformersLLM(resolve_model(model), device=device, batch_size=batch_size)
    queries = [_query(i, x) for i, x in zip(instructions, inputs)]
    deita_prompts = ([DEITA_COMPLEXITY.format(query=q) for q in queries]
                     + [DEITA_QUALITY.format(query=q, response=o.strip()) for q, o in zip(queries, outputs)])

    deita_scores(instructions[:2], inputs[:2], outputs[:2], llm)  # warm-up, both ways
    straightforward_deita(llm.model, llm.tokenizer, deita_prompts[:1])
    t0 = time.perf_counter()
    complexity, quality = deita_scores(instructions, inputs, outputs, llm)
    deita_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference = expected_score(straightforward_deita(llm.model, llm.tokenizer, deita_prompts))
    deita_ref_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    ifd, conditioned, direct, _ = ifd_scores(instructions, inputs, outputs, llm, max_length=max_length)
    ifd_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses = straightforward_ifd(llm.model, llm.tokenizer, instructions, inputs, outputs, max_length)
    ifd_ref_s = time.perf_counter() - t0
    return {
        "model": model, "device": str(llm.device), "dtype": str(llm.dtype).removeprefix("torch."),
        "rows": rows, "batch_size": batch_size,
        "deita_rows_per_s": round(rows / deita_s, 2),
        "deita_straightforward_rows_per_s": round(rows / deita_ref_s, 2),
        "deita_speedup": round(deita_ref_s / deita_s, 1),
        "deita_max_abs_diff": float(np.abs(np.concatenate([complexity, quality]) - reference).max()),
        "ifd_rows_per_s": round(rows / ifd_s, 2),
        "ifd_straightforward_rows_per_s": round(rows / ifd_ref_s, 2),
        "ifd_speedup": round(ifd_ref_s / ifd_s, 1),
        "ifd_max_abs_diff": float(np.abs(ifd - losses[:, 0] / losses[:, 1]).max()),
        "ifd_loss_max_abs_diff": float(np.abs(np.stack([conditioned, direct], axis=1) - losses).max()),
        "reference": "straightforward Hugging Face: IFD from two model(input_ids, labels) calls per row (labels -100 "
                     "on the prompt; conditioned on the Alpaca prompt, direct after BOS alone), one row at a time; "
                     "DEITA from one model(**inputs) call per prompt (complexity and quality: two per row), "
                     "log-softmax of the last position's logits at the six score tokens; same rows, same model",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heuristic-rows", type=int, default=1_000_000)
    parser.add_argument("--reference-rows", type=int, default=20_000, help="rows for the row-by-row heuristics")
    parser.add_argument("--minhash-rows", type=int, default=100_000, help="0 skips MinHash")
    parser.add_argument("--model-rows", type=int, default=8, help="0 skips the model-based scores")
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per forward pass of the scoring model")
    args = parser.parse_args()
    # other work on the machine skews every figure; say how much there was
    result: dict = {"cpu_cores": os.cpu_count(), "load_avg_1m_before": round(os.getloadavg()[0], 2)}
    if args.heuristic_rows:
        result.update(bench_heuristics(args.heuristic_rows, args.reference_rows))
    if args.minhash_rows:
        result["minhash"] = bench_minhash(args.minhash_rows)
    if args.model_rows:
        result["models"] = bench_models(args.model_rows, args.model, args.device, args.batch_size)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
