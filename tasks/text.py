"""Text utilities shared by the stages: ROUGE-L tokens and similarity, word counts, list parsing.

ROUGE-L follows `rouge_score`'s default tokenizer (lowercase, every run of characters outside [a-z0-9]
is a separator, no stemming) and its F1, which for an LCS of length l between token lists of length m and
n is 2l / (m + n). F1 itself is computed with rouge_score's own float operations, so decisions at a
threshold match it exactly. LCS lengths come from rapidfuzz (C++): `RougeIndex.most_similar` on lists of
token ids, `RougeIndex.scores` on short strings where the tokens of the queries get the code points 1, 2, ...
and every other token one filler code no query holds, which leaves every LCS unchanged. Neither needs a
vocabulary-wide alphabet, so there is no limit on the number of distinct tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_WORD = re.compile(r"\S+")
# Distinct F1 values 2l/(m+n) differ by at least 1/(m+n)^2, far more than this for any text below a million
# tokens, while the float rounding of one F1 is ~1e-16: a bound this far below the best F1 cannot reach it.
_EPS = 1e-12
_MAX_CODE = 0x10FFFF - 0x800  # code points available once the surrogate block is skipped


def rouge_tokens(text: str) -> list[str]:
    return [t for t in _NON_ALNUM.split(text.lower()) if t]


def word_count(text: str) -> int:
    return len(_WORD.findall(text))


def rouge_l_f1(a: str, b: str) -> float:
    ta, tb = rouge_tokens(a), rouge_tokens(b)
    return float(rouge_f1_from_lcs(LCSseq.similarity(ta, tb), len(ta), len(tb)))


class RougeIndex:
    """Instructions kept so far, for "which of them is closest to this new one?" queries (ROUGE-L F1).

    Entries are stored as token ids end to end (numpy), and as one list of ids per entry for the exact LCS,
    with an inverted index: for each token, the entries holding it, in order; for a token an entry holds
    k > 1 times, also a list per occurrence number k, so that counting an entry in the query's lists gives
    the multiset overlap of their tokens. Token ids are
    int32: no limit on the number of distinct tokens that matters.

    `most_similar` is exact: the F1 `scores` gives, and the lowest index among ties, as `np.argmax` would.
    An entry's LCS with a query of m tokens is at most their overlap, so its F1 is at most
    2 * overlap / (m + n). The query's lists are visited rarest first, in two rounds: the entries of the
    rarest (FIRST_ROUND postings) are counted (numpy sort), the few with the most in common are scored
    exactly to get a best F1, then the entries of the lists that best still needs (below) are counted the
    same way, and kept only while their bound can still reach the best: each list not visited may add one
    token (binary search in it decides). For the most frequent lists (stop words), "which of these
    entries does it hold?" reads one bool per entry (`_marks`) instead of a binary search per entry. The
    survivors get an exact LCS (rapidfuzz on the lists of token ids) in decreasing order of their bound, in
    batches, until no bound reaches the best. An entry in none of the visited lists shares at most
    r tokens (r lists not visited), F1 <= 2r / (m + r): the most frequent lists (stop words) are visited only
    while that can still reach the best. No Python loop runs over postings, and the only one over entries
    is the exact LCS of the few verified (~50 a check at a 60K pool); what numpy touches
    is the postings of the query's rarer lists, which for a long query with a low best F1 can still be a
    good share of the pool (see benchmarks/novelty_filter.py).
    """

    FIRST_ROUND = 8192  # postings counted (rarest lists first) for a first best F1; the next round: the rest
    SEED = 32  # entries with the most in common scored first, for a best F1 to prune the others with
    BATCH = 32  # entries given an exact LCS at first; doubles while bounds keep reaching the best
    MARKED = 32  # a list holding at least 1/MARKED of the entries (and MARKED_MIN) also gets a mark per entry
    MARKED_MIN = 1024

    def __init__(self, texts: Iterable[str] = ()):
        self.texts: list[str] = []
        self._token_ids: dict[str, int] = {}  # token -> id; also the id of its list of entries
        self._repeat_ids: dict[tuple[int, int], int] = {}  # (token id, k >= 2) -> list of entries holding it k times
        self._lists: list[np.ndarray] = []  # list id -> entries, ascending; capacity grows by doubling
        self._list_sizes = np.zeros(1 << 10, dtype=np.int64)
        self._tokens = np.zeros(1 << 12, dtype=np.int32)  # every entry's token ids, end to end
        self._starts = np.zeros(1 << 10, dtype=np.int64)  # entry e: _tokens[_starts[e]:_starts[e] + _lengths[e]]
        self._lengths = np.zeros(1 << 10, dtype=np.int64)
        self._n_tokens = 0
        self._token_lists: list[list[int]] = []  # entry -> its token ids, for the exact LCS
        # list id -> one bool per entry, True for those in the list: "is it in this list?" for many entries is
        # then one gather, not a binary search each. Only for frequent lists: the total of all list sizes is
        # the number of tokens, so at most MARKED * (tokens per entry) lists have marks.
        self._marks: dict[int, np.ndarray] = {}
        for text in texts:
            self.add(text)

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, text: str) -> None:
        entry = len(self.texts)
        ids: list[int] = []
        held: dict[int, int] = {}
        for token in rouge_tokens(text):
            t = self._token_ids.get(token)
            if t is None:
                t = self._token_ids[token] = self._new_list()
            k = held.get(t, 0) + 1
            held[t] = k
            if k == 1:
                self._append(t, entry)
            else:
                r = self._repeat_ids.get((t, k))
                if r is None:
                    r = self._repeat_ids[(t, k)] = self._new_list()
                self._append(r, entry)
            ids.append(t)
        if entry == len(self._starts):
            self._starts, self._lengths = _grown(self._starts, entry + 1), _grown(self._lengths, entry + 1)
        end = self._n_tokens + len(ids)
        if end > len(self._tokens):
            self._tokens = _grown(self._tokens, end)
        self._tokens[self._n_tokens:end] = ids
        self._starts[entry], self._lengths[entry] = self._n_tokens, len(ids)
        self._n_tokens = end
        self._token_lists.append(ids)
        self.texts.append(text)

    def _new_list(self) -> int:
        i = len(self._lists)
        self._lists.append(np.empty(1, dtype=np.int32))
        if i == len(self._list_sizes):
            self._list_sizes = _grown(self._list_sizes, i + 1)
        return i

    def _append(self, list_id: int, entry: int) -> None:
        entries, size = self._lists[list_id], int(self._list_sizes[list_id])
        if size == len(entries):
            entries = self._lists[list_id] = _grown(entries, size + 1)
        entries[size] = entry
        self._list_sizes[list_id] = size + 1
        marks = self._marks.get(list_id)
        if marks is not None:
            if entry >= len(marks):
                marks = self._marks[list_id] = _grown(marks, entry + 1)
            marks[entry] = True
        elif size + 1 >= self.MARKED_MIN and self.MARKED * (size + 1) >= entry + 1:
            marks = self._marks[list_id] = np.zeros(2 * (entry + 1), dtype=bool)
            marks[entries[:size + 1]] = True

    def _marks_of(self, list_id: int) -> np.ndarray | None:
        """The list's marks, one for every entry in the index, or None if it has none."""
        marks = self._marks.get(list_id)
        if marks is not None and len(marks) < len(self.texts):
            marks = self._marks[list_id] = _grown(marks, len(self.texts))
        return marks

    def _entries(self, list_id: int) -> np.ndarray:
        return self._lists[list_id][:self._list_sizes[list_id]]

    def most_similar(self, text: str) -> tuple[float, int]:
        """Highest ROUGE-L F1 of `text` against the index, and the index of that entry: the lowest one among
        ties, 0 when no entry shares a token with `text` (every F1 is 0), -1 if the index is empty."""
        if not self.texts:
            return 0.0, -1
        search = _Search(self, rouge_tokens(text))
        if not search.lists:
            return 0.0, 0
        lists, m = search.lists, len(search.tokens)
        sizes = np.cumsum([len(p) for p in lists])
        visited, budget = 0, self.FIRST_ROUND  # the first round finds a best F1; the next, what it leaves
        while True:
            # An entry in none of the visited lists shares at most r = (lists left) tokens with the query:
            # F1 <= 2r / (m + r). Leave out the longest lists while that cannot reach the best F1.
            r = np.arange(len(lists) - visited + 1)
            needed = min(len(lists), len(lists) - int((2 * r / (m + r) < search.best - _EPS).sum()) + 1)
            if visited >= needed:
                break
            done = sizes[visited - 1] if visited else 0
            target = min(needed, max(visited + 1, int(np.searchsorted(sizes, done + budget, side="right"))))
            search.score(visited, target)
            visited, budget = target, int(sizes[-1])
        return float(search.best), int(search.nearest)

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """ROUGE-L F1 of each of `texts` against every indexed entry: shape (len(texts), len(index))."""
        out = np.zeros((len(texts), len(self)))
        token_lists = [rouge_tokens(t) for t in texts]
        start = 0
        while start < len(texts) and len(self):
            # The distinct tokens of a chunk of queries get codes 1, 2, ...; every other token 0, which no
            # query holds, so every LCS is unchanged.
            codes: dict[str, int] = {}
            stop = start
            while stop < len(texts) and (stop == start or len(codes) + len(token_lists[stop]) < _MAX_CODE):
                for token in token_lists[stop]:
                    codes.setdefault(token, len(codes) + 1)
                stop += 1
            known = {self._token_ids[t]: c for t, c in codes.items() if t in self._token_ids}
            pool_codes = _local_codes(self._tokens[:self._n_tokens], np.array(sorted(known), dtype=np.int32),
                                      np.array([known[i] for i in sorted(known)], dtype=np.int64))
            as_text = len(codes) < _MAX_CODE
            choices = _sequences(pool_codes, self._starts[:len(self)], self._lengths[:len(self)], as_text)
            queries = [_sequences(np.array([codes[t] for t in tokens], dtype=np.int64), np.array([0]),
                                  np.array([len(tokens)]), as_text)[0] for tokens in token_lists[start:stop]]
            out[start:stop] = f1_matrix(queries, choices)
            start = stop
        return out


