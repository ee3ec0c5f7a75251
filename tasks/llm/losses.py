"""Response-token losses of a causal LM: the one computation behind fine-tuning, eval loss and IFD.

An example is a prompt followed by a response, or a conversation (tasks/chat_template.py) whose assistant
turns are its responses; labels are -100 everywhere else (prompt, user and system turns, role headers,
padding), so only response tokens carry loss. Logits are computed only at the positions that predict a
response token, and in chunks: with Gemma's 262K-token vocabulary a [tokens x vocabulary] float32 tensor is
the largest thing in memory (16 x 256 tokens would be 4.3 GB), far more than the transformer itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100
LOGIT_CHUNK = 1024  # positions per output-layer call: 1024 x 262K float32 logits = 1.07 GB at most


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def trainable_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


TRUNCATION = ("response", "drop")
# What happened to an example that did not fit, as counted in the reports (None: it fit).
TRUNCATED = "truncated_response"        # the response lost its tail (and its end-of-sequence token)
DROPPED_TOO_LONG = "dropped_too_long"   # truncation `drop`: the example is not used
DROPPED_PROMPT = "dropped_prompt_too_long"  # the prompt alone leaves no room for a response token
TRUNCATED_TURNS = "truncated_turns"     # a conversation kept its leading whole turns, the later ones left out


def fit_response(prompt_tokens: int, response_tokens: int, max_length: int, truncation: str = "response",
                 room_tokens: int | None = None) -> tuple[int, str | None]:
    """How many response tokens an example keeps, and why not all of them (None: all kept).

    The prompt is never cut: an instruction with part of it missing teaches the model to answer a
    question nobody asked. With `truncation` "response" an over-long example keeps the head of its
    response, so it ends without the end-of-sequence token and does not teach the model to stop early;
    with "drop" it is left out. `room_tokens` (default: the prompt's length) is the prompt length that
    sets the room; IFD scores a response alone within the room it had after its instruction."""
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
    room = max_length - (prompt_tokens if room_tokens is None else room_tokens)
    if response_tokens <= room:
        return response_tokens, None
    if room < 1:
        return 0, DROPPED_PROMPT
    if truncation == "drop":
        return 0, DROPPED_TOO_LONG
    return room, TRUNCATED


def fit_turns(spans, total_tokens: int, max_length: int, truncation: str = "response") -> tuple[int, str | None]:
    """How many leading tokens of a conversation an example keeps, and why not all of them (None: every
    trained token kept). `spans` are the trained [start, end) spans of its assistant turns, in order.

    The rule of `fit_response`, turn by turn: a conversation is cut only at its end, so what is kept is a
    prefix of it. One that fits whole is kept whole; one whose trained tokens all fit loses only the
    untrained text after its last turn. Otherwise the whole leading turns that fit are kept and
    - the assistant turn that crosses `max_length` keeps its head and loses its tail, end-of-turn token
      included (`truncated_response`), with `truncation` "response";
    - when the cut falls before the next assistant turn's first token (in a user turn or a role header),
      the example ends with the last whole assistant turn (`truncated_turns`): no user turn is kept without
      an answer token trained after it;
    - with "drop" a conversation with any trained token past `max_length` is left out (`dropped_too_long`);
    - when the first assistant turn starts at or past `max_length` it is left out (`dropped_prompt_too_long`).
    With one assistant turn this is `fit_response` with the prompt ending where the turn's span starts."""
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
    if total_tokens <= max_length:
        return total_tokens, None
    if not len(spans) or spans[0][0] >= max_length:
        return 0, DROPPED_PROMPT
    if spans[-1][1] <= max_length:
        return max_length, None
    if truncation == "drop":
        return 0, DROPPED_TOO_LONG
    start, end = next((s, e) for s, e in reversed(spans) if s < max_length)
    return (max_length, TRUNCATED) if end > max_length else (end, TRUNCATED_TURNS)


def make_example(prompt_ids: list[int], response_ids: list[int], max_length: int, truncation: str = "response",
                 room_tokens: int | None = None) -> Example | None:
    """The whole prompt, then as much of the response as fits in `max_length` (see `fit_response`);
    None when the example is dropped."""
    keep, why = fit_response(len(prompt_ids), len(response_ids), max_length, truncation, room_tokens)
    if why is not None and why != TRUNCATED:
        return None
    response_ids = response_ids[:keep]
    return Example(prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _token_ce(model, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy of the output layer over `states`, LOGIT_CHUNK positions at a time."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    losses = []
    for start in range(0, len(targets), LOGIT_CHUNK):
        logits = head(states[start:start + LOGIT_CHUNK]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        losses.append(torch.nn.functional.cross_entropy(logits, targets[start:start + LOGIT_CHUNK], reduction="none"))
    return torch.cat(losses) if losses else states.new_zeros(0, dtype=torch.float32)


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response-token loss and response-token count per example of the (right-padded) batch."""
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    target = batch["labels"][:, 1:]
    mask = target != IGNORE
    loss = _token_ce(model, hidden[:, :-1][mask], target[mask])
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(target.shape[0], dtype=loss.dtype, device=loss.device).index_add(0, rows, loss)
    return sums, mask.sum(dim=1)


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy losses of `hidden @ weight.T` against `targets`, one chunk of rows at a time.

    Forward computes each chunk's logits in float32, its loss, and at once its gradients (softmax minus
    one-hot, through the optional tanh soft-cap), so no [rows x vocabulary] tensor outlives its chunk and
    backward only scales the stored gradients. Peak extra memory: one chunk of logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, softcap: float | None, weight_grad: bool):
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            t = targets[start:start + chunk]
            raw = (h @ weight.T).float()
            logits = torch.tanh(raw / softcap) * softcap if softcap else raw
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            grad = torch.softmax(logits, dim=-1)
            grad[torch.arange(len(t), device=t.device), t] -= 1.0
            if softcap:
                grad *= 1.0 - (logits / softcap) ** 2  # d/dx of c * tanh(x / c)
            grad = grad.to(h.dtype)
            grad_hidden[start:start + chunk] = grad @ weight
            if weight_grad:
                grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight if weight_grad else None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.to(grad_hidden.dtype)
        weight = None if grad_weight is None else (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden * scale, weight, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = LOGIT_CHUNK, softcap: float | None = None) -> torch.Tensor:
    """Summed cross-entropy of the output layer over `hidden` rows (tokens x d) against `targets`,
    without ever holding all the logits. The weight gets a gradient only if it requires one."""
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, softcap, weight.requires_grad)


# ---- Packing: several examples per row, no attention across them -------------------------------------------


def pack(lengths, row_tokens: int, decreasing: bool = True) -> list[list[int]]:
    """Best fit (decreasing by default): example indices grouped into rows of at most `row_tokens` tokens.
    Each example goes to the open row with the least room that still holds it, or opens a new row. Without
    `decreasing` the examples are taken in the given order.

    Near-linear: open rows are kept by their free room, and one integer's bits say which room sizes have an
    open row, so the best row is a shift and a lowest-set-bit away (C big-integer operations over
    `row_tokens` bits), not a pass over every open row (first fit's quadratic cost: 2.6 s at 20K examples)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > row_tokens:
        i = int(np.argmax(lengths > row_tokens))
        raise ValueError(f"example {i} has {lengths[i]} tokens, more than a packed row's {row_tokens}")
    order = np.argsort(-lengths, kind="stable") if decreasing else np.arange(len(lengths))
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # free room -> open rows with exactly that room (a stack)
    has_room = 0  # bit r set: some open row has room r
    for i, n in zip(order.tolist(), lengths[order].tolist()):
        fits = has_room >> n
        if fits:
            room = n + (fits & -fits).bit_length() - 1
            same = by_room[room]
            r = same.pop()
            if not same:
                del by_room[room]
                has_room ^= 1 << room
            rows[r].append(i)
        else:
            r, room = len(rows), row_tokens
            rows.append([i])
        left = room - n
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                has_room |= 1 << left
            by_room[left].append(r)
    return rows


def packed_batch(examples: list[Example], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """One row holding `examples` back to back: position ids restart at 0 for each, which is how the
    model's mask builder tells them apart (a block-diagonal causal mask: no attention across examples).
    The padded tail, if any, is a separate run of positions with no labels. An example's first token must
    have no label: the last position of the example before it would predict it."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ex in examples:
        if ex.labels and ex.labels[0] != IGNORE:
            raise ValueError("a packed example starts with a trained token: the example before it would be "
                             "trained to predict it (every example must open with an untrained prompt token)")
        ids += ex.input_ids
        labels += ex.labels
        positions += range(len(ex.input_ids))
    tail = (width or len(ids)) - len(ids)
    return {"input_ids": torch.tensor([ids + [pad_id] * tail]),
            "labels": torch.tensor([labels + [IGNORE] * tail]),
            "position_ids": torch.tensor([positions + list(range(tail))])}


def stack_rows(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}


def _packed_hidden(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # No attention mask and no cache: transformers then reads the restarting position ids as packed
    # sequences and builds the block-diagonal causal mask.
    return model.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                               attention_mask=None, use_cache=False).last_hidden_state


def packed_loss(model, batch: dict[str, torch.Tensor], chunk: int = LOGIT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response-token loss and token count of a packed batch, through the chunked output layer.

    Each example starts with a prompt token (label -100: the `<bos>` or the chat template's first header
    token; `packed_batch` checks it), so no position predicts across two examples.
    """
    hidden = _packed_hidden(model, batch)
    target = batch["labels"][:, 1:]
    mask = target != IGNORE
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return linear_cross_entropy(hidden[:, :-1][mask], head.weight, target[mask], chunk, cap), mask.sum()


@torch.inference_mode()
def packed_example_losses(model, examples: list[Example], pad_id: int) -> list[float]:
    """Each example's mean response-token loss, read from one packed row holding all of them."""
    batch = {k: v.to(model.device) for k, v in packed_batch(examples, pad_id).items()}
    hidden = _packed_hidden(model, batch)
    target = batch["labels"][:, 1:]
    mask = target != IGNORE
    per_token = _token_ce(model, hidden[:, :-1][mask], target[mask])
    return [float(part.mean()) for part in torch.split(per_token, [ex.trainable_tokens for ex in examples])]
