"""Encoder-decoder models (T5, FLAN-T5, mT5, BART): the prompt is the encoder's input, the response the
decoder's output. The one computation behind their fine-tuning, eval loss and scores, as tasks/llm/losses.py
is for causal models.

An example is `encoder_ids` (the prompt, with whatever special tokens the tokenizer adds: T5's appends
`</s>`) and `labels` (the response, and the end-of-sequence token when training). The model shifts the labels
right behind its `decoder_start_token_id` to make the decoder's input, so every decoder position carries a
label: the loss covers the response tokens only by construction, and -100 marks padding alone.

Lengths: each side is its own sequence, and each holds at most `max_length` tokens (the truncation rule of
`losses.fit_response`, applied per side). The encoder keeps the prompt whole or the example is dropped
(`dropped_prompt_too_long`); the decoder keeps the head of an over-long response (`truncated_response`, without
its end-of-sequence token) or, with truncation `drop`, the example goes (`dropped_too_long`). So the room for a
response does not depend on its prompt: a response scored alone (IFD's direct loss) and after its instruction
is scored on the same tokens without any `room_from`.

No prompt (IFD's direct loss) is the tokenizer's encoding of the empty string: T5's gives `</s>`, Gemma's
`<bos>`; a tokenizer that adds nothing gives the end-of-sequence token alone, since an encoder needs at least
one position for the decoder to attend to.

Packing does not apply: an encoder-decoder example is two sequences, and the decoder's cross-attention would
need a block mask across encoder and decoder rows that these models do not take, so finetune trains them one
example per row whatever `finetune.packing` says (and records that in its metrics). Chat templates do not
apply either: they format a conversation as one causal sequence; `check_finetune_settings` refuses them, and
`encode_table` refuses a conversation row (more than one exchange, or a system prompt).

Logits are computed in chunks of LOGIT_CHUNK positions, never for a whole batch at once: FLAN-T5's 32K-entry
vocabulary is small next to Gemma's 262K, yet 16 responses of 512 tokens still make 1 GB of float32 logits.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tasks import conversation
from tasks.llm.losses import DROPPED_PROMPT, IGNORE, LOGIT_CHUNK, TRUNCATED, TRUNCATION, fit_response
from tasks.prompts import alpaca_prompt


def is_encoder_decoder(model_or_dir) -> bool:
    """Whether a model (or a local model directory, by its config.json) is an encoder-decoder model."""
    config = getattr(model_or_dir, "config", None)
    if config is not None:
        return bool(getattr(config, "is_encoder_decoder", False))
    path = Path(model_or_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the model's config ({exc})") from None
    if "is_encoder_decoder" in raw:
        return bool(raw["is_encoder_decoder"])
    from transformers import AutoConfig  # a config class whose default is not written out

    return bool(AutoConfig.from_pretrained(str(path.parent)).is_encoder_decoder)


UNPACKED = ("encoder-decoder models train unpacked: one example per row, the prompt in the encoder and the "
            "response in the decoder (finetune.packing does not apply)")
# LoRA's targets in T5 (FLAN-T5, mT5): the attention projections q, k, v, o (self- and cross-attention) and
# the MLP's wi and wo; a gated MLP (FLAN-T5's, mT5's) has wi_0 and wi_1 instead of wi.
LORA_TARGETS = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")


def check_finetune_settings(template: str) -> None:
    """Refuse fine-tuning settings that do not apply to an encoder-decoder model (see the module)."""
    if template != "alpaca":
        raise ValueError(f"finetune.template: `{template}` renders a conversation as one causal sequence, which an "
                         f"encoder-decoder model does not read; set `finetune.template: alpaca`")


def layers(model) -> list[torch.nn.Module]:
    """The transformer layers of the encoder and the decoder (T5's `block`s, BART's `layers`), which
    finetune compiles one by one."""
    out = []
    for stack in (model.get_encoder(), model.get_decoder()):
        found = getattr(stack, "block", None)
        found = getattr(stack, "layers", None) if found is None else found
        if found is None:
            raise ValueError(f"finetune.compile: {type(stack).__name__} has neither `block` nor `layers`, so its "
                             f"layers cannot be compiled one by one; set `finetune.compile: false`")
        out += list(found)
    return out


def load_seq2seq_lm(model_dir: Path, device: torch.device, dtype: torch.dtype, attn_implementation: str | None = None):
    from transformers import AutoModelForSeq2SeqLM

    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForSeq2SeqLM.from_pretrained(str(model_dir), dtype=dtype, **extra).to(device)
    check_output_layer(model)
    return model


# ---- Examples --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seq2SeqExample:
    encoder_ids: list[int]
    labels: list[int]  # the decoder's targets: response tokens, then end-of-sequence when it fit

    @property
    def trainable_tokens(self) -> int:
        return len(self.labels)

    @property
    def tokens(self) -> int:
        """Both sides' tokens: the real tokens the model reads."""
        return len(self.encoder_ids) + len(self.labels)


