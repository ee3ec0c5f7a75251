"""Fuzzing the edges users feed: seed files and run configs. Every case gives valid rows (or a config), or
one clear error that names the file and line, or the config key; nothing else escapes."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.config import Config, ConfigError, SeedsConfig, load_config
from tasks.seeds import SeedFormatError, load_seeds

# FUZZ_EXAMPLES=5000 for a longer search than the 150 cases per property that `make test` tries.
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=3), max_leaves=8)
instance = st.fixed_dictionaries({"input": st.text(max_size=20), "output": st.text(max_size=20)})
task = st.fixed_dictionaries(
    {"id": st.text(max_size=6), "instruction": st.text(max_size=30), "instances": st.lists(instance, max_size=2)},
    optional={"name": st.text(max_size=6) | st.integers(), "is_classification": st.booleans() | st.text(max_size=3),
              "category": st.text(max_size=6) | st.none()})
mutated_task = task.flatmap(lambda t: st.sets(st.sampled_from(sorted(t)), max_size=2).map(
    lambda drop: {k: v for k, v in t.items() if k not in drop}))
line = st.one_of(task.map(json.dumps), mutated_task.map(json.dumps), json_values.map(json.dumps),
                 st.text(max_size=40).filter(lambda s: "\n" not in s and "\r" not in s))


SCRATCH = Path(tempfile.mkdtemp(prefix="instructflow-fuzz-"))


def _scratch(name: str) -> Path:
    """A fresh path for one example's file; the previous example's files are gone."""
    for old in SCRATCH.iterdir():
        old.unlink()
    return SCRATCH / name


def _check_seed_error(exc: SeedFormatError, path: Path, n_lines: int) -> None:
    message = str(exc)
    assert message.startswith(str(path)), message
    where = re.match(rf"{re.escape(str(path))}(?::(\d+)| record (\d+))?: \S", message)
    assert where, message
    number = where.group(1) or where.group(2)
    if number is not None:
        assert 0 <= int(number) <= n_lines + 1, message


@FUZZ
@given(lines=st.lists(line, min_size=0, max_size=6), fmt=st.sampled_from(["auto", "self_instruct", "alpaca"]))
def test_jsonl_seed_files_give_rows_or_a_file_and_line(lines, fmt):
    path = _scratch("seeds.jsonl")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        table, stats = load_seeds(SeedsConfig(path=str(path), format=fmt))
    except SeedFormatError as exc:
        _check_seed_error(exc, path, len(lines))
        return
    rows = table.to_pylist()
    assert rows and stats["rows_in"] == len(rows) <= len([x for x in lines if x.strip()])
    for row in rows:
        assert row["instruction"].strip() and row["id"] and row["instances"]
        assert all(isinstance(i["input"], str) and i["output"].strip() for i in row["instances"])


@FUZZ
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_as_seed_file(raw):
    for name in ("seeds.jsonl", "seeds.json", "seeds.csv"):
        path = _scratch(name)
        path.write_bytes(raw)
        try:
            load_seeds(SeedsConfig(path=str(path)))
        except SeedFormatError as exc:
            _check_seed_error(exc, path, raw.count(b"\n") + 1)


@FUZZ
@given(records=st.lists(st.dictionaries(st.sampled_from(["instruction", "input", "output", "id", "category",
                                                         "is_classification", "extra"]),
                                        st.text(max_size=12) | st.integers() | st.none() | st.booleans()),
                        max_size=5))
def test_alpaca_json_and_csv_records(records):
    import pandas as pd

    for name in ("seeds.json", "seeds.csv"):
        path = _scratch(name)
        if name.endswith(".json"):
            path.write_text(json.dumps(records))
        else:
            pd.DataFrame(records).to_csv(path, index=False)
        try:
            table, _ = load_seeds(SeedsConfig(path=str(path)))
        except SeedFormatError as exc:
            _check_seed_error(exc, path, len(records) + 1)
            continue
        assert all(r["instruction"].strip() and r["instances"][0]["output"].strip() for r in table.to_pylist())


SECTIONS = list(Config.model_fields)
FIELDS = sorted({f for s in SECTIONS for f in Config.model_fields[s].annotation.model_fields}) + ["bogus"]
config_value = st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(-10, 10, allow_nan=False) | \
    st.text(max_size=10) | st.lists(st.integers(), max_size=2)
config_data = st.dictionaries(st.sampled_from(SECTIONS + ["extra_section"]),
                              st.dictionaries(st.sampled_from(FIELDS), config_value, max_size=3) | config_value,
                              max_size=3)


def _check_config_error(exc: ConfigError, path: Path) -> None:
    message = str(exc)
    assert message.startswith(str(path)) or message.startswith("override `"), message
    assert "Traceback" not in message and "\n" not in message, message
    assert re.search(r"^override `|`[^`]+`|:\d+: not valid YAML|not UTF-8|top level must be a mapping", message), message


@FUZZ
@given(data=config_data)
def test_configs_load_or_name_the_key(data):
    path = _scratch("run.yaml")
    path.write_text(yaml.safe_dump(data))
    try:
        assert isinstance(load_config(path), Config)
    except ConfigError as exc:
        _check_config_error(exc, path)


@FUZZ
@given(text=st.text(max_size=120), overrides=st.lists(st.text(max_size=30), max_size=3))
def test_any_text_and_overrides_load_or_name_the_problem(text, overrides):
    path = _scratch("run.yaml")
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path, overrides)
    except ConfigError as exc:
        _check_config_error(exc, path)


@settings(max_examples=40, deadline=None)
@given(data=config_data.filter(lambda d: d))
def test_the_cli_answers_a_bad_config_with_one_line_and_no_traceback(data):
    import contextlib
    import io

    from flows.cli import main

    path = _scratch("run.yaml")
    path.write_text(yaml.safe_dump(data))
    try:
        load_config(path)
        return  # a valid config would start a run; the cases here are the refused ones
    except ConfigError:
        pass
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["run", "--config", str(path)])
    assert code == 2 and err.getvalue().startswith("config error: ") and "Traceback" not in err.getvalue()
    assert err.getvalue().count("\n") == 1
