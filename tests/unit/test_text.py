import numpy as np
import pytest

from tasks.text import RougeIndex, f1_matrix, novelty_filter, parse_numbered_list, rouge_l_f1, rouge_tokens, word_count

PAIRS = [
    ("Write a poem about the sea.", "Write a short poem about the ocean."),
    ("Translate 'hello' into French!", "translate HELLO into french"),
    ("What is 2+2?", "What is 2 + 2 ?"),
    ("Résumé: café naïve façade", "resume cafe naive facade"),
    ("", "Anything at all"),
    ("", ""),
    ("!!!", "???"),
    ("Give three tips for staying healthy.", "Give three tips for staying healthy."),
    ("List 10 fruits, sorted by sugar content (g/100g).", "List ten fruits sorted by sugar content"),
    ("a b c d e f g", "g f e d c b a"),
]


@pytest.mark.parametrize("a,b", PAIRS)
def test_rouge_l_matches_rouge_score(a, b):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    reference = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(a, b)["rougeL"].fmeasure
    assert rouge_l_f1(a, b) == pytest.approx(reference, abs=1e-12)
    index = RougeIndex([a])
    assert index.scores([b])[0, 0] == pytest.approx(reference, abs=1e-12)


def test_tokens_and_words():
    assert rouge_tokens("It's 3.5 km—far!") == ["it", "s", "3", "5", "km", "far"]
    assert word_count("  one two\nthree ") == 3


def test_index_most_similar():
    index = RougeIndex(["write a poem about cats", "translate the text to french"])
    score, pos = index.most_similar("Write a poem about dogs")
    assert (round(score, 6), pos) == (0.8, 0)
    assert RougeIndex().most_similar("x") == (0.0, -1)


def test_parse_numbered_list_continues_from_prompt_number():
    items, ended = parse_numbered_list(" Write a poem.\n10. Translate this\n    into German.\n11. Summ", 9)
    assert items == ["Write a poem.", "Translate this into German.", "Summ"] and ended is False


def test_parse_numbered_list_blank_line_ends_list():
    items, ended = parse_numbered_list(" First task.\n10. Second task.\n\n12. Not part of it.", 9)
    assert items == ["First task.", "Second task."] and ended is True


def test_parse_numbered_list_ignores_wrong_numbers():
    items, _ = parse_numbered_list(" A.\n12. B.\n10. C.", 9)
    assert items == ["A. 12. B.", "C."]


def reference_kept(texts, threshold=0.7):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept = []
    for i, text in enumerate(texts):
        if all(scorer.score(texts[j], text)["rougeL"].fmeasure <= threshold for j in kept):
            kept.append(i)
    return kept


VARIED = [
    "Write a poem about the sea.", "write a POEM about the sea!", "Write a poem about the deep blue sea.",
    "Translate 'hello' into French.", "Translate “hello” into French…", "", "   ", "!!!", "3 + 4 = ?",
    "What is 3 + 4?", "What is 3+4", "Résumé du café: écris-le.", "resume du cafe ecris le",
    "Naïve façade — déjà vu.", "日本語の文を翻訳してください。", "Explain quantum tunnelling to a child.",
    "Explain quantum tunneling to a child.", "List 10 fruits (sorted) by sugar: g/100g.",
    "list ten fruits sorted by sugar", "a b c d e f g h i j", "j i h g f e d c b a", "a b c d e f g h i x",
    "Give three tips for staying healthy.", "Give 3 tips for staying healthy.", "Give three tips to stay healthy.",
]


@pytest.mark.parametrize("threshold", [0.7, 0.5, 0.9])
def test_novelty_filter_decisions_equal_rouge_score(threshold):
    mask, best, nearest = novelty_filter(VARIED, threshold)
    assert [i for i, k in enumerate(mask) if k] == reference_kept(VARIED, threshold)
    assert nearest[0] == -1 and best[1] == pytest.approx(1.0) and nearest[1] == 0


def test_novelty_filter_exact_at_the_boundary():
    # F1 = 2*7/(10+10) = 0.7 exactly in rouge_score's arithmetic: kept (only "above 0.7" drops).
    a = "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10"
    b = "w1 w2 w3 w4 w5 w6 w7 x8 x9 x10"
    mask, best, _ = novelty_filter([a, b], 0.7)
    assert mask.tolist() == [True, True] == [i in reference_kept([a, b]) for i in range(2)]


