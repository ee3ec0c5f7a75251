"""Stage 1, seeds: load human-written seed tasks into a table, one row per task, instances kept.

Formats (`seeds.format`, or `auto` to detect from the path and the first record):
- `self_instruct`: the Self-Instruct paper's JSONL: `id`, `name`, `instruction`, `instances: [{input, output}]`,
  `is_classification`, and optionally `category` (this project's seeds carry one; others get `unknown`);
- `alpaca`: a JSON list or JSONL of `instruction`, `input` (optional), `output`: each record is a task with one
  instance;
- `sharegpt`: ShareGPT/Vicuna conversations, a JSON list or JSONL of {`conversations`: [{from, value}, ...]}
  and optionally `id`, `system` (a system prompt; or a first turn `from: system`) and `category`; speakers
  as `conversation.SHAREGPT_ROLES` (human/gpt, user/assistant, ...);
- `messages`: OpenAI-style conversations, a JSONL (or JSON list) of {`messages`: [{role, content}, ...]} and
  optionally `id` and `category`;
- `table`: Parquet or CSV with the Alpaca columns (and optionally `id`, `category`, `is_classification`);
  a Parquet table with a `messages` column ({role, content} lists) or a `conversations` column (ShareGPT
  turns, and optionally `system`) holds conversations: a row whose conversation is null is read by its
  Alpaca columns;
- `hf_dataset`: a Hugging Face dataset directory written by `save_to_disk`, with the Alpaca columns or, as
  `table`, a `messages` or `conversations` column (TRL's conversational datasets).
`auto` reads `.parquet`/`.csv` as `table`, a directory as `hf_dataset`, and a `.json`/`.jsonl` file by its
first record: `instances` -> `self_instruct`, `conversations` -> `sharegpt`, `messages` -> `messages`, else
`alpaca`.

A conversation becomes a row as `tasks/conversation.py` says: its first user turn is the `instruction`, its
first answer the one instance's `output` (input empty), and the whole conversation is in `messages` when it
is more than one exchange or has a system prompt (null otherwise: a one-exchange conversation is a plain
row). Every row has the `messages` column. Every problem is reported with the file and line (or record, or
row) it was found on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks import conversation
from tasks.config import SeedsConfig
from tasks.conversation import ConversationError
from tasks.jsonl import json_lines, parse_line, text_lines

INSTANCE_TYPE = pa.list_(pa.struct([("input", pa.string()), ("output", pa.string())]))
SCHEMA = pa.schema([
    ("id", pa.string()), ("name", pa.string()), ("instruction", pa.string()),
    ("instances", INSTANCE_TYPE), ("is_classification", pa.bool_()), ("category", pa.string()),
    (conversation.COLUMN, conversation.MESSAGES),  # null for a one-exchange row
])


class SeedFormatError(ValueError):
    """A seed file that cannot be read; the message starts with `file:line`."""


def _check(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise SeedFormatError(f"{where}: {message}")


def _parse_task(obj: Any, where: str) -> dict[str, Any]:
    _check(isinstance(obj, dict), where, f"expected a JSON object, got {type(obj).__name__}")
    for key in ("id", "instruction"):
        _check(key in obj, where, f"missing `{key}`")
        _check(isinstance(obj[key], str) and obj[key].strip() != "", where, f"`{key}` must be a non-empty string")
    instances = obj.get("instances")
    _check(isinstance(instances, list) and len(instances) > 0, where, "`instances` must be a non-empty list")
    parsed = []
    for n, inst in enumerate(instances):
        _check(isinstance(inst, dict), where, f"instances[{n}] must be an object with `input` and `output`")
        for key in ("input", "output"):
            _check(isinstance(inst.get(key), str), where, f"instances[{n}].{key} must be a string")
        _check(inst["output"].strip() != "", where, f"instances[{n}].output is empty")
        parsed.append({"input": inst["input"], "output": inst["output"]})
    is_cls = obj.get("is_classification", False)
    _check(isinstance(is_cls, bool), where, "`is_classification` must be true or false")
    name = obj.get("name", obj["id"])
    _check(isinstance(name, str), where, "`name` must be a string")
    category = obj.get("category", "unknown")
    _check(isinstance(category, str) and category.strip() != "", where, "`category` must be a non-empty string")
    return {"id": obj["id"], "name": name, "instruction": obj["instruction"].strip(), "instances": parsed,
            "is_classification": is_cls, "category": category.strip()}


def read_self_instruct_jsonl(path: Path) -> pa.Table:
    return _finish(path, [(where, _parse_task(obj, where)) for where, obj in _json_lines(path)])


def _alpaca_task(obj: Any, where: str, index: int) -> dict[str, Any]:
    _check(isinstance(obj, dict), where, f"expected a JSON object, got {type(obj).__name__}")
    _check(isinstance(obj.get("instruction"), str) and obj["instruction"].strip() != "", where,
           "`instruction` must be a non-empty string")
    _check(isinstance(obj.get("output"), str) and obj["output"].strip() != "", where,
           "`output` must be a non-empty string")
    inp = obj.get("input", "")
    _check(isinstance(inp, str), where, "`input` must be a string")
    task = {"id": obj.get("id", f"seed_{index}"), "instances": [{"input": inp, "output": obj["output"]}],
            "instruction": obj["instruction"], "is_classification": obj.get("is_classification", False),
            "category": obj.get("category", "unknown")}
    _check(isinstance(task["id"], str) and task["id"] != "", where, "`id` must be a non-empty string")
    return _parse_task(task, where)


def _decode_lines(path: Path) -> list[tuple[int, str]]:
    return text_lines(path, SeedFormatError, "seed file")


def _json_lines(path: Path):
    return json_lines(path, SeedFormatError, "seed file")


def _finish(path: Path, tasks: list[tuple[str, dict[str, Any]]]) -> pa.Table:
    """Check ids are unique (naming both places) and build the table."""
    seen: dict[str, str] = {}
    for where, task in tasks:
        if task["id"] in seen:
            raise SeedFormatError(f"{where}: duplicate id `{task['id']}` (first at {seen[task['id']]})")
        seen[task["id"]] = where
    if not tasks:
        raise SeedFormatError(f"{path}: no seed tasks in the file")
    return pa.Table.from_pylist([t for _, t in tasks], schema=SCHEMA)


def _read_text(path: Path) -> str:
    """The whole file as text; a byte that is not UTF-8 stops with its line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SeedFormatError(f"{path}: cannot read seed file ({exc.strerror})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, start = raw.count(b"\n", 0, exc.start) + 1, raw.rfind(b"\n", 0, exc.start) + 1
        raise SeedFormatError(f"{path}:{line}: not valid UTF-8 (byte {exc.start - start} of the line)") from None


def _records(path: Path, what: str) -> list[tuple[str, Any]]:
    """(where, record) for each record: a JSONL file's lines (`file:line`), or a JSON list's records
    (`file record N`: a record's line is not known once the list is parsed)."""
    if path.suffix == ".jsonl":
        return list(_json_lines(path))
    text = _read_text(path)
    try:
        records = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as exc:
        raise SeedFormatError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(records, list):
        raise SeedFormatError(f"{path}: {what} JSON file holds a list of records, got {type(records).__name__}")
    return [(f"{path} record {n}", r) for n, r in enumerate(records)]


def read_alpaca(path: Path) -> pa.Table:
    return _finish(path, [(where, _alpaca_task(obj, where, n))
                          for n, (where, obj) in enumerate(_records(path, "an Alpaca"))])


def _conversation_task(obj: Any, where: str, index: int, key: str) -> dict[str, Any]:
    """A conversation record as a seed task: `key` is `messages` ({role, content} turns) or `conversations`
    (ShareGPT's {from, value} turns, and a `system` prompt beside them in some dumps)."""
    _check(isinstance(obj, dict), where, f"expected a JSON object, got {type(obj).__name__}")
    _check(key in obj, where, f"missing `{key}`")
    try:
        if key == "conversations":
            messages = conversation.from_sharegpt(obj[key], where)
            system = obj.get("system", "")
            _check(isinstance(system, str), where, "`system` must be a string")
            if system.strip():
                _check(messages[0]["role"] != "system", where, "both a `system` field and a system turn")
                messages = conversation.check([{"role": "system", "content": system}, *messages], where)
        else:
            messages = conversation.check(obj[key], where)
    except ConversationError as exc:
        raise SeedFormatError(str(exc)) from None
    row = conversation.from_messages(messages)
    task = _parse_task({"id": obj.get("id", f"seed_{index}"), "instruction": row["instruction"],
                        "instances": [{"input": "", "output": row["output"]}],
                        "is_classification": obj.get("is_classification", False),
                        "category": obj.get("category", "unknown")}, where)
    return {**task, conversation.COLUMN: row[conversation.COLUMN]}


def _kept(where: str, build, skipped: list[str] | None) -> list[tuple[str, dict[str, Any]]]:
    """[(where, task)] of one record, or [] when it is bad and bad records are skipped (`skipped` collects
    each one's message, `file:line` first); without `skipped` a bad record stops the run."""
    try:
        return [(where, build())]
    except SeedFormatError as exc:
        if skipped is None:
            raise
        skipped.append(str(exc))
        return []


def read_sharegpt(path: Path, skipped: list[str] | None = None) -> pa.Table:
    return _finish(path, [t for n, (where, obj) in enumerate(_records(path, "a ShareGPT"))
                          for t in _kept(where, lambda: _conversation_task(obj, where, n, "conversations"), skipped)])


def read_messages(path: Path, skipped: list[str] | None = None) -> pa.Table:
    return _finish(path, [t for n, (where, obj) in enumerate(_records(path, "a messages"))
                          for t in _kept(where, lambda: _conversation_task(obj, where, n, "messages"), skipped)])


def _conversation_key(table: pa.Table) -> str | None:
    """The column a table holds conversations in, if any: `messages`, else ShareGPT's `conversations`."""
    return next((k for k in (conversation.COLUMN, "conversations") if k in table.column_names
                 and not pa.types.is_null(table.column(k).type)), None)


def _conversation_table_tasks(path: Path, table: pa.Table, key: str, skipped: list[str] | None = None) -> pa.Table:
    """A table of conversations, row by row (`path row N`), each row a record of the JSON format. A row
    whose conversation is null is read by its Alpaca columns when the table has them."""
    alpaca = "instruction" in table.column_names
    tasks, n = [], 0
    for batch in table.to_batches():
        for row in batch.to_pylist():
            where = f"{path} row {n}"
            record = {k: v for k, v in row.items() if v is not None}  # a null is an absent field
            if key in record or not alpaca:
                tasks += _kept(where, lambda: _conversation_task(record, where, n, key), skipped)
            else:
                tasks.append((where, _alpaca_task(record, where, n)))
            n += 1
    return _finish(path, tasks)


def _table_tasks(path: Path, table: pa.Table, first_row: int, what: str) -> pa.Table:
    """The Alpaca columns of a table as seed tasks (one instance each), checked and built column-wise: a
    500K-row file loads in seconds. The rules are those of a JSON record; a problem names the first row
    that has it (`path:line` for CSV, `path row N` otherwise)."""
    n = table.num_rows

    def where(row: int) -> str:
        return f"{path}:{row + first_row}" if what == "line" else f"{path} {what} {row}"

    def refuse(bad: np.ndarray | pa.Array | pa.ChunkedArray, message: str) -> None:
        rows = np.flatnonzero(np.asarray(bad, dtype=bool))
        if len(rows):
            raise SeedFormatError(f"{where(int(rows[0]))}: {message}")

    def text(name: str, message: str) -> pa.ChunkedArray | None:
        """The column as strings (None: absent or all missing); a column of another type is refused."""
        if name not in table.column_names or pa.types.is_null(table.column(name).type):
            return None
        column = table.column(name)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            refuse(pc.is_valid(column).to_numpy(zero_copy_only=False), message)
        return column.cast(pa.string())

    def blank(column: pa.ChunkedArray) -> np.ndarray:
        return pc.equal(pc.utf8_trim_whitespace(column), "").to_numpy(zero_copy_only=False)

    if not n:
        raise SeedFormatError(f"{path}: no seed tasks in the file")
    columns = {}
    for name in ("instruction", "output"):
        message = f"`{name}` must be a non-empty string"
        column = text(name, message)
        if column is None:
            refuse(np.ones(n, dtype=bool), message)
        refuse(pc.is_null(column).to_numpy(zero_copy_only=False) | blank(pc.fill_null(column, "")), message)
        columns[name] = column
    given = text("input", "`input` must be a string")
    inputs = pa.chunked_array([pa.array([""] * n, pa.string())]) if given is None else pc.fill_null(given, "")
    given = text("id", "`id` must be a non-empty string")
    default_ids = pa.array([f"seed_{i}" for i in range(n)], pa.string())
    ids = default_ids if given is None else pc.if_else(pc.is_null(given), default_ids, given)
    refuse(blank(ids), "`id` must be a non-empty string")
    given = text("category", "`category` must be a non-empty string")
    category = pa.array(["unknown"] * n, pa.string()) if given is None else pc.fill_null(given, "unknown")
    refuse(blank(category), "`category` must be a non-empty string")
    if "is_classification" in table.column_names and not pa.types.is_null(table.column("is_classification").type):
        flag = table.column("is_classification")
        if not pa.types.is_boolean(flag.type):
            words = pc.utf8_lower(pc.utf8_trim_whitespace(flag.cast(pa.string())))
            known = pc.is_in(words, pa.array(["true", "false", "1", "0"]))
            refuse(pc.and_(pc.is_valid(words), pc.invert(known)).to_numpy(zero_copy_only=False),
                   "`is_classification` must be true or false")
            flag = pc.is_in(words, pa.array(["true", "1"]))
        is_cls = pc.fill_null(flag, False)
    else:
        is_cls = pa.array([False] * n)
    id_values = pd.Series(ids.to_numpy(zero_copy_only=False))
    repeated = np.flatnonzero(id_values.duplicated().to_numpy())
    if len(repeated):
        again = int(repeated[0])
        first = int(np.flatnonzero((id_values == id_values[again]).to_numpy())[0])
        raise SeedFormatError(f"{where(again)}: duplicate id `{id_values[again]}` (first at {where(first)})")
    one_each = pa.array(np.arange(n + 1, dtype=np.int32))
    instances = pa.ListArray.from_arrays(one_each, pa.StructArray.from_arrays(
        [pa.concat_arrays(inputs.chunks) if isinstance(inputs, pa.ChunkedArray) else inputs,
         pa.concat_arrays(columns["output"].chunks)], names=["input", "output"]))
    return pa.table({"id": ids, "name": ids, "instruction": pc.utf8_trim_whitespace(columns["instruction"]),
                     "instances": instances, "is_classification": is_cls,
                     "category": pc.utf8_trim_whitespace(category),
                     conversation.COLUMN: pa.nulls(n, conversation.MESSAGES)}, schema=SCHEMA)


def _tasks_of_table(path: Path, table: pa.Table, skipped: list[str] | None = None) -> pa.Table:
    key = _conversation_key(table)
    return (_table_tasks(path, table, 0, "row") if key is None
            else _conversation_table_tasks(path, table, key, skipped))


def read_table_file(path: Path, skipped: list[str] | None = None) -> pa.Table:
    try:
        if path.suffix == ".parquet":
            return _tasks_of_table(path, pq.read_table(path), skipped)
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (OSError, ValueError, UnicodeDecodeError, pa.ArrowException) as exc:
        if isinstance(exc, SeedFormatError):
            raise
        raise SeedFormatError(f"{path}: cannot read as {path.suffix.lstrip('.')} ({exc})") from None
    return _table_tasks(path, pa.Table.from_pandas(frame, preserve_index=False), 2, "line")  # line 1: the header


def read_hf_dataset(path: Path, skipped: list[str] | None = None) -> pa.Table:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise SeedFormatError(f"{path}: not a dataset saved with save_to_disk ({exc})") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise SeedFormatError(f"{path}: a DatasetDict with splits {list(dataset)}; point at one split's directory")
    return _tasks_of_table(path, dataset.with_format("arrow")[:], skipped)


HEAD_BYTES = 1 << 20


def _first_record(path: Path) -> Any:
    """The first record of a JSON list file (None when it is not one, or is not valid JSON: the reader then
    says what is wrong). Decoded from the file's first MiB when the record fits there, so that telling a
    ShareGPT dump from an Alpaca file does not read a large file twice."""
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)

    def first(text: str) -> Any:
        body = text.lstrip()
        if not body.startswith("["):
            return None
        rest = body[1:]
        return json.JSONDecoder().raw_decode(rest, len(rest) - len(rest.lstrip()))[0]

    try:
        return first(head.decode("utf-8", errors="ignore"))
    except json.JSONDecodeError:
        if len(head) < HEAD_BYTES:  # that was the whole file
            return None
    try:
        return first(_read_text(path))
    except json.JSONDecodeError:
        return None


