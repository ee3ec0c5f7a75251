import numpy as np
import pyarrow as pa
import pytest

from tasks.dedup import agreement, components, lsh_bands, near_duplicates, pick_representatives, signatures
from tasks.textscan import shingle_hashes


def test_shingles_are_word_k_grams_case_and_punctuation_blind():
    hashes, offsets = shingle_hashes(pa.array(["The cat sat on", "the CAT, sat... on!", "one two", "", None]), 3)
    assert offsets.tolist() == [0, 2, 4, 5, 5, 5]  # 4 words -> 2 shingles; 2 words -> 1; none -> 0
    assert hashes[0:2].tolist() == hashes[2:4].tolist()
    assert len(set(hashes[0:2].tolist())) == 2


def test_signature_agreement_estimates_jaccard():
    words = [f"w{i}" for i in range(200)]
    a = " ".join(words[:150])
    b = " ".join(words[50:200])  # 1-shingles: |A & B| = 100, |A | B| = 200 -> Jaccard 0.5
    sig, has = signatures(pa.array([a, b, ""]), shingle_size=1, num_perm=512, seed=1)
    assert has.tolist() == [True, True, False]
    assert agreement(sig, np.array([[0, 1]]))[0] == pytest.approx(0.5, abs=0.07)
    assert agreement(sig, np.array([[0, 0]]))[0] == 1.0


def test_lsh_bands_fit_the_threshold():
    for threshold in (0.5, 0.7, 0.9):
        b, r = lsh_bands(threshold, 128)
        assert b * r <= 128
        # The S-curve's steepest point, (1/b)^(1/r), lies near the threshold.
        assert abs((1 / b) ** (1 / r) - threshold) < 0.1
    assert lsh_bands(0.7, 128) == (14, 9)


def test_components_merge_chains_and_label_by_smallest_member():
    pairs = np.array([[5, 3], [3, 1], [7, 8], [2, 2]])
    assert components(9, pairs).tolist() == [0, 1, 2, 1, 4, 1, 6, 7, 7]
    assert components(3, np.zeros((0, 2), np.int64)).tolist() == [0, 1, 2]


def test_representative_is_the_best_eligible_row_ties_to_the_earliest():
    label = np.array([0, 0, 0, 3, 3, 5])
    eligible = np.array([True, True, False, True, True, True])
    rank = np.array([0.2, 0.5, 0.9, 0.7, 0.7, np.nan])
    assert pick_representatives(label, eligible, rank).tolist() == [1, -1, -1, -1, 3, -1]


def test_near_duplicates_finds_planted_copies_among_random_texts():
    rng = np.random.default_rng(0)
    vocab = [f"v{i}" for i in range(5000)]
    texts = [" ".join(rng.choice(vocab, 40)) for _ in range(300)]
    copies = []
    for i in range(0, 300, 3):  # every third text gets a copy with its last word changed: Jaccard 37/39
        words = texts[i].split()
        words[-1] = "changed"
        copies.append(" ".join(words))
    found = near_duplicates(pa.array(texts + copies), threshold=0.7)
    for k, i in enumerate(range(0, 300, 3)):
        assert found.label[300 + k] == found.label[i]
    assert len(np.unique(found.label)) == 300  # nothing else merged


def test_a_conversation_is_compared_by_its_turns_of_the_fields_roles():
    from tasks.conversation import messages_array
    from tasks.dedup import example_texts

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "First q"},
            {"role": "assistant", "content": "First a"}, {"role": "user", "content": "Second q"},
            {"role": "assistant", "content": "Second a"}]
    messages = messages_array([None, chat, None])
    columns = [pa.array(["Say hi", "First q", "Add"]), pa.array(["ctx", "", None]), pa.array(["Hi.", "First a", "5"])]
    whole = example_texts(columns, ["instruction", "input", "output"], messages)
    # A one-exchange row keeps its fields; a conversation is every turn in order, in the first column.
    assert [c.to_pylist() for c in whole] == [["Say hi", "Be brief.\nFirst q\nFirst a\nSecond q\nSecond a", "Add"],
                                              ["ctx", "", None], ["Hi.", "", "5"]]
    requests = example_texts(columns[:2], ["instruction", "input"], messages)
    assert [c.to_pylist() for c in requests] == [["Say hi", "Be brief.\nFirst q\nSecond q", "Add"], ["ctx", "", None]]
    answers = example_texts(columns[2:], ["output"], messages)
    assert [c.to_pylist() for c in answers] == [["Hi.", "First a\nSecond a", "5"]]
    # Without conversations the columns go through untouched.
    assert example_texts(columns, ["instruction", "input", "output"], messages_array([None] * 3)) is columns
    assert example_texts(columns, ["instruction", "input", "output"], None) is columns
