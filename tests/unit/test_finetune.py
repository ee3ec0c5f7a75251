import json

import pandas as pd
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks.config import EvaluateConfig, FinetuneConfig
from tasks.finetune import build_example, build_examples, finetune, mask_report
from tasks.llm.losses import IGNORE, collate
from tasks.prompts import alpaca_prompt


@pytest.fixture(scope="module")
def tokenizer(gemma_tokenizer_dir):
    return AutoTokenizer.from_pretrained(gemma_tokenizer_dir)


def test_loss_mask_covers_response_and_eos_only(tokenizer):
    ex, why = build_example(tokenizer, "Name a color.", "", "Blue.", max_length=256)
    prompt_ids = tokenizer(alpaca_prompt("Name a color."))["input_ids"]
    response_ids = tokenizer("Blue.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert why is None and ex.input_ids == prompt_ids + response_ids
    assert ex.labels == [IGNORE] * len(prompt_ids) + response_ids
    assert ex.input_ids[0] == tokenizer.bos_token_id and ex.trainable_tokens == len(response_ids)


LONG_ANSWER = " ".join(f"step {i} is done." for i in range(60))  # ~300 tokens


def test_over_long_example_keeps_the_whole_prompt_and_cuts_the_response(tokenizer):
    prompt_ids = tokenizer(alpaca_prompt("Explain every step."))["input_ids"]
    response_ids = tokenizer(LONG_ANSWER, add_special_tokens=False)["input_ids"]
    ex, why = build_example(tokenizer, "Explain every step.", "", LONG_ANSWER, max_length=64)
    assert why == "truncated_response" and len(ex.input_ids) == 64
    assert ex.input_ids[:len(prompt_ids)] == prompt_ids  # the instruction is intact
    assert ex.input_ids[len(prompt_ids):] == response_ids[:64 - len(prompt_ids)]
    assert ex.input_ids[-1] != tokenizer.eos_token_id  # a cut answer does not teach stopping there
    assert ex.trainable_tokens == 64 - len(prompt_ids)
    dropped, why = build_example(tokenizer, "Explain every step.", "", LONG_ANSWER, 64, truncation="drop")
    assert dropped is None and why == "dropped_too_long"
    long_input = "word " * 300  # the prompt alone is longer than max_length: dropped whatever the setting
    assert build_example(tokenizer, "Summarize.", long_input, "Short.", 64) == (None, "dropped_prompt_too_long")


def test_build_examples_counts_what_truncation_did(tokenizer):
    df = pd.DataFrame({"instruction": ["Say hi.", "Explain every step.", "Summarize.", "Add 1 and 1."],
                       "input": ["", "", "word " * 300, ""], "output": ["Hi.", LONG_ANSWER, "Short.", "2"]})
    examples, kept, reasons = build_examples(tokenizer, df, 64)
    assert kept.tolist() == [0, 1, 3] and len(examples) == 3
    assert reasons == {"truncated_response": 1, "dropped_prompt_too_long": 1}
    examples, kept, reasons = build_examples(tokenizer, df, 64, truncation="drop")
    assert kept.tolist() == [0, 3] and reasons == {"dropped_too_long": 1, "dropped_prompt_too_long": 1}
    report = mask_report(examples, ["a", "d"], reasons, 64)
    assert report["examples"] == 2 and report["truncation"] == {"dropped_prompt_too_long": 1, "dropped_too_long": 1}
    with pytest.raises(ValueError, match="every training example was dropped"):
        mask_report([], [], {"dropped_too_long": 4}, 64)


def test_collate_pads_right_with_ignored_labels(tokenizer):
    a, _ = build_example(tokenizer, "Say hi.", "", "Hi.", 128)
    b, _ = build_example(tokenizer, "Say hello to the world politely.", "", "Hello, world.", 128)
    batch = collate([a, b], tokenizer.pad_token_id)
    n = len(a.input_ids)
    assert batch["input_ids"].shape == (2, len(b.input_ids))
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(b.input_ids) - n)
    assert (batch["labels"][0, n:] == IGNORE).all()


def mixed_frame(n_train=8, n_eval=4):
    """Train and eval rows of one skill (answer in a fixed sentence) with no instruction in common: eval
    loss falls only if the model learned the skill, not the rows."""
    words = ["seven", "twelve", "forty", "nine", "three", "eighty", "six", "ten", "fifteen", "two", "thirty", "one",
             "fifty", "eleven", "sixty", "four", "ninety", "twenty", "eight", "seventy"]
    assert n_train + n_eval <= len(words), f"mixed_frame has {len(words)} distinct rows"
    rows = []
    for i in range(n_train + n_eval):
        rows.append({"id": f"r{i}", "instruction": f"Repeat the number {words[i]}.", "input": "",
                     "output": f"The number is {words[i]}.", "split": "train" if i < n_train else "eval"})
    return pd.DataFrame(rows)


