"""Text utilities shared by the stages: ROUGE-L tokens and similarity, word counts, list parsing.

ROUGE-L follows `rouge_score`'s default tokenizer (lowercase, every run of characters outside [a-z0-9]
is a separator, no stemming) and its F1, which for an LCS of length l between token lists of length m and
n is 2l / (m + n). LCS lengths come from rapidfuzz (C++). Each distinct token is mapped to one code point,
so a token list becomes a short string and rapidfuzz compares whole batches at once.
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
    if not ta or not tb:
        return 0.0
    return 2.0 * LCSseq.similarity(ta, tb) / (len(ta) + len(tb))


class RougeIndex:
    """Instructions kept so far, for "is this new one too close to any of them?" queries."""

    def __init__(self, texts: Iterable[str] = ()):
        self._vocab: dict[str, str] = {}
        self._encoded: list[str] = []
        self._lengths: list[int] = []
        self.texts: list[str] = []
        for text in texts:
            self.add(text)

    def _encode(self, text: str) -> str:
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
        enc = self._encode(text)
        self._encoded.append(enc)
        self._lengths.append(len(enc))
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
        queries = [self._encode(t) for t in texts]
        if not self._encoded or not queries:
            return np.zeros((len(queries), len(self._encoded)))
        lcs = process.cdist(queries, self._encoded, scorer=LCSseq.similarity, dtype=np.int32, workers=-1)
        total = np.add.outer(np.array([len(q) for q in queries]), np.array(self._lengths))
        with np.errstate(divide="ignore", invalid="ignore"):
            f1 = np.where(total > 0, 2.0 * lcs / np.maximum(total, 1), 0.0)
        return f1


_NUMBERED = re.compile(r"^\s*(\d{1,3})\s*[.)]\s*(.*)$")


def parse_numbered_list(text: str, first_number: int) -> tuple[list[str], bool]:
    """Items of a numbered list that continues at `first_number` (its marker already ends the prompt).

    A line starting with the next number opens a new item; other non-blank lines continue the current one;
    a blank line after some text ends the list. Returns the items and whether the list ended there (if it
    did not, the last item may have been cut off by the token limit).
    """
    items: list[list[str]] = [[]]
    expected = first_number + 1
    for line in text.split("\n"):
        m = _NUMBERED.match(line)
        if m and int(m.group(1)) == expected:
            items.append([m.group(2).strip()])
            expected += 1
        elif line.strip():
            items[-1].append(line.strip())
        elif any(items[-1]):
            return [" ".join(p).strip() for p in items if " ".join(p).strip()], True
    return [" ".join(p).strip() for p in items if " ".join(p).strip()], False
