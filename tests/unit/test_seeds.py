import json
from collections import Counter
from pathlib import Path

import pytest

from tasks.config import SeedsConfig
from tasks.seeds import SeedFormatError, load_seeds, read_self_instruct_jsonl

ROOT = Path(__file__).resolve().parents[2]
EXTERNAL = ROOT.parent / "shared" / "external" / "self_instruct_seed_tasks.jsonl"
GOOD = {"id": "t1", "name": "n", "instruction": "Say hi.", "instances": [{"input": "", "output": "Hi."}],
        "is_classification": False}


def test_project_seeds():
    table, stats = load_seeds(SeedsConfig(), base_dir=ROOT)
    rows = table.to_pylist()
    assert len(rows) >= 100
    cats = Counter(r["category"] for r in rows)
    for needed in ("qa", "open_generation", "summarization", "translation", "rewriting", "classification",
                   "extraction", "reasoning", "math", "coding", "dialog"):
        assert cats[needed] >= 5, needed
    # Every task and every instance as the file writes them, in file order.
    raw = [json.loads(line) for line in (ROOT / "data" / "seed_tasks.jsonl").read_text().splitlines() if line.strip()]
    assert [(r["id"], r["instruction"], r["instances"], r["category"]) for r in rows] == [
        (x["id"], x["instruction"], x["instances"], x["category"]) for x in raw]
    assert stats["instances"] == sum(len(x["instances"]) for x in raw) > len(rows)  # some tasks hold several
    assert stats["classification_tasks"] == sum(r["is_classification"] for r in rows) > 0
    assert all(r["is_classification"] for r in rows if r["category"] == "classification")


@pytest.mark.skipif(not EXTERNAL.exists(), reason="../shared/external is not beside this checkout")
def test_self_instruct_paper_seeds_load_unchanged():
    table = read_self_instruct_jsonl(EXTERNAL)
    assert table.num_rows == 175
    assert sum(table.column("is_classification").to_pylist()) == 26
    assert set(table.column("category").to_pylist()) == {"unknown"}


def write_lines(tmp_path, lines, raw=None):
    path = tmp_path / "seeds.jsonl"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return path


@pytest.mark.parametrize("lines,message", [
    ([GOOD, "{not json"], r"seeds.jsonl:2: malformed JSON"),
    ([GOOD, {**GOOD, "id": "t2", "instruction": ""}], r":2: `instruction` must be a non-empty string"),
    ([{k: v for k, v in GOOD.items() if k != "instruction"}], r":1: missing `instruction`"),
    ([GOOD, GOOD], r":2: duplicate id `t1` \(first at .*seeds.jsonl:1\)"),
    ([{**GOOD, "instances": []}], r":1: `instances` must be a non-empty list"),
    ([{**GOOD, "instances": [{"input": 1, "output": "x"}]}], r":1: instances\[0\].input must be a string"),
    ([{**GOOD, "is_classification": "yes"}], r":1: `is_classification` must be true or false"),
    ([[1, 2]], r":1: expected a JSON object"),
])
def test_bad_seed_files_name_file_and_line(tmp_path, lines, message):
    with pytest.raises(SeedFormatError, match=message):
        read_self_instruct_jsonl(write_lines(tmp_path, lines))


def test_invalid_utf8_and_empty(tmp_path):
    good = json.dumps(GOOD).encode()
    with pytest.raises(SeedFormatError, match=r"seeds.jsonl:2: not valid UTF-8"):
        read_self_instruct_jsonl(write_lines(tmp_path, None, raw=good + b"\n\xff\xfe\n"))
    with pytest.raises(SeedFormatError, match=r"no seed tasks"):
        read_self_instruct_jsonl(write_lines(tmp_path, None, raw=b"\n\n"))


def test_missing_file_names_config_key(tmp_path):
    with pytest.raises(SeedFormatError, match=r"seed file not found \(config key `seeds.path`\)"):
        load_seeds(SeedsConfig(path=str(tmp_path / "none.jsonl")))


def test_limit(tmp_path):
    path = write_lines(tmp_path, [{**GOOD, "id": f"t{i}"} for i in range(5)])
    table, stats = load_seeds(SeedsConfig(path=str(path), limit=3))
    assert table.num_rows == 3 and stats["rows_in"] == 5 and stats["dropped"] == {"over_limit": 2}


ALPACA = [{"instruction": "Give a synonym of happy.", "input": "", "output": "Joyful."},
          {"instruction": "Translate to French.", "input": "Good night", "output": "Bonne nuit."}]


