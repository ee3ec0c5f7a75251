"""Training examples tokenized once, as token arrays on disk that every epoch, process and resume reads.

With `finetune.template: alpaca` an example is the Alpaca prompt of a row followed by its output and the
end-of-sequence token, one trained span: the response. `encode` does that for a batch of rows with one call
of the fast tokenizer per part, into numpy arrays. A row with `messages` (more than one exchange, or a
system prompt: tasks/conversation.py) is no Alpaca example and is refused, naming the row.
With `finetune.template: chat` an example is the row's whole conversation rendered with the chat template,
one trained span per assistant turn: its content and end-of-turn token (tasks/chat_template.py says which
tokens exactly; `encode_chat`: a Jinja render per assistant turn and row, about twice the Alpaca path's
time for one-turn rows). Labels are -100 outside the spans, so only response tokens carry loss (see
tasks/llm/losses.py: `fit_response` and `fit_turns` decide what an over-long example keeps).

`prepare` runs that over a whole table, a batch of rows at a time, and writes

    <root>/<key>/tokens.bin        int32, every kept example's tokens back to back
                 offsets.npy       int64, example i is tokens[offsets[i]:offsets[i + 1]]
                 spans.npy         int32 [spans, 2], trained [start, end) within its example, in order
                 span_offsets.npy  int64, example i's spans are spans[span_offsets[i]:span_offsets[i + 1]]
                 rows.npy          int64, each example's row in the table it came from
                 meta.json         tokens, examples, template, truncation counts, seconds
                 _SUCCESS          written last

`key` hashes the tokenizer's files, the template (alpaca, or the chat template's text), `max_length`,
`truncation`, the rows' text (conversations included) and this module's code, so a second epoch, a resumed
run, each torchrun process and a run with other training settings read the same arrays (memory-mapped: the
pages are shared, nothing is rebuilt), and a changed input gives a new directory. 4 bytes a token instead of
a Python list's ~44.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from tasks import conversation
from tasks.artifacts import KEY_LENGTH, atomic_write_json, canonical_json, sha256_bytes, sha256_file
from tasks.llm.losses import IGNORE, TRUNCATED, TRUNCATED_TURNS, Example, fit_response, fit_turns
from tasks.prompts import alpaca_prompt

TEMPLATE = "alpaca"
BATCH_ROWS = 4096  # rows per tokenizer call: large enough for the fast tokenizer's threads, small in memory
# Files of a model directory that make its tokenizer what it is.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                    "chat_template.json")
_TEXT = ("instruction", "input", "output")


@dataclass
class Encoded:
    """A batch of rows as examples: `tokens` back to back, `lengths` per kept example, its trained `spans`
    ([start, end) within the example) with `span_counts` per example, `kept` the rows that gave one, and
    the count per truncation reason."""

    tokens: np.ndarray
    lengths: np.ndarray
    spans: np.ndarray
    span_counts: np.ndarray
    kept: np.ndarray
    reasons: dict[str, int]

    @property
    def prompt(self) -> np.ndarray:
        """Each example's tokens before its first trained one (an Alpaca example's prompt length)."""
        if not len(self.spans):
            return self.lengths.astype(np.int32)
        first = np.minimum(np.cumsum(self.span_counts) - self.span_counts, len(self.spans) - 1)
        return np.where(self.span_counts > 0, self.spans[first, 0], self.lengths).astype(np.int32)


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
    """The Alpaca examples of a batch of rows, as `finetune` trains on them (see the module's docstring)."""
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
    lengths_a = np.asarray(lengths, dtype=np.int64)
    spans = np.stack([np.asarray(prompt_lengths, dtype=np.int32), lengths_a.astype(np.int32)], axis=1)
    return Encoded(tokens, lengths_a, spans.reshape(-1, 2), np.ones(len(kept), dtype=np.int64),
                   np.asarray(kept, dtype=np.int64), reasons)


def encode_chat(tokenizer, template: str, conversations: Sequence[Sequence[dict[str, str]]], where: Sequence[str],
                max_length: int, truncation: str = "response") -> Encoded:
    """The chat examples of a batch of conversations (`where` names each in errors): each rendered whole
    with `template`, a trained span per assistant turn (tasks/chat_template.py `turn_spans`), cut to
    `max_length` by `fit_turns`."""
    from tasks.chat_template import turn_spans

    pieces: list[list[int]] = []
    lengths, kept, spans, span_counts = [], [], [], []
    reasons: dict[str, int] = {}
    for row, (ids, turns) in enumerate(turn_spans(tokenizer, template, conversations, where)):
        keep, why = fit_turns(turns, len(ids), max_length, truncation)
        if why is not None:
            reasons[why] = reasons.get(why, 0) + 1
            if why not in (TRUNCATED, TRUNCATED_TURNS):
                continue
        kept_spans = [(s, min(e, keep)) for s, e in turns if s < keep]
        pieces.append(ids[:keep])
        lengths.append(keep)
        spans += kept_spans
        span_counts.append(len(kept_spans))
        kept.append(row)
    tokens = np.fromiter((t for piece in pieces for t in piece), dtype=np.int32, count=sum(lengths))
    return Encoded(tokens, np.asarray(lengths, dtype=np.int64), np.asarray(spans, dtype=np.int32).reshape(-1, 2),
                   np.asarray(span_counts, dtype=np.int64), np.asarray(kept, dtype=np.int64), reasons)


def as_table(rows: pa.Table | pd.DataFrame) -> pa.Table:
    """Rows as a pyarrow table of what examples are built from: id (when there is one), instruction, input,
    output and `messages` (when there is such a column)."""
    if isinstance(rows, pa.Table):
        return rows
    columns = {name: pa.array(rows[name].fillna("").astype(str).tolist(), pa.string())
               for name in ("id", *_TEXT) if name in rows.columns}
    if conversation.COLUMN in rows.columns:
        columns[conversation.COLUMN] = conversation.messages_array(
            _turns(value, n) for n, value in enumerate(rows[conversation.COLUMN]))
    return pa.table(columns)


def _turns(value: Any, n: int) -> list[dict[str, str]] | None:
    """A DataFrame cell of `messages` as turns (a list, or the numpy array pyarrow gives), None when null."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    if value is None or pd.isna(value):
        return None
    raise ValueError(f"row {n}: `messages` must be a list of {{role, content}} turns or null, got "
                     f"{type(value).__name__}")


def _texts(batch: pa.Table, name: str) -> list[str]:
    return batch.column(name).to_pandas().fillna("").astype(str).tolist()


def _where(batch: pa.Table, first_row: int) -> list[str]:
    """Each row's name in errors: its id, or its position."""
    if "id" in batch.column_names:
        return [f"row {value!r}" for value in batch.column("id").to_pylist()]
    return [f"row {first_row + n}" for n in range(batch.num_rows)]


def _has_messages(batch: pa.Table) -> np.ndarray:
    if conversation.COLUMN not in batch.column_names:
        return np.zeros(batch.num_rows, dtype=bool)
    return batch.column(conversation.COLUMN).is_valid().to_numpy(zero_copy_only=False)


def encode_rows(tokenizer, batch: pa.Table, max_length: int, truncation: str = "response",
                chat_template: str | None = None, first_row: int = 0) -> Encoded:
    """The examples of a table's rows: Alpaca examples without `chat_template`, chat examples with it.
    `first_row` is the batch's first row in its table (for errors naming rows without an id)."""
    if chat_template is None:
        multi = np.flatnonzero(_has_messages(batch))
        if len(multi):
            at = _where(batch.slice(int(multi[0]), 1), first_row + int(multi[0]))[0]
            raise ValueError(f"finetune.template is alpaca but {at} is a conversation (more than one exchange, or "
                             f"a system prompt; {len(multi)} such rows in this batch): an Alpaca example is one "
                             f"instruction and its answer; set finetune.template: chat to train on conversations")
        return encode(tokenizer, _texts(batch, "instruction"), _texts(batch, "input"), _texts(batch, "output"),
                      max_length, truncation)
    where = _where(batch, first_row)
    messages = conversation.rows_messages(batch)
    chats = [conversation.check(m, at) if m is not None else plain
             for m, plain, at in zip(messages, conversation.conversations(batch), where)]
    return encode_chat(tokenizer, chat_template, chats, where, max_length, truncation)


class Tokenized:
    """Examples read from token arrays (memory-mapped when opened from disk); `examples[i]` is an Example."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, spans: np.ndarray, span_offsets: np.ndarray,
                 rows: np.ndarray, meta: dict[str, Any]):
        self.tokens, self.offsets, self.rows, self.meta = tokens, offsets, rows, meta
        self.spans, self.span_offsets = spans.reshape(-1, 2), span_offsets
        self.lengths = np.diff(offsets)
        owner = np.repeat(np.arange(len(self.lengths)), np.diff(span_offsets))
        trained = (self.spans[:, 1] - self.spans[:, 0]).astype(np.int64)
        # Tokens with a label (response tokens), per example.
        self.trainable = np.bincount(owner, weights=trained, minlength=len(self.lengths)).astype(np.int64)

    @classmethod
    def from_encoded(cls, enc: Encoded, meta: dict[str, Any] | None = None) -> "Tokenized":
        offsets = np.concatenate([[0], np.cumsum(enc.lengths)]).astype(np.int64)
        span_offsets = np.concatenate([[0], np.cumsum(enc.span_counts)]).astype(np.int64)
        return cls(enc.tokens, offsets, enc.spans, span_offsets, enc.kept, meta or {"truncation": enc.reasons})

    @classmethod
    def open(cls, path: Path) -> "Tokenized":
        meta = json.loads((path / "meta.json").read_text())
        tokens = (np.memmap(path / "tokens.bin", dtype=np.int32, mode="r") if meta["tokens"]
                  else np.zeros(0, dtype=np.int32))
        return cls(tokens, np.load(path / "offsets.npy"), np.load(path / "spans.npy"),
                   np.load(path / "span_offsets.npy"), np.load(path / "rows.npy"), meta)

    def __len__(self) -> int:
        return len(self.lengths)

    def trained_spans(self, i: int) -> list[tuple[int, int]]:
        """Example i's trained [start, end) spans."""
        return [(int(s), int(e)) for s, e in self.spans[self.span_offsets[i]:self.span_offsets[i + 1]]]

    def __getitem__(self, i: int) -> Example:
        ids = np.asarray(self.tokens[self.offsets[i]:self.offsets[i + 1]], dtype=np.int64)
        labels = np.full(len(ids), IGNORE, dtype=np.int64)
        for s, e in self.trained_spans(i):
            labels[s:e] = ids[s:e]
        return Example(ids.tolist(), labels.tolist())

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
    """Content hash of the text an example is built from: instruction, input and output of every row, and
    the turns of its conversation where it has `messages` (rows without are hashed as before there was
    such a column: a table whose `messages` are all null has the same fingerprint as one without)."""
    table = as_table(table)
    cells = table.select(list(_TEXT)).to_pandas().fillna("").astype(str)
    per_row = pd.util.hash_pandas_object(cells, index=False).to_numpy()
    digest = hashlib.sha256(per_row.tobytes() + str(len(per_row)).encode())
    if _has_messages(table).any():
        column = table.column(conversation.COLUMN).combine_chunks()
        turns = pc.list_flatten(column)
        flat = pd.DataFrame({"role": turns.field("role").to_pandas(), "content": turns.field("content").to_pandas()})
        digest.update(pc.fill_null(pc.list_value_length(column), -1).to_numpy(zero_copy_only=False).tobytes())
        digest.update(pd.util.hash_pandas_object(flat.fillna(""), index=False).to_numpy().tobytes())
    return digest.hexdigest()


def template_id(chat_template: str | None) -> str:
    """What the examples' template is, for keys: `alpaca`, or `chat:` and the chat template's SHA-256."""
    return TEMPLATE if chat_template is None else f"chat:{sha256_bytes(chat_template.encode())}"


def key(tokenizer_id: str, data_id: str, max_length: int, truncation: str, template: str = TEMPLATE) -> str:
    """The directory name of a set of examples; `template` is `template_id`'s."""
    from tasks.codehash import code_hash

    code, _ = code_hash((__name__,))
    payload = {"tokenizer": tokenizer_id, "template": template, "max_length": max_length, "truncation": truncation,
               "rows": data_id, "code": code}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:KEY_LENGTH]


