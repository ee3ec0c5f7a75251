"""Data-parallel fine-tuning launched with torchrun: two CPU processes (gloo) take the same steps as one
process accumulating two micro-batches per step."""

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from tasks.config import EvaluateConfig, FinetuneConfig
from tasks.finetune import finetune, plan_steps
from tasks.multigpu import launch
from tests.unit.test_finetune import mixed_frame

BASE = dict(max_steps=3, batch_size=1, row_tokens=96, learning_rate=3e-3, warmup_ratio=0.0, max_length=96,
            train_embeddings=True, device="cpu", checkpoint_every=2)


def test_plan_gives_each_step_grad_accum_times_world_micro_batches():
    lengths = [40, 50, 60, 30, 20, 70, 45, 55]
    two_procs = plan_steps(lengths, FinetuneConfig(**{**BASE, "max_steps": None, "epochs": 1}), seed=3, world=2)
    accum_two = plan_steps(lengths, FinetuneConfig(**{**BASE, "max_steps": None, "epochs": 1, "grad_accum": 2}), 3)
    assert two_procs == accum_two and all(len(step) == 2 for step in two_procs)


def test_two_cpu_processes_train_like_one_with_two_accumulated_micro_batches(tiny_model_dir, tmp_path):
    mixed = mixed_frame(n_train=12, n_eval=4)
    mix_path = tmp_path / "mix.parquet"
    mixed.to_parquet(mix_path)
    eval_cfg = EvaluateConfig(batch_size=4)

    ddp_rows, ddp = launch(mix_path, FinetuneConfig(**BASE, processes=2), eval_cfg, tiny_model_dir,
                           tmp_path / "ddp", seed=0, data={"mix artifact": "test"})
    one_rows, one = finetune(mixed, FinetuneConfig(**BASE, grad_accum=2), eval_cfg, tiny_model_dir,
                             tmp_path / "one", seed=0)

    assert ddp["processes"] == 2 and one["processes"] == 1 and ddp["steps"] == one["steps"] == 3
    assert ddp["train_tokens"] == one["train_tokens"]
    assert ddp["train_loss_last"] == pytest.approx(one["train_loss_last"], rel=1e-4)
    assert ddp["eval_loss_after"] == pytest.approx(one["eval_loss_after"], rel=1e-4)
    assert ddp["eval_loss_after"] < ddp["eval_loss_before"]
    pd.testing.assert_frame_equal(ddp_rows, one_rows, rtol=1e-4)
    a = load_file(tmp_path / "ddp" / "model" / "model.safetensors")
    b = load_file(tmp_path / "one" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # The launch's own files are gone; the checkpoint at step 2 was removed once the model was saved.
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["mask_report.md", "metrics.json", "model",
                                                                        "training_curve.png"]


def test_a_failing_process_stops_the_launch_with_its_error(tiny_model_dir, tmp_path):
    mixed = mixed_frame(n_train=4, n_eval=0)  # no eval rows: every process refuses
    mixed.to_parquet(tmp_path / "mix.parquet")
    with pytest.raises(RuntimeError, match=r"(?s)failed \(torchrun exit 1\).*finetune needs train and eval rows"):
        launch(tmp_path / "mix.parquet", FinetuneConfig(**BASE, processes=2), EvaluateConfig(), tiny_model_dir,
               tmp_path / "out", seed=0, data={})
