"""Stage 6, finetune: instruction-tune the base model on the mix, and measure eval loss before and after.

With `finetune.template: alpaca` each example is the Alpaca prompt followed by the output and the
end-of-sequence token (a multi-turn row is refused); with `chat` it is the row's whole conversation rendered
with the chat template (tasks/chat_template.py), trained on every assistant turn and its end-of-turn token.
The loss covers those response tokens only (everything else, padding included, has label -100). The prompt
is always kept whole: an over-long example loses the tail of its (last kept) response, or its later turns,
or is dropped (`finetune.truncation`; tasks/llm/losses.py `fit_response`, `fit_turns`); the mask report counts
each, per reason, and `mask_report.md` in the artifact shows a sample of examples with their trained tokens
marked. Training is a plain AdamW loop with linear warmup and cosine decay. The same eval loss (mean over
response tokens of the held-out split) is measured on the base model and on the tuned model, which is saved
with its tokenizer so `from_pretrained` loads it; trained with `chat`, the tokenizer carries the chat
template (`apply_chat_template` renders prompts as training did) and generation stops at the end-of-turn
token as well as at end-of-sequence.

An encoder-decoder base model (T5, FLAN-T5, BART; its config says `is_encoder_decoder`; tasks/llm/seq2seq.py)
trains with the Alpaca prompt as the encoder's input and the output and end-of-sequence token as the decoder's
labels, all of them trained. It trains one example per row whatever `finetune.packing` says (metrics record
`packing: false` and a `packing_note`); `finetune.template: chat` is refused. Its FLOPs and MFU are not
counted (None in the metrics): tasks/flops.py counts decoder-only transformers. Its examples are built in
memory, not in the tokenized cache (see `finetune`).

Weights and optimizer state stay in float32; on a GPU the forward and backward run in bfloat16 under
autocast. Under torchrun (tasks/multigpu.py) every process trains its share of each step's micro-batches
and DistributedDataParallel averages the gradients, so N processes take the same steps as one process with
N times the gradient accumulation.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from tasks import chat_template, flops
from tasks.artifacts import atomic_write_json, atomic_write_text
from tasks.config import EvaluateConfig, FinetuneConfig, LoraConfig
from tasks.llm import seq2seq
from tasks.llm.losses import Example, collate, pack, packed_batch, packed_loss, stack_rows, token_losses
from tasks.llm.seq2seq import Seq2SeqExample
from tasks.llm.transformers_backend import load_lm, load_tokenizer, pick_device, pick_dtype
from tasks.tokenized import Tokenized, as_table, encode, encode_chat, encode_rows, prepare

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, for MFU
MASK_REPORT = "mask_report.md"  # in the stage's artifact: a sample of examples, trained tokens marked
MASK_REPORT_EXAMPLES = 8
TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"  # around trained text in the mask report


def ranks() -> tuple[int, int]:
    """This process's rank and the number of processes training together (0 and 1 outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision: float32 weights, `dtype` compute. A no-op for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def build_example(tokenizer, instruction: str, input: str, output: str, max_length: int,
                  truncation: str = "response") -> tuple[Example | None, str | None]:
    """The training example of one row and what truncation did to it (None: it fit; see fit_response)."""
    enc = encode(tokenizer, [instruction], [input], [output], max_length, truncation)
    return (Tokenized.from_encoded(enc)[0] if len(enc.kept) else None), next(iter(enc.reasons), None)


def build_chat_example(tokenizer, template: str, messages: list[dict[str, str]], max_length: int,
                       truncation: str = "response") -> tuple[Example | None, str | None]:
    """The chat training example of one conversation and what truncation did to it (see fit_turns)."""
    enc = encode_chat(tokenizer, template, [messages], ["the conversation"], max_length, truncation)
    return (Tokenized.from_encoded(enc)[0] if len(enc.kept) else None), next(iter(enc.reasons), None)


Examples = Tokenized | list[Example] | list[Seq2SeqExample]


