"""The mixed training set in the formats trainers read, beside `train.parquet` and `eval.parquet`.

- `alpaca`: `<split>.alpaca.json`, a JSON list of {instruction, input, output} (Stanford Alpaca).
- `sharegpt`: `<split>.sharegpt.jsonl`, {"conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}.
- `messages`: `<split>.messages.jsonl`, {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
  (OpenAI fine-tuning, TRL's conversational format).
- `prompt_completion`: `<split>.prompt_completion.jsonl`, {"prompt", "completion"}, the prompt in this
  project's training template (Alpaca), so a trainer sees exactly what `finetune` trains on.
- `hf_dataset`: `hf_dataset/`, a `datasets.DatasetDict` with `train` and `eval`, from `save_to_disk`.

Each file is written to a temporary name and renamed, like every artifact file.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from tasks.artifacts import atomic_write_text
from tasks.prompts import alpaca_prompt


def user_turn(instruction: str, input: str) -> str:
    return f"{instruction.strip()}\n\n{input.strip()}" if input and input.strip() else instruction.strip()


def _records(df: pd.DataFrame) -> tuple[list[str], list[str], list[str]]:
    return (df["instruction"].fillna("").astype(str).tolist(), df["input"].fillna("").astype(str).tolist(),
            df["output"].fillna("").astype(str).tolist())


def _jsonl(objs) -> str:
    return "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs)


def alpaca(df: pd.DataFrame) -> str:
    ins, inp, out = _records(df)
    return json.dumps([{"instruction": a, "input": b, "output": c} for a, b, c in zip(ins, inp, out)],
                      ensure_ascii=False, indent=1) + "\n"


def sharegpt(df: pd.DataFrame) -> str:
    ins, inp, out = _records(df)
    return _jsonl({"id": i, "conversations": [{"from": "human", "value": user_turn(a, b)}, {"from": "gpt", "value": c}]}
                  for i, a, b, c in zip(df["id"].astype(str), ins, inp, out))


def messages(df: pd.DataFrame) -> str:
    ins, inp, out = _records(df)
    return _jsonl({"messages": [{"role": "user", "content": user_turn(a, b)}, {"role": "assistant", "content": c}]}
                  for a, b, c in zip(ins, inp, out))


def prompt_completion(df: pd.DataFrame) -> str:
    ins, inp, out = _records(df)
    return _jsonl({"prompt": alpaca_prompt(a, b), "completion": c} for a, b, c in zip(ins, inp, out))


TEXT_FORMATS = {"alpaca": ("alpaca.json", alpaca), "sharegpt": ("sharegpt.jsonl", sharegpt),
                "messages": ("messages.jsonl", messages), "prompt_completion": ("prompt_completion.jsonl",
                                                                               prompt_completion)}
EXPORT_COLUMNS = ["id", "instruction", "input", "output", "category", "origin", "source"]


def export_all(splits: dict[str, pd.DataFrame], out_dir: Path, formats: list[str]) -> dict[str, list[str]]:
    """Write each format for each split into `out_dir`; returns format -> file names written."""
    written: dict[str, list[str]] = {}
    for fmt in formats:
        if fmt == "hf_dataset":
            written[fmt] = [_save_hf_dataset(splits, out_dir / "hf_dataset")]
            continue
        suffix, render = TEXT_FORMATS[fmt]
        written[fmt] = []
        for split, df in splits.items():
            name = f"{split}.{suffix}"
            atomic_write_text(out_dir / name, render(df))
            written[fmt].append(name)
    return written


def _save_hf_dataset(splits: dict[str, pd.DataFrame], target: Path) -> str:
    from datasets import Dataset, DatasetDict

    columns = [c for c in EXPORT_COLUMNS if all(c in df for df in splits.values())]
    dd = DatasetDict({split: Dataset.from_pandas(df[columns].fillna("").astype(str).reset_index(drop=True),
                                                  preserve_index=False)
                      for split, df in splits.items()})
    tmp = Path(tempfile.mkdtemp(prefix=".hf_dataset.", dir=target.parent))
    try:
        dd.save_to_disk(str(tmp / "d"))
        if target.exists():
            shutil.rmtree(target)
        (tmp / "d").rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target.name
