"""Training examples tokenized once (tasks/tokenized.py): the arrays hold exactly the examples built one row
at a time, a second preparation or a resumed run reads them instead of tokenizing again, and a change of
rows or length settings gets its own."""

import numpy as np
import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from tasks import tokenized
from tasks.config import EvaluateConfig, FinetuneConfig
from tasks.finetune import finetune
from tasks.llm.losses import IGNORE
from tasks.prompts import alpaca_prompt
from tests.unit.test_finetune import mixed_frame


@pytest.fixture(scope="module")
def tokenizer(gemma_tokenizer_dir):
    return AutoTokenizer.from_pretrained(gemma_tokenizer_dir)


def rows(n: int) -> pa.Table:
    """Rows with and without input, unicode, an answer too long for 64 tokens and a prompt alone too long."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "naïve", "日本語", "x=1;", "\"quoted\"", "line\nbreak", "42", "tab\there"]
    out = []
    for i in range(n):
        pick = lambda k: " ".join(rng.choice(words, k))  # noqa: E731
        out.append({"id": f"r{i}", "instruction": f"Task {i}: {pick(3)}",
                    "input": pick(int(rng.integers(1, 6))) if i % 3 else ("word " * 80 if i % 7 == 0 else ""),
                    "output": pick(int(rng.integers(1, 40)))})
    return pa.Table.from_pylist(out)


def one_at_a_time(tok, row: dict, max_length: int, truncation: str):
    prompt = tok(alpaca_prompt(row["instruction"], row["input"]))["input_ids"]
    response = tok(row["output"].strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    room = max_length - len(prompt)
    if room < 1 or (truncation == "drop" and len(response) > room):
        return None
    response = response[:room]
    return prompt + response, [IGNORE] * len(prompt) + response


@pytest.mark.parametrize("truncation", ["response", "drop"])
def test_arrays_hold_the_examples_built_row_by_row(tokenizer, gemma_tokenizer_dir, tmp_path, monkeypatch, truncation):
    monkeypatch.setattr(tokenized, "BATCH_ROWS", 16)  # several batches, one of them partial
    table = rows(53)
    examples, info = tokenized.prepare(tokenizer, table, 64, truncation, tmp_path, gemma_tokenizer_dir)
    assert not info["reused"] and isinstance(examples.tokens, np.memmap) and examples.tokens.dtype == np.int32
    expected = [one_at_a_time(tokenizer, r, 64, truncation) for r in table.to_pylist()]
    kept = [i for i, e in enumerate(expected) if e is not None]
    assert examples.rows.tolist() == kept and len(examples) == len(kept) < 53
    for position, row in enumerate(kept):
        ex = examples[position]
        assert (ex.input_ids, ex.labels) == expected[row]
        assert examples.lengths[position] == len(ex.input_ids) and examples.trainable[position] == ex.trainable_tokens
    dropped = 53 - len(kept)
    assert sum(v for k, v in examples.truncation.items() if k.startswith("dropped")) == dropped


def test_a_second_preparation_reads_the_arrays_and_other_settings_get_their_own(tokenizer, gemma_tokenizer_dir,
                                                                                tmp_path, monkeypatch):
    table = rows(20)
    first, info = tokenized.prepare(tokenizer, table, 64, "response", tmp_path, gemma_tokenizer_dir)
    calls = []
    monkeypatch.setattr(tokenized, "encode", lambda *a, **k: calls.append(a) or pytest.fail("tokenized again"))
    again, info2 = tokenized.prepare(tokenizer, table.to_pandas(), 64, "response", tmp_path, gemma_tokenizer_dir)
    assert info2["reused"] and info2["path"] == info["path"] and not calls
    assert np.array_equal(np.asarray(again.tokens), np.asarray(first.tokens))
    monkeypatch.undo()
    for other in [dict(max_length=48), dict(truncation="drop"),
                  dict(table=table.set_column(3, "output", pa.array(["changed"] * 20)))]:
        args = {"table": table, "max_length": 64, "truncation": "response", **other}
        _, info3 = tokenized.prepare(tokenizer, args["table"], args["max_length"], args["truncation"], tmp_path,
                                     gemma_tokenizer_dir)
        assert not info3["reused"] and info3["path"] != info["path"]
    assert len(list(tmp_path.glob("*/_SUCCESS"))) == 4 and not list(tmp_path.glob("*.tmp"))


def test_a_staging_directory_left_by_a_crash_is_never_read(tokenizer, gemma_tokenizer_dir, tmp_path):
    table = rows(10)
    where = tmp_path / tokenized.key(tokenized.tokenizer_fingerprint(gemma_tokenizer_dir),
                                     tokenized.rows_fingerprint(table), 64, "response")
    (where.with_name(where.name + ".tmp")).mkdir(parents=True)
    (where.with_name(where.name + ".tmp") / "tokens.bin").write_bytes(b"\0" * 12)  # half-written
    where.mkdir()
    (where / "tokens.bin").write_bytes(b"\0" * 8)  # no _SUCCESS: not done
    examples, info = tokenized.prepare(tokenizer, table, 64, "response", tmp_path, gemma_tokenizer_dir)
    expected = [one_at_a_time(tokenizer, r, 64, "response") for r in table.to_pylist()]
    assert not info["reused"] and (where / "_SUCCESS").is_file() and not where.with_name(where.name + ".tmp").exists()
    assert [(examples[i].input_ids, examples[i].labels) for i in range(len(examples))] == [e for e in expected if e]


def test_finetune_tokenizes_once_across_runs_with_a_shared_root(tiny_model_dir, tmp_path):
    cfg = FinetuneConfig(max_steps=2, epochs=3, batch_size=2, row_tokens=96, max_length=96, device="cpu")
    shared = tmp_path / "tokenized"
    mixed = mixed_frame()
    _, first = finetune(mixed, cfg, EvaluateConfig(batch_size=4), tiny_model_dir, tmp_path / "a", 0,
                        tokens_root=shared)
    _, second = finetune(pa.Table.from_pandas(mixed), cfg.model_copy(update={"learning_rate": 1e-3}),
                         EvaluateConfig(batch_size=4), tiny_model_dir, tmp_path / "b", 0, tokens_root=shared)
    assert not first["tokenized"]["train"]["reused"] and not first["tokenized"]["eval"]["reused"]
    assert second["tokenized"]["train"]["reused"] and second["tokenized"]["eval"]["reused"]
    assert first["tokenized"]["train"]["path"] == second["tokenized"]["train"]["path"]
    assert len(list(shared.glob("*/_SUCCESS"))) == 2  # train and eval; kept for the next run
    assert not (tmp_path / "a" / "tokenized").exists()
    assert first["mask"] == second["mask"] and first["train_tokens"] == second["train_tokens"]


def test_a_tokenizer_left_padding_by_generation_gives_the_same_examples(gemma_tokenizer_dir):
    """A generation backend's tokenizer keeps the padding and truncation of its last call on its Rust
    tokenizer; examples built with it (the held-out loss does) must not carry them."""
    tok = AutoTokenizer.from_pretrained(gemma_tokenizer_dir)
    tok.padding_side, tok.truncation_side = "left", "left"
    rows_in = ["Say hi.", "Explain every step of long division with an example."]
    expected = tokenized.encode(tok, rows_in, ["", ""], ["Hi.", "Divide, multiply, subtract, bring down."], 64)
    tok(["a", "a much longer prompt than the first"], padding=True, truncation=True, max_length=8)
    assert tok.backend_tokenizer.padding is not None  # what generation leaves behind
    again = tokenized.encode(tok, rows_in, ["", ""], ["Hi.", "Divide, multiply, subtract, bring down."], 64)
    assert np.array_equal(again.tokens, expected.tokens) and np.array_equal(again.lengths, expected.lengths)
