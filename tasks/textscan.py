"""Compiled scans over string columns: one pass over each row's UTF-8 bytes, no Python per row.

The quality heuristics and MinHash need per-row token work (content words, lines, shingles) over a million
rows in seconds. A pyarrow string array is two buffers, the bytes and the row offsets; these numba kernels
read them directly, rows in parallel over the cores (`prange`). Definitions, at the byte level:

- whitespace: the ASCII whitespace bytes (space, \\t, \\n, \\v, \\f, \\r), as `str.split()` sees them in ASCII;
- a content word: a maximal run of ASCII letters, lowercased, at least `min_len` long (the regex
  `[a-z]{4,}` over the lowercased text);
- a line: the text between newlines with surrounding whitespace stripped; empty lines do not count;
- a shingle word: a maximal run of ASCII letters and digits, lowercased, or of bytes >= 0x80 (any
  non-ASCII text), the tokens `rouge_tokens` yields for ASCII text.

Token identity is a 64-bit FNV-1a hash of the token's bytes; two different words sharing a hash is a
2**-64 event per pair, well below anything a score could show.

Compiled code is cached (`NUMBA_CACHE_DIR`, by default under the user's cache directory), so only the
first call after an install pays the few seconds of compilation.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                                              / "instructflow" / "numba"))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from numba import njit, prange  # noqa: E402

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)
MAX_WORDS = 256   # distinct content words per instruction taken into account (instructions are short)
MAX_LINES = 512   # lines per output checked for repetition


def string_buffers(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """The UTF-8 bytes and the n+1 row offsets of a string column; nulls read as empty strings."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise TypeError(f"expected a string column, got {column.type}")
    if column.null_count:
        column = column.fill_null("")
    offset_type = np.int64 if pa.types.is_large_string(column.type) else np.int32
    _, offsets_buf, data_buf = column.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=offset_type)[column.offset: column.offset + len(column) + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return data, offsets.astype(np.int64)


@njit(inline="always", cache=True)
def _is_space(b):
    return b == 32 or (9 <= b <= 13)


@njit(inline="always", cache=True)
def _letter(b):
    """The lowercase ASCII letter for `b`, or 0 if `b` is not a letter."""
    if 65 <= b <= 90:
        return b + 32
    if 97 <= b <= 122:
        return b
    return 0


@njit(inline="always", cache=True)
def _shingle_byte(b):
    """The lowercased byte if it belongs to a shingle word (letter, digit, non-ASCII), else 0."""
    if 65 <= b <= 90:
        return b + 32
    if 97 <= b <= 122 or 48 <= b <= 57 or b >= 128:
        return b
    return 0


@njit(parallel=True, cache=True)
def _heuristic_scan(idata, ioff, pdata, poff, odata, ooff, min_len):
    n = len(ioff) - 1
    words = np.zeros(n, np.int64)
    relevance = np.ones(n, np.float64)
    repeated = np.zeros(n, np.bool_)
    first = np.zeros(n, np.uint8)
    last = np.zeros(n, np.uint8)
    for r in prange(n):
        # 1. The instruction's distinct content words.
        wanted = np.empty(MAX_WORDS, np.uint64)
        k = 0
        h = FNV_OFFSET
        length = 0
        end = ioff[r + 1]
        for i in range(ioff[r], end + 1):
            c = _letter(idata[i]) if i < end else 0
            if c:
                h = (h ^ np.uint64(c)) * FNV_PRIME
                length += 1
                continue
            if length >= min_len and k < MAX_WORDS:
                seen = False
                for j in range(k):
                    if wanted[j] == h:
                        seen = True
                        break
                if not seen:
                    wanted[k] = h
                    k += 1
            h = FNV_OFFSET
            length = 0
        # 2. Which of them occur among the content words of the input, then the output.
        if k > 0:
            found = np.zeros(k, np.bool_)
            nfound = 0
            for part in range(2):
                data = pdata if part == 0 else odata
                start = poff[r] if part == 0 else ooff[r]
                end = poff[r + 1] if part == 0 else ooff[r + 1]
                h = FNV_OFFSET
                length = 0
                for i in range(start, end + 1):
                    if nfound == k:
                        break
                    c = _letter(data[i]) if i < end else 0
                    if c:
                        h = (h ^ np.uint64(c)) * FNV_PRIME
                        length += 1
                        continue
                    if length >= min_len:
                        for j in range(k):
                            if wanted[j] == h and not found[j]:
                                found[j] = True
                                nfound += 1
                    h = FNV_OFFSET
                    length = 0
            relevance[r] = nfound / k
        # 3. The output: words, first and last non-space byte, stripped non-empty lines.
        lines = np.empty(MAX_LINES, np.uint64)
        nlines = 0
        nwords = 0
        prev_space = True
        line_hash = FNV_OFFSET
        line_end_hash = FNV_OFFSET  # the hash up to the line's last non-space byte (right strip)
        in_line = False             # seen the line's first non-space byte (left strip)
        end = ooff[r + 1]
        for i in range(ooff[r], end + 1):
            b = odata[i] if i < end else 10  # a virtual newline closes the last line
            space = _is_space(b)
            if not space:
                if prev_space:
                    nwords += 1
                if first[r] == 0:
                    first[r] = b
                last[r] = b
            prev_space = space
            if b == 10:
                if in_line and nlines < MAX_LINES:
                    lines[nlines] = line_end_hash
                    nlines += 1
                line_hash = FNV_OFFSET
                line_end_hash = FNV_OFFSET
                in_line = False
            elif in_line or not space:
                in_line = True
                line_hash = (line_hash ^ np.uint64(b)) * FNV_PRIME
                if not space:
                    line_end_hash = line_hash
        words[r] = nwords
        if nlines >= 3:
            ordered = np.sort(lines[:nlines])
            run = 1
            for j in range(1, nlines):
                run = run + 1 if ordered[j] == ordered[j - 1] else 1
                if run >= 3:
                    repeated[r] = True
                    break
    return words, relevance, repeated, first, last


def heuristic_scan(instruction, input, output, min_word_len: int = 4) -> dict[str, np.ndarray]:
    """Per row: `output_words`, `relevance` (share of the instruction's content words found in input or
    output; 1 when it has none), `repeated_line` (some stripped line occurs 3+ times among 3+ lines), and the
    output's `first_byte` and `last_byte` outside whitespace (0 for a blank output)."""
    words, relevance, repeated, first, last = _heuristic_scan(
        *string_buffers(instruction), *string_buffers(input), *string_buffers(output), min_word_len)
    return {"output_words": words, "relevance": relevance, "repeated_line": repeated,
            "first_byte": first, "last_byte": last}


@njit(cache=True)
def _count_words(data, off):
    n = len(off) - 1
    counts = np.zeros(n, np.int64)
    for r in range(n):
        inside = False
        for i in range(off[r], off[r + 1]):
            if _shingle_byte(data[i]):
                if not inside:
                    counts[r] += 1
                inside = True
            else:
                inside = False
    return counts


@njit(parallel=True, cache=True)
def _shingle_hashes(data, off, k, starts, out):
    n = len(off) - 1
    for r in prange(n):
        # The word hashes of the row, in order, into the ring of the last k words.
        ring = np.zeros(k, np.uint64)
        count = 0
        pos = starts[r]
        h = FNV_OFFSET
        inside = False
        end = off[r + 1]
        for i in range(off[r], end + 1):
            c = _shingle_byte(data[i]) if i < end else 0
            if c:
                h = (h ^ np.uint64(c)) * FNV_PRIME
                inside = True
                continue
            if inside:
                ring[count % k] = h
                count += 1
                if count >= k:
                    s = FNV_OFFSET
                    for j in range(count - k, count):  # the last k words, in order
                        s = (s ^ ring[j % k]) * FNV_PRIME
                        s ^= s >> np.uint64(29)
                    out[pos] = s
                    pos += 1
            h = FNV_OFFSET
            inside = False
        if count < k and count > 0:  # a row shorter than one shingle is one shingle of all its words
            s = FNV_OFFSET
            for j in range(count):
                s = (s ^ ring[j]) * FNV_PRIME
                s ^= s >> np.uint64(29)
            out[pos] = s


def shingle_hashes(text, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The hashes of each row's word k-shingles, flattened, and the n+1 offsets of each row's run.

    A row with fewer than k words (but some) gives one shingle of all its words; a row without words none.
    """
    data, off = string_buffers(text)
    words = _count_words(data, off)
    counts = np.where(words >= k, words - k + 1, np.minimum(words, 1))
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    out = np.empty(int(offsets[-1]), np.uint64)
    _shingle_hashes(data, off, k, offsets[:-1], out)
    return out, offsets
