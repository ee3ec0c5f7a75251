"""Data-parallel fine-tuning as a Ray Train job (`finetune.launcher: ray`, tasks/ray_train.py): two CPU workers
(gloo) of a local Ray cluster take the same steps and save the same weights as two torchrun processes and as
one process accumulating two micro-batches per step."""

from __future__ import annotations

import json
import signal
import time

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from tasks.config import EvaluateConfig, FinetuneConfig, RunConfig
from tasks.finetune import finetune
from tests.unit.test_finetune import mixed_frame
from tests.unit.test_finetune_distributed import BASE

ray = pytest.importorskip("ray")

from tasks import multigpu, ray_train  # noqa: E402  (Ray present)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cluster() -> RunConfig:
    """One local cluster of 2 CPUs for the module's tests."""
    from tasks.ray_executor import connect

    if ray.is_initialized():  # another module's cluster: start this one's own
        ray.shutdown()
    run = RunConfig(ray_local_cpus=2)
    connect(run)
    yield run
    ray.shutdown()


def _log(out_dir):
    return json.loads((out_dir / "metrics.json").read_text())["train_log"]


def test_two_ray_workers_train_like_two_torchrun_processes_and_like_one_accumulating_two(
        cluster, tiny_model_dir, tmp_path):
    mixed = mixed_frame(n_train=12, n_eval=4)
    mix_path = tmp_path / "mix.parquet"
    mixed.to_parquet(mix_path)
    eval_cfg = EvaluateConfig(batch_size=4)
    cfg = FinetuneConfig(**BASE, processes=2)
    data = {"mix artifact": "test"}
    seconds = {}

    handler = signal.getsignal(signal.SIGINT)
    t0 = time.perf_counter()
    ray_rows, on_ray = ray_train.launch(mix_path, cfg.model_copy(update={"launcher": "ray"}), eval_cfg,
                                        tiny_model_dir, tmp_path / "ray", 0, data, None, cluster)
    seconds["ray"] = time.perf_counter() - t0
    assert signal.getsignal(signal.SIGINT) is handler  # Ray Train's own handler does not outlive the job
    t0 = time.perf_counter()
    ddp_rows, ddp = multigpu.launch(mix_path, cfg, eval_cfg, tiny_model_dir, tmp_path / "ddp", 0, data)
    seconds["torchrun"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    one_rows, one = finetune(mixed, FinetuneConfig(**BASE, grad_accum=2), eval_cfg, tiny_model_dir,
                             tmp_path / "one", seed=0)
    seconds["one process"] = time.perf_counter() - t0
    print(f"\nwall seconds: {json.dumps({k: round(v, 1) for k, v in seconds.items()})}; "
          f"Ray Train fit {on_ray['ray']['fit_seconds']:.1f} s, of which training {on_ray['seconds']:.1f} s; "
          f"torchrun training {ddp['seconds']:.1f} s")

    assert on_ray["processes"] == ddp["processes"] == 2 and on_ray["steps"] == ddp["steps"] == one["steps"] == 3
    assert len(on_ray["ray"]["hosts"]) == 2 and on_ray["device"] == "cpu"
    assert on_ray["train_tokens"] == ddp["train_tokens"] == one["train_tokens"]
    logs = {name: _log(tmp_path / name) for name in ("ray", "ddp", "one")}
    for name in ("ddp", "one"):  # the same steps: losses per step, learning rates, tokens
        assert [e["tokens"] for e in logs["ray"]] == [e["tokens"] for e in logs[name]]
        assert [e["lr"] for e in logs["ray"]] == pytest.approx([e["lr"] for e in logs[name]], rel=1e-9)
        assert [e["loss"] for e in logs["ray"]] == pytest.approx([e["loss"] for e in logs[name]], rel=1e-4)
    for other in (ddp, one):
        assert on_ray["eval_loss_before"] == pytest.approx(other["eval_loss_before"], rel=1e-5)
        assert on_ray["eval_loss_after"] == pytest.approx(other["eval_loss_after"], rel=1e-4)
    assert on_ray["eval_loss_after"] < on_ray["eval_loss_before"]
    pd.testing.assert_frame_equal(ray_rows, ddp_rows, rtol=1e-4)
    pd.testing.assert_frame_equal(ray_rows, one_rows, rtol=1e-4)
    weights = {name: load_file(tmp_path / name / "model" / "model.safetensors") for name in ("ray", "ddp", "one")}
    for name in ("ddp", "one"):
        assert weights["ray"].keys() == weights[name].keys()
        assert all(torch.allclose(weights["ray"][k], weights[name][k], atol=1e-5) for k in weights["ray"])
    # The launch's files and Ray Train's storage are gone; the checkpoint at step 2 went with the model saved.
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == ["mask_report.md", "metrics.json", "model",
                                                                       "training_curve.png"]


@pytest.mark.parametrize("processes, cpus", [(3, 1.0), (2, 2.0)])
def test_a_cluster_too_small_for_the_workers_is_refused_before_anything_starts(cluster, tmp_path, processes, cpus):
    run = cluster.model_copy(update={"ray_num_cpus": cpus})
    with pytest.raises(RuntimeError, match=rf"finetune.processes is {processes} but the Ray cluster \(2 CPUs, 0 GPUs\) "
                                           rf"can hold only {int(2 // cpus)} training workers of "
                                           rf"run.ray_num_cpus={cpus:g} CPUs and run.ray_num_gpus=0 GPUs each"):
        ray_train.launch(tmp_path / "mix.parquet", FinetuneConfig(**BASE, processes=processes, launcher="ray"),
                         EvaluateConfig(), tmp_path / "model", tmp_path / "out", 0, {}, None, run)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device, gpus, message", [
    ("auto", 0.5, r"run.ray_num_gpus=0.5: a training worker needs a whole GPU"),
    ("cuda", 0.0, r"finetune.device is cuda but run.ray_num_gpus is 0"),
    ("cpu", 1.0, r"finetune.device is cpu but run.ray_num_gpus is 1"),
])
def test_device_and_gpus_that_contradict_each_other_are_refused(tmp_path, device, gpus, message):
    with pytest.raises(ValueError, match=message):
        ray_train.launch(tmp_path / "mix.parquet", FinetuneConfig(**{**BASE, "device": device}, processes=2),
                         EvaluateConfig(), tmp_path / "model", tmp_path / "out", 0, {}, None,
                         RunConfig(ray_local_cpus=2, ray_num_gpus=gpus))
    assert not (tmp_path / "out").exists()


def test_a_failing_worker_stops_the_job_with_its_error_and_leaves_no_result(cluster, tiny_model_dir, tmp_path):
    mixed = mixed_frame(n_train=4, n_eval=0)  # no eval rows: every worker refuses
    mixed.to_parquet(tmp_path / "mix.parquet")
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match=r"(?s)finetune across 2 Ray Train workers failed: "
                                           r"rank \d: ValueError: finetune needs train and eval rows, got 4 and 0"):
        ray_train.launch(tmp_path / "mix.parquet", FinetuneConfig(**BASE, processes=2, launcher="ray"),
                         EvaluateConfig(), tiny_model_dir, out, 0, {}, None, cluster)
    assert list(out.iterdir()) == []  # no launch or result files, no Ray Train storage