def build_examples(tokenizer, df: pd.DataFrame | pa.Table, max_length: int, truncation: str = "response",
                   chat_template: str | None = None, encoder_decoder: bool = False,
                   ) -> tuple[Tokenized | list[Seq2SeqExample], np.ndarray, dict[str, int]]:
    """The examples of the rows that are kept (in memory): Alpaca examples, or chat examples rendered with
    `chat_template`, or with `encoder_decoder` an encoder-decoder model's (the Alpaca prompt for the encoder,
    the output and end-of-sequence as the decoder's labels: tasks/llm/seq2seq.py); their row positions in
    `df`, and the count per truncation reason (truncated_response, truncated_turns, dropped_too_long,
    dropped_prompt_too_long). `token_counts` reads either kind."""
    if encoder_decoder:
        if chat_template is not None:
            seq2seq.check_finetune_settings("chat")
        return seq2seq.encode_table(tokenizer, as_table(df), max_length, truncation)
    enc = encode_rows(tokenizer, as_table(df), max_length, truncation, chat_template)
    return Tokenized.from_encoded(enc), enc.kept, enc.reasons


def is_seq2seq(examples: Examples) -> bool:
    """Whether the examples are an encoder-decoder model's (`Seq2SeqExample`s)."""
    return isinstance(examples, list) and bool(examples) and isinstance(examples[0], Seq2SeqExample)


def token_counts(examples: Examples) -> tuple[np.ndarray, np.ndarray]:
    """Each example's tokens (an encoder-decoder example's: both sides') and trainable (response) tokens."""
    if isinstance(examples, Tokenized):
        return examples.lengths, examples.trainable
    if is_seq2seq(examples):
        return seq2seq.token_counts(examples)
    return (np.array([len(ex.input_ids) for ex in examples], dtype=np.int64),
            np.array([ex.trainable_tokens for ex in examples], dtype=np.int64))


@torch.inference_mode()
def evaluate_loss(model, examples: Examples, batch_size: int, pad_id: int, device: torch.device,
                  dtype: torch.dtype = torch.float32, desc: str = "eval loss") -> tuple[float, list[float]]:
    """Token-weighted mean loss over the examples' response tokens, and each example's own mean: a causal
    model's examples, or an encoder-decoder model's (`Seq2SeqExample`s: the decoder's labels are the response).
    Under torchrun each process takes every N-th example and all receive the whole result."""
    rank, world = ranks()
    model.eval()
    encoder_decoder = is_seq2seq(examples)
    batch_of, losses_of = (seq2seq.collate, seq2seq.token_losses) if encoder_decoder else (collate, token_losses)
    mine = [examples[i] for i in range(rank, len(examples), world)]
    sums, counts = [], []
    for start in tqdm(range(0, len(mine), batch_size), desc=desc, leave=False, disable=rank > 0):
        batch = {k: v.to(device) for k, v in batch_of(mine[start:start + batch_size], pad_id).items()}
        with autocast(device, dtype):
            s, c = losses_of(model, batch)
        sums += s.tolist()
        counts += c.tolist()
    if world > 1:
        shares: list[Any] = [None] * world
        dist.all_gather_object(shares, (sums, counts))
        sums, counts = [0.0] * len(examples), [0] * len(examples)
        for r, (s, c) in enumerate(shares):
            sums[r::world], counts[r::world] = s, c
    return sum(sums) / max(sum(counts), 1), [s / max(c, 1) for s, c in zip(sums, counts)]


def lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def plan_steps(lengths, cfg: FinetuneConfig, seed: int, world: int = 1) -> list[list[list[list[int]]]]:
    """The whole run's data order, fixed by the seed: per optimizer step its `grad_accum x world`
    micro-batches, each a list of rows, each row the examples it holds (several when packed, one otherwise).
    A resumed run replays it; process r of `world` trains micro-batches r*grad_accum to (r+1)*grad_accum."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, dtype=np.int64)
    batches: list[list[list[int]]] = []
    per_step = cfg.grad_accum * world
    per_epoch = total = 0
    while not total or len(batches) < total * per_step:
        order = rng.permutation(len(lengths))
        if cfg.packing:  # best fit in a new random order each epoch: different neighbours, few gaps
            ids = order.tolist()
            rows = [[ids[i] for i in row] for row in pack(lengths[order], cfg.row_tokens, decreasing=False)]
            rows = [rows[i] for i in rng.permutation(len(rows))]
        else:
            rows = [[i] for i in order.tolist()]
        epoch = [rows[s:s + cfg.batch_size] for s in range(0, len(rows), cfg.batch_size)]
        per_epoch = per_epoch or len(epoch)
        total = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs / per_step))
        batches += epoch
    return [batches[s * per_step:(s + 1) * per_step] for s in range(total)]


def micro_batch(examples: Examples, rows: list[list[int]], packing: bool, pad_id: int) -> dict[str, torch.Tensor]:
    if is_seq2seq(examples):
        if packing:
            raise ValueError(f"encoder-decoder examples cannot be packed: {seq2seq.UNPACKED}")
        return seq2seq.collate([examples[row[0]] for row in rows], pad_id)
    if not packing:
        return collate([examples[row[0]] for row in rows], pad_id)
    width = max(sum(len(examples[i].input_ids) for i in row) for row in rows)  # pad to the longest row
    return stack_rows([packed_batch([examples[i] for i in row], pad_id, width) for row in rows])


def batch_loss(model, batch: dict[str, torch.Tensor], packing: bool, chunk: int) -> tuple[torch.Tensor, int]:
    """Summed response-token loss of a micro-batch and its number of response tokens (an encoder-decoder
    model's: over its decoder's labels, never packed)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return seq2seq.batch_loss(model, batch, chunk)
    if packing:
        total, count = packed_loss(model, batch, chunk)
        return total, int(count)
    sums, counts = token_losses(model, batch)
    return sums.sum(), int(counts.sum())


