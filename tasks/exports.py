"""The mixed training set in the formats trainers read, beside `train.parquet` and `eval.parquet`.

A row is one exchange (instruction, input, output) or, when its `messages` is set, a whole conversation
(tasks/conversation.py): a system prompt perhaps, then user and assistant turns. Each format:

- `alpaca`: `<split>.alpaca.json`, a JSON list of {instruction, input, output} (Stanford Alpaca). A
  conversation is written in the Alpaca-with-history convention LLaMA-Factory reads: `instruction` its last
  user turn, `input` "", `output` its last answer, `system` its system prompt (when it has one) and
  `history` the earlier exchanges as [[user, assistant], ...] (when there are any). LLaMA-Factory's
  dataset_info.json names them: "columns": {"prompt": "instruction", "query": "input", "response":
  "output", "system": "system", "history": "history"}.
- `sharegpt`: `<split>.sharegpt.jsonl`, {"id", "conversations": [{"from": "human", ...}, {"from": "gpt",
  ...}]}; a conversation with every turn, its system prompt as a first turn `{"from": "system"}`.
- `messages`: `<split>.messages.jsonl`, {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
  (OpenAI fine-tuning, TRL's conversational format); a conversation with every turn, system first.
- `prompt_completion`: `<split>.prompt_completion.jsonl`, {"prompt", "completion"}, the prompt in this
  project's training template (Alpaca), so a trainer sees exactly what `finetune` trains on with
  `template: alpaca`. A pair holds one answer, and the Alpaca template has no turns: a conversation cannot
  be written without losing turns, so multi-turn rows are left out of this format, and `export_all` counts
  them under `left_out` (in the mix stage's stats.json). Use `messages` or `sharegpt` for them.
- `hf_dataset`: `hf_dataset/`, a `datasets.DatasetDict` with `train` and `eval`, from `save_to_disk`: the
  columns id, instruction, input, output, category, origin, source, and `messages` for every row (a
  one-exchange row's conversation as `conversation.messages_of` builds it), which TRL's SFTTrainer reads.

The text formats are written in one pass over each split, `BATCH_ROWS` rows at a time: each string of a
batch is JSON-encoded once (with the encoder `json.dumps` itself uses, so the bytes are those of
`json.dumps(..., ensure_ascii=False)`; the Alpaca list as with `indent=1`) and every format's lines for the
batch are appended to its file. A batch's multi-turn rows are rendered one by one (`json.dumps`, the same
bytes), in their places. No file is ever held whole in memory. Each file is written to a temporary name and
renamed, like every artifact file.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import ExitStack
from json.encoder import encode_basestring  # json.dumps(str, ensure_ascii=False), in C
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from tasks import conversation
from tasks.artifacts import atomic_file, sha256_bytes
from tasks.conversation import user_turn
from tasks.prompts import alpaca_prompt

BATCH_ROWS = 4096
EXPORT_COLUMNS = ["id", "instruction", "input", "output", "category", "origin", "source"]
SUFFIXES = {"alpaca": "alpaca.json", "sharegpt": "sharegpt.jsonl", "messages": "messages.jsonl",
            "prompt_completion": "prompt_completion.jsonl"}
SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}  # Vicuna's speaker names


def _as_table(data: pa.Table | pd.DataFrame) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    present = [c for c in EXPORT_COLUMNS if c in data]
    table = pa.Table.from_pandas(data[present], preserve_index=False)
    if conversation.COLUMN in data:  # pandas holds each conversation as an array of dicts, or None / NaN
        table = table.append_column(conversation.COLUMN, conversation.messages_array(
            list(v) if isinstance(v, (list, np.ndarray)) else None for v in data[conversation.COLUMN]))
    return table


def _texts(column: pa.Array, missing: str | None = "") -> list:
    """A column as Python strings, a missing value as `missing` (as pandas' fillna("").astype(str) did)."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return (column.fill_null(missing) if missing is not None and column.null_count else column).to_pylist()
    return [missing if v is None else str(v) for v in column.to_pylist()]


def _multi_turn(batch: pa.RecordBatch | pa.Table) -> tuple[np.ndarray, list[list[dict[str, str]]]]:
    """The positions of the rows whose `messages` is set, and those conversations (the only per-row work)."""
    if conversation.COLUMN not in batch.column_names:
        return np.zeros(0, dtype=np.int64), []
    messages = batch.column(conversation.COLUMN)
    if messages.null_count == len(messages):
        return np.zeros(0, dtype=np.int64), []
    where = np.flatnonzero(pc.is_valid(messages).to_numpy(zero_copy_only=False))
    return where, messages.take(pa.array(where)).to_pylist()


def _alpaca_with_history(messages: list[dict[str, str]]) -> dict[str, Any]:
    """A conversation as an Alpaca record with `system` and `history` (LLaMA-Factory's convention)."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    users = [m["content"] for m in messages if m["role"] == "user"]
    answers = conversation.assistant_turns(messages)
    record: dict[str, Any] = {"instruction": users[-1], "input": "", "output": answers[-1]}
    if system:
        record["system"] = system[0]
    if len(answers) > 1:
        record["history"] = [[u, a] for u, a in zip(users[:-1], answers[:-1])]
    return record


def _alpaca_records(ins: list[str], inp: list[str], out: list[str]) -> list[str]:
    return [f' {{\n  "instruction": {a},\n  "input": {b},\n  "output": {c}\n }}'
            for a, b, c in zip(map(encode_basestring, ins), map(encode_basestring, inp), out)]


def _json_line(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def _write_split(table: pa.Table, files: dict[str, object]) -> int:
    """Every requested text format of one split, batch by batch, into the open `files` (format -> file).
    Returns the multi-turn rows left out of `prompt_completion` (when it is written)."""
    first, left_out = True, 0
    columns = ("id", "instruction", "input", "output", conversation.COLUMN)
    for batch in table.select([c for c in columns if c in table.column_names]).to_batches(max_chunksize=BATCH_ROWS):
        ins, inp = _texts(batch.column("instruction")), _texts(batch.column("input"))
        out = list(map(encode_basestring, _texts(batch.column("output"))))
        multi, conversations = _multi_turn(batch)  # these rows' lines replace their first exchange's
        if "sharegpt" in files or "messages" in files:
            turns = [encode_basestring(user_turn(a, b)) for a, b in zip(ins, inp)]
        if "alpaca" in files:
            records = _alpaca_records(ins, inp, out)
            for row, messages in zip(multi, conversations):  # indent=1 inside the list: one more space
                records[row] = " " + json.dumps(_alpaca_with_history(messages), ensure_ascii=False,
                                                indent=1).replace("\n", "\n ")
            if records:
                files["alpaca"].write((("[\n" if first else ",\n") + ",\n".join(records)).encode("utf-8"))
                first = False
        if "sharegpt" in files:
            id_texts = _texts(batch.column("id"), None)
            lines = [f'{{"id": {"null" if i is None else encode_basestring(i)}, "conversations": '
                     f'[{{"from": "human", "value": {t}}}, {{"from": "gpt", "value": {o}}}]}}\n'
                     for i, t, o in zip(id_texts, turns, out)]
            for row, messages in zip(multi, conversations):
                lines[row] = _json_line({"id": id_texts[row], "conversations": [
                    {"from": SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in messages]})
            files["sharegpt"].write("".join(lines).encode("utf-8"))
        if "messages" in files:
            lines = [f'{{"messages": [{{"role": "user", "content": {t}}}, {{"role": "assistant", "content": {o}}}]}}\n'
                     for t, o in zip(turns, out)]
            for row, messages in zip(multi, conversations):
                lines[row] = _json_line({"messages": [{"role": m["role"], "content": m["content"]}
                                                      for m in messages]})
            files["messages"].write("".join(lines).encode("utf-8"))
        if "prompt_completion" in files:
            single = np.ones(len(ins), dtype=bool)
            single[multi] = False  # a conversation has no one prompt and completion: left out, counted
            lines = [f'{{"prompt": {encode_basestring(alpaca_prompt(a, b))}, "completion": {o}}}\n'
                     for a, b, o, one in zip(ins, inp, out, single) if one]
            left_out += len(multi)
            files["prompt_completion"].write("".join(lines).encode("utf-8"))
    if "alpaca" in files:
        files["alpaca"].write(b"[]\n" if first else b"\n]\n")
    return left_out


def export_all(splits: dict[str, pa.Table | pd.DataFrame], out_dir: Path, formats: list[str]) -> dict[str, Any]:
    """Write each format for each split into `out_dir`; returns format -> file names written, and, when a
    format had to leave rows out, `left_out`: {format: {"multi_turn": {split: rows}}}."""
    tables = {split: _as_table(data) for split, data in splits.items()}
    text_formats = [f for f in formats if f in SUFFIXES]
    left_out: dict[str, int] = {}
    for split, table in tables.items():
        with ExitStack() as stack:
            files = {fmt: stack.enter_context(atomic_file(out_dir / f"{split}.{SUFFIXES[fmt]}"))
                     for fmt in text_formats}
            left_out[split] = _write_split(table, files)
    written: dict[str, Any] = {}
    for fmt in formats:
        if fmt == "hf_dataset":
            written[fmt] = [_save_hf_dataset(tables, out_dir / "hf_dataset")]
        else:
            written[fmt] = [f"{split}.{SUFFIXES[fmt]}" for split in tables]
    if "prompt_completion" in formats and any(left_out.values()):
        written["left_out"] = {"prompt_completion": {"multi_turn": left_out}}
    return written


def _string_column(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """As `fillna("").astype(str)` and `Dataset.from_pandas` left a column: large_string (pandas' strings),
    a missing value empty. The mix's text columns are that already: nothing is copied."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return pa.chunked_array([pa.array(_texts(chunk), pa.large_string()) for chunk in column.chunks],
                                pa.large_string())
    column = column.cast(pa.large_string()) if pa.types.is_string(column.type) else column
    return column.fill_null("") if column.null_count else column


def messages_column(table: pa.Table) -> pa.ChunkedArray:
    """Every row's conversation (`conversation.messages_of`): a one-exchange row's user turn and its
    stripped output built column-wise around one string per row, a multi-turn row's `messages` as it is."""
    chunks = []
    columns = ("instruction", "input", "output", conversation.COLUMN)
    for batch in table.select([c for c in columns if c in table.column_names]).to_batches(max_chunksize=BATCH_ROWS):
        n = batch.num_rows
        texts = {c: _texts(batch.column(c)) if c in batch.column_names else [""] * n
                 for c in ("instruction", "input", "output")}
        users = pa.array([user_turn(a, b) for a, b in zip(texts["instruction"], texts["input"])], pa.string())
        answers = pa.array([o.strip() for o in texts["output"]], pa.string())
        interleaved = np.empty(2 * n, dtype=np.int64)
        interleaved[0::2], interleaved[1::2] = np.arange(n), np.arange(n, 2 * n)
        turns = pa.StructArray.from_arrays(
            [pa.array(["user", "assistant"]).take(pa.array(np.tile([0, 1], n))),
             pa.concat_arrays([users, answers]).take(pa.array(interleaved))], names=["role", "content"])
        single = pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)), turns,
                                          type=conversation.MESSAGES)
        multi, conversations = _multi_turn(batch)
        if len(multi):  # the rows' own conversations, taken into their places
            order = np.arange(n)
            order[multi] = n + np.arange(len(multi))
            single = pa.concat_arrays([single, conversation.messages_array(conversations)]).take(pa.array(order))
        chunks.append(single)
    return pa.chunked_array(chunks, conversation.MESSAGES)


def _save_hf_dataset(tables: dict[str, pa.Table], target: Path) -> str:
    from datasets import Dataset, DatasetDict

    columns = [c for c in EXPORT_COLUMNS if all(c in t.column_names for t in tables.values())]
    # A fingerprint from the (content-addressed) place, not datasets' default: that pickles the whole table
    # to hash it, seconds at 500K rows.
    dd = DatasetDict({split: Dataset(pa.table({**{c: _string_column(t.column(c)) for c in columns},
                                               conversation.COLUMN: messages_column(t)}),
                                     fingerprint=sha256_bytes(f"{target.resolve()}:{split}".encode())[:16])
                      for split, t in tables.items()})
    tmp = Path(tempfile.mkdtemp(prefix=".hf_dataset.", dir=target.parent))
    try:
        dd.save_to_disk(str(tmp / "d"))
        if target.exists():
            shutil.rmtree(target)
        (tmp / "d").rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target.name