def fit(prompt_tokens: int, response_tokens: int, max_length: int,
        truncation: str = "response") -> tuple[int, str | None]:
    """How many response tokens an example keeps, and why not all of them (None: all kept): the prompt
    must fit the encoder's `max_length` whole, the response the decoder's (see the module)."""
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
    if prompt_tokens > max_length:
        return 0, DROPPED_PROMPT
    return fit_response(0, response_tokens, max_length, truncation)


def make_example(prompt_ids: list[int], response_ids: list[int], max_length: int,
                 truncation: str = "response") -> Seq2SeqExample | None:
    """The whole prompt for the encoder, as much of the response as fits for the decoder; None when dropped."""
    keep, why = fit(len(prompt_ids), len(response_ids), max_length, truncation)
    if why is not None and why != TRUNCATED:
        return None
    return Seq2SeqExample(list(prompt_ids), list(response_ids[:keep]))


def encoder_ids(tokenizer, texts: Sequence[str], max_tokens: int | None = None) -> list[list[int]]:
    """Each text as the encoder reads it: the tokenizer's special tokens included, an empty encoding
    replaced by the end-of-sequence token (see the module). `max_tokens` keeps the tail of a longer text
    (the tokenizer's truncation side), as generation does; examples are never cut."""
    cut = {"truncation": True, "max_length": max_tokens} if max_tokens else {"truncation": False}
    ids = tokenizer(list(texts), add_special_tokens=True, padding=False, **cut)["input_ids"]
    return [row if row else [tokenizer.eos_token_id] for row in ids]


def encode_pairs(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int,
                 truncation: str = "response",
                 eos: bool = True) -> tuple[list[Seq2SeqExample], np.ndarray, dict[str, int]]:
    """The examples of prompt/response texts (each response stripped, then its end-of-sequence token when
    `eos`), the positions of the pairs that gave one, and the count per truncation reason."""
    prompt_ids = encoder_ids(tokenizer, prompts)
    response_ids = tokenizer([r.strip() for r in responses], add_special_tokens=False, padding=False,
                             truncation=False)["input_ids"]
    tail = [tokenizer.eos_token_id] if eos else []
    examples, kept, reasons = [], [], {}
    for row, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        keep, why = fit(len(p), len(r) + len(tail), max_length, truncation)
        if why is not None:
            reasons[why] = reasons.get(why, 0) + 1
            if why != TRUNCATED:
                continue
        examples.append(Seq2SeqExample(p, (r + tail)[:keep]))
        kept.append(row)
    return examples, np.asarray(kept, dtype=np.int64), reasons


