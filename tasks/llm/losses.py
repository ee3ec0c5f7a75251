"""Response-token losses of a causal LM: the one computation behind fine-tuning, eval loss and IFD.

An example is a prompt followed by a response; labels are -100 on the prompt (and on padding), so only
response tokens carry loss. Logits are computed only at the positions that predict a response token, and
in chunks: with Gemma's 262K-token vocabulary a [tokens x vocabulary] float32 tensor is the largest thing
in memory (16 x 256 tokens would be 4.3 GB), far more than the transformer itself.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def make_example(prompt_ids: list[int], response_ids: list[int], max_length: int) -> Example:
    """Prompt then response, at most `max_length` tokens: the response keeps all but one of them if it
    must, and the prompt loses its oldest tokens after the first (the BOS) when they do not fit."""
    response_ids = response_ids[: max_length - 1]
    keep_prompt = max_length - len(response_ids)
    if len(prompt_ids) > keep_prompt:
        prompt_ids = prompt_ids[:1] + prompt_ids[len(prompt_ids) - keep_prompt + 1:]
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


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response-token loss and response-token count per example of the (right-padded) batch."""
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    target = batch["labels"][:, 1:]
    mask = target != IGNORE
    states, targets = hidden[:, :-1][mask], target[mask]
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    losses = []
    for start in range(0, len(targets), LOGIT_CHUNK):
        logits = head(states[start:start + LOGIT_CHUNK]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        losses.append(torch.nn.functional.cross_entropy(logits, targets[start:start + LOGIT_CHUNK], reduction="none"))
    loss = torch.cat(losses) if losses else states.new_zeros(0, dtype=torch.float32)
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(target.shape[0], dtype=loss.dtype, device=loss.device).index_add(0, rows, loss)
    return sums, mask.sum(dim=1)
