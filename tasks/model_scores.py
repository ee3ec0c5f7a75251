"""Scores read off a local causal LM's probabilities, with no sampling: DEITA expected scores and IFD.

DEITA (Liu et al. 2024, "What Makes Good Data for Alignment?") asks a scorer for an instruction's complexity
and a response's quality on a 1..6 scale and takes, instead of the sampled digit, the expectation under the
model's next-token distribution renormalised over the six score tokens: sum_i i * p(i) / sum_i p(i).
The prompts are DEITA's. DEITA trained its scorers for these prompts; a general model gives a weaker signal
on the same scale. Both prompts of every row go through one batched forward pass.

IFD (Li et al. 2024, "From Quantity to Quality") is the output's mean token loss given the instruction
(the Alpaca prompt the model is trained on) divided by its mean token loss alone. Near 1 the instruction
barely helps predict the output; above 1 it hurts, and such pairs are usually mismatched. Cherry LLM (the
same paper) keeps the rows with the highest IFD below 1: the instruction helps, yet the answer is not simply
implied by it (an answer that repeats the instruction's words scores low).

A conversation (a row with `messages`, tasks/conversation.py) is scored one assistant turn at a time, all
its turns in the same batched passes as the other rows' exchanges, and a one-exchange row's scores are
exactly those of `deita_scores` and `ifd_scores`:
- DEITA, as its paper scores ShareGPT's multi-turn dialogues: each turn on its own (the user turn as the
  query, the answer as the response; no earlier turns, no system prompt), and the row's `score_deita` is
  the sum over its turns of complexity x quality, so it grows with the number of turns as in DEITA's
  selection; `score_deita_complexity` and `score_deita_quality` are the means over the turns, on the 1..6
  scale their thresholds are set on.
- IFD, each answer with the conversation before it as its instruction (`conversation_prompt`, the Alpaca
  prompt's shape over turns) against the answer alone; the row's IFD is the mean of its turns' IFDs, and
  each loss column the mean of its turns' losses, over the turns that have one (so for a conversation the
  IFD is not the ratio of the two mean losses). An answer whose context fills `max_length` gets no score
  (neither does any later one): the row keeps the mean of the turns before it, NaN if none, and its
  `ifd_truncation` is the most severe of its turns' (a dropped turn over a truncated one).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tasks.conversation import Message
from tasks.prompts import alpaca_prompt

DEITA_COMPLEXITY = ("You are a helpful assistant. Please identify the complexity score of the following user "
                    "query. \n##Query: {query}\n##Complexity: ")
DEITA_QUALITY = ("You are a helpful assistant. Please identify the quality score of the Response corresponding "
                 "to the Question. \n#Question#:\n{query}\n#Response#:\n{response} \n##Quality: ")
SCORE_TOKENS = ("1", "2", "3", "4", "5", "6")


def _query(instruction: str, input: str) -> str:
    return f"{instruction.strip()}\n{input.strip()}" if input and input.strip() else instruction.strip()


def expected_score(logprobs: np.ndarray) -> np.ndarray:
    """Per row of (rows, 6) score-token log-probabilities: the expected score in [1, 6]."""
    z = logprobs - logprobs.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    return p @ np.arange(1, len(SCORE_TOKENS) + 1, dtype=float)


def _deita(queries: Sequence[str], responses: Sequence[str], scorer) -> tuple[np.ndarray, np.ndarray]:
    """(complexity, quality) of each (query, response) pair, every prompt in one batched pass."""
    prompts = ([DEITA_COMPLEXITY.format(query=q) for q in queries]
               + [DEITA_QUALITY.format(query=q, response=o.strip()) for q, o in zip(queries, responses)])
    scores = expected_score(scorer.next_token_logprobs(prompts, SCORE_TOKENS))
    return scores[: len(queries)], scores[len(queries):]


def deita_scores(instructions: Sequence[str], inputs: Sequence[str], outputs: Sequence[str],
                 scorer) -> tuple[np.ndarray, np.ndarray]:
    """(complexity, quality) expected scores per row; `scorer` has `next_token_logprobs`."""
    return _deita([_query(i, x) for i, x in zip(instructions, inputs)], outputs, scorer)


def _ifd(prompts: list[str], responses: list[str], scorer,
         max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str | None]]:
    """(IFD, conditioned loss, direct loss, truncation) of each response after its prompt."""
    truncation = scorer.truncations(prompts, responses, max_length)
    conditioned = scorer.response_losses(prompts, responses, max_length, desc="IFD (conditioned)")
    direct = scorer.response_losses([""] * len(responses), responses, max_length, desc="IFD (direct)",
                                    room_from=prompts)
    with np.errstate(divide="ignore", invalid="ignore"):
        ifd = np.where(direct > 0, conditioned / direct, np.nan)
    return ifd, conditioned, direct, truncation


def ifd_scores(instructions: Sequence[str], inputs: Sequence[str], outputs: Sequence[str], scorer,
               max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str | None]]:
    """(IFD, conditioned loss, direct loss, truncation) per row; NaN where the output is empty or the prompt
    alone fills `max_length`. Both losses cover the same response tokens: an over-long output is scored on
    the head that fits after its instruction, alone as well as conditioned (`truncation` says which rows
    were cut or dropped, None for those that fit)."""
    return _ifd([alpaca_prompt(i, x or "") for i, x in zip(instructions, inputs)], list(outputs), scorer,
                max_length)


# --- rows that may be conversations ---------------------------------------------------------------------------

CONVERSATION_HEAD = ("Below is a conversation between a user and an assistant. "
                     "Write the assistant's next response.\n\n")
_TURN_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}


def conversation_prompt(before: Sequence[Message]) -> str:
    """IFD's instruction for an answer of a conversation: the turns before it, in the Alpaca prompt's shape,
    ending where the assistant's next response goes."""
    turns = "".join(f"{_TURN_HEADERS[m['role']]}{m['content'].strip()}\n\n" for m in before)
    return f"{CONVERSATION_HEAD}{turns}{_TURN_HEADERS['assistant']}"