class _Search:
    """One `most_similar` query: its token ids, its lists of entries (rarest first) and their marks where the
    index keeps them, the best entry so far."""

    def __init__(self, index: RougeIndex, tokens: list[str]):
        self.index, self.tokens = index, tokens
        ids: list[int] = []  # one list per (token, occurrence number) some entry also holds
        held: dict[str, int] = {}
        for token in tokens:
            k = held.get(token, 0) + 1
            held[token] = k
            t = index._token_ids.get(token)
            list_id = t if k == 1 or t is None else index._repeat_ids.get((t, k))
            if list_id is not None:
                ids.append(list_id)
        ids.sort(key=lambda i: index._list_sizes[i])
        self.lists = [index._entries(i) for i in ids]  # rarest first
        self.marks = [index._marks_of(i) for i in ids]
        # The query as token ids, -1 for a token no entry holds (it matches nothing, as it should).
        self.query = [index._token_ids.get(t, -1) for t in tokens]
        self.best, self.nearest = -1.0, 0

    def score(self, start: int, stop: int) -> None:
        """Exact F1, in decreasing order of their bound, for the entries of lists[start:stop] that could
        reach the best so far; updates the best and its entry.

        An entry met in an earlier round comes again here with a count that leaves those lists out: it was
        already scored, or its bound was below the best, which only grew since, so that loses nothing.
        (Leaving out, list by list, the entries too long to reach the best from that list on saved fewer
        postings than the filter cost to run.)
        """
        index, lists, m, L = self.index, self.lists, len(self.tokens), len(self.lists)
        entries, overlap = _count(lists[start:stop])
        n = index._lengths[entries]
        if self.best < 0 and len(entries) > index.SEED:
            # No best yet to prune with: take one from the entries most in common so far.
            self._verify(entries[np.argpartition(overlap / (m + n), -index.SEED)[-index.SEED:]])
        # F1 <= 2 * overlap / (m + n) reaches the best only with (best (m + n) / 2) tokens in common (the float
        # division is within an ulp of the exact value, far inside _EPS). Lists start..stop-1 are counted for
        # an entry, each list from stop on may add one token more; `room`: how many more of those it may miss.
        # An entry whose room is below 0 cannot reach the best.
        room = overlap + (L - stop) - (self.best - _EPS) / 2 * (m + n)
        for j in range(stop, L):
            keep = room >= 0
            if 3 * np.count_nonzero(keep) < 2 * len(keep):
                entries, overlap, room = entries[keep], overlap[keep], room[keep]
            if not len(entries):
                break
            if self.marks[j] is not None:
                hit = self.marks[j][entries]
            else:
                p = lists[j]  # ascending
                hit = p[np.minimum(np.searchsorted(p, entries), len(p) - 1)] == entries
            overlap += hit
            room += hit - 1.0
        keep = room >= 0
        entries, overlap = entries[keep], overlap[keep]
        n = index._lengths[entries]
        bound = 2 * overlap / (m + n)
        order = np.argsort(-bound, kind="stable")
        entries, bound = entries[order], bound[order]
        start, batch = 0, index.BATCH
        while start < len(entries) and bound[start] >= self.best - _EPS:
            stop = start + int(np.searchsorted(-bound[start:start + batch], -(self.best - _EPS), side="right"))
            self._verify(entries[start:stop])
            start, batch = stop, 2 * batch

    def _verify(self, entries: np.ndarray) -> None:
        """Exact F1 of `entries`; the best of them replaces the best so far if higher, or equal and earlier.

        One rapidfuzz LCS per entry on the token id lists (a few hundred ns each for instruction-length
        texts: less than building a batch for one `cdist` call), and F1 in Python floats with
        `rouge_f1_from_lcs`'s operations in its order: IEEE doubles, the very same values."""
        lcs, token_lists, query, m = LCSseq.similarity, self.index._token_lists, self.query, len(self.query)
        best, nearest = self.best, self.nearest
        for e in entries.tolist():
            tokens = token_lists[e]
            common = lcs(query, tokens)
            if common:
                p, r = common / len(tokens), common / m
                f1 = 2 * p * r / (p + r)
            else:
                f1 = 0.0
            if f1 > best or (f1 == best and e < nearest):
                best, nearest = f1, e
        self.best, self.nearest = best, nearest


