import json
from collections import Counter
from pathlib import Path

import pytest

from tasks import conversation
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
    ({"sources": [{"path": "a.json"}], "limit": 5},
     "give each source its own `format`, `limit` and `bad_conversations`"),
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


# --- conversations: ShareGPT, OpenAI messages, tables and HF datasets with a conversation column -----------

def turns(*pairs, speaker=("human", "gpt")):
    """ShareGPT turns from (question, answer) pairs."""
    return [t for q, a in pairs for t in ({"from": speaker[0], "value": q}, {"from": speaker[1], "value": a})]


def msgs(*pairs, system=None):
    out = [{"role": "system", "content": system}] if system else []
    return out + [t for q, a in pairs for t in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


SHAREGPT = [
    {"id": "QWJhYvA_0", "conversations": turns(("Name a prime.", "7."))},  # one exchange: a plain row
    {"id": "i6IyJda_0", "conversations": turns((" Capital of France? ", "Paris."), ("And of Peru?", "Lima."))},
    {"id": "sys_turn", "conversations": [{"from": "system", "value": "Be brief."}, *turns(("Hi", "Hello."))],
     "category": "dialog"},
    {"id": "sys_field", "system": "You are a tutor.", "conversations":
        turns(("What is 2+2?", "4."), ("Times 3?", "12."), ("Minus 5?", "7."), speaker=("user", "ChatGPT"))},
    {"conversations": turns(("No id here.", "Fine."), ("Really?", "Yes.")), "system": ""},  # empty system: none
]
SHAREGPT_ROWS = [  # (id, instruction, output, messages, category)
    ("QWJhYvA_0", "Name a prime.", "7.", None, "unknown"),
    ("i6IyJda_0", "Capital of France?", "Paris.", msgs(("Capital of France?", "Paris."), ("And of Peru?", "Lima.")),
     "unknown"),
    ("sys_turn", "Hi", "Hello.", msgs(("Hi", "Hello."), system="Be brief."), "dialog"),
    ("sys_field", "What is 2+2?", "4.", msgs(("What is 2+2?", "4."), ("Times 3?", "12."), ("Minus 5?", "7."),
                                            system="You are a tutor."), "unknown"),
    ("seed_4", "No id here.", "Fine.", msgs(("No id here.", "Fine."), ("Really?", "Yes.")), "unknown"),
]


def expect_conversation_rows(table, expected=SHAREGPT_ROWS):
    rows = table.to_pylist()
    assert [(r["id"], r["instruction"], r["instances"], r["messages"], r["category"]) for r in rows] == [
        (i, ins, [{"input": "", "output": out}], m, c) for i, ins, out, m, c in expected]
    assert all(r["name"] == r["id"] and r["is_classification"] is False for r in rows)


@pytest.mark.parametrize("name", ["chats.jsonl", "chats.json"])
def test_sharegpt_jsonl_and_json_are_detected_and_loaded(tmp_path, name):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in SHAREGPT) + "\n" if name.endswith("l")
                    else json.dumps(SHAREGPT, indent=2))
    table, stats = load_seeds(SeedsConfig(path=str(path)))
    expect_conversation_rows(table)
    assert stats["format"] == "sharegpt" and stats["conversations"] == 4
    assert stats["turns"] == {"1": 2, "2": 2, "3": 1} and stats["instances"] == 5
    assert table.schema.field("messages").type == conversation.MESSAGES
    # The same file with the format named.
    named, _ = load_seeds(SeedsConfig(path=str(path), format="sharegpt"))
    assert named.equals(table)


