"""Near-duplicate detection with MinHash and locality-sensitive hashing (Broder 1997; Leskovec et al., ch. 3).

Each row's text is a set of word k-shingles (tasks/textscan.py). Its MinHash signature holds, for each of
`num_perm` hash functions h_p(x) = (a_p * x + b_p) >> 32 over 64-bit shingle hashes (a_p odd), the minimum
over the row's shingles; two rows agree on one entry with probability equal to their Jaccard similarity.
The signature is cut into b bands of r rows; rows equal on a whole band are candidates. (b, r) is chosen
for the Jaccard threshold t by minimising the equal-weighted areas of false positives, the integral over
[0, t] of 1 - (1 - s^r)^b, and false negatives, over [t, 1] of (1 - s^r)^b. A candidate pair is linked
only if its signatures agree on at least t of all entries (the estimated Jaccard); linked rows form
clusters (connected components).

A conversation (a row with `messages`, tasks/conversation.py) is compared whole (`example_texts`): its text
is its turns in order, those of the roles the compared fields name (`instruction`: the system and user
turns, `output`: the assistant's, `input`: none, a conversation's input being part of its user turn), so by
default every turn. Two conversations that open alike and then differ are as similar as all their words
say, and a one-exchange row's text is a conversation's first exchange, so a conversation and its own first
exchange alone are measured like any pair: they are near-duplicates only when the later turns add so few
words that the whole stays above the threshold (then the better-ranked of the two stays; either one
teaches that exchange).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.textscan import shingle_hashes  # also sets numba's cache directory
from numba import njit, prange  # noqa: I001  (after textscan, which configures numba's cache)

_MAX = np.uint32(0xFFFFFFFF)
# The turns of a conversation that stand for each field dedup may compare.
FIELD_ROLES = {"instruction": ("system", "user"), "input": (), "output": ("assistant",)}


@lru_cache(maxsize=32)
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band), b * r <= num_perm, minimising false positive + false negative area."""
    s = np.linspace(0.0, 1.0, 401)
    below, above = s <= threshold, s >= threshold
    best, best_err = (1, num_perm), np.inf
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1.0 - (1.0 - s ** r) ** b  # probability of becoming a candidate at similarity s
            err = np.trapezoid(p[below], s[below]) + np.trapezoid(1.0 - p[above], s[above])
            if err < best_err:
                best, best_err = (b, r), err
    return best


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd multipliers
    b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
    return a, b


@njit(parallel=True, cache=True)
def _signatures(hashes, offsets, a, b):
    n = len(offsets) - 1
    num_perm = len(a)
    sig = np.full((n, num_perm), 0xFFFFFFFF, np.uint32)
    for r in prange(n):
        for i in range(offsets[r], offsets[r + 1]):
            x = hashes[i]
            for p in range(num_perm):
                v = np.uint32((a[p] * x + b[p]) >> np.uint64(32))
                if v < sig[r, p]:
                    sig[r, p] = v
    return sig


Text = pa.Array | pa.ChunkedArray | Sequence[pa.Array | pa.ChunkedArray]
SIGNATURE_ROWS = 1 << 16  # rows shingled at a time: the shingle hashes (8 bytes a word) are held for these only