def expect_alpaca_rows(table):
    rows = table.to_pylist()
    assert [r["instruction"] for r in rows] == [a["instruction"] for a in ALPACA]
    assert [r["instances"] for r in rows] == [[{"input": a["input"], "output": a["output"]}] for a in ALPACA]
    assert [r["id"] for r in rows] == ["seed_0", "seed_1"] and not any(r["is_classification"] for r in rows)


def test_alpaca_json_jsonl_csv_parquet_and_hf_dataset(tmp_path):
    import datasets
    import pandas as pd

    files = {"a.json": lambda p: p.write_text(json.dumps(ALPACA)),
             "a.jsonl": lambda p: p.write_text("\n".join(json.dumps(a) for a in ALPACA) + "\n"),
             "a.csv": lambda p: pd.DataFrame(ALPACA).to_csv(p, index=False),
             "a.parquet": lambda p: pd.DataFrame(ALPACA).to_parquet(p),
             "hf": lambda p: datasets.Dataset.from_list(ALPACA).save_to_disk(str(p))}
    expected_format = {"a.json": "alpaca", "a.jsonl": "alpaca", "a.csv": "table", "a.parquet": "table",
                       "hf": "hf_dataset"}
    for name, write in files.items():
        path = tmp_path / name
        write(path)
        table, stats = load_seeds(SeedsConfig(path=str(path)))
        expect_alpaca_rows(table)
        assert stats["format"] == expected_format[name], name


@pytest.mark.parametrize("name,content,message", [
    ("a.json", '[{"instruction": "x y z", "output": "o"},\n {"instruction": "", "output": "o"}]',
     r"a.json record 1: `instruction` must be a non-empty string"),
    ("a.json", '[{"instruction": "x", "output": "o"},\n {oops}]', r"a.json:2: malformed JSON"),
    ("a.json", '{"instruction": "x"}', r"holds a list of records, got dict"),
    ("a.csv", "instruction,input,output\nSay hi.,,Hi\nSay bye.,,\n", r"a.csv:3: `output` must be a non-empty string"),
    ("a.csv", "instruction,input,output,is_classification\nSay hi.,,Hi,maybe\n",
     r"a.csv:2: `is_classification` must be true or false"),
    ("b.jsonl", '{"instruction": "Say hi.", "output": "Hi"}\n{"instruction": "Say hi.", "output": 3}\n',
     r"b.jsonl:2: `output` must be a non-empty string"),
    ("c.txt", "hello", r"cannot detect the seed format"),
])
def test_bad_alpaca_and_table_inputs(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SeedFormatError, match=message):
        load_seeds(SeedsConfig(path=str(path)))


@pytest.mark.skipif(not EXTERNAL.exists(), reason="../shared/external is not beside this checkout")
def test_paper_seeds_detected_as_self_instruct():
    table, stats = load_seeds(SeedsConfig(path=str(EXTERNAL)))
    assert stats["format"] == "self_instruct" and table.num_rows == 175 and stats["classification_tasks"] == 26


def test_several_datasets_are_sources_of_one_table(tmp_path):
    """An Alpaca JSON file, the project's Self-Instruct JSONL (limited) and a Parquet table, in one run: every
    row says which file it came from, ids stay unique across files, and the stats count each source."""
    import pandas as pd

    (tmp_path / "alpaca_52k.json").write_text(json.dumps([
        {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat, sleep, move."},
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}]))
    pd.DataFrame({"id": ["seed_0"], "instruction": ["Name a prime."], "input": [""], "output": ["7"],
                  "category": ["math"]}).to_parquet(tmp_path / "extra.parquet")
    cfg = SeedsConfig(sources=[{"path": "alpaca_52k.json"},
                               {"path": str(ROOT / "data" / "seed_tasks.jsonl"), "limit": 3, "name": "ours"},
                               {"path": "extra.parquet", "name": "dolly"}])
    table, stats = load_seeds(cfg, base_dir=tmp_path)
    rows = table.to_pylist()
    assert [r["dataset"] for r in rows] == ["alpaca_52k"] * 2 + ["ours"] * 3 + ["dolly"]
    assert [r["id"] for r in rows[:2]] + [rows[-1]["id"]] == ["alpaca_52k/seed_0", "alpaca_52k/seed_1", "dolly/seed_0"]
    assert rows[2]["id"].startswith("ours/") and len({r["id"] for r in rows}) == 6
    assert {k: (v["format"], v["rows_in"], v["rows"]) for k, v in stats["datasets"].items()} == {
        "alpaca_52k": ("alpaca", 2, 2), "ours": ("self_instruct", 120, 3), "dolly": ("table", 1, 1)}
    assert stats["rows_in"] == 123 and stats["dropped"] == {"over_limit": 117} and stats["format"] == "several"
    from tasks.self_instruct import seed_examples

    examples = seed_examples(table)
    assert examples["dataset"].tolist()[:2] == ["alpaca_52k"] * 2 and examples["dataset"].iloc[-1] == "dolly"
    assert examples["id"].iloc[0] == "alpaca_52k/seed_0#0" and set(examples["origin"]) == {"seed"}


