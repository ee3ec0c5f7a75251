"""Benchmark: supervised fine-tuning throughput, the stage's packed training against fair references.

    python benchmarks/sft_throughput.py [--model DIR|bundled] [--examples 4096] [--steps 20] [--variants ...]
    python benchmarks/sft_throughput.py --tiny     # a CPU correctness check on a tiny random Gemma 3, ~1 minute

Prints JSON lines: `setup`; `loss_check`: the examples of TRL's first packed sequences, each one's mean
response loss through the stage's padded loss, its packed loss and TRL's collator and forward (same weights,
float32), their largest differences, and `trl_same_tokens`, how many of all `trl_examples` TRL tokenized and
labelled exactly as the stage does; then one line per variant. Each variant line names its `reference`
(what it is) and counts tokens the same way: `real_tokens_per_step` (tokens of actual examples, padding not
counted), `response_tokens_per_step` (the trained ones), `computed_tokens_per_step` (positions the model
ran, padding included); `real_tokens_per_s` and `response_tokens_per_s` divide the timed steps' tokens by
their seconds. `flops_per_token` is tasks/flops.py's count of the FLOPs the step needs (padding and masked
attention pairs not credited) per real token, the same formula for every variant; `mfu` divides those FLOPs
per second by the GPU's dense bf16 peak (null on CPU).

Variants, all on the same examples (the project's seed tasks in the Alpaca format, built by the stage's
`build_example`), the same model and weights, float32 weights with bf16 autocast on a GPU (float32 on CPU),
AdamW at lr 1e-5 without weight decay or clipping, the embedding (tied to the output layer) frozen as the
stage freezes it by default (`--train-embeddings` trains it everywhere), and one micro-batch per step:
- `seed_recipe_b4` / `padded_b16`: the seed document's recipe, batches of 4 / 16 padded to the longest and
  the model's own loss over full [tokens x vocabulary] logits;
- `padded_matched`: the stage with packing off, at the packed run's real tokens per step: batches padded
  to the longest, logits only at response positions (`finetune.batch_loss`);
- `packed`: the stage, rows of `--row-tokens` filled first fit decreasing, `--rows` rows per step, position
  ids restarting per example (block-diagonal causal mask, SDPA), chunked linear cross-entropy over response
  tokens (`finetune.batch_loss`); `packed_flex`: with flex attention; `packed_compiled`: decoder layers
  compiled, as `finetune.compile` does;
- `trl_packed` / `trl_packed_flex`: TRL's `SFTTrainer` on a prompt/completion dataset of the same examples,
  completion-only loss, best-fit-decreasing packing into sequences of `--row-tokens` with padding-free
  batches of `--rows` sequences (one flattened row, position ids restarting), its fused LM head; SDPA / flex.
  Off a GPU that head scores every position, not only the response ones (its compact path needs Triton), so
  CPU figures say nothing about TRL's speed; they are there for the correctness check.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tasks.finetune import PEAK_BF16_FLOPS, batch_loss, build_example, micro_batch
from tasks.flops import attention_pairs, mfu, model_shape, training_flops
from tasks.llm.losses import (
    IGNORE,
    Example,
    collate,
    pack,
    packed_batch,
    packed_example_losses,
    stack_rows,
    token_losses,
)
from tasks.prompts import alpaca_prompt

GPU_VARIANTS = ["seed_recipe_b4", "padded_b16", "padded_matched", "packed", "packed_flex", "trl_packed",
                "trl_packed_flex"]
CPU_VARIANTS = ["padded_matched", "packed", "trl_packed"]  # flex attention has no CPU backward
LR = 1e-5

REFERENCES = {
    "seed_recipe_b4": "the seed document's recipe: batches of 4 padded to the longest, the model's own loss over "
                      "full [tokens x vocabulary] logits",
    "padded_b16": "the seed document's recipe at batch 16",
    "padded_matched": "padded baseline at the packed run's real tokens per step: the stage with packing off "
                      "(batches padded to the longest, finetune.batch_loss: logits at response positions only)",
    "packed": "the stage: first-fit-decreasing packed rows, position ids restarting per example (block-diagonal "
              "causal mask), chunked linear cross-entropy over response tokens (finetune.batch_loss), SDPA",
    "packed_flex": "the stage with flex attention (finetune's default on a GPU)",
    "packed_compiled": "the stage with each decoder layer compiled (finetune.compile)",
    "trl_packed": "TRL SFTTrainer: prompt/completion dataset, completion_only_loss, packing_strategy 'bfd' with "
                  "padding_free (one flattened row per step), its fused chunked LM head, SDPA",
    "trl_packed_flex": "TRL SFTTrainer as trl_packed, with flex attention",
}


@dataclass
class Step:
    batch: dict[str, torch.Tensor]
    lengths: list[int]  # tokens of each example in the step
    response: int  # response tokens (labels other than -100): the positions that carry loss

    @property
    def real(self) -> int:
        return sum(self.lengths)

    @property
    def computed(self) -> int:
        return self.batch["input_ids"].numel()


# ---- Data: the seed tasks' instances in turn, as stage examples and as a TRL prompt/completion dataset ------


def seed_rows(n: int) -> list[tuple[str, str, str]]:
    """n (instruction, input, output) rows: the seed tasks' instances in turn."""
    seeds = [json.loads(line) for line in (ROOT / "data" / "seed_tasks.jsonl").read_text().splitlines() if line]
    rows = [(s["instruction"], i.get("input", ""), i["output"]) for s in seeds for i in s["instances"]]
    return [rows[k % len(rows)] for k in range(n)]