def _format_of_record(obj: Any) -> str:
    if isinstance(obj, dict):
        for key, fmt in (("conversations", "sharegpt"), ("messages", "messages")):
            if key in obj:
                return fmt
    return "alpaca"


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return "hf_dataset"
        raise SeedFormatError(f"{path}: a directory but not a saved Hugging Face dataset; set `seeds.format`")
    if path.suffix in (".parquet", ".csv"):
        return "table"
    if path.suffix == ".json":
        return _format_of_record(_first_record(path))
    if path.suffix == ".jsonl":
        first = next(iter(_decode_lines(path)), None)
        if first is None:
            raise SeedFormatError(f"{path}: no seed tasks in the file")
        obj = parse_line(path, *first, SeedFormatError)
        return "self_instruct" if isinstance(obj, dict) and "instances" in obj else _format_of_record(obj)
    raise SeedFormatError(f"{path}: cannot detect the seed format from the name; set `seeds.format`")


CONVERSATION_READERS = ("sharegpt", "messages", "table", "hf_dataset")  # formats that hold conversations
READERS = {"self_instruct": read_self_instruct_jsonl, "alpaca": read_alpaca, "table": read_table_file,
           "hf_dataset": read_hf_dataset, "sharegpt": read_sharegpt, "messages": read_messages}


