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