def test_novelty_filter_against_existing_pool():
    mask, best, nearest = novelty_filter(["Write a poem about the sea"], 0.7, existing=["write a poem about the sea"])
    assert mask.tolist() == [False] and nearest.tolist() == [0] and best[0] == 1.0


def test_parse_numbered_list_chat_reply_skips_preamble():
    reply = "Sure, here are more tasks:\n\n9. Plan a picnic menu.\n10. Explain\nrecursion.\n\nHope this helps!"
    assert parse_numbered_list(reply, 9, opened=False) == (["Plan a picnic menu.", "Explain recursion."], True)
    restarted = "1. Name a river.\n2. Name a lake."  # numbered afresh instead of from 9
    assert parse_numbered_list(restarted, 9, opened=False) == (["Name a river.", "Name a lake."], False)
    assert parse_numbered_list("No list at all.", 9, opened=False) == ([], False)


# --- the inverted index: exact against brute force, any number of distinct tokens -------------------------------

class BruteForce:
    """Every entry coded with one test-local alphabet (small vocabularies only); (best F1, lowest index among
    ties) from `f1_matrix` over all of them and np.argmax."""

    def __init__(self):
        self.vocab: dict[str, str] = {}
        self.pool: list[str] = []

    def encode(self, text: str) -> str:
        return "".join(self.vocab.setdefault(t, chr(0x100 + len(self.vocab))) for t in rouge_tokens(text))

    def add(self, text: str) -> None:
        self.pool.append(self.encode(text))

    def most_similar(self, text: str) -> tuple[float, int]:
        if not self.pool:
            return 0.0, -1
        f1 = f1_matrix([self.encode(text)], self.pool)[0]
        best = int(np.argmax(f1))
        return float(f1[best]), best


def instruction_like(n: int, seed: int) -> list[str]:
    """Short instructions over a small Zipf vocabulary with stop words: repeated tokens, duplicates, near
    copies, ties and empty texts are all common."""
    rng = np.random.default_rng(seed)
    words = ["the", "a", "of", "to", "and", "in", "for", "write", "explain", "list", "given", "classify"] + \
        [f"w{i}" for i in range(150)]
    p = 1.0 / (np.arange(len(words)) + 1.5)
    p /= p.sum()
    texts: list[str] = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.03:
            texts.append(["", "!!!", "  ", "?"][int(rng.integers(4))])
        elif kind < 0.25 and texts:  # a near copy of an earlier text
            toks = texts[int(rng.integers(len(texts)))].split()
            for _ in range(int(rng.integers(0, 3))):
                if toks:
                    toks[int(rng.integers(len(toks)))] = str(rng.choice(words, p=p))
            texts.append(" ".join(toks).upper() if rng.random() < 0.2 else " ".join(toks))
        else:
            texts.append(" ".join(rng.choice(words, size=int(rng.integers(1, 25)), p=p)) + ".")
    return texts


@pytest.mark.parametrize("tiny_rounds,marks", [(False, "default"), (True, "default"), (True, "none"), (False, "all")])
def test_most_similar_equals_brute_force(tiny_rounds, marks):
    texts = instruction_like(4000, seed=3)
    index = RougeIndex()
    if tiny_rounds:  # a first round of a few postings, a seed from few entries, batches of 2: every pruning path
        index.FIRST_ROUND, index.SEED, index.BATCH = 8, 2, 2
    if marks == "none":  # membership in the later lists by binary search only
        index.MARKED_MIN = 10**9
    elif marks == "all":  # every list gets marks from its first entry on (grown as the index grows)
        index.MARKED, index.MARKED_MIN = 10**9, 1
    brute = BruteForce()
    mismatches = []
    for i, text in enumerate(texts):
        got, want = index.most_similar(text), brute.most_similar(text)
        if got != want:
            mismatches.append((i, text, got, want))
        if i % 3 != 2:  # most are added, as the stage adds the ones it keeps
            index.add(text)
            brute.add(text)
    assert mismatches == []
    assert len(index) == len(brute.pool) == 2667 and index.texts == [t for i, t in enumerate(texts) if i % 3 != 2]