def examples(tokenizer, rows: list[tuple[str, str, str]], max_length: int) -> list[Example]:
    """The rows built as the finetune stage builds them."""
    out = []
    for row in rows:
        example, _ = build_example(tokenizer, *row, max_length)
        if example is None:
            raise ValueError(f"seed row {row[0][:60]!r} does not fit in --max-length {max_length}")
        out.append(example)
    return out


def trl_dataset(rows: list[tuple[str, str, str]]):
    """The same rows as TRL's prompt/completion format: TRL tokenizes them and appends the end-of-sequence token
    itself (loss_check reports whether it made the stage's token ids)."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [alpaca_prompt(instruction, input) for instruction, input, _ in rows],
                              "completion": [output.strip() for _, _, output in rows]})


def padded_steps(exs: list[Example], batch: int, pad_id: int) -> list[Step]:
    return [Step(micro_batch(exs, [[i] for i in range(s, min(s + batch, len(exs)))], False, pad_id),
                 [len(e.input_ids) for e in exs[s:s + batch]], sum(e.trainable_tokens for e in exs[s:s + batch]))
            for s in range(0, len(exs), batch)]


def packed_steps(exs: list[Example], row_tokens: int, rows_per_step: int, pad_id: int) -> list[Step]:
    rows = pack([len(e.input_ids) for e in exs], row_tokens)
    steps = []
    for s in range(0, len(rows), rows_per_step):
        group = [[exs[i] for i in row] for row in rows[s:s + rows_per_step]]
        batch = stack_rows([packed_batch(row, pad_id, row_tokens) for row in group])  # fixed width: one shape
        steps.append(Step(batch, [len(e.input_ids) for row in group for e in row],
                          sum(e.trainable_tokens for row in group for e in row)))
    return steps


def timed_steps(args) -> range:
    """Indices of the timed steps: each variant cycles through its steps, the first `warmup` untimed."""
    return range(args.warmup, args.warmup + args.steps)


def matched_batch(exs: list[Example], packed: list[Step], args) -> int:
    """Examples per padded step whose real tokens per timed step come closest to the packed run's."""
    lengths = np.array([len(e.input_ids) for e in exs])
    target = np.mean([packed[k % len(packed)].real for k in timed_steps(args)])
    ends = np.concatenate([[0], np.cumsum(lengths)])

    def real_per_step(size: int) -> float:
        starts = np.arange(0, len(lengths), size)
        per_step = ends[np.minimum(starts + size, len(lengths))] - ends[starts]
        return float(np.mean([per_step[k % len(per_step)] for k in timed_steps(args)]))

    return min(range(1, len(lengths) + 1), key=lambda size: abs(real_per_step(size) - target))


# ---- Model ------------------------------------------------------------------------------------------------------


