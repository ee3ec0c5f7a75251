"""Stage 1, seeds: load human-written seed tasks into a table, one row per task, instances kept.

Format `self_instruct` is the Self-Instruct paper's JSONL: `id`, `name`, `instruction`,
`instances: [{input, output}]`, `is_classification`, and optionally `category` (this project's seeds carry
one; others get `unknown`). Every problem is reported with the file and line it was found on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from tasks.config import SeedsConfig

INSTANCE_TYPE = pa.list_(pa.struct([("input", pa.string()), ("output", pa.string())]))
SCHEMA = pa.schema([
    ("id", pa.string()), ("name", pa.string()), ("instruction", pa.string()),
    ("instances", INSTANCE_TYPE), ("is_classification", pa.bool_()), ("category", pa.string()),
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
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SeedFormatError(f"{path}: cannot read seed file ({exc.strerror})") from None
    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SeedFormatError(f"{where}: not valid UTF-8 (byte {exc.start} of the line)") from None
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SeedFormatError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        task = _parse_task(obj, where)
        if task["id"] in seen:
            raise SeedFormatError(f"{where}: duplicate id `{task['id']}` (first on line {seen[task['id']]})")
        seen[task["id"]] = lineno
        rows.append(task)
    if not rows:
        raise SeedFormatError(f"{path}: no seed tasks in the file")
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def load_seeds(cfg: SeedsConfig, base_dir: Path = Path(".")) -> tuple[pa.Table, dict[str, Any]]:
    path = Path(cfg.path)
    if not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        raise SeedFormatError(f"{path}: seed file not found (config key `seeds.path`)")
    fmt = cfg.format
    if fmt == "auto":
        if path.suffix != ".jsonl":
            raise SeedFormatError(f"{path}: cannot detect the seed format from the name; set `seeds.format`")
        fmt = "self_instruct"
    table = read_self_instruct_jsonl(path)
    rows_in = table.num_rows
    if cfg.limit is not None:
        table = table.slice(0, cfg.limit)
    categories = table.column("category").value_counts().to_pylist()
    stats = {
        "rows_in": rows_in,
        "source": str(path),
        "format": fmt,
        "dropped": {"over_limit": rows_in - table.num_rows} if table.num_rows < rows_in else {},
        "classification_tasks": int(sum(table.column("is_classification").to_pylist())),
        "instances": int(sum(len(i) for i in table.column("instances").to_pylist())),
        "categories": {c["values"]: c["counts"] for c in categories},
    }
    return table, stats