def encode_rows(tokenizer, instructions: Sequence[str], inputs: Sequence[str], outputs: Sequence[str], max_length: int,
                truncation: str = "response") -> tuple[list[Seq2SeqExample], np.ndarray, dict[str, int]]:
    """Training examples of instruction/input/output rows: the Alpaca prompt to the encoder, the output and
    the end-of-sequence token to the decoder. Returns the examples, the rows that gave one and the count per
    truncation reason (truncated_response, dropped_too_long, dropped_prompt_too_long)."""
    prompts = [alpaca_prompt(i, x or "") for i, x in zip(instructions, inputs)]
    return encode_pairs(tokenizer, prompts, outputs, max_length, truncation, eos=True)


def encode_table(tokenizer, table: pa.Table, max_length: int,
                 truncation: str = "response") -> tuple[list[Seq2SeqExample], np.ndarray, dict[str, int]]:
    """`encode_rows` over a table's `instruction`, `input` and `output` columns (tasks/tokenized.py
    `as_table`); a row with `messages` (a conversation: tasks/conversation.py) is refused, naming the row."""
    if conversation.COLUMN in table.column_names:
        multi = np.flatnonzero(table.column(conversation.COLUMN).is_valid().to_numpy(zero_copy_only=False))
        if len(multi):
            row = int(multi[0])
            at = f"row {table.column('id')[row].as_py()!r}" if "id" in table.column_names else f"row {row}"
            raise ValueError(f"{at} is a conversation (more than one exchange, or a system prompt; {len(multi)} "
                             f"such rows): an encoder-decoder model trains on one instruction and its answer "
                             f"per row (finetune.template: alpaca); leave conversations out of its mix")

    def texts(name: str) -> list[str]:
        return table.column(name).to_pandas().fillna("").astype(str).tolist()

    return encode_rows(tokenizer, texts("instruction"), texts("input"), texts("output"), max_length, truncation)


def token_counts(examples: Sequence[Seq2SeqExample]) -> tuple[np.ndarray, np.ndarray]:
    """Each example's tokens (encoder and decoder) and trainable (decoder) tokens."""
    return (np.array([ex.tokens for ex in examples], dtype=np.int64),
            np.array([ex.trainable_tokens for ex in examples], dtype=np.int64))


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their attention mask. An encoder reads padding at the end: T5's relative and
    BART's absolute positions of the real tokens are then the same as without padding."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids, mask


