"""On a CUDA machine: the real Gemma 3 270M fine-tunes in bf16 and its eval loss drops."""

from pathlib import Path

import pytest
import torch

from tasks.config import EvaluateConfig, FinetuneConfig, MixConfig, SeedsConfig
from tasks.finetune import finetune
from tasks.llm.models import bundled_model_dir
from tasks.mix import mix
from tasks.seeds import load_seeds
from tasks.self_instruct import seed_examples

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_real_gemma_trains_on_gpu_and_eval_loss_drops(tmp_path):
    seeds, _ = load_seeds(SeedsConfig(), base_dir=ROOT)
    rows = seed_examples(seeds).assign(keep=True)
    mixed, _, _ = mix(rows, MixConfig(eval_fraction=0.15, seed=0))
    train, held_out = mixed[mixed["split"] == "train"], mixed[mixed["split"] == "eval"]
    # Held out for real: no eval instruction (or task, whose other instances may be trained on) in training.
    assert not set(held_out["instruction"]) & set(train["instruction"])
    assert not set(held_out["task_id"]) & set(train["task_id"])
    # A few hundred packed steps of ~10 examples each.
    cfg = FinetuneConfig(epochs=20, batch_size=4, row_tokens=256, learning_rate=2e-5, device="cuda", max_length=256)
    per_example, stats = finetune(mixed, cfg, EvaluateConfig(batch_size=16), bundled_model_dir(), tmp_path, seed=0)
    assert stats["device"].startswith("cuda") and stats["dtype"] == "bfloat16" and stats["weights_dtype"] == "float32"
    assert stats["steps"] >= 200
    assert stats["attn_implementation"] == "flex_attention" and stats["mfu"] is not None
    assert stats["eval_loss_after"] < stats["eval_loss_before"]
    # One loss before and after per held-out row, in the eval split's order.
    assert per_example["id"].tolist() == held_out["id"].tolist()
    assert stats["eval_examples"] == len(held_out) and stats["train_examples"] == len(train)
