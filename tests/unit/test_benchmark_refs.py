"""The benchmarks' comparisons are only worth their figures if ours and each reference compute the same thing:
these run the comparison functions of benchmarks/novelty_filter.py and benchmarks/quality.py on tiny inputs
and check exact agreement (no timings)."""

import importlib.util
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tasks.config import DedupConfig
from tasks.textscan import shingle_hashes

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


novelty = _load("novelty_filter")
quality = _load("quality")


# --- novelty: the pipeline's incremental check, Alpaca's way, a serial rouge_score loop ------------------------

def test_novelty_methods_keep_identical_lists_on_200_instructions():
    pytest.importorskip("rouge_score")
    pool = novelty.seed_instructions()
    candidates = novelty.instructions_from_seeds(200)
    ours = novelty.ours_kept(pool, candidates, 0.7)
    assert 40 < len(ours) < 160  # a real mix of kept and dropped, so agreement means something
    assert novelty.serial_kept(pool, candidates, 0.7) == ours
    assert novelty.old_kept(pool, candidates, 0.7) == ours
    # Alpaca's way opens a process pool per candidate (~50-150 ms each): the first 30. The check is
    # greedy and in order, so its kept list on a prefix is the prefix of the full kept list.
    prefix = [i for i in ours if i < 30]
    assert 0 < len(prefix) < 30
    assert novelty.alpaca_kept(pool, candidates[:30], 0.7, processes=2) == prefix


def test_novelty_methods_agree_at_the_threshold():
    """F1 exactly at 0.7 (kept, not above) and just above it: the float arithmetic must match rouge_score's."""
    pytest.importorskip("rouge_score")
    pool = ["a b c d e f g h i j"]
    candidates = ["a b c d e f g x y z",      # LCS 7 of 10 and 10: F1 0.7, not above: kept
                  "a b c d e f g h x y",      # LCS 8 against the first pool entry: 0.8, dropped
                  "q r s t u v w x y z k",    # LCS 3 ("x y z") of 10 and 11 with the first: kept
                  "Q, R; S T U V W X Y Z!"]   # LCS 10 of 10 and 11 against the one above: dropped
    result = novelty.compare(pool, candidates, 0.7, processes=1)
    assert result["kept"] == {"ours": 2, "old_cdist": 2, "alpaca": 2, "serial_rouge_score": 2}
    assert result["same_kept"] is True
    assert result["kept_indices"]["ours"] == [0, 2]
    assert result["pairs_in_full_scans"] == 1 + 2 + 2 + 3
    assert novelty.ours_kept(pool, candidates, 0.69) == [2]  # the same first candidate is dropped below 0.7


def test_realistic_instructions_are_fixed_and_planted_at_their_similarity():
    texts, sources, similarity = novelty.realistic_instructions(600, seed=0)
    assert texts == novelty.realistic_instructions(600, seed=0)[0] and len(set(texts)) > 500
    lengths = [len(novelty.rouge_tokens(t)) for t in texts]
    assert min(lengths) >= 5 and max(lengths) <= 40
    planted = np.flatnonzero(sources >= 0)
    assert 100 < len(planted) < 250 and (sources[planted] < planted).all()
    assert [novelty.rouge_l_f1(texts[sources[i]], texts[i]) for i in planted] == similarity[planted].tolist()
    assert np.isnan(similarity[sources < 0]).all()


def test_rouge_score_check_agrees_with_ours_and_reports_a_disagreement():
    pytest.importorskip("rouge_score")
    pool = novelty.seed_instructions()
    candidates = novelty.realistic_instructions(150, seed=1)[0]
    ours = novelty.ours_kept(pool, candidates, 0.7)
    check = novelty.rouge_score_check(pool, candidates, 0.7, ours, processes=2)
    assert check["same_kept"] is True and check["kept"] == len(ours) and check["first_disagreement"] is None
    wrong = [i for i in range(len(candidates)) if i not in ours][:1] + ours[1:]  # the first kept one swapped
    check = novelty.rouge_score_check(pool, candidates, 0.7, wrong, processes=2)
    assert check["same_kept"] is False and check["first_disagreement"] == min(ours[0], wrong[0])


def test_novelty_compare_reports_a_disagreement():
    result = novelty.compare(["write a poem about cats"], ["write a poem about dogs"], 0.7, methods=["ours"])
    assert result["same_kept"] is None and result["kept"] == {"ours": 0}
    original = novelty.METHODS["serial_rouge_score"]
    novelty.METHODS["serial_rouge_score"] = lambda pool, candidates, threshold: [0]
    try:
        result = novelty.compare(["write a poem about cats"], ["write a poem about dogs"], 0.7,
                                 methods=["ours", "serial_rouge_score"])
    finally:
        novelty.METHODS["serial_rouge_score"] = original
    assert result["same_kept"] is False