def test_most_similar_ties_and_empty_texts():
    # "c d" (LCS 2 of 2) and "a b c d e f g h" (4 of 8) both give F1 2/3 against "a b c d": the earlier wins.
    assert RougeIndex(["x y", "a b c d e f g h", "c d"]).most_similar("a b c d") == (pytest.approx(2 / 3), 1)
    assert RougeIndex(["x y", "c d", "a b c d e f g h"]).most_similar("a b c d") == (pytest.approx(2 / 3), 1)
    assert RougeIndex(["a b c", "x", "a b c", "c b a"]).most_similar("A, b; C!") == (1.0, 0)
    assert RougeIndex(["x y", "!!!"]).most_similar("no shared token") == (0.0, 0)  # every F1 is 0: argmax 0
    assert RougeIndex(["x y"]).most_similar("") == (0.0, 0)
    assert RougeIndex(["", "x y"]).most_similar("x") == (pytest.approx(2 / 3), 1)
    assert RougeIndex().most_similar("") == (0.0, -1)
    # a repeated token: LCS "the the" of 2 and 3 (0.8) beats "the ... the" of 2 and 4 (2/3)
    assert RougeIndex(["the cat the dog", "the the the"]).most_similar("the the") == (pytest.approx(0.8), 1)


def test_more_than_a_million_distinct_tokens():
    # 1,300,001 distinct tokens w0..w1300000, 100 to an entry: past the code point limit of a global alphabet.
    texts = [" ".join(f"w{j}" for j in range(i, min(i + 100, 1_300_001))) for i in range(0, 1_300_001, 100)]
    index = RougeIndex(texts)
    assert len(index) == 13_001
    words = texts[12_345].split()
    near = " ".join(words[:45] + [f"new{i}" for i in range(10)] + words[55:])
    assert index.most_similar(near) == (0.9, 12_345)  # LCS 90 of 100 and 100
    across = " ".join(texts[7].split()[50:] + texts[8].split()[:30])  # 50 tokens of entry 7, then 30 of entry 8
    assert index.most_similar(across) == (pytest.approx(2 * 50 / 180), 7)
    assert index.most_similar("w1300000 w0") == (pytest.approx(2 / 3), 13_000)  # the last entry is "w1300000"
    assert index.most_similar("nothing here") == (0.0, 0)
    scores = index.scores([near])[0]
    assert scores.shape == (13_001,) and scores[12_345] == 0.9 and np.count_nonzero(scores) == 1


def near_threshold_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """Pairs whose ROUGE-L F1 lies within 0.05 of 0.7; one in ten exactly at it (LCS 7 of 10 and 10, or 14 of
    20 and 20)."""
    rng = np.random.default_rng(seed)
    words = [f"t{i}" for i in range(40)] + ["the", "a", "of"]
    pairs = []
    while len(pairs) < n:
        if len(pairs) % 10 == 0:
            a = [str(w) for w in rng.permutation(words)[:10 * int(rng.integers(1, 3))]]
            b = list(a)
            for j, pos in enumerate(rng.choice(len(a), size=3 * len(a) // 10, replace=False)):
                b[pos] = f"u{j}"
            pairs.append((" ".join(a), " ".join(b)))
            continue
        a = [str(w) for w in rng.choice(words, size=int(rng.integers(5, 31)))]
        b = list(a)
        for _ in range(int(rng.integers(1, 1 + len(a) // 2))):
            op, pos = rng.random(), int(rng.integers(len(b)))
            if op < 0.4:
                b[pos] = str(rng.choice(words))
            elif op < 0.7 and len(b) > 2:
                del b[pos]
            else:
                b.insert(pos, str(rng.choice(words)))
        pair = (" ".join(a), " ".join(b) + "!")
        if abs(rouge_l_f1(*pair) - 0.7) <= 0.05:
            pairs.append(pair)
    return pairs


def test_scores_and_decisions_equal_rouge_score_near_the_threshold():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = near_threshold_pairs(400, seed=5)
    at_threshold = 0
    for a, b in pairs:
        reference = scorer.score(a, b)["rougeL"].fmeasure
        score, nearest = RougeIndex(["unrelated words", a]).most_similar(b)
        assert (score, nearest) == (reference, 1)  # the same float, not just close
        assert (score > 0.7) == (reference > 0.7)
        at_threshold += reference == 0.7
    assert at_threshold >= 40
    texts = [t for pair in pairs[:150] for t in pair]
    mask, _, _ = novelty_filter(texts, 0.7)
    assert [i for i, k in enumerate(mask) if k] == reference_kept(texts, 0.7)