def test_messages_jsonl_is_detected_and_loaded(tmp_path):
    records = [{"messages": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7."}],
                "id": "QWJhYvA_0"}]
    for i, _, _, m, category in SHAREGPT_ROWS[1:]:
        records.append({"messages": m, **({"id": i} if i != "seed_4" else {}),
                        **({"category": category} if category != "unknown" else {})})
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    table, stats = load_seeds(SeedsConfig(path=str(path)))
    expect_conversation_rows(table)
    assert stats["format"] == "messages" and stats["conversations"] == 4 and stats["turns"] == {"1": 2, "2": 2, "3": 1}
    as_json = tmp_path / "chats.json"
    as_json.write_text(json.dumps(records))
    table, stats = load_seeds(SeedsConfig(path=str(as_json)))
    expect_conversation_rows(table)
    assert stats["format"] == "messages"


def test_alpaca_rows_have_a_null_messages_column(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ALPACA))
    table, stats = load_seeds(SeedsConfig(path=str(tmp_path / "a.json")))
    assert table.column("messages").to_pylist() == [None, None]
    assert stats["conversations"] == 0 and stats["turns"] == {"1": 2}
    table, stats = load_seeds(SeedsConfig(limit=4), base_dir=ROOT)
    assert table.column("messages").null_count == 4 and stats["turns"] == {"1": 4}


def test_parquet_and_hf_dataset_with_a_messages_column(tmp_path):
    """TRL's conversational datasets (a `messages` column) as Parquet and as a saved HF dataset; a row whose
    `messages` is null is read by its Alpaca columns."""
    import datasets
    import pandas as pd

    conversations = [m if m is not None else msgs((ins, out)) for _, ins, out, m, _ in SHAREGPT_ROWS]
    ids = [r[0] for r in SHAREGPT_ROWS]
    categories = [r[4] for r in SHAREGPT_ROWS]
    datasets.Dataset.from_dict({"messages": conversations}).save_to_disk(str(tmp_path / "hf"))
    table, stats = load_seeds(SeedsConfig(path=str(tmp_path / "hf")))
    expect_conversation_rows(table, [("seed_%d" % n, *r[1:4], "unknown") for n, r in enumerate(SHAREGPT_ROWS)])
    assert stats["format"] == "hf_dataset" and stats["conversations"] == 4

    frame = pd.DataFrame({"id": ids, "messages": conversations, "category": categories})
    frame.to_parquet(tmp_path / "chats.parquet")
    table, stats = load_seeds(SeedsConfig(path=str(tmp_path / "chats.parquet")))
    expect_conversation_rows(table)
    assert stats["format"] == "table" and stats["turns"] == {"1": 2, "2": 2, "3": 1}

    # Mixed: Alpaca rows with a null `messages` among conversations (as this project's own tables are).
    mixed = pd.DataFrame({"instruction": ["Translate to French.", None], "input": ["Good night", None],
                          "output": ["Bonne nuit.", None], "messages": [None, conversations[1]]})
    mixed.to_parquet(tmp_path / "mixed.parquet")
    rows = load_seeds(SeedsConfig(path=str(tmp_path / "mixed.parquet")))[0].to_pylist()
    assert [(r["id"], r["instruction"], r["instances"], r["messages"]) for r in rows] == [
        ("seed_0", "Translate to French.", [{"input": "Good night", "output": "Bonne nuit."}], None),
        ("seed_1", "Capital of France?", [{"input": "", "output": "Paris."}], conversations[1])]


def test_parquet_and_hf_dataset_with_a_sharegpt_conversations_column(tmp_path):
    import datasets
    import pandas as pd

    frame = pd.DataFrame({"id": [r.get("id", "seed_4") for r in SHAREGPT],
                          "conversations": [r["conversations"] for r in SHAREGPT],
                          "system": [r.get("system") for r in SHAREGPT],
                          "category": [r.get("category") for r in SHAREGPT]})
    frame.to_parquet(tmp_path / "chats.parquet")
    table, stats = load_seeds(SeedsConfig(path=str(tmp_path / "chats.parquet")))
    expect_conversation_rows(table)
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "hf"))
    table, stats = load_seeds(SeedsConfig(path=str(tmp_path / "hf")))
    expect_conversation_rows(table)
    assert stats["format"] == "hf_dataset" and stats["conversations"] == 4