# --- MinHash: the same shingles for both, planted Jaccard bins, ours and datasketch ----------------------------

TEXTS = ["The cat sat on the mat.", "the CAT, sat... on THE mat", "one two", "", "Café au lait, s'il vous plaît",
         "x1 y2 z3 x1 y2 z3 x1", "naïve façade: ÜBER groß", "a"]


def test_python_shingles_are_the_compiled_scan_shingles():
    """Both benchmark methods see the same sets: per row the same number of distinct shingles, and for every
    pair of rows the same Jaccard similarity, from ours' hashes and from the byte strings datasketch gets."""
    hashes, offsets = shingle_hashes(pa.array(TEXTS, pa.large_string()), 3)
    ours = [set(hashes[offsets[i]:offsets[i + 1]].tolist()) for i in range(len(TEXTS))]
    theirs = [quality.shingle_set(t, 3) for t in TEXTS]
    assert [len(s) for s in ours] == [len(s) for s in theirs] == [4, 4, 1, 0, 5, 3, 2, 1]
    for i in range(len(TEXTS)):
        for j in range(len(TEXTS)):
            assert quality.jaccard(ours[i], ours[j]) == quality.jaccard(theirs[i], theirs[j])
    assert theirs[0] == theirs[1]
    assert quality.shingle_set("naïve façade: ÜBER groß", 1) == {"naïve".encode(), "façade".encode(), b"\xc3\x9cber",
                                                                  "groß".encode()}


def test_planted_pairs_land_in_their_intended_jaccard_bins():
    bins = quality.JACCARD_BINS
    texts, pairs, true = quality.planted(420, 3)
    assert len(texts) == 420 and len(pairs) == 140
    intended = np.arange(len(pairs)) % (len(bins) - 1)
    assert (np.digitize(true, bins) - 1).tolist() == intended.tolist()
    assert len(set(pairs[:, 0].tolist())) == len(pairs)  # one copy per original
    # the exact Jaccard agrees with the sets ours hashes
    hashes, offsets = shingle_hashes(pa.array(texts, pa.large_string()), 3)
    rows = [set(hashes[offsets[i]:offsets[i + 1]].tolist()) for i in range(len(texts))]
    assert [quality.jaccard(rows[a], rows[b]) for a, b in pairs] == true.tolist()


def test_false_merges_and_bins_count_exactly():
    label = np.array([0, 0, 2, 2, 2, 5, 5])
    family = np.array([0, 0, 2, 3, 4, 5, 6])
    assert quality.false_merges(label, family) == 3
    pairs = np.array([[0, 1], [2, 3], [5, 6], [4, 6]])
    assert quality.merged_by_bin(label, pairs, np.array([0.55, 0.92, 0.93, 0.52])) == \
        [0.5, None, None, None, None, None, 1.0]


def test_ours_and_datasketch_both_cluster_an_identical_copy():
    pytest.importorskip("datasketch")
    cfg = DedupConfig()
    texts = quality.planted(90, cfg.shingle_size)[0] + ["The same text, copied: " * 5]
    texts.append(texts[-1].upper())  # identical shingles
    ours = quality.near_duplicates(pa.array(texts, pa.large_string()), cfg.threshold, cfg.shingle_size, cfg.num_perm)
    theirs = quality.datasketch_clusters(texts, cfg.threshold, cfg.shingle_size, cfg.num_perm)
    for label in (ours.label, theirs["label"], theirs["label_unverified"]):
        assert label[-1] == label[-2] and (label == label[-1]).sum() == 2


def test_ours_and_datasketch_merge_by_jaccard_bin():
    pytest.importorskip("datasketch")
    cfg = DedupConfig()
    texts, pairs, true = quality.planted(840, cfg.shingle_size)
    result = quality.compare_minhash(texts, pairs, true, cfg)
    assert result["bands_rows_per_band"]["ours"] == result["bands_rows_per_band"]["datasketch"] == [14, 9]
    by_bin = result["merged_share_by_jaccard"]
    assert [b["pairs"] for b in by_bin.values()] == [40] * 7
    for method in ("ours", "datasketch", "datasketch_unverified"):
        assert by_bin["0.90-0.95"][method] == 1.0
        assert by_bin["0.80-0.90"][method] >= 0.85
        assert result["false_merges"][method] == 0
    for method in ("ours", "datasketch"):  # verified at the threshold: far below it, nothing merges
        assert by_bin["0.50-0.60"][method] == 0.0