def prepare(tokenizer, table: pa.Table | pd.DataFrame, max_length: int, truncation: str, root: Path,
            model_dir: Path, desc: str = "tokenize",
            chat_template: str | None = None) -> tuple[Tokenized, dict[str, Any]]:
    """The examples of `table`'s rows (Alpaca examples, or chat examples rendered with `chat_template`),
    from `<root>/<key>/` when an earlier run made them, else tokenized there now (one process at a time;
    another waits and reads them). Also says which and how long."""
    from tasks.locks import holding, me

    t0 = time.perf_counter()
    table = as_table(table)
    where = root / key(tokenizer_fingerprint(model_dir), rows_fingerprint(table), max_length, truncation,
                       template_id(chat_template))
    if not (where / "_SUCCESS").is_file():
        with holding(root / f".{where.name}.lock", me(), what=f"tokenized examples {where}"):
            if not (where / "_SUCCESS").is_file():
                _write(tokenizer, table, max_length, truncation, where, desc, chat_template)
                return Tokenized.open(where), {"path": str(where), "reused": False,
                                               "seconds": round(time.perf_counter() - t0, 3)}
    return Tokenized.open(where), {"path": str(where), "reused": True, "seconds": round(time.perf_counter() - t0, 3)}


def _write(tokenizer, table: pa.Table, max_length: int, truncation: str, where: Path, desc: str,
           chat_template: str | None) -> None:
    """Tokenize `table` a batch at a time into a staging directory, streaming tokens to disk; rename it."""
    staging = where.with_name(where.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    t0 = time.perf_counter()
    n = table.num_rows
    lengths, spans, span_counts, rows = [], [], [], []
    reasons: dict[str, int] = {}
    done = 0
    with open(staging / "tokens.bin", "wb") as fh, tqdm(total=n, desc=desc, unit="row", leave=False) as bar:
        for batch in table.to_batches(max_chunksize=BATCH_ROWS):
            enc = encode_rows(tokenizer, pa.Table.from_batches([batch]), max_length, truncation, chat_template,
                              done)
            fh.write(enc.tokens.tobytes())
            lengths.append(enc.lengths)
            spans.append(enc.spans)
            span_counts.append(enc.span_counts)
            rows.append(enc.kept + done)
            for why, count in enc.reasons.items():
                reasons[why] = reasons.get(why, 0) + count
            done += batch.num_rows
            bar.update(batch.num_rows)
        fh.flush()
        os.fsync(fh.fileno())
    lengths_all = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths_all)]).astype(np.int64)
    counts_all = np.concatenate(span_counts) if span_counts else np.zeros(0, dtype=np.int64)
    np.save(staging / "offsets.npy", offsets)
    np.save(staging / "spans.npy", np.concatenate(spans) if spans else np.zeros((0, 2), dtype=np.int32))
    np.save(staging / "span_offsets.npy", np.concatenate([[0], np.cumsum(counts_all)]).astype(np.int64))
    np.save(staging / "rows.npy", np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64))
    atomic_write_json(staging / "meta.json", {
        "rows": n, "examples": len(lengths_all), "tokens": int(offsets[-1]),
        "template": "alpaca" if chat_template is None else "chat", "template_id": template_id(chat_template),
        "max_length": max_length, "truncation_mode": truncation, "truncation": dict(sorted(reasons.items())),
        "seconds": round(time.perf_counter() - t0, 3)})
    atomic_write_json(staging / "_SUCCESS", {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    shutil.rmtree(where, ignore_errors=True)
    os.replace(staging, where)