def _answers(conversation: Sequence[Message]) -> list[int]:
    """Positions of a conversation's assistant turns, each checked to follow a user turn."""
    positions = [k for k, m in enumerate(conversation) if m["role"] == "assistant"]
    if not positions or any(k == 0 or conversation[k - 1]["role"] != "user" for k in positions):
        raise ValueError("a conversation's assistant turns must each follow a user turn (tasks/conversation.py)")
    return positions


def _per_row(owner: np.ndarray, values: np.ndarray, n: int, how: str) -> np.ndarray:
    """Per row, the sum or the mean of the values of its entries (`owner`) that are not NaN; NaN for a
    row with none. A row with one entry gets that value exactly."""
    have = ~np.isnan(values)
    sums = np.bincount(owner[have], weights=values[have], minlength=n)
    counts = np.bincount(owner[have], minlength=n)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = sums / counts if how == "mean" else sums
    return np.where(counts > 0, out, np.nan)


def deita_row_scores(instructions: Sequence[str], inputs: Sequence[str], outputs: Sequence[str],
                     messages: Sequence[Sequence[Message] | None],
                     scorer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(complexity, quality, DEITA score) per row, a conversation (`messages` not None) turn by turn (module
    docstring): the means of its turns' complexity and quality, and the sum of their products."""
    pairs: list[tuple[int, str, str]] = []  # (row, query, response)
    for row, (instruction, input, output, conversation) in enumerate(zip(instructions, inputs, outputs, messages)):
        if conversation is None:
            pairs.append((row, _query(instruction, input), output))
        else:
            pairs += [(row, conversation[k - 1]["content"].strip(), conversation[k]["content"])
                      for k in _answers(conversation)]
    complexity, quality = _deita([q for _, q, _ in pairs], [r for _, _, r in pairs], scorer)
    owner, n = np.array([row for row, _, _ in pairs], dtype=np.int64), len(instructions)
    return (_per_row(owner, complexity, n, "mean"), _per_row(owner, quality, n, "mean"),
            _per_row(owner, complexity * quality, n, "sum"))


def _severity(truncation: str | None) -> int:
    return 0 if truncation is None else 2 if truncation.startswith("dropped") else 1


def ifd_row_scores(instructions: Sequence[str], inputs: Sequence[str], outputs: Sequence[str],
                   messages: Sequence[Sequence[Message] | None], scorer,
                   max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str | None]]:
    """(IFD, conditioned loss, direct loss, truncation) per row, a conversation (`messages` not None) per
    assistant turn with the turns before it as context, then the means (module docstring)."""
    pairs: list[tuple[int, str, str]] = []  # (row, prompt, response)
    for row, (instruction, input, output, conversation) in enumerate(zip(instructions, inputs, outputs, messages)):
        if conversation is None:
            pairs.append((row, alpaca_prompt(instruction, input or ""), output))
        else:
            pairs += [(row, conversation_prompt(conversation[:k]), conversation[k]["content"])
                      for k in _answers(conversation)]
    ifd, conditioned, direct, cut = _ifd([p for _, p, _ in pairs], [r for _, _, r in pairs], scorer, max_length)
    owner, n = np.array([row for row, _, _ in pairs], dtype=np.int64), len(instructions)
    truncation: list[str | None] = [None] * n
    for row, why in zip(owner.tolist(), cut):
        if _severity(why) > _severity(truncation[row]):
            truncation[row] = why
    return (_per_row(owner, ifd, n, "mean"), _per_row(owner, conditioned, n, "mean"),
            _per_row(owner, direct, n, "mean"), truncation)
