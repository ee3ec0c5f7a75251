"""Training examples tokenized once, as token arrays on disk that every epoch, process and resume reads.

An example is the Alpaca prompt of a row followed by its output and the end-of-sequence token; labels are
-100 on the prompt, so only response tokens carry loss (see tasks/llm/losses.py: `fit_response` decides what
an over-long example keeps). `encode` does that for a batch of rows with one call of the fast tokenizer
per part, into numpy arrays; `prepare` runs it over a whole table, a batch of rows at a time, and writes

    <root>/<key>/tokens.bin    int32, every kept example's tokens back to back (prompt, then response)
                 offsets.npy   int64, example i is tokens[offsets[i]:offsets[i + 1]]
                 prompt.npy    int32, the prompt's length of each example (its label -100 positions)
                 rows.npy      int64, each example's row in the table it came from
                 meta.json     tokens, examples, truncation counts, seconds
                 _SUCCESS      written last

`key` hashes the tokenizer's files, the template, `max_length`, `truncation`, the rows' text and this
module's code, so a second epoch, a resumed run, each torchrun process and a run with other training
settings read the same arrays (memory-mapped: the pages are shared, nothing is rebuilt), and a changed input
gives a new directory. 4 bytes a token instead of a Python list's ~44.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from tasks.artifacts import KEY_LENGTH, atomic_write_json, canonical_json, sha256_file
from tasks.llm.losses import IGNORE, TRUNCATED, Example, fit_response
from tasks.prompts import alpaca_prompt

TEMPLATE = "alpaca"
BATCH_ROWS = 4096  # rows per tokenizer call: large enough for the fast tokenizer's threads, small in memory
# Files of a model directory that make its tokenizer what it is.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                    "chat_template.json")


@dataclass
class Encoded:
    """A batch of rows as examples: `tokens` back to back, `lengths` and `prompt` per kept example, `kept`
    the rows that gave one, and the count per truncation reason."""

    tokens: np.ndarray
    lengths: np.ndarray
    prompt: np.ndarray
    kept: np.ndarray
    reasons: dict[str, int]


def token_ids(tokenizer, texts: list[str], special_tokens: bool) -> list[list[int]]:
    """What `tokenizer(texts)["input_ids"]` gives, through the Rust tokenizer's batch call that skips
    character offsets where there is one (a quarter faster: the offsets are never used here). Only when that
    tokenizer pads and truncates nothing: transformers leaves the padding and truncation of its last call
    set on it (a generation backend's tokenizer pads), and those would change the ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is not None and hasattr(backend, "encode_batch_fast") and backend.padding is None
            and backend.truncation is None):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=special_tokens)]
    return tokenizer(texts, add_special_tokens=special_tokens, padding=False, truncation=False)["input_ids"]


def encode(tokenizer, instructions: list[str], inputs: list[str], outputs: list[str], max_length: int,
           truncation: str = "response") -> Encoded:
    """The examples of a batch of rows, as `finetune` trains on them (see the module's docstring)."""
    prompts = token_ids(tokenizer, [alpaca_prompt(i, x or "") for i, x in zip(instructions, inputs)], True)
    responses = token_ids(tokenizer, [o.strip() for o in outputs], False)
    eos = tokenizer.eos_token_id
    pieces: list[list[int]] = []
    lengths, prompt_lengths, kept = [], [], []
    reasons: dict[str, int] = {}
    for row, (p, r) in enumerate(zip(prompts, responses)):
        keep, why = fit_response(len(p), len(r) + 1, max_length, truncation)
        if why is not None:
            reasons[why] = reasons.get(why, 0) + 1
            if why != TRUNCATED:
                continue
        response = (r + [eos])[:keep]
        pieces += (p, response)
        lengths.append(len(p) + len(response))
        prompt_lengths.append(len(p))
        kept.append(row)
    tokens = np.fromiter((t for piece in pieces for t in piece), dtype=np.int32, count=sum(lengths))
    return Encoded(tokens, np.asarray(lengths, dtype=np.int64), np.asarray(prompt_lengths, dtype=np.int32),
                   np.asarray(kept, dtype=np.int64), reasons)


def _texts(batch: pa.RecordBatch | pd.DataFrame, name: str) -> list[str]:
    column = batch[name] if isinstance(batch, pd.DataFrame) else batch.column(name).to_pandas()
    return column.fillna("").astype(str).tolist()