GOOD_CHAT = {"id": "c1", "conversations": turns(("Hi", "Hello."))}


@pytest.mark.parametrize("lines,message", [
    ([GOOD_CHAT, {"id": "c2", "conversations": turns(("Hi", "Hello."))[::-1]}],
     r"chats.jsonl:2: turn 0 is an assistant turn to open the conversation; expected user"),
    ([GOOD_CHAT, {"id": "c2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "human", "value": "Hi"},
                                                 {"from": "gpt", "value": "Hello."}]}],
     r"chats.jsonl:2: turn 1 is a user turn after a user turn; expected assistant"),
    ([GOOD_CHAT, {"id": "c2", "conversations": turns(("Hi", "Hello."), ("More?", ""))}],
     r"chats.jsonl:2: turn 3 \(assistant\) is empty"),
    ([GOOD_CHAT, {"id": "c2", "conversations": turns(("Hi", "Hello."), ("More?", "Yes."))[:-1]}],
     r"chats.jsonl:2: the conversation ends with a user turn"),
    ([{"id": "c2", "conversations": turns(("Hi", "Hello."), speaker=("human", "claude"))}],
     r"chats.jsonl:1: conversations\[1\] has unknown speaker 'claude'"),
    ([GOOD_CHAT, {"id": "c2", "turns": []}], r"chats.jsonl:2: missing `conversations`"),
    ([GOOD_CHAT, GOOD_CHAT], r"chats.jsonl:2: duplicate id `c1` \(first at .*chats.jsonl:1\)"),
    ([{**GOOD_CHAT, "system": "Be brief.", "conversations": [{"from": "system", "value": "Be terse."},
                                                           *GOOD_CHAT["conversations"]]}],
     r"chats.jsonl:1: both a `system` field and a system turn"),
    ([{**GOOD_CHAT, "system": 3}], r"chats.jsonl:1: `system` must be a string"),
    ([{**GOOD_CHAT, "id": 3}], r"chats.jsonl:1: `id` must be a non-empty string"),
    ([{**GOOD_CHAT, "category": ""}], r"chats.jsonl:1: `category` must be a non-empty string"),
    ([GOOD_CHAT, "[1]"], r"chats.jsonl:2: expected a JSON object, got list"),
    ([GOOD_CHAT, "{oops"], r"chats.jsonl:2: malformed JSON"),
])
def test_bad_sharegpt_records_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    with pytest.raises(SeedFormatError, match=message):
        load_seeds(SeedsConfig(path=str(path), format="sharegpt"))


def test_bad_records_in_a_json_list_name_the_record(tmp_path):
    path = tmp_path / "chats.json"
    path.write_text(json.dumps([GOOD_CHAT, {"id": "c2", "conversations": turns(("Hi", "Hello."),
                                                                               speaker=("human", "robot"))}]))
    with pytest.raises(SeedFormatError, match=r"chats.json record 1: conversations\[1\] has unknown speaker"):
        load_seeds(SeedsConfig(path=str(path)))
    path.write_text(json.dumps([GOOD_CHAT, GOOD_CHAT]))
    with pytest.raises(SeedFormatError, match=r"chats.json record 1: duplicate id `c1` \(first at .*record 0\)"):
        load_seeds(SeedsConfig(path=str(path)))
    path.write_text('[\n\n{"conversations": []},\n\n{oops}]')  # a blank line does not shift the line named
    with pytest.raises(SeedFormatError, match=r"chats.json:5: malformed JSON"):
        load_seeds(SeedsConfig(path=str(path), format="sharegpt"))
    path.write_text(json.dumps({"conversations": []}))
    with pytest.raises(SeedFormatError, match=r"chats.json: a ShareGPT JSON file holds a list of records, got dict"):
        load_seeds(SeedsConfig(path=str(path), format="sharegpt"))