def _count(lists: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The entries in any of `lists` (ascending) and in how many of them each is."""
    if len(lists) == 1:
        return lists[0], np.ones(len(lists[0]), dtype=np.int64)
    joined = np.sort(np.concatenate(lists))
    if not len(joined):
        return joined, np.zeros(0, dtype=np.int64)
    first = np.flatnonzero(np.concatenate(([True], joined[1:] != joined[:-1])))
    return joined[first], np.diff(np.append(first, len(joined)))


def _local_codes(tokens: np.ndarray, ids: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """`codes[i]` for each token equal to `ids[i]` (ids ascending), 0 for every other token."""
    if len(ids) == 0:
        return np.zeros(len(tokens), dtype=np.int64)
    pos = np.minimum(np.searchsorted(ids, tokens), len(ids) - 1)
    return np.where(ids[pos] == tokens, codes[pos], 0)


def _sequences(codes: np.ndarray, starts: np.ndarray, lengths: np.ndarray, as_text: bool) -> list:
    """codes[start:start + length] for each start, as strings of those code points (the surrogate block
    skipped), or as lists of ints when there are too many codes for Unicode."""
    if as_text:
        points = np.where(codes < 0xD800, codes, codes + 0x800).astype("<u4")
        text = points.tobytes().decode("utf-32-le")
    else:
        text = codes.tolist()
    return [text[a:a + b] for a, b in zip(starts.tolist(), lengths.tolist())]


def _grown(a: np.ndarray, needed: int) -> np.ndarray:
    out = np.zeros(max(needed, 2 * len(a)), dtype=a.dtype)
    out[:len(a)] = a
    return out


def f1_matrix(queries: Sequence[str], choices: Sequence[str]) -> np.ndarray:
    """ROUGE-L F1 between token sequences coded so that equal tokens are equal characters (or ints), as
    `RougeIndex.scores` codes them: shape (queries, choices). LCS lengths come from one multi-threaded
    rapidfuzz call."""
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




def novelty_filter(texts: Sequence[str], threshold: float = 0.7,
                   existing: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy in-order novelty filter: keep a text iff its ROUGE-L F1 against every kept text (and every
    `existing` one) is at most `threshold`.

    Returns (kept mask, highest F1 against what was kept before it, index of that nearest text in
    `existing + texts`: the lowest among ties, -1 if nothing was there yet), as `RougeIndex.most_similar`.
    """
    index = RougeIndex(existing)
    position = list(range(len(existing)))  # index entry -> position in existing + texts
    kept = np.zeros(len(texts), dtype=bool)
    best = np.zeros(len(texts))
    nearest = np.full(len(texts), -1, dtype=np.int64)
    for i, text in enumerate(texts):
        score, entry = index.most_similar(text)
        best[i], nearest[i] = score, position[entry] if entry >= 0 else -1
        if score <= threshold:
            kept[i] = True
            index.add(text)
            position.append(len(existing) + i)
    return kept, best, nearest