def turns_histogram(messages: pa.ChunkedArray) -> dict[str, int]:
    """{assistant turns: rows}: a row without `messages` is one turn."""
    turns, rows = np.unique(conversation.turn_counts(messages, len(messages)), return_counts=True)
    return {str(t): int(n) for t, n in zip(turns.tolist(), rows.tolist())}


def load_seeds(cfg: SeedsConfig, base_dir: Path = Path(".")) -> tuple[pa.Table, dict[str, Any]]:
    """Every source's tasks in one table, each row's source named in `dataset` (see SeedsConfig)."""
    sources = cfg.datasets()
    tables, per_source = [], {}
    for n, src in enumerate(sources):
        key = f"seeds.sources[{n}].path" if cfg.sources else "seeds.path"
        path = Path(src.path)
        if not path.is_absolute():
            path = base_dir / path
        if not path.exists():
            raise SeedFormatError(f"{path}: seed file not found (config key `{key}`)")
        fmt = detect_format(path) if src.format == "auto" else src.format
        # Conversation records that break the rules stop the run, or with `bad_conversations: skip` are left
        # out and counted (real ShareGPT dumps hold many); the other formats always stop.
        skipped: list[str] | None = [] if src.bad_conversations == "skip" and fmt in CONVERSATION_READERS else None
        table = READERS[fmt](path, skipped) if skipped is not None else READERS[fmt](path)
        rows_in = table.num_rows + len(skipped or [])
        if src.limit is not None:
            table = table.slice(0, src.limit)
        if cfg.sources:  # ids stay unique across files
            table = table.set_column(0, "id", pc.binary_join_element_wise(f"{src.dataset}/", table.column("id"), ""))
        tables.append(table.append_column("dataset", pa.array([src.dataset] * table.num_rows, pa.string())))
        per_source[src.dataset] = {"path": str(path), "format": fmt, "rows_in": rows_in, "rows": table.num_rows}
        if skipped:
            per_source[src.dataset]["bad_conversations"] = {"skipped": len(skipped), "first": skipped[:5]}
    table = pa.concat_tables(tables)
    rows_in = sum(s["rows_in"] for s in per_source.values())
    bad = sum(s.get("bad_conversations", {}).get("skipped", 0) for s in per_source.values())
    paths, formats = [s["path"] for s in per_source.values()], [s["format"] for s in per_source.values()]
    categories = table.column("category").value_counts().to_pylist()
    stats = {
        "rows_in": rows_in,
        "source": paths[0] if len(paths) == 1 else paths,
        "format": formats[0] if len(formats) == 1 else "several",
        "datasets": per_source,
        "dropped": {reason: n for reason, n in (("bad_conversation", bad),
                                                ("over_limit", rows_in - bad - table.num_rows)) if n},
        "classification_tasks": int(pc.sum(table.column("is_classification")).as_py() or 0),
        "instances": int(pc.sum(pc.list_value_length(table.column("instances"))).as_py() or 0),
        "categories": {c["values"]: c["counts"] for c in categories},
        # Rows with a whole conversation in `messages`, and rows per number of assistant turns.
        "conversations": int(pc.sum(pc.is_valid(table.column(conversation.COLUMN))).as_py() or 0),
        "turns": turns_histogram(table.column(conversation.COLUMN)),
    }
    return table, stats