def signatures(text: Text, shingle_size: int, num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """MinHash signatures (rows x num_perm, uint32) and whether each row had any shingle at all.

    `text` is a string column, or several, which are joined per row with a newline. Rows are shingled
    `SIGNATURE_ROWS` at a time (a row's shingles depend on its text alone), so neither the joined text nor
    the shingle hashes of the whole column are ever held."""
    columns = list(text) if isinstance(text, (list, tuple)) else [text]
    n = len(columns[0])
    a, b = permutations(num_perm, seed)
    sig = np.empty((n, num_perm), np.uint32)
    has_shingles = np.zeros(n, dtype=bool)
    for start in range(0, n, SIGNATURE_ROWS):
        part = [column.slice(start, SIGNATURE_ROWS) for column in columns]
        chunk = part[0] if len(part) == 1 else pc.binary_join_element_wise(*part, pa.scalar("\n", pa.large_string()))
        hashes, offsets = shingle_hashes(chunk, shingle_size)
        sig[start:start + len(chunk)] = _signatures(hashes, offsets, a, b)
        has_shingles[start:start + len(chunk)] = np.diff(offsets) > 0
    return sig, has_shingles


def example_texts(columns: list[pa.Array | pa.ChunkedArray], fields: Sequence[str],
                  messages: pa.Array | None) -> list[pa.Array | pa.ChunkedArray]:
    """The text `signatures` compares per row: the `fields` columns, where a conversation row (`messages`
    set) has instead its turns of the fields' roles (FIELD_ROLES), in order, one per line, in the first
    column (the others empty for it). Column-wise: the turns are flattened, filtered and joined per row."""
    if messages is None or messages.null_count == len(messages):
        return columns
    roles = [role for field in fields for role in FIELD_ROLES[field]]
    counts = np.asarray(pc.list_value_length(messages).fill_null(0), dtype=np.int64)
    flat = pc.list_flatten(messages)  # null rows give no turns, as counts says
    chosen = np.asarray(pc.is_in(flat.field("role"), value_set=pa.array(roles, flat.field("role").type)))
    per_row = np.bincount(np.repeat(np.arange(len(counts)), counts)[chosen], minlength=len(counts))
    offsets = pa.array(np.concatenate([[0], np.cumsum(per_row)]), pa.int64())
    turns = flat.field("content").cast(pa.large_string()).fill_null("").filter(pa.array(chosen))
    text = pc.binary_join(pa.LargeListArray.from_arrays(offsets, turns), pa.scalar("\n", pa.large_string()))
    is_conversation = messages.is_valid()
    empty = pa.scalar("", pa.large_string())
    out = []
    for k, column in enumerate(columns):
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        out.append(pc.if_else(is_conversation, text if k == 0 else empty, column.cast(pa.large_string())))
    return out


def _band_keys(band: np.ndarray) -> np.ndarray:
    """One 64-bit key per row for a band's r signature entries."""
    key = np.full(band.shape[0], 0xCBF29CE484222325, dtype=np.uint64)
    for col in band.T:
        key = (key ^ col.astype(np.uint64)) * np.uint64(0x100000001B3)
        key ^= key >> np.uint64(31)
    return key


def candidate_pairs(sig: np.ndarray, rows: np.ndarray, bands: int, per_band: int) -> np.ndarray:
    """(i, j) row pairs sharing a band: each row is paired with the first row of its bucket."""
    pairs = []
    for band in range(bands):
        keys = _band_keys(sig[rows, band * per_band:(band + 1) * per_band])
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        new_group = np.ones(len(order), dtype=bool)
        new_group[1:] = sorted_keys[1:] != sorted_keys[:-1]
        leader = order[np.maximum.accumulate(np.where(new_group, np.arange(len(order)), 0))]
        member = ~new_group
        pairs.append(np.stack([rows[leader[member]], rows[order[member]]], axis=1))
    if not pairs:
        return np.zeros((0, 2), np.int64)
    pairs = np.concatenate(pairs)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def agreement(sig: np.ndarray, pairs: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """The share of signature entries two rows agree on, per pair: their estimated Jaccard similarity."""
    out = np.empty(len(pairs), np.float64)
    for start in range(0, len(pairs), chunk):
        p = pairs[start:start + chunk]
        out[start:start + chunk] = (sig[p[:, 0]] == sig[p[:, 1]]).mean(axis=1)
    return out


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of the graph on n nodes: each node's label is the smallest node of its cluster."""
    parent = np.arange(n)
    if len(pairs) == 0:
        return parent
    u, v = pairs[:, 0], pairs[:, 1]
    while True:
        pu, pv = parent[u], parent[v]  # roots: parent is fully compressed at this point
        lo, hi = np.minimum(pu, pv), np.maximum(pu, pv)
        linked = lo != hi
        if not linked.any():
            return parent
        np.minimum.at(parent, hi[linked], lo[linked])  # hook each larger root under a smaller one
        while True:  # pointer jumping until every node points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand


@dataclass(frozen=True)
class Clusters:
    label: np.ndarray       # per row: the smallest row index of its cluster (itself when alone)
    similarity: np.ndarray  # per linked pair, its estimated Jaccard
    pairs: np.ndarray       # linked pairs (i, j)
    bands: int
    per_band: int
    candidates: int         # candidate pairs before verification


def near_duplicates(text: Text, threshold: float, shingle_size: int = 3,
                    num_perm: int = 128, seed: int = 0, groups: np.ndarray | None = None) -> Clusters:
    """Cluster rows whose shingle sets have an (estimated) Jaccard similarity of at least `threshold`.
    `text`: a string column, or several joined per row with a newline (see `signatures`).

    Rows with the same `groups` code are never linked directly (instances of one task, say).
    """
    sig, has_shingles = signatures(text, shingle_size, num_perm, seed)
    bands, per_band = lsh_bands(threshold, num_perm)
    rows = np.flatnonzero(has_shingles)  # a row without words is nobody's duplicate
    pairs = candidate_pairs(sig, rows, bands, per_band)
    if groups is not None and len(pairs):
        pairs = pairs[groups[pairs[:, 0]] != groups[pairs[:, 1]]]
    sim = agreement(sig, pairs)
    linked = sim >= threshold
    label = components(len(sig), pairs[linked])
    return Clusters(label=label, similarity=sim[linked], pairs=pairs[linked], bands=bands, per_band=per_band,
                    candidates=len(pairs))


def pick_representatives(label: np.ndarray, eligible: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Per row, the row it duplicates, or -1: in each cluster the eligible row with the highest `rank`
    (ties: the earliest row) is kept, and every other eligible row of the cluster points at it."""
    n = len(label)
    duplicate_of = np.full(n, -1, dtype=np.int64)
    idx = np.flatnonzero(eligible)
    if len(idx) == 0:
        return duplicate_of
    score = np.nan_to_num(rank[idx].astype(float), nan=-np.inf)  # an unscored row ranks last
    order = idx[np.lexsort((idx, -score, label[idx]))]  # by cluster, best first, then earliest
    first = np.ones(len(order), dtype=bool)
    first[1:] = label[order][1:] != label[order][:-1]
    rep = order[np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))]
    duplicate_of[order[~first]] = rep[~first]
    return duplicate_of
