"""The mixed training set in the formats trainers read, beside `train.parquet` and `eval.parquet`.

- `alpaca`: `<split>.alpaca.json`, a JSON list of {instruction, input, output} (Stanford Alpaca).
- `sharegpt`: `<split>.sharegpt.jsonl`, {"conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}.
- `messages`: `<split>.messages.jsonl`, {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
  (OpenAI fine-tuning, TRL's conversational format).
- `prompt_completion`: `<split>.prompt_completion.jsonl`, {"prompt", "completion"}, the prompt in this
  project's training template (Alpaca), so a trainer sees exactly what `finetune` trains on.
- `hf_dataset`: `hf_dataset/`, a `datasets.DatasetDict` with `train` and `eval`, from `save_to_disk`.

The text formats are written in one pass over each split, `BATCH_ROWS` rows at a time: each string of a
batch is JSON-encoded once (with the encoder `json.dumps` itself uses, so the bytes are those of
`json.dumps(..., ensure_ascii=False)`; the Alpaca list as with `indent=1`) and every format's lines for the
batch are appended to its file. No file is ever held whole in memory. Each file is written to a temporary
name and renamed, like every artifact file.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import ExitStack
from json.encoder import encode_basestring  # json.dumps(str, ensure_ascii=False), in C
from pathlib import Path

import pandas as pd
import pyarrow as pa

from tasks.artifacts import atomic_file, sha256_bytes
from tasks.prompts import alpaca_prompt

BATCH_ROWS = 4096
EXPORT_COLUMNS = ["id", "instruction", "input", "output", "category", "origin", "source"]
SUFFIXES = {"alpaca": "alpaca.json", "sharegpt": "sharegpt.jsonl", "messages": "messages.jsonl",
            "prompt_completion": "prompt_completion.jsonl"}


def user_turn(instruction: str, input: str) -> str:
    return f"{instruction.strip()}\n\n{input.strip()}" if input and input.strip() else instruction.strip()


def _as_table(data: pa.Table | pd.DataFrame) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    present = [c for c in EXPORT_COLUMNS if c in data]
    return pa.Table.from_pandas(data[present], preserve_index=False)


def _texts(column: pa.Array, missing: str | None = "") -> list:
    """A column as Python strings, a missing value as `missing` (as pandas' fillna("").astype(str) did)."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return (column.fill_null(missing) if missing is not None and column.null_count else column).to_pylist()
    return [missing if v is None else str(v) for v in column.to_pylist()]


def _alpaca_records(ins: list[str], inp: list[str], out: list[str]) -> list[str]:
    return [f' {{\n  "instruction": {a},\n  "input": {b},\n  "output": {c}\n }}'
            for a, b, c in zip(map(encode_basestring, ins), map(encode_basestring, inp), out)]


def _write_split(table: pa.Table, files: dict[str, object]) -> None:
    """Every requested text format of one split, batch by batch, into the open `files` (format -> file)."""
    first = True
    for batch in table.select([c for c in ("id", "instruction", "input", "output") if c in table.column_names]
                              ).to_batches(max_chunksize=BATCH_ROWS):
        ins, inp = _texts(batch.column("instruction")), _texts(batch.column("input"))
        out = list(map(encode_basestring, _texts(batch.column("output"))))
        if "sharegpt" in files or "messages" in files:
            turns = [encode_basestring(user_turn(a, b)) for a, b in zip(ins, inp)]
        if "alpaca" in files:
            records = _alpaca_records(ins, inp, out)
            if records:
                files["alpaca"].write((("[\n" if first else ",\n") + ",\n".join(records)).encode("utf-8"))
                first = False
        if "sharegpt" in files:
            ids = [encode_basestring(i) if i is not None else "NaN" for i in _texts(batch.column("id"), None)]
            files["sharegpt"].write("".join(
                f'{{"id": {i}, "conversations": [{{"from": "human", "value": {t}}}, '
                f'{{"from": "gpt", "value": {o}}}]}}\n' for i, t, o in zip(ids, turns, out)).encode("utf-8"))
        if "messages" in files:
            files["messages"].write("".join(
                f'{{"messages": [{{"role": "user", "content": {t}}}, {{"role": "assistant", "content": {o}}}]}}\n'
                for t, o in zip(turns, out)).encode("utf-8"))
        if "prompt_completion" in files:
            files["prompt_completion"].write("".join(
                f'{{"prompt": {encode_basestring(alpaca_prompt(a, b))}, "completion": {o}}}\n'
                for a, b, o in zip(ins, inp, out)).encode("utf-8"))
    if "alpaca" in files:
        files["alpaca"].write(b"[]\n" if first else b"\n]\n")


def export_all(splits: dict[str, pa.Table | pd.DataFrame], out_dir: Path, formats: list[str]) -> dict[str, list[str]]:
    """Write each format for each split into `out_dir`; returns format -> file names written."""
    tables = {split: _as_table(data) for split, data in splits.items()}
    text_formats = [f for f in formats if f in SUFFIXES]
    for split, table in tables.items():
        with ExitStack() as stack:
            files = {fmt: stack.enter_context(atomic_file(out_dir / f"{split}.{SUFFIXES[fmt]}"))
                     for fmt in text_formats}
            _write_split(table, files)
    written: dict[str, list[str]] = {}
    for fmt in formats:
        if fmt == "hf_dataset":
            written[fmt] = [_save_hf_dataset(tables, out_dir / "hf_dataset")]
        else:
            written[fmt] = [f"{split}.{SUFFIXES[fmt]}" for split in tables]
    return written


def _string_column(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """As `fillna("").astype(str)` and `Dataset.from_pandas` left a column: large_string (pandas' strings),
    a missing value empty. The mix's text columns are that already: nothing is copied."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return pa.chunked_array([pa.array(_texts(chunk), pa.large_string()) for chunk in column.chunks],
                                pa.large_string())
    column = column.cast(pa.large_string()) if pa.types.is_string(column.type) else column
    return column.fill_null("") if column.null_count else column


def _save_hf_dataset(tables: dict[str, pa.Table], target: Path) -> str:
    from datasets import Dataset, DatasetDict

    columns = [c for c in EXPORT_COLUMNS if all(c in t.column_names for t in tables.values())]
    # A fingerprint from the (content-addressed) place, not datasets' default: that pickles the whole table
    # to hash it, seconds at 500K rows.
    dd = DatasetDict({split: Dataset(pa.table({c: _string_column(t.column(c)) for c in columns}),
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

