"""On a CUDA machine: the real Gemma 3 270M fine-tunes in bf16 and its eval loss drops."""

from pathlib import Path

import pandas as pd
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
    mixed, _ = mix(rows, MixConfig(eval_fraction=0.15, seed=0))
    # A few hundred packed steps of ~10 examples each.
    cfg = FinetuneConfig(epochs=20, batch_size=4, row_tokens=256, learning_rate=2e-5, device="cuda", max_length=256)
    per_example, stats = finetune(mixed, cfg, EvaluateConfig(batch_size=16), bundled_model_dir(), tmp_path, seed=0)
    assert stats["device"].startswith("cuda") and stats["dtype"] == "bfloat16" and stats["weights_dtype"] == "float32"
    assert stats["steps"] >= 200
    assert stats["attn_implementation"] == "flex_attention" and stats["mfu"] is not None
    assert stats["eval_loss_after"] < stats["eval_loss_before"]
    assert isinstance(per_example, pd.DataFrame) and len(per_example) == stats["eval_examples"]