class ResponseLoss(torch.nn.Module):
    """`batch_loss` as one module call: DistributedDataParallel synchronises the gradients of the
    forward it wraps, and the loss reads the decoder's hidden states, not the model's logits."""

    def __init__(self, model, packing: bool, chunk: int):
        super().__init__()
        self.model = model
        self.packing = packing
        self.chunk = chunk

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return batch_loss(self.model, batch, self.packing, self.chunk)


class Checkpoints:
    """`checkpoints/step-NNNNNN/` in the stage's artifact: trainable weights, optimizer and scheduler state,
    and the log so far; written to a temporary name and renamed, so a directory there is complete. Only the
    newest is kept. Frozen weights are not saved: they are the base model's."""

    def __init__(self, root: Path):
        self.root = root

    def latest(self) -> Path | None:
        done = sorted(p for p in self.root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        return done[-1] if done else None

    def save(self, step: int, model, optimizer, scheduler, log: list[dict[str, float]]) -> Path:
        final = self.root / f"step-{step:06d}"
        staging = self.root / f"step-{step:06d}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        try:
            torch.save({"step": step, "model": trainable, "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "log": log}, staging / "state.pt")
        except RuntimeError as exc:  # torch's writer reports a full disk without an errno; say what it was
            full = shutil.disk_usage(staging).free < 64 * 2**20
            raise OSError(errno.ENOSPC if full else errno.EIO, f"writing a checkpoint failed ({exc})",
                          str(staging / "state.pt")) from exc
        os.replace(staging, final)
        for old in self.root.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, model, optimizer, scheduler) -> tuple[int, list[dict[str, float]]]:
        latest = self.latest()
        if latest is None:
            return 0, []
        # Tensors, numbers, strings and containers only: a checkpoint on a shared volume is never unpickled
        # into arbitrary objects, so a planted file cannot run code in the training process.
        try:
            state = torch.load(latest / "state.pt", map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise RuntimeError(f"{latest / 'state.pt'}: refused, it holds more than tensors and plain values "
                               f"({str(exc).splitlines()[0]}); delete {latest} to train from the previous "
                               f"checkpoint or the start") from None
        missing = set(state["model"]) - {n for n, p in model.named_parameters() if p.requires_grad}
        if missing:
            raise RuntimeError(f"{latest}: checkpoint holds weights this run does not train: {sorted(missing)[:3]}")
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        return int(state["step"]), list(state["log"])


def lora_targets(model, configured: list[str]) -> list[str]:
    """The names of the linear layers LoRA adapts: `configured`, when one of them is a linear layer of the
    model. The default names a causal model's projections (Gemma, Llama, Qwen); on a T5 model, which has
    none of them, it stands for T5's (tasks/llm/seq2seq.py LORA_TARGETS). Otherwise the key is refused."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    if names & set(configured):
        return list(configured)
    if model.config.is_encoder_decoder and list(configured) == LoraConfig().target_modules:
        t5 = [name for name in seq2seq.LORA_TARGETS if name in names]
        if t5:
            return t5
    raise ValueError(f"finetune.lora.target_modules: none of {list(configured)} is a linear layer of "
                     f"{type(model).__name__}; set it to some of its linear layers' names: {sorted(names)}")


def with_lora(model, cfg: LoraConfig):
    """The model wrapped with trainable low-rank adapters; everything else frozen."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError:
        raise RuntimeError("finetune.lora.enabled needs peft: pip install -e '.[lora]'") from None
    task = "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM"
    return get_peft_model(model, PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                target_modules=lora_targets(model, cfg.target_modules),
                                                task_type=task))


def train(model, examples: Examples, cfg: FinetuneConfig, seed: int, pad_id: int, device: torch.device,
          checkpoints: Checkpoints | None = None,
          dtype: torch.dtype = torch.float32) -> tuple[list[dict[str, float]], int]:
    """Train; return the log (one entry per optimizer step) and the step the run resumed from (0: none)."""
    rank, world = ranks()
    if not cfg.train_embeddings and not cfg.lora.enabled:
        model.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    lengths, trainable = token_counts(examples)
    steps = plan_steps(lengths, cfg, seed, world)
    warmup = int(cfg.warmup_ratio * len(steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, len(steps)))
    start, log = checkpoints.load(model, optimizer, scheduler) if checkpoints else (0, [])
    torch.manual_seed(seed)
    loss_fn: torch.nn.Module = ResponseLoss(model, cfg.packing, cfg.logit_chunk)
    if world > 1:
        loss_fn = torch.nn.parallel.DistributedDataParallel(
            loss_fn, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)

    # tasks/flops.py counts a decoder-only transformer's attention; an encoder-decoder model's is not counted.
    count_pairs = not model.config.is_encoder_decoder
    model.train()
    bar = tqdm(range(start, len(steps)), desc="finetune", unit="step", initial=start, total=len(steps),
               disable=rank > 0)
    for step in bar:
        t0 = time.perf_counter()
        # Every process knows the whole step; it trains its own micro-batches and scales its loss so that
        # the averaged gradient is that of the mean over all response tokens of the step.
        in_step = [i for rows in steps[step] for row in rows for i in row]
        n_tokens = int(trainable[in_step].sum())
        step_lengths = lengths[in_step].tolist()
        mine = steps[step][rank * cfg.grad_accum:(rank + 1) * cfg.grad_accum]
        step_sum = torch.zeros((), device=device)
        for k, rows in enumerate(mine):
            # Dropout (T5's `dropout_rate`, LoRA's) draws from a seed of (seed, step, micro-batch of the step):
            # a resumed run draws the masks the uninterrupted one drew, and N processes those of one process
            # accumulating N micro-batches.
            torch.manual_seed(int(np.random.SeedSequence([seed, step, rank * cfg.grad_accum + k]).generate_state(1)[0]))
            batch = {key: v.to(device) for key, v in micro_batch(examples, rows, cfg.packing, pad_id).items()}
            last = k == len(mine) - 1
            sync = contextlib.nullcontext() if last or world == 1 else loss_fn.no_sync()
            with sync:
                with autocast(device, dtype):
                    total, _ = loss_fn(batch)
                (total * world / n_tokens).backward()
            step_sum += total.detach()
        if world > 1:
            dist.all_reduce(step_sum)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        log.append({"step": step + 1, "loss": float(step_sum) / max(n_tokens, 1), "lr": scheduler.get_last_lr()[0],
                    "tokens": n_tokens, "real_tokens": sum(step_lengths),
                    "attention_pairs": flops.attention_pairs(model.config, step_lengths) if count_pairs else None,
                    "seconds": time.perf_counter() - t0})
        bar.set_postfix(loss=f"{log[-1]['loss']:.3f}")
        if checkpoints and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < len(steps):
            if rank == 0:
                checkpoints.save(step + 1, model, optimizer, scheduler, log)
            if world > 1:
                dist.barrier()  # nobody runs ahead of a checkpoint it might have to resume from
    return log, start


def mask_report(examples: Examples, ids: list[str], truncation: dict[str, int] | None = None,
                max_length: int | None = None) -> dict[str, Any]:
    """Trainable (response) share of each example's tokens, and what truncation did (count per reason);
    an example with nothing to learn from stops the stage. `ids` names the examples, in their order. An
    encoder-decoder example's tokens are both sides', its trainable ones the decoder's labels."""
    lengths, trainable = token_counts(examples)
    empty = np.flatnonzero(trainable == 0)
    if len(empty):
        raise ValueError(f"finetune: {len(empty)} training examples have no response token to learn from "
                         f"(first: {[ids[i] for i in empty[:3]]}); raise finetune.max_length or fix those rows")
    if not len(lengths):
        raise ValueError(f"finetune: every training example was dropped as too long ({truncation}); raise "
                         f"finetune.max_length (now {max_length}) or set finetune.truncation: response")
    shares = trainable / lengths
    return {"examples": len(lengths), "trainable_tokens": int(trainable.sum()), "tokens": int(lengths.sum()),
            "trainable_share_min": round(float(shares.min()), 4),
            "trainable_share_mean": round(float(shares.mean()), 4),
            "trainable_share_p10": round(float(np.quantile(shares, 0.1)), 4),
            "truncation": dict(sorted((truncation or {}).items()))}


def _runs(tokenizer, ids: list[int], spans: list[tuple[int, int]]) -> list[tuple[str, bool]]:
    """The example's text in runs, each trained or not. Decoded as prefixes, so a run's text is exactly
    what its tokens add to the text (a character split across runs goes to the run that completes it)."""
    cuts = sorted({0, len(ids), *(b for span in spans for b in span)})
    trained = [any(s <= a < e for s, e in spans) for a in cuts[:-1]]

    def text(n: int) -> str:
        return tokenizer.decode(ids[:n], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    texts = [text(n) for n in cuts]
    if all(b.startswith(a) for a, b in zip(texts, texts[1:])):
        pieces = [b[len(a):] for a, b in zip(texts, texts[1:])]
    else:  # a tokenizer whose decoded prefixes are not prefixes: each run decoded alone
        pieces = [tokenizer.decode(ids[a:b], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                  for a, b in zip(cuts, cuts[1:])]
    return list(zip(pieces, trained))


def mask_report_markdown(tokenizer, examples: Tokenized | list[Seq2SeqExample], ids: list[str], template: str,
                         sample: int = MASK_REPORT_EXAMPLES, seed: int = 0,
                         truncation: dict[str, int] | None = None) -> str:
    """A seeded sample of `sample` training examples as Markdown: each example's whole text, special tokens
    included, its trained text between ⟦ and ⟧, and its token counts. `template` names how the examples
    were rendered; `truncation` is the count per reason (None: the Tokenized's own). An encoder-decoder
    example shows its encoder's text, then its decoder's labels, all trained. What a user reads to see what
    the model was trained on."""
    n = len(examples)
    picked = sorted(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False).tolist()) if n else []
    lengths, trainable = token_counts(examples)
    encoder_decoder = is_seq2seq(examples)
    truncation = examples.truncation if truncation is None else truncation
    marked = (f"The encoder reads the text before {TRAINED_OPEN}; the decoder is trained on the text between "
              f"{TRAINED_OPEN} and {TRAINED_CLOSE}, its labels, all of them" if encoder_decoder else
              f"The trained tokens (those with a loss) are between {TRAINED_OPEN} and {TRAINED_CLOSE}; the rest "
              f"is context the model reads and is not trained on")
    lines = [f"# What finetune trains: {len(picked)} of {n} training examples", "",
             f"Template: {template}. {marked}. Special tokens are shown as they are.", "",
             f"All {n} examples: {int(lengths.sum())} tokens, {int(trainable.sum())} trained "
             f"({trainable.sum() / max(lengths.sum(), 1):.1%}). Truncation: "
             f"{', '.join(f'{k} {v}' for k, v in sorted(truncation.items())) or 'none'} (an answer cut "
             f"short ends without its end-of-turn token).", ""]
    for number, i in enumerate(picked, start=1):
        if encoder_decoder:
            example = examples[i]
            spans = [(len(example.encoder_ids), example.tokens)]
            runs = _runs(tokenizer, example.encoder_ids + example.labels, spans)
            counts = (f"{lengths[i]} tokens: {len(example.encoder_ids)} in the encoder, {trainable[i]} trained in "
                      f"the decoder.")
        else:
            spans = examples.trained_spans(i)
            runs = _runs(tokenizer, examples[i].input_ids, spans)
            counts = f"{lengths[i]} tokens, {trainable[i]} trained, in {len(spans)} span{'s' * (len(spans) != 1)}."
        body = "".join(f"{TRAINED_OPEN}{t}{TRAINED_CLOSE}" if trained else t for t, trained in runs)
        fence = "`" * max(3, _longest_run(body, "`") + 1)
        lines += [f"## {number}. `{ids[i]}`", "", counts, "", f"{fence}text", body, fence, ""]
    return "\n".join(lines)


def _longest_run(text: str, char: str) -> int:
    longest = current = 0
    for c in text:
        current = current + 1 if c == char else 0
        longest = max(longest, current)
    return longest


def attention_for(cfg: FinetuneConfig, device: torch.device) -> str:
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    # Flex attention turns the packed rows' block-diagonal mask into skipped blocks (measured on an H200:
    # 106K vs 89K real tokens/s for sdpa); it has no backward on CPU. Unpacked (encoder-decoder models
    # always are), sdpa.
    return "flex_attention" if device.type == "cuda" and cfg.packing else "sdpa"


def training_figures(log: list[dict[str, float]], model, device: torch.device, world: int = 1) -> dict[str, Any]:
    """Throughput of all processes together: real tokens/s (tokens of the examples, padding never counted;
    an encoder-decoder example's on both sides) is the headline. The FLOPs are those actually done
    (tasks/flops.py: 6 x the decoder's matmul weights per token, the attention pairs within each example, the
    output layer at response positions only, and its weight gradient only when it is trained); MFU is that
    against `world` GPUs' dense bf16 peak. Neither is given (None) under LoRA, nor for an encoder-decoder
    model: tasks/flops.py counts a decoder-only transformer, and T5's encoder, cross-attention and relative
    position biases are another count."""
    seconds = sum(entry["seconds"] for entry in log) or 1e-9
    real = sum(entry["real_tokens"] for entry in log)
    response = sum(entry["tokens"] for entry in log)
    head_trained = model.get_output_embeddings().weight.requires_grad
    # The count is that of full fine-tuning; under LoRA the frozen weights get no weight gradient and the
    # adapters add their own, so no figure rather than a flattering one.
    done = None if hasattr(model, "peft_config") or model.config.is_encoder_decoder else flops.training_flops(
        model.config, real, response, sum(entry["attention_pairs"] for entry in log), head_trained)
    figures: dict[str, Any] = {"train_tokens": response, "train_real_tokens": real,
                               "real_tokens_per_s": real / seconds, "train_seconds": seconds, "processes": world,
                               "train_flops": done, "model_flops_per_token": done and done / max(real, 1),
                               "head_trained": head_trained}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((f for key, f in PEAK_BF16_FLOPS.items() if key in name), None)
        figures.update(gpu=name, peak_mem_gb=torch.cuda.max_memory_allocated(device) / 2**30,
                       mfu=flops.mfu(done, seconds, peak * world) if peak and done else None)
    else:
        import resource

        figures["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return figures


def plot_curve(log: list[dict[str, float]], before: float, after: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([e["step"] for e in log], [e["loss"] for e in log], label="train loss (response tokens)")
    ax.scatter([0, log[-1]["step"]], [before, after], color="tab:orange", zorder=3, label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    staging = path.with_suffix(".tmp.png")
    fig.savefig(staging)
    plt.close(fig)
    os.replace(staging, path)


def model_card(metrics: dict[str, Any], data: dict[str, str]) -> str:
    how = ("the Alpaca template as the encoder's input, loss on the response (the decoder's labels)"
           if metrics.get("encoder_decoder") else
           "the Alpaca template, loss on response tokens only" if metrics["template"] == "alpaca" else
           "its chat template (saved with the tokenizer: prompt it with `tokenizer.apply_chat_template(messages, "
           "add_generation_prompt=True)`), loss on every assistant turn and its end-of-turn token only")
    lines = ["# instructflow fine-tune", "",
             f"Base model: `{metrics['base_model']}`, instruction-tuned with {how} "
             f"({metrics['steps']} optimizer steps, {metrics['train_examples']} training examples"
             f"{', packed' if metrics['packing'] else ''}{', LoRA adapters merged in' if metrics['lora'] else ''}).",
             "", "## Data", ""]
    lines += [f"- {name}: `{value}`" for name, value in data.items()]
    lines += ["", "## Results", "", "| metric | value |", "|---|---|"]
    for key in ("eval_loss_before", "eval_loss_after", "real_tokens_per_s", "mfu", "peak_mem_gb"):
        if metrics.get(key) is not None:
            lines.append(f"| {key} | {metrics[key]:.4g} |")
    return "\n".join(lines) + "\n"


def finetune(mixed: pd.DataFrame | pa.Table, cfg: FinetuneConfig, eval_cfg: EvaluateConfig, model_dir: Path,
             out_dir: Path, seed: int, data: dict[str, str] | None = None,
             tokens_root: Path | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Train on the `train` split of `mixed`, save the model to `out_dir/model`, return per-example eval losses.

    `data` names what the model was trained on (artifact keys) for its model card. A run that finds
    checkpoints in `out_dir/checkpoints` continues from the newest one. The examples are tokenized once into
    `tokens_root` (tasks/tokenized.py), where a resumed run, every other process and any run with the same
    tokenizer, rows, template and length settings find them; by default `out_dir/tokenized`, removed with
    the checkpoints once the model is saved (an encoder-decoder model's examples are built in memory instead).
    `cfg.template` and `cfg.chat_template` say how examples are rendered (see the module's docstring);
    `out_dir/mask_report.md` shows a sample of them.
    """
    # 1. Model (float32 weights; `dtype` is the compute precision), tokenizer and examples. Under torchrun
    # each process takes the GPU of its local rank. An encoder-decoder model trains one example per row (its
    # prompt in the encoder, its response in the decoder: nothing to pack) and refuses chat templates.
    rank, world = ranks()
    encoder_decoder = seq2seq.is_encoder_decoder(model_dir)
    if encoder_decoder:
        seq2seq.check_finetune_settings(cfg.template)
        cfg = cfg.model_copy(update={"packing": False})
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dtype = pick_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(model_dir, padding_side="right")
    template = chat_template.template_for(tokenizer, cfg.chat_template) if cfg.template == "chat" else None
    model = load_lm(model_dir, device, torch.float32, attn_implementation=attention_for(cfg, device))
    table = mixed if isinstance(mixed, pa.Table) else pa.Table.from_pandas(mixed, preserve_index=False)
    train_rows = table.filter(pc.equal(table.column("split"), "train"))
    eval_rows = table.filter(pc.equal(table.column("split"), "eval"))
    del table
    if eval_cfg.max_examples is not None:
        eval_rows = eval_rows.slice(0, eval_cfg.max_examples)
    if not train_rows.num_rows or not eval_rows.num_rows:
        raise ValueError(f"finetune needs train and eval rows, got {train_rows.num_rows} and {eval_rows.num_rows}")
    root = tokens_root or out_dir / "tokenized"
    if encoder_decoder:
        # In memory (Python lists, ~44 bytes a token, in every process): tasks/tokenized.py's cache holds
        # causal examples, and its `prepare` encodes rows causally (prompt and response as one sequence, the
        # key covering that code). An encoder-decoder example would fit its arrays (encoder ids, then the
        # labels as the one trained span) once `prepare` takes the model kind; until then a resumed run
        # tokenizes again, which for FLAN-T5-sized mixes takes seconds.
        train_examples, train_kept, train_cut = seq2seq.encode_table(tokenizer, train_rows, cfg.max_length,
                                                                     cfg.truncation)
        eval_examples, eval_kept, eval_cut = seq2seq.encode_table(tokenizer, eval_rows, cfg.max_length,
                                                                  cfg.truncation)
        train_prep = eval_prep = None
    else:
        train_examples, train_prep = prepare(tokenizer, train_rows, cfg.max_length, cfg.truncation, root,
                                             model_dir, "tokenize (train)", template)
        eval_examples, eval_prep = prepare(tokenizer, eval_rows, cfg.max_length, cfg.truncation, root, model_dir,
                                           "tokenize (eval)", template)
        train_kept, train_cut = train_examples.rows, train_examples.truncation
        eval_kept, eval_cut = eval_examples.rows, eval_examples.truncation
    train_ids = train_rows.column("id").take(train_kept).to_pylist()
    masks = mask_report(train_examples, train_ids, train_cut, cfg.max_length)
    masks["eval_truncation"] = dict(sorted(eval_cut.items()))
    masks["template"] = cfg.template
    if rank == 0:  # before training: what will be trained can be read while it trains
        source = (f"the file `{cfg.chat_template}`" if cfg.chat_template else
                  "Gemma's turn format" if template == chat_template.GEMMA else "the tokenizer's own")
        described = ("alpaca on an encoder-decoder model (the Alpaca prompt in the encoder; the response and "
                     "end-of-sequence as the decoder's labels)" if encoder_decoder else
                     "alpaca (the Alpaca prompt, then the response and end-of-sequence)" if template is None else
                     f"chat, {source}: every assistant turn and its end-of-turn token trained")
        atomic_write_text(out_dir / MASK_REPORT, mask_report_markdown(tokenizer, train_examples, train_ids,
                                                                      described, seed=seed, truncation=train_cut))
    eval_df = eval_rows.select(["id", "instruction"]).take(eval_kept).to_pandas()
    del train_rows, eval_rows
    if not len(eval_examples):
        raise ValueError(f"finetune: every eval example was dropped as too long ({eval_cut}); "
                         f"raise finetune.max_length (now {cfg.max_length}) or set finetune.truncation: response")
    pad_id = tokenizer.pad_token_id
    if cfg.lora.enabled:
        model = with_lora(model, cfg.lora)
    if cfg.gradient_checkpointing:  # transformers 5 renamed it; older releases have the old name only
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:  # each transformer layer (an encoder-decoder model's: the encoder's and the decoder's)
        for layer in seq2seq.layers(model) if encoder_decoder else model.get_decoder().layers:
            layer.compile()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # 2. Eval loss of the base model, training (from the newest checkpoint, if any), eval loss again.
    t0 = time.perf_counter()
    before, before_each = evaluate_loss(model, eval_examples, eval_cfg.batch_size, pad_id, device, dtype, "eval (base)")
    checkpoints = Checkpoints(out_dir / "checkpoints")
    log, resumed_from = train(model, train_examples, cfg, seed, pad_id, device, checkpoints, dtype)
    after, after_each = evaluate_loss(model, eval_examples, eval_cfg.batch_size, pad_id, device, dtype, "eval (tuned)")
    seconds = time.perf_counter() - t0

    # 3. Metrics, the curve, the model with its tokenizer and card; the checkpoints go once the model is saved.
    metrics = {
        "base_model": str(model_dir), "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "weights_dtype": "float32", "gradient_checkpointing": cfg.gradient_checkpointing, "compile": cfg.compile,
        "attn_implementation": attention_for(cfg, device), "packing": cfg.packing, "lora": cfg.lora.enabled,
        "encoder_decoder": encoder_decoder, "packing_note": seq2seq.UNPACKED if encoder_decoder else None,
        "template": cfg.template, "mask_report": MASK_REPORT,
        "train_examples": len(train_examples), "eval_examples": len(eval_examples), "steps": len(log),
        "resumed_from_step": resumed_from, "mask": masks, "tokenized": {"train": train_prep, "eval": eval_prep},
        "eval_loss_before": before, "eval_loss_after": after, "eval_loss_delta": after - before,
        "train_loss_first": log[0]["loss"], "train_loss_last": log[-1]["loss"],
        **training_figures(log[resumed_from:], model, device, world), "seconds": seconds, "train_log": log,
    }
    metrics["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_example = pd.DataFrame({"id": eval_df["id"].to_numpy(), "instruction": eval_df["instruction"].to_numpy(),
                                "loss_before": before_each, "loss_after": after_each})
    stats = {k: v for k, v in metrics.items() if k != "train_log"}
    stats["model_path"] = str(out_dir / "model")
    if rank > 0:  # the first process writes; the others are done
        return per_example, stats
    plot_curve(log, before, after, out_dir / "training_curve.png")
    if cfg.lora.enabled:
        model = model.merge_and_unload()  # a plain model again: from_pretrained needs no peft
    final = out_dir / "model"
    staging = out_dir / "model.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    if template is not None:  # prompts render as examples did; a reply ends at the end-of-turn token
        tokenizer.chat_template = template
        stop = chat_template.end_of_turn_id(tokenizer, template)
        eos = int(tokenizer.eos_token_id)
        model.generation_config.eos_token_id = [eos] + ([stop] if stop is not None and stop != eos else [])
    model.save_pretrained(staging)
    # Ready for generation: a causal model continues left-padded prompts, an encoder reads right-padded ones.
    # save_pretrained writes the side only from init_kwargs (transformers 5); else loading gives the class's.
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "right" if encoder_decoder else "left"
    tokenizer.save_pretrained(staging)
    (staging / "README.md").write_text(model_card(metrics, data or {}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    atomic_write_json(out_dir / "metrics.json", metrics)
    shutil.rmtree(checkpoints.root, ignore_errors=True)
    if tokens_root is None:  # this run's own: done with, like its checkpoints (a shared root is kept)
        shutil.rmtree(root, ignore_errors=True)
    return per_example, stats
