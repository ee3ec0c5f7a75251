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
        assert hf[split].features == old.features and hf[split].to_list() == old.to_list()


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