def tiny_config(tokenizer):
    """A 2-layer Gemma 3 over the real 262K-token vocabulary, one sliding (64) and one full attention layer;
    d 32, since the output layer's d x 262K matmuls are nearly all its work."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=2048,
                            sliding_window=64, layer_types=["sliding_attention", "full_attention"],
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)


def load_model(args, tokenizer, attn: str, device: torch.device):
    """The same float32 weights every time: the model directory's, or the tiny model's from seed 0."""
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM

    if args.tiny:
        torch.manual_seed(0)
        model = Gemma3ForCausalLM._from_config(tiny_config(tokenizer), attn_implementation=attn, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation=attn)
    model.get_input_embeddings().weight.requires_grad_(args.train_embeddings)
    return model.to(device)


def head_trained(model) -> bool:
    return model.get_output_embeddings().weight.requires_grad


def figures(name: str, model, steps: list[Step], seconds: float, losses: list[float], device, **extra) -> dict:
    """One variant's line: tokens per step and per second, FLOPs per real token and MFU (tasks/flops.py)."""
    config = model.config
    real = sum(s.real for s in steps)
    response = sum(s.response for s in steps)
    flops = sum(training_flops(config, s.real, s.response, attention_pairs(config, s.lengths), head_trained(model))
                for s in steps)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()),
                None)
    n = len(steps)
    return {"variant": name, "reference": REFERENCES[name], "attn_implementation": config._attn_implementation,
            **extra, "steps": n, "real_tokens_per_step": round(real / n),
            "response_tokens_per_step": round(response / n),
            "computed_tokens_per_step": round(sum(s.computed for s in steps) / n),
            "real_tokens_per_s": round(real / seconds, 1), "response_tokens_per_s": round(response / seconds, 1),
            "flops_per_token": round(flops / real), "mfu": round(mfu(flops, seconds, peak), 4) if peak else None,
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
            "seconds": round(seconds, 3), "mean_loss": round(sum(losses) / len(losses), 4)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- Our variants: a plain loop over prepared steps -----------------------------------------------------------


def run_variant(name: str, args, tokenizer, exs: list[Example], device: torch.device) -> dict:
    attn = "flex_attention" if name == "packed_flex" else "sdpa"
    model = load_model(args, tokenizer, attn, device)
    pad_id = tokenizer.pad_token_id
    packed = packed_steps(exs, args.row_tokens, args.rows, pad_id)
    extra: dict[str, Any]
    if name.startswith("packed"):
        steps, extra = packed, {"rows_per_step": args.rows, "row_tokens": args.row_tokens}
        if name == "packed_compiled":
            for layer in model.get_decoder().layers:
                layer.compile()
    else:
        size = {"seed_recipe_b4": 4, "padded_b16": 16}.get(name) or matched_batch(exs, packed, args)
        steps, extra = padded_steps(exs, size, pad_id), {"examples_per_step": size}
    if name in ("seed_recipe_b4", "padded_b16"):
        def loss_of(batch):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                         use_cache=False).loss
    else:
        def loss_of(batch):
            total, count = batch_loss(model, batch, name.startswith("packed"), args.chunk)
            return total / count

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0,
                            fused=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timed: list[Step] = []
    seconds, losses = 0.0, []
    for k in range(args.warmup + args.steps):
        step = steps[k % len(steps)]
        batch = {key: v.to(device, non_blocking=True) for key, v in step.batch.items()}
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_of(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if k in timed_steps(args):
            seconds += time.perf_counter() - t0
            timed.append(step)
            losses.append(float(loss.detach()))
    return figures(name, model, timed, seconds, losses, device, **extra)


# ---- TRL's SFTTrainer -------------------------------------------------------------------------------------------


def trl_trainer(args, model, tokenizer, rows, device: torch.device):
    """SFTTrainer set up as the plain loop trains: same lr, precision, optimizer, no clipping or checkpointing.
    It tokenizes and packs `rows` as it is built (minutes for 4096 rows: it hashes the tokenizer for its cache)."""
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(
        output_dir=args.out_dir, max_length=args.row_tokens, packing=True, packing_strategy="bfd", padding_free=True,
        completion_only_loss=True, per_device_train_batch_size=args.rows, gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=0.0, optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
        bf16=device.type == "cuda", activation_checkpointing=False, use_cpu=device.type != "cuda",
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=trl_dataset(rows), processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # its log lines would break the JSON lines on stdout
    return trainer


class CountingCollator:
    """TRL's own collator, recording each batch's example lengths and response tokens in call order."""

    def __init__(self, collate_fn):
        self.collate_fn = collate_fn
        self.calls: list[Step] = []

    def __call__(self, features):
        batch = self.collate_fn(features)
        lengths = [n for f in features for n in f["seq_lengths"]]
        self.calls.append(Step({"input_ids": batch["input_ids"]}, lengths, int((batch["labels"] != IGNORE).sum())))
        return batch


def run_trl(name: str, args, tokenizer, rows, device: torch.device, trainer=None) -> dict:
    """Train TRL's trainer (`trainer`: the one loss_check built, not trained yet) and time its optimizer steps."""
    from transformers import TrainerCallback

    if trainer is None:
        model = load_model(args, tokenizer, "flex_attention" if name == "trl_packed_flex" else "sdpa", device)
        trainer = trl_trainer(args, model, tokenizer, rows, device)
    counting = trainer.data_collator = CountingCollator(trainer.data_collator)
    clock: dict[int, float] = {}
    losses: dict[int, float] = {}

    class Clock(TrainerCallback):  # the optimizer steps only: no data loading, logging or set-up
        def on_step_begin(self, *_, **__):
            sync(device)
            clock["t0"] = time.perf_counter()

        def on_step_end(self, _args, state, *_, **__):
            sync(device)
            clock[state.global_step] = time.perf_counter() - clock["t0"]

        def on_log(self, _args, state, _control, logs=None, **__):
            if logs and "loss" in logs:
                losses[state.global_step] = logs["loss"]

    trainer.add_callback(Clock())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed = [k + 1 for k in timed_steps(args)]  # global_step counts from 1
    if len(counting.calls) < timed[-1]:
        raise RuntimeError(f"TRL collated {len(counting.calls)} batches for {timed[-1]} steps")
    # With one micro-batch per step and no data-loader workers, step k trained the k-th batch collated.
    return figures(name, trainer.model, [counting.calls[k - 1] for k in timed], sum(clock[k] for k in timed),
                   [losses[k] for k in timed], device, sequences_per_step=args.rows, max_length=args.row_tokens)


# ---- Same examples, same weights: three losses ----------------------------------------------------------------


Key = tuple[tuple[int, ...], tuple[int, ...]]  # an example's token ids and labels


def key(example: Example) -> Key:
    return tuple(example.input_ids), tuple(example.labels)


def trl_segments(row: dict) -> list[Key]:
    """The examples TRL packed into one sequence of its prepared dataset, as it tokenized and labelled them."""
    out, start = [], 0
    for n in row["seq_lengths"]:
        out.append((tuple(row["input_ids"][start:start + n]), tuple(row["labels"][start:start + n])))
        start += n
    return out


@torch.no_grad()
def trl_row_losses(trainer, row: dict, device: torch.device) -> list[float]:
    """Each packed example's mean response loss as TRL trains it: its collator over the sequence, then the
    model's forward with TRL's fused LM head."""
    trainer.model.eval()
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in trainer.data_collator([row]).items()}
    fused = trainer.model(**batch, fused_lm_head=True)
    nll, mask = -fused.log_probs[0], fused.label_mask[0]
    out, start = [], 0
    for n in row["seq_lengths"]:
        part = slice(start, start + n - 1)  # the positions that predict the example's tokens 1 .. n-1
        out.append(float(nll[part][mask[part]].mean()))
        start += n
    return out


@torch.no_grad()
def loss_check(args, tokenizer, rows, exs: list[Example], device: torch.device):
    """The same examples and weights (float32) through three losses: the examples of TRL's first packed
    sequences (at least --check-examples), each one's mean response loss by the stage's padded batches, by the
    stage's packed row, and by TRL's collator and fused LM head. Also whether TRL tokenized and labelled every
    example as the stage does. TRL prepares (tokenizes, packs) all `rows` for this, once: the trainer is
    returned, untrained, for the trl_packed variant."""
    model = load_model(args, tokenizer, "sdpa", device)
    trainer = trl_trainer(args, model, tokenizer, rows, device)
    ours = {key(e): e for e in exs}
    segments = [trl_segments(row) for row in trainer.train_dataset]
    same = sum(k in ours for row in segments for k in row)
    check: list[Example] = []
    trl: list[float] = []
    for row, keys in zip(trainer.train_dataset, segments):
        if len(check) >= args.check_examples:
            break
        for k, loss in zip(keys, trl_row_losses(trainer, row, device)):
            if k in ours:
                check.append(ours[k])
                trl.append(loss)
    if not check:
        raise RuntimeError("TRL tokenized no example as the stage does: nothing to compare losses on")
    model.eval()
    pad_id = tokenizer.pad_token_id
    padded = []
    for i in range(0, len(check), 8):
        sums, counts = token_losses(model, {k: v.to(device) for k, v in collate(check[i:i + 8], pad_id).items()})
        padded += (sums / counts).tolist()
    packed = packed_example_losses(model, check, pad_id)
    result = {"variant": "loss_check", "examples": len(check), "trl_examples": sum(map(len, segments)),
              "trl_same_tokens": same, "max_abs_diff_packed": max(abs(a - b) for a, b in zip(padded, packed)),
              "max_abs_diff_trl": max(abs(a - b) for a, b in zip(padded, trl)),
              "mean_loss": sum(padded) / len(padded), "padded": padded, "packed": packed, "trl": trl}
    return result, trainer


# ---- Recipe ------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bundled",
                        help="a local Hugging Face model directory or `bundled`; with --tiny, where the tokenizer is")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny random Gemma 3 (2 layers, d 32) over --model's tokenizer: a quick CPU check")
    parser.add_argument("--examples", type=int, help="default 4096, 32 with --tiny")
    parser.add_argument("--check-examples", type=int,
                        help="at least this many examples in loss_check (those of TRL's first packed sequences); "
                        "default 24, 8 with --tiny")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, help="timed steps per variant; default 20, 2 with --tiny")
    parser.add_argument("--warmup", type=int, help="untimed steps first; default 3, 1 with --tiny")
    parser.add_argument("--row-tokens", type=int, help="tokens per packed row (TRL's max_length); default 4096, "
                        "384 with --tiny")
    parser.add_argument("--rows", type=int, help="packed rows per step; default 8, 2 with --tiny")
    parser.add_argument("--chunk", type=int, default=4096, help="positions per output-layer chunk")
    parser.add_argument("--train-embeddings", action="store_true",
                        help="train the embedding (tied output layer) too, as finetune.train_embeddings does")
    parser.add_argument("--variants", nargs="+", help=f"default on a GPU: {' '.join(GPU_VARIANTS)}; on CPU: "
                        f"{' '.join(CPU_VARIANTS)}")
    args = parser.parse_args(argv)
    tiny = args.tiny
    for name, full, small in (("examples", 4096, 32), ("check_examples", 24, 8), ("steps", 20, 2), ("warmup", 3, 1),
                              ("row_tokens", 4096, 384), ("rows", 8, 2)):
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)
    unknown = sorted(set(args.variants or []) - set(REFERENCES))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {sorted(REFERENCES)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def run(args) -> dict[str, Any]:
    """Every line the benchmark prints, as one document: setup, loss_check and the variants."""
    import transformers
    import trl
    from transformers import AutoConfig, AutoTokenizer

    from tasks.llm.models import BUNDLED, bundled_model_dir, resolve_model

    # 1. Device, tokenizer, model directory (or the tiny model's config), examples.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = bundled_model_dir() if args.model == BUNDLED else Path(args.model)
    args.model_dir = source if args.tiny else resolve_model(str(source))
    tokenizer = AutoTokenizer.from_pretrained(str(args.model_dir))
    rows = seed_rows(args.examples)
    exs = examples(tokenizer, rows, args.max_length)
    longest = max(len(e.input_ids) for e in exs)
    if longest > args.row_tokens:
        raise SystemExit(f"--row-tokens {args.row_tokens} is shorter than the longest example ({longest} tokens)")
    variants = args.variants or (GPU_VARIANTS if device.type == "cuda" else CPU_VARIANTS)
    config = tiny_config(tokenizer) if args.tiny else AutoConfig.from_pretrained(args.model_dir)
    setup = {"variant": "setup", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
             "model": "tiny random Gemma 3 (2 layers, d 32)" if args.tiny else str(args.model_dir),
             "matmul_params": model_shape(config).matmul_params, "examples": len(exs),
             "mean_example_tokens": round(sum(len(e.input_ids) for e in exs) / len(exs), 1),
             "response_share": round(sum(e.trainable_tokens for e in exs) / sum(len(e.input_ids) for e in exs), 4),
             "train_embeddings": args.train_embeddings, "precision": "bf16 autocast" if device.type == "cuda"
             else "float32", "torch": torch.__version__, "transformers": transformers.__version__,
             "trl": trl.__version__, "flops": "tasks/flops.py: 6 N T + 12 H h P + (4 or 6) d V R"}
    print(json.dumps(setup), flush=True)

    # 2. The same examples through three losses, then every variant from the same weights.
    with tempfile.TemporaryDirectory() as out_dir:
        args.out_dir = out_dir  # the TRL trainers' output_dir; they save nothing
        check, trainer = loss_check(args, tokenizer, rows, exs, device)
        print(json.dumps({k: v for k, v in check.items() if k not in ("padded", "packed", "trl")}), flush=True)
        if "trl_packed" not in variants:
            trainer = None  # its model's memory goes now
        results = []
        for name in variants:
            try:
                if name.startswith("trl"):
                    result = run_trl(name, args, tokenizer, rows, device, trainer if name == "trl_packed" else None)
                else:
                    result = run_variant(name, args, tokenizer, exs, device)
            except Exception as exc:  # noqa: BLE001  one variant failing (flex attention on CPU, say) is reported
                error = f"{type(exc).__name__}: {exc}"[:500]  # and must not hide the others
                result = {"variant": name, "reference": REFERENCES[name], "error": error}
            print(json.dumps(result), flush=True)
            results.append(result)
            if name == "trl_packed":
                trainer = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"setup": setup, "loss_check": check, "variants": results}


if __name__ == "__main__":
    run(parse_args())
