import pytest

from tasks.text import RougeIndex, parse_numbered_list, rouge_l_f1, rouge_tokens, word_count

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
    from tasks.text import novelty_filter

    for block in (1, 4, 512):
        mask, best, nearest = novelty_filter(VARIED, threshold, block=block)
        assert [i for i, k in enumerate(mask) if k] == reference_kept(VARIED, threshold)
    assert nearest[0] == -1 and best[1] == pytest.approx(1.0) and nearest[1] == 0


def test_novelty_filter_exact_at_the_boundary():
    from tasks.text import novelty_filter

    # F1 = 2*7/(10+10) = 0.7 exactly in rouge_score's arithmetic: kept (only "above 0.7" drops).
    a = "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10"
    b = "w1 w2 w3 w4 w5 w6 w7 x8 x9 x10"
    mask, best, _ = novelty_filter([a, b], 0.7)
    assert mask.tolist() == [True, True] == [i in reference_kept([a, b]) for i in range(2)]


def test_novelty_filter_against_existing_pool():
    from tasks.text import novelty_filter

    mask, best, nearest = novelty_filter(["Write a poem about the sea"], 0.7, existing=["write a poem about the sea"])
    assert mask.tolist() == [False] and nearest.tolist() == [0] and best[0] == 1.0


def test_parse_numbered_list_chat_reply_skips_preamble():
    reply = "Sure, here are more tasks:\n\n9. Plan a picnic menu.\n10. Explain\nrecursion.\n\nHope this helps!"
    assert parse_numbered_list(reply, 9, opened=False) == (["Plan a picnic menu.", "Explain recursion."], True)
    restarted = "1. Name a river.\n2. Name a lake."  # numbered afresh instead of from 9
    assert parse_numbered_list(restarted, 9, opened=False) == (["Name a river.", "Name a lake."], False)
    assert parse_numbered_list("No list at all.", 9, opened=False) == ([], False)
