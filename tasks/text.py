"""Text utilities shared by the stages: ROUGE-L tokens and similarity, word counts, list parsing.

ROUGE-L follows `rouge_score`'s default tokenizer (lowercase, every run of characters outside [a-z0-9]
is a separator, no stemming) and its F1, which for an LCS of length l between token lists of length m and
n is 2l / (m + n). LCS lengths come from rapidfuzz (C++). Each distinct token is mapped to one code point,
so a token list becomes a short string and rapidfuzz compares whole batches at once. F1 itself is
computed with rouge_score's own float operations, so decisions at a threshold match it exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_WORD = re.compile(r"\S+")


def rouge_tokens(text: str) -> list[str]:
    return [t for t in _NON_ALNUM.split(text.lower()) if t]


def word_count(text: str) -> int:
    return len(_WORD.findall(text))


def rouge_l_f1(a: str, b: str) -> float:
    ta, tb = rouge_tokens(a), rouge_tokens(b)
    return float(rouge_f1_from_lcs(LCSseq.similarity(ta, tb), len(ta), len(tb)))


class RougeIndex:
    """Instructions kept so far, for "is this new one too close to any of them?" queries."""

    def __init__(self, texts: Iterable[str] = ()):
        self._vocab: dict[str, str] = {}
        self._encoded: list[str] = []
        self.texts: list[str] = []
        for text in texts:
            self.add(text)

    def encode(self, text: str) -> str:
        # Code points from 0x100 up, skipping the surrogate block, one per distinct token.
        chars = []
        for token in rouge_tokens(text):
            ch = self._vocab.get(token)
            if ch is None:
                n = len(self._vocab) + 0x100
                ch = chr(n if n < 0xD800 else n + 0x800)
                self._vocab[token] = ch
            chars.append(ch)
        return "".join(chars)

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, text: str) -> None:
        self._encoded.append(self.encode(text))
        self.texts.append(text)

    def most_similar(self, text: str) -> tuple[float, int]:
        """Highest ROUGE-L F1 of `text` against the index, and the index of that entry (-1 if empty)."""
        scores = self.scores([text])[0]
        if scores.size == 0:
            return 0.0, -1
        best = int(np.argmax(scores))
        return float(scores[best]), best

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """ROUGE-L F1 of each of `texts` against every indexed entry: shape (len(texts), len(index))."""
        return f1_matrix([self.encode(t) for t in texts], self._encoded)


def f1_matrix(queries: Sequence[str], choices: Sequence[str]) -> np.ndarray:
    """ROUGE-L F1 between encoded token strings (see `RougeIndex.encode`): shape (queries, choices).
    LCS lengths come from one multi-threaded rapidfuzz call."""
    if not queries or not choices:
        return np.zeros((len(queries), len(choices)))
    lcs = process.cdist(queries, choices, scorer=LCSseq.similarity, dtype=np.int32, workers=-1)
    q_len = np.array([len(q) for q in queries])
    c_len = np.array([len(c) for c in choices])
    return rouge_f1_from_lcs(lcs, q_len[:, None], c_len[None, :])


_NUMBERED = re.compile(r"^\s*(\d{1,3})\s*[.)]\s*(.*)$")


def parse_numbered_list(text: str, first_number: int, opened: bool = True) -> tuple[list[str], bool]:
    """Items of a numbered list that continues at `first_number`.

    `opened`: the prompt already ends with the marker `first_number.`, so the text starts inside that item
    (a completion). Otherwise (a chat reply) the list starts at the first line numbered `first_number`, or
    `1` if the model started afresh, and any preamble before it is ignored.

    A line starting with the next number opens a new item; other non-blank lines continue the current one;
    a blank line after some text ends the list. Returns the items and whether the list ended there (if it
    did not, the last item may have been cut off by the token limit).
    """
    items: list[list[str]] = [[]]
    expected = first_number + 1 if opened else None
    started = opened
    for line in text.split("\n"):
        m = _NUMBERED.match(line)
        number = int(m.group(1)) if m else None
        if not started:
            if number is not None and number in (first_number, 1):
                items, expected, started = [[m.group(2).strip()]], number + 1, True
            continue
        if number is not None and number == expected:
            items.append([m.group(2).strip()])
            expected += 1
        elif line.strip():
            items[-1].append(line.strip())
        elif any(items[-1]):
            return [" ".join(p).strip() for p in items if " ".join(p).strip()], True
    return [" ".join(p).strip() for p in items if " ".join(p).strip()], False


def rouge_f1_from_lcs(lcs: np.ndarray, len_a: np.ndarray, len_b: np.ndarray) -> np.ndarray:
    """ROUGE-L F1 with rouge_score's own float operations (p = l/len_b, r = l/len_a, 2pr/(p+r)), so that
    decisions at a threshold are identical to it, not just close."""
    lcs = np.asarray(lcs, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = lcs / np.asarray(len_b, dtype=np.float64)
        r = lcs / np.asarray(len_a, dtype=np.float64)
        f = 2 * p * r / (p + r)
    empty = (np.asarray(len_a) == 0) | (np.asarray(len_b) == 0) | ~((p + r) > 0)
    return np.where(empty, 0.0, f)


def novelty_filter(texts: Sequence[str], threshold: float = 0.7, existing: Sequence[str] = (),
                   block: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy in-order novelty filter: keep a text iff its ROUGE-L F1 against every kept text (and every
    `existing` one) is at most `threshold`.

    Returns (kept mask, highest F1 against what was kept before it, index of that nearest text in
    `existing + texts`, -1 if none). Texts are compared a block at a time: the block against everything
    kept before it in one multi-threaded rapidfuzz call, then within the block in order.
    """
    index = RougeIndex()
    kept_strings = [index.encode(t) for t in existing]
    encoded = [index.encode(t) for t in texts]
    n_existing = len(kept_strings)
    kept_ids = list(range(n_existing))
    kept_mask = np.zeros(len(texts), dtype=bool)
    best = np.zeros(len(texts))
    nearest = np.full(len(texts), -1, dtype=np.int64)
    for start in range(0, len(encoded), block):
        queries = encoded[start:start + block]
        if kept_strings:
            f1 = f1_matrix(queries, kept_strings)
            arg = f1.argmax(axis=1)
            block_best = f1[np.arange(len(queries)), arg]
            block_nearest = np.array(kept_ids, dtype=np.int64)[arg]
        else:
            block_best = np.zeros(len(queries))
            block_nearest = np.full(len(queries), -1, dtype=np.int64)
        inner_f1 = f1_matrix(queries, queries)
        kept_here: list[int] = []
        for i in range(len(queries)):
            score, near = block_best[i], block_nearest[i]
            if kept_here:
                j = int(np.argmax(inner_f1[i, kept_here]))
                if inner_f1[i, kept_here[j]] > score:
                    score, near = inner_f1[i, kept_here[j]], n_existing + start + kept_here[j]
            best[start + i], nearest[start + i] = score, near
            if score <= threshold:
                kept_here.append(i)
        for i in kept_here:
            kept_mask[start + i] = True
            kept_strings.append(queries[i])
            kept_ids.append(n_existing + start + i)
    return kept_mask, best, nearest
