"""Stage 6, finetune: instruction-tune the base model on the mix, and measure eval loss before and after.

Each example is the Alpaca prompt followed by the output and the end-of-sequence token; the loss covers the
response tokens only (prompt and padding labels are -100). An over-long example keeps its whole response
where possible and drops prompt tokens from the left. Training is a plain AdamW loop with linear warmup and
cosine decay. The same eval loss (mean over response tokens of the held-out split) is measured on the base
model and on the tuned model, which is saved with its tokenizer so `from_pretrained` loads it.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from tasks.artifacts import atomic_write_json
from tasks.config import EvaluateConfig, FinetuneConfig
from tasks.llm.losses import Example, collate, make_example, token_losses
from tasks.llm.transformers_backend import load_causal_lm, load_tokenizer, pick_device, pick_dtype
from tasks.prompts import alpaca_prompt


def build_example(tokenizer, instruction: str, input: str, output: str, max_length: int) -> Example:
    prompt_ids = tokenizer(alpaca_prompt(instruction, input), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(output.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return make_example(prompt_ids, response_ids, max_length)


def build_examples(tokenizer, df: pd.DataFrame, max_length: int) -> list[Example]:
    # Every example trains on at least its end-of-sequence token: the response is never cut to nothing.
    return [build_example(tokenizer, r.instruction, r.input or "", r.output, max_length) for r in df.itertuples()]


@torch.inference_mode()
def evaluate_loss(model, examples: list[Example], batch_size: int, pad_id: int, device: torch.device,
                  desc: str = "eval loss") -> tuple[float, list[float]]:
    """Token-weighted mean loss over the examples' response tokens, and each example's own mean."""
    model.eval()
    sums, counts = [], []
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, leave=False):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
        s, c = token_losses(model, batch)
        sums += s.tolist()
        counts += c.tolist()
    return sum(sums) / max(sum(counts), 1), [s / max(c, 1) for s, c in zip(sums, counts)]


def lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def train(model, examples: list[Example], cfg: FinetuneConfig, seed: int, pad_id: int,
          device: torch.device) -> list[dict[str, float]]:
    if not cfg.train_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    batches_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total_steps = cfg.max_steps or max(1, math.ceil(batches_per_epoch * cfg.epochs / cfg.grad_accum))
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total_steps))
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)

    def batches():
        while True:  # epochs, each in a new shuffled order
            order = rng.permutation(len(examples))
            for start in range(0, len(order), cfg.batch_size):
                yield [examples[i] for i in order[start:start + cfg.batch_size]]

    model.train()
    stream = batches()
    log = []
    for step in (bar := tqdm(range(total_steps), desc="finetune", unit="step")):
        t0 = time.perf_counter()
        step_sum, step_tokens = 0.0, 0
        micro = [next(stream) for _ in range(cfg.grad_accum)]
        n_tokens = sum(ex.trainable_tokens for mb in micro for ex in mb)
        for mb in micro:
            batch = {k: v.to(device) for k, v in collate(mb, pad_id).items()}
            s, c = token_losses(model, batch)
            (s.sum() / n_tokens).backward()  # mean over all response tokens of the optimizer step
            step_sum += float(s.detach().sum())
            step_tokens += int(c.sum())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = step_sum / max(step_tokens, 1)
        log.append({"step": step + 1, "loss": loss, "lr": scheduler.get_last_lr()[0], "tokens": step_tokens,
                    "seconds": time.perf_counter() - t0})
        bar.set_postfix(loss=f"{loss:.3f}")
    return log


def finetune(mixed: pd.DataFrame, cfg: FinetuneConfig, eval_cfg: EvaluateConfig, model_dir: Path,
             out_dir: Path, seed: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Train on the `train` split of `mixed`, save the model to `out_dir/model`, return per-example eval losses."""
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(model_dir, padding_side="right")
    model = load_causal_lm(model_dir, device, dtype)
    train_df = mixed[mixed["split"] == "train"]
    eval_df = mixed[mixed["split"] == "eval"]
    if eval_cfg.max_examples is not None:
        eval_df = eval_df.iloc[: eval_cfg.max_examples]
    if train_df.empty or eval_df.empty:
        raise ValueError(f"finetune needs train and eval rows, got {len(train_df)} and {len(eval_df)}")
    train_examples = build_examples(tokenizer, train_df, cfg.max_length)
    eval_examples = build_examples(tokenizer, eval_df, cfg.max_length)
    pad_id = tokenizer.pad_token_id

    t0 = time.perf_counter()
    before, before_each = evaluate_loss(model, eval_examples, eval_cfg.batch_size, pad_id, device, "eval (base)")
    log = train(model, train_examples, cfg, seed, pad_id, device)
    after, after_each = evaluate_loss(model, eval_examples, eval_cfg.batch_size, pad_id, device, "eval (tuned)")
    seconds = time.perf_counter() - t0

    final = out_dir / "model"
    staging = out_dir / "model.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.padding_side = "left"  # ready for generation
    tokenizer.save_pretrained(staging)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)

    train_tokens = sum(entry["tokens"] for entry in log)
    train_seconds = sum(entry["seconds"] for entry in log)
    metrics = {
        "base_model": str(model_dir), "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "train_examples": len(train_examples), "eval_examples": len(eval_examples), "steps": len(log),
        "eval_loss_before": before, "eval_loss_after": after, "eval_loss_delta": after - before,
        "train_loss_first": log[0]["loss"], "train_loss_last": log[-1]["loss"],
        "train_tokens": train_tokens, "train_tokens_per_s": train_tokens / max(train_seconds, 1e-9),
        "seconds": seconds, "train_log": log,
    }
    atomic_write_json(out_dir / "metrics.json", metrics)
    per_example = pd.DataFrame({"id": eval_df["id"].to_numpy(), "instruction": eval_df["instruction"].to_numpy(),
                                "loss_before": before_each, "loss_after": after_each})
    stats = {k: v for k, v in metrics.items() if k != "train_log"}
    stats["model_path"] = str(final)
    return per_example, stats