@pytest.mark.parametrize("record,message", [
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello."}]},
     r"chats.jsonl:2: turn 1 has unknown role 'bot'; one of system, user, assistant"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]},
     r"chats.jsonl:2: turn 1 \(assistant\) is empty"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."},
                   {"role": "system", "content": "Be brief."}]},
     r"chats.jsonl:2: turn 2 is a system turn after an assistant turn; expected user"),
    ({"messages": []}, r"chats.jsonl:2: a conversation is a non-empty list of turns"),
    ({"id": "m1", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}]},
     r"chats.jsonl:2: duplicate id `m1` \(first at .*chats.jsonl:1\)"),
    ({"conversations": []}, r"chats.jsonl:2: missing `messages`"),
])
def test_bad_messages_records_name_file_and_line(tmp_path, record, message):
    good = {"id": "m1", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}]}
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(SeedFormatError, match=message):
        load_seeds(SeedsConfig(path=str(path), format="messages"))


@pytest.mark.parametrize("frame,message", [
    ({"messages": [msgs(("Hi", "Yo.")), msgs(("Hi", "Yo."))[::-1]]},
     r"a.parquet row 1: turn 0 is an assistant turn to open the conversation"),
    ({"messages": [msgs(("Hi", "Yo.")), None]}, r"a.parquet row 1: missing `messages`"),
    ({"messages": [msgs(("Hi", "Yo.")), msgs(("Hi", "Yo."))], "id": ["x", "x"]},
     r"a.parquet row 1: duplicate id `x` \(first at .*a.parquet row 0\)"),
    ({"instruction": ["Say hi.", None], "output": ["Hi.", None], "messages": [None, None]},
     r"a.parquet row 1: `instruction` must be a non-empty string"),
    ({"conversations": [turns(("Hi", "Yo.")), turns(("Hi", "Yo."), speaker=("human", "robot"))]},
     r"a.parquet row 1: conversations\[1\] has unknown speaker 'robot'"),
])
def test_bad_conversation_tables_name_the_row(tmp_path, frame, message):
    import pandas as pd

    pd.DataFrame(frame).to_parquet(tmp_path / "a.parquet")
    with pytest.raises(SeedFormatError, match=message):
        load_seeds(SeedsConfig(path=str(tmp_path / "a.parquet")))


def test_a_json_file_whose_first_record_is_long_is_still_detected(tmp_path):
    long = "word " * 300_000  # 1.5 MB: past the head read for detection
    path = tmp_path / "long.json"
    path.write_text(json.dumps([{"conversations": turns(("Summarize this: " + long, "Words."))}]))
    table, stats = load_seeds(SeedsConfig(path=str(path)))
    assert stats["format"] == "sharegpt" and table.num_rows == 1 and table.column("messages").null_count == 1


def test_written_sharegpt_data_loads_whole_and_distinct(tmp_path):
    """The test-data writer (tests/conversations.py): 40 Vicuna-style conversations of 1 to 4 answers, a few
    with a system prompt, each on its own topic; loaded as written."""
    from tests.conversations import write_sharegpt

    records = write_sharegpt(tmp_path / "vicuna.jsonl", n=40, seed=3)
    assert write_sharegpt(tmp_path / "again.jsonl", n=40, seed=3) == records  # deterministic
    assert (tmp_path / "vicuna.jsonl").read_text() == (tmp_path / "again.jsonl").read_text()
    assert write_sharegpt(tmp_path / "other.jsonl", n=40, seed=4) != records
    table, stats = load_seeds(SeedsConfig(path=str(tmp_path / "vicuna.jsonl")))
    systems = sum(r["conversations"][0]["from"] == "system" for r in records)
    answers = [sum(t["from"] == "gpt" for t in r["conversations"]) for r in records]
    assert systems == 5 and sorted(set(answers)) == [1, 2, 3, 4]
    assert stats["format"] == "sharegpt" and table.num_rows == 40
    assert stats["turns"] == {"1": 10, "2": 10, "3": 10, "4": 10}
    assert stats["conversations"] == sum(1 for r, n in zip(records, answers) if n > 1
                                         or r["conversations"][0]["from"] == "system")
    speaker = {"system": "system", "human": "user", "gpt": "assistant"}
    for row, record in zip(table.to_pylist(), records):
        whole = [{"role": speaker[t["from"]], "content": t["value"]} for t in record["conversations"]]
        assert row["id"] == record["id"] and (row["messages"] or [{"role": "user", "content": row["instruction"]},
                                                                  {"role": "assistant",
                                                                   "content": row["instances"][0]["output"]}]) == whole
    assert len(set(table.column("instruction").to_pylist())) == 40  # one topic each: nothing for dedup to merge
    assert len({r["instances"][0]["output"] for r in table.to_pylist()}) == 40
    write_sharegpt(tmp_path / "vicuna.json", n=40, seed=3)  # the same records as one JSON list
    assert load_seeds(SeedsConfig(path=str(tmp_path / "vicuna.json")))[0].equals(table)


