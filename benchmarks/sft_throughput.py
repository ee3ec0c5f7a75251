"""Benchmark: supervised fine-tuning throughput, the seed document's padded recipe against packed training.

    python benchmarks/sft_throughput.py --model DIR [--examples 4096] [--steps 20] [--variants ...]

Prints one JSON line per variant: `variant`, `real_tokens_per_s` (tokens of actual examples, padding not
counted), `mfu` (6 N FLOPs per real token, N = all parameters, over the GPU's dense bf16 peak), `peak_mem_gb`
and the mean training loss of the timed steps; then a line `loss_check` comparing the per-example response
losses of the padded and the packed forward on the same examples (packing must not change what is learned).

Every variant trains the same model (float32 weights, bf16 autocast, fused AdamW, lr 1e-5) on the same
Alpaca-format examples built from the project's seed tasks:
- `seed_recipe_b4` / `padded_b16`: batches of 4 / 16 examples padded to the longest, the model's own loss
  over full [tokens x 262K] logits (the seed document's recipe);
- `packed`: examples packed into rows of `--row-tokens` with position ids restarting per example (a
  block-diagonal causal mask, no attention across examples) and the chunked linear cross-entropy over
  response tokens only (tasks/llm/losses.py), `--rows` rows per step;
- `packed_flex`: the same with PyTorch's flex attention; `packed_compiled`: the same under torch.compile.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tasks.finetune import PEAK_BF16_FLOPS, build_example  # noqa: E402
from tasks.llm.losses import (Example, collate, pack, packed_batch, packed_example_losses,  # noqa: E402
                              packed_loss, stack_rows, token_losses)


def examples(tokenizer, n: int, max_length: int) -> list[Example]:
    """n training examples, the seed tasks' instances in turn, built as the finetune stage builds them."""
    seeds = [json.loads(line) for line in (ROOT / "data" / "seed_tasks.jsonl").read_text().splitlines() if line]
    built = [build_example(tokenizer, s["instruction"], i.get("input", ""), i["output"], max_length)
             for s in seeds for i in s["instances"]]
    return [built[k % len(built)] for k in range(n)]


def padded_batches(exs: list[Example], batch: int, pad_id: int):
    for start in range(0, len(exs), batch):
        chunk = exs[start:start + batch]
        yield collate(chunk, pad_id), sum(len(e.input_ids) for e in chunk)


def packed_batches(exs: list[Example], row_tokens: int, rows_per_step: int, pad_id: int):
    rows = pack([len(e.input_ids) for e in exs], row_tokens)
    for start in range(0, len(rows), rows_per_step):
        group = rows[start:start + rows_per_step]
        batch = stack_rows([packed_batch([exs[i] for i in r], pad_id, row_tokens) for r in group])
        yield batch, sum(len(exs[i].input_ids) for r in group for i in r)


def run_variant(name: str, model, exs, args, pad_id: int, device) -> dict:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=device.type == "cuda")
    if name.startswith("packed"):
        stream = packed_batches(exs, args.row_tokens, args.rows, pad_id)
        forward = model if name != "packed_compiled" else torch.compile(model)

        def loss_of(batch):
            total, count = packed_loss(forward, batch, chunk=args.chunk)
            return total / count
    else:
        stream = padded_batches(exs, 4 if name == "seed_recipe_b4" else 16, pad_id)

        def loss_of(batch):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"], use_cache=False).loss

    batches = list(stream)
    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    timed_tokens, timed_seconds, losses = 0, 0.0, []
    for step in range(args.warmup + args.steps):
        batch, real = batches[step % len(batches)]
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_of(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            timed_seconds += time.perf_counter() - t0
            timed_tokens += real
            losses.append(float(loss.detach()))
    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_s = timed_tokens / timed_seconds
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    return {"variant": name, "real_tokens_per_s": round(tokens_per_s), "mfu": round(6 * n_params * tokens_per_s / peak, 4)
            if peak else None, "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if device.type == "cuda" else None, "tokens_per_step": round(timed_tokens / args.steps),
            "steps": args.steps, "mean_loss": round(sum(losses) / len(losses), 4)}


@torch.no_grad()
def loss_check(model, exs: list[Example], pad_id: int, device) -> dict:
    """Per-example mean response loss, padded batches vs one packed row, same examples (float32)."""
    model.eval()
    padded = []
    for i in range(0, len(exs), 8):
        sums, counts = token_losses(model, {k: v.to(device) for k, v in collate(exs[i:i + 8], pad_id).items()})
        padded += (sums / counts).tolist()
    packed = packed_example_losses(model, exs, pad_id)
    diff = max(abs(a - b) for a, b in zip(padded, packed))
    return {"variant": "loss_check", "examples": len(exs), "max_abs_diff": diff,
            "mean_loss": sum(padded) / len(padded)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a local Hugging Face model directory")
    parser.add_argument("--examples", type=int, default=4096)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--row-tokens", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=8, help="packed rows per step")
    parser.add_argument("--chunk", type=int, default=4096, help="positions per output-layer chunk")
    parser.add_argument("--variants", nargs="+", default=["seed_recipe_b4", "padded_b16", "packed", "packed_flex"])
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    exs = examples(tokenizer, args.examples, args.max_length)
    print(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "examples": len(exs), "mean_example_tokens": round(sum(len(e.input_ids) for e in exs) / len(exs), 1),
                      "torch": torch.__version__}), flush=True)
    for name in args.variants:
        attn = "flex_attention" if name == "packed_flex" else "sdpa"
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation=attn).to(device)
        if name == args.variants[0]:
            print(json.dumps(loss_check(model, exs[:24], tokenizer.pad_token_id, device)), flush=True)
        try:
            print(json.dumps(run_variant(name, model, exs, args, tokenizer.pad_token_id, device)), flush=True)
        except Exception as exc:  # one variant failing (flex attention on an old torch, say) must not hide the rest
            print(json.dumps({"variant": name, "error": f"{type(exc).__name__}: {exc}"[:500]}), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
