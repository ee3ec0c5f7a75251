"""Kill -9 the finetune stage in a subprocess after a checkpoint; the re-run continues from it and ends with
the same weights and eval loss as an uninterrupted run."""

import pytest
import torch
from safetensors.torch import load_file

from tasks.config import EvaluateConfig, FinetuneConfig
from tasks.finetune import finetune
from tests.killing import kill_when
from tests.unit.test_finetune import mixed_frame

CFG = dict(max_steps=6, batch_size=2, row_tokens=64, learning_rate=3e-3, warmup_ratio=0.0, max_length=48,
           train_embeddings=False, checkpoint_every=2, device="cpu")

SCRIPT = """
    import pathlib, time
    import tasks.finetune as ft
    from tasks.config import EvaluateConfig, FinetuneConfig
    from tests.unit.test_finetune import mixed_frame
    from tests.unit.test_finetune_resume import CFG

    save = ft.Checkpoints.save
    def slow_save(self, *args, **kwargs):  # leave the parent time to see each checkpoint and kill us
        path = save(self, *args, **kwargs)
        time.sleep(1.0)
        return path
    ft.Checkpoints.save = slow_save
    ft.finetune(mixed_frame(), FinetuneConfig(**CFG), EvaluateConfig(batch_size=4), pathlib.Path({model!r}),
                pathlib.Path({out!r}), seed=0)
"""


def _checkpoint_step(out):
    done = [p for p in (out / "checkpoints").glob("step-*") if not p.name.endswith(".tmp")]
    return max((int(p.name.split("-")[1]) for p in done), default=0)


@pytest.mark.parametrize("kill_at", [2, 4])
def test_kill_9_then_resume_matches_uninterrupted(tiny_model_dir, tmp_path, kill_at):
    cfg = FinetuneConfig(**CFG)
    full_dir = tmp_path / "full"
    _, full = finetune(mixed_frame(), cfg, EvaluateConfig(batch_size=4), tiny_model_dir, full_dir, seed=0)
    assert full["steps"] == 6 and full["resumed_from_step"] == 0
    assert not (full_dir / "checkpoints").exists()  # gone once the model is saved

    out = tmp_path / "killed"
    script = SCRIPT.format(model=str(tiny_model_dir), out=str(out))
    reached = kill_when(script, lambda: _checkpoint_step(out), kill_at, tmp_path, timeout_s=240)
    assert reached == kill_at and not (out / "model").exists()

    _, resumed = finetune(mixed_frame(), cfg, EvaluateConfig(batch_size=4), tiny_model_dir, out, seed=0)
    assert resumed["resumed_from_step"] == kill_at and resumed["steps"] == 6
    assert resumed["tokenized"]["train"]["reused"] and resumed["tokenized"]["eval"]["reused"]  # not tokenized again
    assert not full["tokenized"]["train"]["reused"]
    assert resumed["eval_loss_after"] == pytest.approx(full["eval_loss_after"], rel=1e-5)
    a, b = load_file(full_dir / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


class _Planted:
    """What someone with write access to the shared volume could leave as a checkpoint: unpickling it
    would run code (here: create a file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_checkpoint_is_refused_not_unpickled(tiny_model_dir, tmp_path):
    from tasks.finetune import Checkpoints
    from tasks.llm.transformers_backend import load_causal_lm

    marker = tmp_path / "code-ran"
    step = tmp_path / "checkpoints" / "step-000002"
    step.mkdir(parents=True)
    torch.save({"step": 2, "model": {}, "optimizer": {}, "scheduler": {}, "log": [], "x": _Planted(marker)},
               step / "state.pt")
    model = load_causal_lm(tiny_model_dir, torch.device("cpu"), torch.float32)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(RuntimeError, match=r"state.pt: refused, it holds more than tensors and plain values"):
        Checkpoints(tmp_path / "checkpoints").load(model, optimizer, scheduler)
    assert not marker.exists()