class Tokenized:
    """Examples read from token arrays (memory-mapped when opened from disk); `examples[i]` is an Example."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, prompt: np.ndarray, rows: np.ndarray,
                 meta: dict[str, Any]):
        self.tokens, self.offsets, self.prompt, self.rows, self.meta = tokens, offsets, prompt, rows, meta
        self.lengths = np.diff(offsets)
        self.trainable = self.lengths - prompt  # response tokens: the ones with a label

    @classmethod
    def from_encoded(cls, enc: Encoded, meta: dict[str, Any] | None = None) -> "Tokenized":
        offsets = np.concatenate([[0], np.cumsum(enc.lengths)]).astype(np.int64)
        return cls(enc.tokens, offsets, enc.prompt, enc.kept, meta or {"truncation": enc.reasons})

    @classmethod
    def open(cls, path: Path) -> "Tokenized":
        meta = json.loads((path / "meta.json").read_text())
        tokens = (np.memmap(path / "tokens.bin", dtype=np.int32, mode="r") if meta["tokens"]
                  else np.zeros(0, dtype=np.int32))
        return cls(tokens, np.load(path / "offsets.npy"), np.load(path / "prompt.npy"), np.load(path / "rows.npy"),
                   meta)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> Example:
        ids = self.tokens[self.offsets[i]:self.offsets[i + 1]].tolist()
        p = int(self.prompt[i])
        return Example(ids, [IGNORE] * p + ids[p:])

    @property
    def truncation(self) -> dict[str, int]:
        return dict(self.meta.get("truncation", {}))


def tokenizer_fingerprint(model_dir: Path) -> str:
    """SHA-256 over the tokenizer's files in a model directory (names and contents)."""
    digest = hashlib.sha256()
    found = [model_dir / name for name in _TOKENIZER_FILES if (model_dir / name).is_file()]
    if not found:
        raise FileNotFoundError(f"{model_dir}: no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...)")
    for path in found:
        digest.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def rows_fingerprint(table: pa.Table | pd.DataFrame) -> str:
    """Content hash of the text an example is built from: instruction, input and output of every row."""
    frame = table if isinstance(table, pd.DataFrame) else table.select(["instruction", "input", "output"]).to_pandas()
    cells = frame[["instruction", "input", "output"]].fillna("").astype(str)
    per_row = pd.util.hash_pandas_object(cells, index=False).to_numpy()
    return hashlib.sha256(per_row.tobytes() + str(len(per_row)).encode()).hexdigest()


def key(tokenizer_id: str, data_id: str, max_length: int, truncation: str) -> str:
    from tasks.codehash import code_hash

    code, _ = code_hash((__name__,))
    payload = {"tokenizer": tokenizer_id, "template": TEMPLATE, "max_length": max_length, "truncation": truncation,
               "rows": data_id, "code": code}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:KEY_LENGTH]


def prepare(tokenizer, table: pa.Table | pd.DataFrame, max_length: int, truncation: str, root: Path,
            model_dir: Path, desc: str = "tokenize") -> tuple[Tokenized, dict[str, Any]]:
    """The examples of `table`'s rows, from `<root>/<key>/` when an earlier run made them, else tokenized
    there now (one process at a time; another waits and reads them). Also says which and how long."""
    from tasks.locks import holding, me

    t0 = time.perf_counter()
    where = root / key(tokenizer_fingerprint(model_dir), rows_fingerprint(table), max_length, truncation)
    if not (where / "_SUCCESS").is_file():
        with holding(root / f".{where.name}.lock", me(), what=f"tokenized examples {where}"):
            if not (where / "_SUCCESS").is_file():
                _write(tokenizer, table, max_length, truncation, where, desc)
                return Tokenized.open(where), {"path": str(where), "reused": False,
                                               "seconds": round(time.perf_counter() - t0, 3)}
    return Tokenized.open(where), {"path": str(where), "reused": True, "seconds": round(time.perf_counter() - t0, 3)}


def _write(tokenizer, table: pa.Table | pd.DataFrame, max_length: int, truncation: str, where: Path,
           desc: str) -> None:
    """Tokenize `table` a batch at a time into a staging directory, streaming tokens to disk; rename it."""
    staging = where.with_name(where.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    t0 = time.perf_counter()
    n = len(table)
    lengths, prompt, rows = [], [], []
    reasons: dict[str, int] = {}
    batches = ((table.iloc[s:s + BATCH_ROWS] for s in range(0, n, BATCH_ROWS)) if isinstance(table, pd.DataFrame)
               else table.to_batches(max_chunksize=BATCH_ROWS))
    done = 0
    with open(staging / "tokens.bin", "wb") as fh, tqdm(total=n, desc=desc, unit="row", leave=False) as bar:
        for batch in batches:
            enc = encode(tokenizer, _texts(batch, "instruction"), _texts(batch, "input"), _texts(batch, "output"),
                         max_length, truncation)
            fh.write(enc.tokens.tobytes())
            lengths.append(enc.lengths)
            prompt.append(enc.prompt)
            rows.append(enc.kept + done)
            for why, count in enc.reasons.items():
                reasons[why] = reasons.get(why, 0) + count
            done += len(batch)
            bar.update(len(batch))
        fh.flush()
        os.fsync(fh.fileno())
    lengths_all = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths_all)]).astype(np.int64)
    np.save(staging / "offsets.npy", offsets)
    np.save(staging / "prompt.npy", np.concatenate(prompt) if prompt else np.zeros(0, dtype=np.int32))
    np.save(staging / "rows.npy", np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64))
    atomic_write_json(staging / "meta.json", {
        "rows": n, "examples": len(lengths_all), "tokens": int(offsets[-1]), "template": TEMPLATE,
        "max_length": max_length, "truncation_mode": truncation, "truncation": dict(sorted(reasons.items())),
        "seconds": round(time.perf_counter() - t0, 3)})
    atomic_write_json(staging / "_SUCCESS", {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    shutil.rmtree(where, ignore_errors=True)
    os.replace(staging, where)