def test_one_path_is_one_dataset_named_after_its_file(tmp_path):
    table, stats = load_seeds(SeedsConfig(limit=2), base_dir=ROOT)
    assert table.column("dataset").to_pylist() == ["seed_tasks"] * 2 and not table.column("id")[0].as_py().count("/")
    assert stats["datasets"]["seed_tasks"]["rows"] == 2 and stats["format"] == "self_instruct"


@pytest.mark.parametrize("section,message", [
    ({"sources": [{"path": "a.json"}, {"path": "b/a.jsonl"}]}, r"two sources share a name \(a\)"),
    ({"sources": [{"path": "a.json"}], "limit": 5}, "give each source its own `format` and `limit`"),
    ({"sources": [{"path": "a.json", "name": "has space"}]}, "name"),
])
def test_bad_sources_are_refused(section, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        SeedsConfig(**section)


def test_a_missing_source_names_its_key(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi."}]))
    with pytest.raises(SeedFormatError, match=r"nope.json: seed file not found \(config key `seeds.sources\[1\].path`\)"):
        load_seeds(SeedsConfig(sources=[{"path": "a.json"}, {"path": "nope.json"}]), base_dir=tmp_path)


def test_a_table_loads_column_wise_as_its_records_would(tmp_path):
    """The same records as an Alpaca JSON file (read record by record) and as Parquet and CSV tables (read
    column-wise): the same seed table, defaults included (no id, no input, no category)."""
    import pandas as pd

    records = [{"id": "a", "instruction": "  Name a color. ", "input": "sky", "output": "Blue. ", "category": " qa",
                "is_classification": True},
               {"id": None, "instruction": "Say hi.", "input": None, "output": "Hi.", "category": None,
                "is_classification": None},
               {"id": "c", "instruction": "Naïve café, 日本語?", "input": "x\ny \"q\"", "output": "ok",
                "category": "qa", "is_classification": False}]
    as_json = [{k: v for k, v in r.items() if v is not None} for r in records]
    (tmp_path / "a.json").write_text(json.dumps(as_json))
    pd.DataFrame(records).to_parquet(tmp_path / "a.parquet")
    expected, _ = load_seeds(SeedsConfig(path=str(tmp_path / "a.json")))
    table, _ = load_seeds(SeedsConfig(path=str(tmp_path / "a.parquet")))
    assert table.to_pylist() == expected.to_pylist()
    assert expected.column("id").to_pylist() == ["a", "seed_1", "c"]
    assert expected.column("category").to_pylist() == ["qa", "unknown", "qa"]
    frame = pd.DataFrame(records).fillna("").astype(str)
    frame.loc[1, "id"] = "seed_1"
    frame.loc[1, "category"] = "unknown"
    frame.loc[1, "is_classification"] = "false"
    frame.to_csv(tmp_path / "a.csv", index=False)
    table, _ = load_seeds(SeedsConfig(path=str(tmp_path / "a.csv")))
    assert table.to_pylist() == expected.to_pylist()


@pytest.mark.parametrize("frame,message", [
    ({"instruction": ["a b", "c d"], "output": ["x", "y"], "id": ["t", "t"]},
     r"a.parquet row 1: duplicate id `t` \(first at .*a.parquet row 0\)"),
    ({"instruction": ["a b", "c d"], "output": ["x", "  "]}, r"a.parquet row 1: `output` must be a non-empty string"),
    ({"instruction": ["a b", None], "output": ["x", "y"]}, r"a.parquet row 1: `instruction` must be a non-empty"),
    ({"instruction": ["a b"], "output": ["x"], "id": [7]}, r"a.parquet row 0: `id` must be a non-empty string"),
    ({"instruction": ["a b"], "output": ["x"], "input": [3]}, r"a.parquet row 0: `input` must be a string"),
    ({"instruction": ["a b", "c"], "output": ["x", "y"], "category": ["qa", " "]},
     r"row 1: `category` must be a non-empty string"),
    ({"output": ["x"]}, r"a.parquet row 0: `instruction` must be a non-empty string"),
    ({"instruction": [], "output": []}, r"a.parquet: no seed tasks in the file"),
])
def test_bad_parquet_rows_are_named(tmp_path, frame, message):
    import pandas as pd

    pd.DataFrame(frame).to_parquet(tmp_path / "a.parquet")
    with pytest.raises(SeedFormatError, match=message):
        load_seeds(SeedsConfig(path=str(tmp_path / "a.parquet")))