def test_finetune_tiny_model_lowers_eval_loss_and_saves(tiny_model_dir, tmp_path):
    cfg = FinetuneConfig(max_steps=12, batch_size=4, learning_rate=3e-3, warmup_ratio=0.0, max_length=96,
                         train_embeddings=True)
    per_example, stats = finetune(mixed_frame(), cfg, EvaluateConfig(batch_size=4), tiny_model_dir, tmp_path, seed=0)
    assert stats["steps"] == 12 and stats["train_examples"] == 8 and stats["eval_examples"] == 4
    assert stats["eval_loss_after"] < stats["eval_loss_before"]
    assert list(per_example.columns) == ["id", "instruction", "loss_before", "loss_after"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["train_log"]) == 12 and metrics["eval_loss_after"] == stats["eval_loss_after"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert model.config.num_hidden_layers == 2
    assert AutoTokenizer.from_pretrained(tmp_path / "model").padding_side == "left"
    assert not (tmp_path / "model.tmp").exists()
    # Packed by default; every example trains on its response; the curve, the card and the figures.
    assert metrics["packing"] and metrics["attn_implementation"] == "sdpa"
    assert metrics["mask"]["examples"] == 8 and 0 < metrics["mask"]["trainable_share_min"] < 1
    assert metrics["real_tokens_per_s"] > 0 and metrics["peak_rss_gb"] > 0
    # FLOPs done (tasks/flops.py): the trained, tied head counts its weight gradient at response positions.
    assert metrics["head_trained"] and metrics["train_real_tokens"] == sum(e["real_tokens"] for e in metrics["train_log"])
    assert metrics["train_flops"] == pytest.approx(metrics["model_flops_per_token"] * metrics["train_real_tokens"])
    shape = model.config
    per_token_floor = 6 * 2 * (64 * 32 * (2 * 2 + 2 * 1) + 3 * 64 * 128)  # 6 x the decoder's matmul weights
    head = 6 * shape.hidden_size * shape.vocab_size * metrics["train_tokens"] / metrics["train_real_tokens"]
    assert per_token_floor + head < metrics["model_flops_per_token"] < per_token_floor + head + 12 * 2 * 32 * 2 * 96
    assert (tmp_path / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (tmp_path / "model" / "README.md").read_text()
    assert "Base model:" in card and "eval_loss_after" in card and "Alpaca template" in card
    # The mask report: a sample of 8 of the 8 examples, each response marked as the trained text.
    report = (tmp_path / metrics["mask_report"]).read_text()
    assert metrics["mask_report"] == "mask_report.md" and metrics["template"] == "alpaca"
    assert report.count("```text") == 8 and report.count("### Response:\n⟦The number is ") == 8


def test_an_example_without_response_tokens_stops_the_stage():
    from tasks.finetune import mask_report
    from tasks.llm.losses import Example

    good = Example([2, 5, 6], [IGNORE, 6, 1])
    assert mask_report([good], ["a"])["trainable_share_min"] == round(2 / 3, 4)
    with pytest.raises(ValueError, match=r"1 training examples have no response token.*\['b'\]"):
        mask_report([good, Example([2, 5], [IGNORE, IGNORE])], ["a", "b"])


def test_step_plan_covers_every_example_each_epoch_and_is_fixed_by_the_seed():
    from tasks.finetune import plan_steps

    lengths = [30, 10, 25, 5, 40, 20, 15, 35]
    cfg = FinetuneConfig(epochs=2, batch_size=2, row_tokens=64, max_length=64)
    steps = plan_steps(lengths, cfg, seed=3)
    assert steps == plan_steps(lengths, cfg, seed=3) and steps != plan_steps(lengths, cfg, seed=4)
    rows = [row for step in steps for micro in step for row in micro]
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    seen = sorted(i for row in rows for i in row)
    assert seen == sorted(list(range(8)) * 2)  # two epochs, each example once per epoch
    unpacked = plan_steps(lengths, cfg.model_copy(update={"packing": False}), seed=3)
    assert len(unpacked) == 8 and all(len(row) == 1 for step in unpacked for micro in step for row in micro)


def test_response_only_logits_match_full_forward(tiny_model_dir, tokenizer):
    import torch

    from tasks.llm.losses import token_losses

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    examples = [build_example(tokenizer, "Say hi.", "", "Hi there.", 64)[0],
                build_example(tokenizer, "Count to three.", "please", "One, two, three.", 64)[0]]
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        sums, counts = token_losses(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        full = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:],
                                                 ignore_index=IGNORE, reduction="none").sum(dim=1)
    assert counts.tolist() == [ex.trainable_tokens for ex in examples]
    assert torch.allclose(sums, full, rtol=1e-5, atol=1e-4)


def test_lora_trains_adapters_only_and_saves_a_plain_model(tiny_model_dir, tmp_path):
    cfg = FinetuneConfig(max_steps=4, batch_size=2, row_tokens=96, learning_rate=1e-2, warmup_ratio=0.0,
                         max_length=96, lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0})
    _, stats = finetune(mixed_frame(), cfg, EvaluateConfig(batch_size=4), tiny_model_dir, tmp_path, seed=0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n_base = sum(p.numel() for p in base.parameters())
    assert 0 < stats["trainable_params"] < n_base / 100  # adapters on 2 small layers only
    assert stats["eval_loss_after"] < stats["eval_loss_before"]
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # merged: no peft needed to load
    assert not any("lora" in name for name, _ in tuned.named_parameters())
    assert sum(p.numel() for p in tuned.parameters()) == n_base


def test_gradient_checkpointing_and_compiled_layers_learn_the_same(tiny_model_dir, tmp_path):
    base = dict(max_steps=3, batch_size=2, row_tokens=96, learning_rate=3e-3, warmup_ratio=0.0, max_length=96,
                train_embeddings=True, device="cpu")
    import torch._dynamo.utils

    runs = {}
    torch._dynamo.utils.counters.clear()
    for name, extra in {"plain": {}, "recompute+compile": {"gradient_checkpointing": True, "compile": True}}.items():
        _, runs[name] = finetune(mixed_frame(), FinetuneConfig(**base, **extra), EvaluateConfig(batch_size=4),
                                 tiny_model_dir, tmp_path / name.replace("+", "_"), seed=0)
    plain, other = runs["plain"], runs["recompute+compile"]
    assert other["gradient_checkpointing"] and other["compile"] and not plain["compile"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the layers really were compiled
    for key in ("train_loss_first", "train_loss_last", "eval_loss_after"):
        assert other[key] == pytest.approx(plain[key], rel=1e-5)
