"""The streamed exports write exactly the bytes the old whole-file renderers wrote: `json.dumps` of the whole
list with indent=1 for Alpaca, `json.dumps` per line for the JSON-lines formats. The expected bytes are built
here the old way, on rows with unicode, empty and missing inputs, quotes, backslashes, control characters and
newlines, across several batches."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from tasks import exports
from tasks.conversation import messages_of
from tasks.exports import export_all, user_turn
from tasks.prompts import alpaca_prompt

FORMATS = ["alpaca", "sharegpt", "messages", "prompt_completion", "hf_dataset"]


def rows(n: int = 11) -> pd.DataFrame:
    texts = ["Say \"hi\" to Zoë.", "Übersetze: 東京 ist groß.", "  padded instruction \t", "line one\nline two",
             "back\\slash and tab\t and \x01 control", "emoji 🙂 and \u2028 separator", "\x7f del and 'single'"]
    inputs = ["", None, "  ", "context with \"quotes\"\nand a newline", "ünïcode input", "\r\n", "plain"]
    outputs = ["Hello, \"Zoë\".", "", "Tokyo is big.\n\n- a\n- b", "\\n is not a newline", "42", "é" * 3, "end"]
    return pd.DataFrame({
        "id": [f"task-{i}#{i % 3}" for i in range(n)],
        "instruction": [texts[i % len(texts)] + ("" if i < len(texts) else f" ({i})") for i in range(n)],
        "input": [inputs[i % len(inputs)] for i in range(n)],
        "output": [outputs[i % len(outputs)] for i in range(n)],
        "category": ["qa", "math"] * (n // 2) + ["qa"] * (n % 2),
        "origin": ["seed"] * n,
        "source": ["qa", "math"] * (n // 2) + ["qa"] * (n % 2),
    })


def old_files(df: pd.DataFrame) -> dict[str, str]:
    """The files as tasks/exports.py rendered them before it streamed (each a whole string)."""
    ins = df["instruction"].fillna("").astype(str).tolist()
    inp = df["input"].fillna("").astype(str).tolist()
    out = df["output"].fillna("").astype(str).tolist()

    def jsonl(objs):
        return "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs)

    return {
        "alpaca.json": json.dumps([{"instruction": a, "input": b, "output": c} for a, b, c in zip(ins, inp, out)],
                                  ensure_ascii=False, indent=1) + "\n",
        "sharegpt.jsonl": jsonl({"id": i, "conversations": [{"from": "human", "value": user_turn(a, b)},
                                                           {"from": "gpt", "value": c}]}
                                for i, a, b, c in zip(df["id"].astype(str), ins, inp, out)),
        "messages.jsonl": jsonl({"messages": [{"role": "user", "content": user_turn(a, b)},
                                              {"role": "assistant", "content": c}]} for a, b, c in zip(ins, inp, out)),
        "prompt_completion.jsonl": jsonl({"prompt": alpaca_prompt(a, b), "completion": c}
                                         for a, b, c in zip(ins, inp, out)),
    }


@pytest.mark.parametrize("as_table", [False, True])
@pytest.mark.parametrize("batch_rows", [3, 4096])
def test_streamed_exports_are_byte_identical_to_whole_file_json(tmp_path, monkeypatch, as_table, batch_rows):
    monkeypatch.setattr(exports, "BATCH_ROWS", batch_rows)
    train, evals = rows(11), rows(2).assign(id=["e-0", "e-1"])
    splits = {"train": train, "eval": evals}
    given = {k: pa.Table.from_pandas(v, preserve_index=False) for k, v in splits.items()} if as_table else splits
    written = export_all(given, tmp_path, FORMATS)
    assert written == {"alpaca": ["train.alpaca.json", "eval.alpaca.json"],
                       "sharegpt": ["train.sharegpt.jsonl", "eval.sharegpt.jsonl"],
                       "messages": ["train.messages.jsonl", "eval.messages.jsonl"],
                       "prompt_completion": ["train.prompt_completion.jsonl", "eval.prompt_completion.jsonl"],
                       "hf_dataset": ["hf_dataset"]}
    for split, df in splits.items():
        for suffix, text in old_files(df).items():
            assert (tmp_path / f"{split}.{suffix}").read_bytes() == text.encode("utf-8"), (split, suffix)
    assert not list(tmp_path.glob(".*.tmp"))  # temp files renamed, none left behind

    from datasets import Dataset, load_from_disk

    hf = load_from_disk(str(tmp_path / "hf_dataset"))
    assert set(hf) == {"train", "eval"}
    for split, df in splits.items():  # the old way: Dataset.from_pandas of the filled, stringified columns
        old = Dataset.from_pandas(df[exports.EXPORT_COLUMNS].fillna("").astype(str), preserve_index=False)
        columns = hf[split].remove_columns("messages")
        assert columns.features == old.features and columns.to_list() == old.to_list()
        # and every row's conversation, for TRL: its user turn and its (stripped) answer
        filled = df.fillna("").astype(str)
        assert hf[split]["messages"] == [messages_of(a, b, c) for a, b, c in
                                         zip(filled["instruction"], filled["input"], filled["output"])]


def test_empty_split_and_single_format(tmp_path):
    empty = rows(3).iloc[:0]
    written = export_all({"train": rows(3), "eval": empty}, tmp_path, ["alpaca", "messages"])
    assert written == {"alpaca": ["train.alpaca.json", "eval.alpaca.json"],
                       "messages": ["train.messages.jsonl", "eval.messages.jsonl"]}
    assert (tmp_path / "eval.alpaca.json").read_text() == json.dumps([], indent=1) + "\n" == "[]\n"
    assert (tmp_path / "eval.messages.jsonl").read_bytes() == b""
    assert not (tmp_path / "train.sharegpt.jsonl").exists() and not (tmp_path / "hf_dataset").exists()
    assert json.loads((tmp_path / "train.alpaca.json").read_text())[2]["input"] == "  "


def test_a_failed_export_leaves_no_file(tmp_path, monkeypatch):
    (tmp_path / "train.messages.jsonl").write_text("old\n")

    def broken(instruction, input):
        raise RuntimeError("boom")

    monkeypatch.setattr(exports, "user_turn", broken)
    with pytest.raises(RuntimeError, match="boom"):
        export_all({"train": rows(3)}, tmp_path, ["alpaca", "messages"])
    assert (tmp_path / "train.messages.jsonl").read_text() == "old\n"  # the old file stays whole
    assert not (tmp_path / "train.alpaca.json").exists() and not list(tmp_path.glob(".*"))


@pytest.mark.filterwarnings("ignore:'str' is not supported as a fill value")  # the old way, on purpose
def test_non_string_columns_are_written_as_text(tmp_path):
    df = rows(4).assign(output=[1, 2.5, np.nan, 4.0])
    export_all({"train": df}, tmp_path, ["alpaca", "hf_dataset"])
    assert (tmp_path / "train.alpaca.json").read_text() == old_files(df)["alpaca.json"]
    from datasets import load_from_disk

    assert load_from_disk(str(tmp_path / "hf_dataset"))["train"]["output"] == ["1.0", "2.5", "", "4.0"]


# --- conversations: multi-turn rows keep every turn -------------------------------------------------------

SYSTEM = "You are a terse assistant."
THREE = [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7."},
         {"role": "user", "content": "A bigger one?"}, {"role": "assistant", "content": "101, \"odd\"."},
         {"role": "user", "content": "And one below 5?"}, {"role": "assistant", "content": "3 — or 2."}]
WITH_SYSTEM = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi 🙂"},
               {"role": "assistant", "content": "Hello.\nHow can I help?"}]
SYSTEM_TWO = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Capital of France?"},
              {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Of Peru?"},
              {"role": "assistant", "content": "Lima."}]


def mixed_rows() -> pd.DataFrame:
    """Single-turn rows (an input, a null id, padded text) around three conversations: one of three
    exchanges, one of one exchange with a system prompt, one of two with a system prompt. A conversation
    row's own columns are its first exchange, as the seeds stage writes them."""
    conversations = [None, THREE, None, WITH_SYSTEM, None, SYSTEM_TWO, None]
    firsts = {1: THREE, 3: WITH_SYSTEM, 5: SYSTEM_TWO}
    instruction = ["Say hi.", None, "Translate to French.", None, "  Sum these. ", None, "Zoë?"]
    inputs = ["", "", "Good night", "", "2, 3", "", None]
    outputs = ["Hi.", None, "Bonne nuit.", None, " 5 ", None, "Oui."]
    for row, messages in firsts.items():
        system = 1 if messages[0]["role"] == "system" else 0
        instruction[row], outputs[row] = messages[system]["content"], messages[system + 1]["content"]
    return pd.DataFrame({"id": ["a", "b", None, "d", "e", "f", "g"], "instruction": instruction, "input": inputs,
                         "output": outputs, "category": ["qa"] * 7, "origin": ["seed"] * 7, "source": ["qa"] * 7,
                         "messages": conversations})