def collate(examples: Sequence[Seq2SeqExample], pad_id: int) -> dict[str, torch.Tensor]:
    """A padded batch: `input_ids` and `attention_mask` for the encoder, `labels` for the decoder (-100 on
    padding). `model(**batch)` takes it as is; the model makes the decoder's input from the labels."""
    ids, mask = pad_rows([ex.encoder_ids for ex in examples], pad_id)
    labels, _ = pad_rows([ex.labels for ex in examples], IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---- Forward and losses ----------------------------------------------------------------------------------------


def decoder_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   decoder_input_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states (batch, decoder positions, d): what the output layer reads."""
    encoded = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return model.get_decoder()(input_ids=decoder_input_ids, encoder_hidden_states=encoded,
                               encoder_attention_mask=attention_mask, use_cache=False).last_hidden_state


def _output_layer(model) -> tuple[float, torch.Tensor, torch.Tensor | None]:
    """(scale, weight, bias) of the output layer: logits = (scale * states) @ weight.T + bias. T5 scales its
    decoder's output by d_model ** -0.5 before a tied output layer; BART adds `final_logits_bias`."""
    config = model.config
    scaled = getattr(config, "scale_decoder_outputs", None)
    if scaled is None:  # transformers 4 read it off tie_word_embeddings
        scaled = config.tie_word_embeddings
    scale = model.model_dim ** -0.5 if scaled and hasattr(model, "model_dim") else 1.0
    bias = getattr(model, "final_logits_bias", None)
    return scale, model.get_output_embeddings().weight, None if bias is None else bias.reshape(-1)


def _logits(states: torch.Tensor, scale: float, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(states * scale if scale != 1.0 else states, weight, bias).float()


def logits(model, states: torch.Tensor) -> torch.Tensor:
    """The output layer over decoder states (any leading shape), in float32."""
    return _logits(states, *_output_layer(model))


@torch.no_grad()
def check_output_layer(model) -> None:
    """Refuse a model whose logits `logits` would not reproduce (an architecture whose output layer is more
    than a scaled linear layer with a bias): its losses and scores would be silently wrong."""
    if not is_encoder_decoder(model):
        raise ValueError(f"{type(model).__name__} is not an encoder-decoder model")
    if model.config.decoder_start_token_id is None:
        raise ValueError(f"{type(model).__name__}: its config has no decoder_start_token_id, so the decoder has no "
                         f"first input (T5 uses its pad token id); set it in the model's config.json")
    was_training = model.training
    model.eval()  # no dropout
    try:
        device = model.get_output_embeddings().weight.device
        start = torch.tensor([[model.config.decoder_start_token_id]], device=device)  # a valid id for both sides
        want = model(input_ids=start, decoder_input_ids=start).logits[0, -1].float()
        got = logits(model, decoder_states(model, start, torch.ones_like(start), start))[0, -1]
    finally:
        model.train(was_training)
    # The same operations in the model's dtype: only rounding may differ (a few units in the last place).
    tolerance = max(1e-3, 4 * torch.finfo(model.get_output_embeddings().weight.dtype).eps) * float(want.abs().max())
    if not torch.allclose(got, want, rtol=0.0, atol=tolerance + 1e-6):
        raise ValueError(f"{type(model).__name__} ({model.config.model_type}): its output layer is not the scaled "
                         f"linear layer this project computes losses with (T5, FLAN-T5, mT5 and BART are); use one "
                         f"of those, or a causal model")


def _chunk_losses(states: torch.Tensor, targets: torch.Tensor, scale: float, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    return F.cross_entropy(_logits(states, scale, weight, bias), targets, reduction="none")


def token_losses(model, batch: dict[str, torch.Tensor], chunk: int = LOGIT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response-token loss and response-token count per example of a `collate` batch.

    The output layer runs on `chunk` decoder positions at a time. Under autograd each chunk is
    checkpointed: its logits are recomputed in the backward pass rather than kept, so one chunk of logits is
    the most in memory at any time, training or not (for one more output-layer forward per chunk).
    """
    labels = batch["labels"]
    decoder_input_ids = batch.get("decoder_input_ids")
    if decoder_input_ids is None:
        decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
    hidden = decoder_states(model, batch["input_ids"], batch["attention_mask"], decoder_input_ids)
    mask = labels != IGNORE
    states, targets = hidden[mask], labels[mask]
    scale, weight, bias = _output_layer(model)
    grad = torch.is_grad_enabled() and (states.requires_grad or weight.requires_grad)
    parts = []
    for start in range(0, len(targets), chunk):
        args = (states[start:start + chunk], targets[start:start + chunk], scale, weight, bias)
        parts.append(checkpoint(_chunk_losses, *args, use_reentrant=False) if grad else _chunk_losses(*args))
    per_token = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=per_token.dtype, device=per_token.device).index_add(0, rows, per_token)
    return sums, mask.sum(dim=1)


def batch_loss(model, batch: dict[str, torch.Tensor], chunk: int = LOGIT_CHUNK) -> tuple[torch.Tensor, int]:
    """Summed response-token loss of a training micro-batch and its number of response tokens."""
    sums, counts = token_losses(model, batch, chunk)
    return sums.sum(), int(counts.sum())


@torch.inference_mode()
def first_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         token_ids: Sequence[int]) -> np.ndarray:
    """Log-probability of each of `token_ids` as the decoder's first token, for each (right-padded) encoder
    input: shape (rows, tokens). The decoder reads its start token alone."""
    start = torch.full((input_ids.shape[0], 1), model.config.decoder_start_token_id, dtype=torch.long,
                       device=input_ids.device)
    first = logits(model, decoder_states(model, input_ids, attention_mask, start)[:, 0])
    return torch.log_softmax(first, dim=-1)[:, list(token_ids)].cpu().numpy()
