"""`finetune` on an encoder-decoder model: a tiny T5 (tests/unit/test_seq2seq.py's builder, at T5's own weight
scale so that a few steps teach it; T5's dropout on) trains end to end with `finetune.packing` left at its
default, measures eval loss as the evaluate stage will, resumes from a checkpoint to the same weights, trains
in two processes as in one, trains LoRA adapters on T5's layers, compiles its layers, and refuses chat
templates, conversations and LoRA targets it does not have."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import tasks.finetune as ft
from tasks.config import EvaluateConfig, FinetuneConfig, LLMConfig
from tasks.finetune import build_examples, evaluate_loss, finetune, token_counts
from tasks.llm import seq2seq
from tasks.llm.base import GenerationParams
from tasks.llm.factory import get_llm
from tasks.prompts import alpaca_prompt
from tests.unit.test_finetune import mixed_frame
from tests.unit.test_seq2seq import build_tiny_t5

# A high learning rate and the embeddings trained: 24 steps (12 epochs of the 8 train rows) take the loss from
# ln(262K) = 12.5 to about 5.5. `packing` is left at its default (true).
BASE = dict(max_steps=24, batch_size=4, learning_rate=3e-2, warmup_ratio=0.0, max_length=96, train_embeddings=True,
            device="cpu")
EVAL = EvaluateConfig(batch_size=4)


@pytest.fixture(scope="module")
def t5_dir(gemma_tokenizer_dir, tmp_path_factory):
    return build_tiny_t5(gemma_tokenizer_dir, tmp_path_factory.mktemp("tiny-t5"), scale=1.0)


@pytest.fixture(scope="module")
def tokenizer(t5_dir):
    return AutoTokenizer.from_pretrained(t5_dir)


@pytest.fixture(scope="module")
def trained(t5_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned-t5")
    per_example, stats = finetune(mixed_frame(), FinetuneConfig(**BASE), EVAL, t5_dir, out, seed=0)
    return out, per_example, stats


def rows(split: str) -> pd.DataFrame:
    df = mixed_frame()
    return df[df["split"] == split].reset_index(drop=True)


def greedy(model_dir, prompts: list[str]) -> list[str]:
    llm = get_llm(LLMConfig(model=str(model_dir), device="cpu", dtype="float32"))
    assert llm.encoder_decoder
    return [c.text for c in llm.generate(prompts, GenerationParams(max_new_tokens=8, temperature=0.0))]


def test_a_t5_trains_unpacked_lowers_its_loss_and_reports_its_masks(trained, t5_dir, tokenizer):
    out, per_example, stats = trained
    metrics = json.loads((out / "metrics.json").read_text())
    assert stats["steps"] == 24 and stats["train_examples"] == 8 and stats["eval_examples"] == 4
    assert stats["resumed_from_step"] == 0
    # Packing was asked for (the default) and not applied: recorded, not refused.
    assert FinetuneConfig(**BASE).packing
    assert metrics["packing"] is False and metrics["packing_note"] == seq2seq.UNPACKED
    assert metrics["encoder_decoder"] and metrics["template"] == "alpaca" and metrics["attn_implementation"] == "sdpa"
    losses = [entry["loss"] for entry in metrics["train_log"]]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 3, losses
    assert stats["eval_loss_after"] < stats["eval_loss_before"] - 2
    # No FLOPs or MFU for an encoder-decoder model (tasks/flops.py counts decoder-only transformers).
    assert metrics["train_flops"] is None and metrics["model_flops_per_token"] is None
    assert all(entry["attention_pairs"] is None for entry in metrics["train_log"])

    # The masks: the encoder's tokens are read, the decoder's labels (the output and <eos>) trained.
    train = rows("train")
    expected, kept, cut = seq2seq.encode_rows(tokenizer, train["instruction"], train["input"], train["output"], 96)
    assert kept.tolist() == list(range(8)) and cut == {}
    assert expected[0].labels == tokenizer("The number is seven.", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id]
    tokens, trained_tokens = seq2seq.token_counts(expected)
    assert metrics["mask"]["examples"] == 8
    assert metrics["mask"]["tokens"] == int(tokens.sum()) and metrics["mask"]["trainable_tokens"] == int(
        trained_tokens.sum())
    assert metrics["mask"]["trainable_share_min"] == round(float((trained_tokens / tokens).min()), 4)
    # 24 steps of 4 rows are 12 epochs of the 8 rows: each example 12 times, one per row.
    assert metrics["train_tokens"] == 12 * int(trained_tokens.sum())
    assert metrics["train_real_tokens"] == 12 * int(tokens.sum())
    report = (out / ft.MASK_REPORT).read_text()
    assert report.count("```text") == 8 and report.count("### Response:\n⟦The number is ") == 8
    assert report.count("<eos>⟧") == 8 and "encoder-decoder" in report

    # Per-example eval losses: the base model's is its own loss of the example (the prompt in the encoder).
    base = AutoModelForSeq2SeqLM.from_pretrained(t5_dir).eval()
    held_out = rows("eval")
    first = seq2seq.encode_rows(tokenizer, [held_out["instruction"][0]], [""], [held_out["output"][0]], 96)[0][0]
    with torch.no_grad():
        own = float(base(input_ids=torch.tensor([first.encoder_ids]), labels=torch.tensor([first.labels])).loss)
    assert list(per_example.columns) == ["id", "instruction", "loss_before", "loss_after"]
    assert per_example["id"].tolist() == held_out["id"].tolist()
    assert per_example["loss_before"][0] == pytest.approx(own, rel=1e-5)


def test_the_tuned_t5_loads_and_generates_through_the_backend(trained, t5_dir):
    out, per_example, stats = trained
    model = AutoModelForSeq2SeqLM.from_pretrained(out / "model")
    assert type(model).__name__ == "T5ForConditionalGeneration" and not (out / "model.tmp").exists()
    assert AutoTokenizer.from_pretrained(out / "model").padding_side == "right"  # an encoder reads it so
    assert "encoder's input" in (out / "model" / "README.md").read_text()
    prompts = [alpaca_prompt(i) for i in rows("eval")["instruction"]]
    assert all(text.startswith("The") for text in greedy(out / "model", prompts))  # the first word it learned
    assert not any(text.startswith("The") for text in greedy(t5_dir, prompts))

    # The held-out loss the evaluate stage measures on a loaded model: the stage's own eval loss, per example too.
    llm = get_llm(LLMConfig(model=str(out / "model"), device="cpu", dtype="float32"))
    examples, kept, cut = build_examples(llm.tokenizer, rows("eval"), 96, encoder_decoder=True)
    assert all(isinstance(ex, seq2seq.Seq2SeqExample) for ex in examples) and kept.tolist() == [0, 1, 2, 3]
    loss, each = evaluate_loss(llm.model, examples, 3, llm.tokenizer.pad_token_id, llm.device, llm.dtype)
    assert loss == pytest.approx(stats["eval_loss_after"], rel=1e-5)
    np.testing.assert_allclose(each, per_example["loss_after"], rtol=1e-5)
    assert int(token_counts(examples)[1].sum()) == sum(len(ex.labels) for ex in examples)


def test_an_interrupted_run_resumes_to_the_same_weights(t5_dir, tmp_path, monkeypatch):
    """Stopped right after its step-4 checkpoint (dropout on: the resumed steps draw the same masks)."""
    cfg = FinetuneConfig(**{**BASE, "max_steps": 6, "checkpoint_every": 2})
    _, full = finetune(mixed_frame(), cfg, EVAL, t5_dir, tmp_path / "full", seed=0)

    class Stopped(Exception):
        pass

    save = ft.Checkpoints.save

    def save_then_stop(self, step, *args):
        path = save(self, step, *args)
        if step == 4:
            raise Stopped
        return path

    monkeypatch.setattr(ft.Checkpoints, "save", save_then_stop)
    with pytest.raises(Stopped):
        finetune(mixed_frame(), cfg, EVAL, t5_dir, tmp_path / "stopped", seed=0)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()] == ["step-000004"]
    assert not (tmp_path / "stopped" / "model").exists()

    _, resumed = finetune(mixed_frame(), cfg, EVAL, t5_dir, tmp_path / "stopped", seed=0)
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 6
    logs = [json.loads((tmp_path / name / "metrics.json").read_text())["train_log"] for name in ("full", "stopped")]
    assert [e["loss"] for e in logs[1]] == pytest.approx([e["loss"] for e in logs[0]], rel=1e-5)
    assert resumed["eval_loss_after"] == pytest.approx(full["eval_loss_after"], rel=1e-5)
    a = load_file(tmp_path / "full" / "model" / "model.safetensors")
    b = load_file(tmp_path / "stopped" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_two_cpu_processes_train_a_t5_like_one_accumulating_two_micro_batches(t5_dir, tmp_path):
    """torchrun, gloo: with dropout on, each micro-batch draws its masks from (seed, step, micro-batch)."""
    from tasks.multigpu import launch

    mixed = mixed_frame(n_train=12, n_eval=4)
    mixed.to_parquet(tmp_path / "mix.parquet")
    cfg = {**BASE, "max_steps": 3, "batch_size": 1, "checkpoint_every": 2}
    ddp_rows, ddp = launch(tmp_path / "mix.parquet", FinetuneConfig(**cfg, processes=2), EVAL, t5_dir,
                           tmp_path / "ddp", seed=0, data={})
    one_rows, one = finetune(mixed, FinetuneConfig(**cfg, grad_accum=2), EVAL, t5_dir, tmp_path / "one", seed=0)
    assert ddp["processes"] == 2 and one["processes"] == 1 and ddp["steps"] == one["steps"] == 3
    assert ddp["packing"] is False and ddp["train_tokens"] == one["train_tokens"]
    assert ddp["train_loss_last"] == pytest.approx(one["train_loss_last"], rel=1e-5)
    assert ddp["eval_loss_after"] == pytest.approx(one["eval_loss_after"], rel=1e-5)
    assert ddp["eval_loss_after"] < ddp["eval_loss_before"]
    pd.testing.assert_frame_equal(ddp_rows, one_rows, rtol=1e-5)
    a = load_file(tmp_path / "ddp" / "model" / "model.safetensors")
    b = load_file(tmp_path / "one" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=2e-4) for k in a)  # Adam at lr 3e-2


def test_lora_adapts_t5s_layers_by_default_and_saves_a_plain_model(t5_dir, tmp_path):
    cfg = FinetuneConfig(**{**BASE, "max_steps": 8, "train_embeddings": False},
                         lora={"enabled": True, "r": 4, "alpha": 8})
    _, stats = finetune(mixed_frame(), cfg, EVAL, t5_dir, tmp_path, seed=0)
    # The default target_modules name a causal model's projections; on T5 they stand for q, k, v, o (32 x 32)
    # and wi (32 -> 64), wo (64 -> 32): r (in + out) each, in 2 encoder layers (self-attention) and 2
    # decoder layers (self- and cross-attention).
    qkvo, mlp = 4 * (32 + 32), 4 * (32 + 64)
    assert stats["trainable_params"] == 2 * (4 * qkvo + 2 * mlp) + 2 * (8 * qkvo + 2 * mlp) == 9216
    assert stats["lora"] and stats["train_flops"] is None
    assert stats["eval_loss_after"] < stats["eval_loss_before"]
    tuned = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "model")  # merged: no peft needed to load
    base = AutoModelForSeq2SeqLM.from_pretrained(t5_dir)
    assert not any("lora" in name for name, _ in tuned.named_parameters())
    assert sum(p.numel() for p in tuned.parameters()) == sum(p.numel() for p in base.parameters())


def test_compiled_and_recomputed_layers_learn_the_same(t5_dir, tmp_path, monkeypatch):
    import torch._dynamo.utils
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # compiled dropout draws as eager does
    base = {**BASE, "max_steps": 2}
    torch._dynamo.utils.counters.clear()
    _, plain = finetune(mixed_frame(), FinetuneConfig(**base), EVAL, t5_dir, tmp_path / "plain", seed=0)
    _, other = finetune(mixed_frame(), FinetuneConfig(**base, compile=True, gradient_checkpointing=True), EVAL,
                        t5_dir, tmp_path / "other", seed=0)
    assert other["compile"] and other["gradient_checkpointing"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # T5's blocks really were compiled
    for key in ("train_loss_first", "train_loss_last", "eval_loss_after"):
        assert other[key] == pytest.approx(plain[key], rel=1e-5)


def test_chat_templates_conversations_and_unknown_lora_targets_are_refused(t5_dir, tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"finetune.template: `chat`.*set `finetune.template: alpaca`"):
        finetune(mixed_frame(), FinetuneConfig(**BASE, template="chat"), EVAL, t5_dir, tmp_path / "chat", seed=0)
    assert not (tmp_path / "chat").exists()  # refused before anything was loaded or written

    df = mixed_frame()
    turns = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Bye."}, {"role": "assistant", "content": "Goodbye."}]
    df["messages"] = [turns if row_id == "r3" else None for row_id in df["id"]]
    with pytest.raises(ValueError, match=r"row 'r3' is a conversation .*finetune.template: alpaca"):
        build_examples(tokenizer, df, 96, encoder_decoder=True)

    lora = {"enabled": True, "target_modules": ["q_proj", "v_proj"]}
    with pytest.raises(ValueError, match=r"finetune.lora.target_modules: none of \['q_proj', 'v_proj'\].*'wo'"):
        finetune(mixed_frame(), FinetuneConfig(**BASE, lora=lora), EVAL, t5_dir, tmp_path / "lora", seed=0)