def text(value) -> str:
    return value if isinstance(value, str) else ""  # pandas' missing text is None or NaN


def whole_conversation(row) -> list[dict]:
    return messages_of(text(row["instruction"]), text(row["input"]), text(row["output"]), row["messages"])


@pytest.mark.parametrize("given", ["table", "parquet_frame"])
def test_conversations_keep_every_turn_in_every_export(tmp_path, monkeypatch, given):
    """A table mixing single- and multi-turn rows, in batches of 2: read back, every file holds each row's
    conversation turn by turn; single-turn rows are written as before; prompt_completion leaves the
    conversations out and says how many."""
    monkeypatch.setattr(exports, "BATCH_ROWS", 2)
    frame = mixed_rows()
    table = pa.Table.from_pandas(frame, preserve_index=False)
    assert table.schema.field("messages").type == pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    if given == "table":
        data = table
    else:  # as the mix hands a DataFrame over: conversations are arrays of dicts, one-exchange rows None
        import pyarrow.parquet as pq

        pq.write_table(table, tmp_path / "rows.parquet")
        data = pq.read_table(tmp_path / "rows.parquet").to_pandas()
        assert isinstance(data["messages"][1], np.ndarray) and data["messages"][0] is None
    out = tmp_path / "out"
    out.mkdir()
    written = export_all({"train": data}, out, FORMATS)
    assert written["left_out"] == {"prompt_completion": {"multi_turn": {"train": 3}}}
    rows = frame.to_dict("records")
    expected = [whole_conversation(r) for r in rows]
    assert [len(m) for m in expected] == [2, 6, 2, 3, 2, 5, 2]
    # The text files write a single-turn row's output as it is (as they always did); messages_of strips it.
    assert expected[4][1]["content"] == "5"
    expected_text = [c if r["messages"] is not None else [c[0], {**c[1], "content": text(r["output"])}]
                     for r, c in zip(rows, expected)]

    share = [json.loads(line) for line in (out / "train.sharegpt.jsonl").read_text().splitlines()]
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    assert [r["id"] for r in share] == ["a", "b", None, "d", "e", "f", "g"]  # a null id is JSON null, not NaN
    assert (out / "train.sharegpt.jsonl").read_text().splitlines()[2].startswith('{"id": null, ')
    assert [r["conversations"] for r in share] == [[{"from": speaker[m["role"]], "value": m["content"]} for m in c]
                                                    for c in expected_text]
    assert share[3]["conversations"][0] == {"from": "system", "value": SYSTEM}

    messages = [json.loads(line) for line in (out / "train.messages.jsonl").read_text().splitlines()]
    assert [m["messages"] for m in messages] == expected_text

    alpaca = [{"instruction": "Say hi.", "input": "", "output": "Hi."},
              {"instruction": "And one below 5?", "input": "", "output": "3 — or 2.",
               "history": [["Name a prime.", "7."], ["A bigger one?", "101, \"odd\"."]]},
              {"instruction": "Translate to French.", "input": "Good night", "output": "Bonne nuit."},
              {"instruction": "Hi 🙂", "input": "", "output": "Hello.\nHow can I help?", "system": SYSTEM},
              {"instruction": "  Sum these. ", "input": "2, 3", "output": " 5 "},
              {"instruction": "Of Peru?", "input": "", "output": "Lima.", "system": SYSTEM,
               "history": [["Capital of France?", "Paris."]]},
              {"instruction": "Zoë?", "input": "", "output": "Oui."}]
    # Byte for byte the JSON list json.dumps writes (indent=1), the multi-turn records in their places.
    assert (out / "train.alpaca.json").read_text() == json.dumps(alpaca, ensure_ascii=False, indent=1) + "\n"

    completions = [json.loads(line) for line in (out / "train.prompt_completion.jsonl").read_text().splitlines()]
    single = [r for r in rows if r["messages"] is None]
    assert completions == [{"prompt": alpaca_prompt(r["instruction"], text(r["input"])), "completion": r["output"]}
                           for r in single]

    from datasets import load_from_disk

    hf = load_from_disk(str(out / "hf_dataset"))["train"]
    assert hf["messages"] == expected
    assert hf["instruction"][1] == "Name a prime." and hf["id"][2] == ""  # the columns as before

    # Single-turn rows: the bytes of a table without conversations.
    alone = out / "alone"
    alone.mkdir()
    export_all({"train": frame[frame["messages"].isna()].drop(columns="messages")}, alone, FORMATS[:-1])
    for suffix in ("sharegpt.jsonl", "messages.jsonl", "prompt_completion.jsonl"):
        lines = (out / f"train.{suffix}").read_text().splitlines()
        if suffix != "prompt_completion.jsonl":
            lines = [line for n, line in enumerate(lines) if rows[n]["messages"] is None]
        assert lines == (alone / f"train.{suffix}").read_text().splitlines(), suffix


def test_no_conversations_no_left_out(tmp_path):
    written = export_all({"train": mixed_rows().iloc[[0, 2]]}, tmp_path, ["prompt_completion"])
    assert written == {"prompt_completion": ["train.prompt_completion.jsonl"]}