def test_conversations_and_alpaca_rows_as_sources_of_one_table(tmp_path):
    (tmp_path / "alpaca.json").write_text(json.dumps(ALPACA))
    (tmp_path / "vicuna.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SHAREGPT))
    table, stats = load_seeds(SeedsConfig(sources=[{"path": "alpaca.json"}, {"path": "vicuna.jsonl"}]),
                              base_dir=tmp_path)
    assert table.column("dataset").to_pylist() == ["alpaca"] * 2 + ["vicuna"] * 5
    assert table.column("id").to_pylist()[2:4] == ["vicuna/QWJhYvA_0", "vicuna/i6IyJda_0"]
    assert [m is not None for m in table.column("messages").to_pylist()] == [False, False, False, True, True, True,
                                                                            True]
    assert stats["conversations"] == 4 and stats["turns"] == {"1": 4, "2": 2, "3": 1}
    assert {k: v["format"] for k, v in stats["datasets"].items()} == {"alpaca": "alpaca", "vicuna": "sharegpt"}


def test_bad_conversations_stop_the_run_or_are_skipped_and_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = {"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                         {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye!"}]}
    lines = [good, {"id": "b", "conversations": [{"from": "gpt", "value": "I start"}]},
             {"id": "c", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": " "}]},
             {"id": "d", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}]
    path = tmp_path / "dump.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(SeedFormatError, match=rf"^{path}:2: turn 0 is an assistant turn"):
        load_seeds(SeedsConfig(path=str(path)))
    table, stats = load_seeds(SeedsConfig(path=str(path), bad_conversations="skip"))
    assert table.column("id").to_pylist() == ["a", "d"]
    assert stats["rows_in"] == 4 and stats["dropped"] == {"bad_conversation": 2}
    skipped = stats["datasets"]["dump"]["bad_conversations"]
    assert skipped["skipped"] == 2 and [m.split(": ")[0] for m in skipped["first"]] == [f"{path}:2", f"{path}:3"]
    # the same rule for a table with a messages column, and with a limit on top
    rows = [{"id": r["id"], "messages": [{"role": {"human": "user", "gpt": "assistant"}[t["from"]],
                                          "content": t["value"]} for t in r["conversations"]]} for r in lines]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dump.parquet")
    table, stats = load_seeds(SeedsConfig(path=str(tmp_path / "dump.parquet"), bad_conversations="skip", limit=1))
    assert table.column("id").to_pylist() == ["a"] and stats["dropped"] == {"bad_conversation": 2, "over_limit": 1}
    # an Alpaca file is not a conversation file: its bad records still stop the run
    (tmp_path / "bad.jsonl").write_text('{"instruction": "x"}\n')
    with pytest.raises(SeedFormatError, match="`output` must be a non-empty string"):
        load_seeds(SeedsConfig(path=str(tmp_path / "bad.jsonl"), bad_conversations="skip"))
