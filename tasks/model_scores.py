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
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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


def deita_scores(instructions: Sequence[str], inputs: Sequence[str], outputs: Sequence[str],
                 scorer) -> tuple[np.ndarray, np.ndarray]:
    """(complexity, quality) expected scores per row; `scorer` has `next_token_logprobs`."""
    queries = [_query(i, x) for i, x in zip(instructions, inputs)]
    prompts = ([DEITA_COMPLEXITY.format(query=q) for q in queries]
               + [DEITA_QUALITY.format(query=q, response=o.strip()) for q, o in zip(queries, outputs)])
    scores = expected_score(scorer.next_token_logprobs(prompts, SCORE_TOKENS))
    return scores[: len(queries)], scores[len(queries):]


def ifd_scores(instructions: Sequence[str], inputs: Sequence[str], outputs: Sequence[str], scorer,
               max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str | None]]:
    """(IFD, conditioned loss, direct loss, truncation) per row; NaN where the output is empty or the prompt
    alone fills `max_length`. Both losses cover the same response tokens: an over-long output is scored on
    the head that fits after its instruction, alone as well as conditioned (`truncation` says which rows
    were cut or dropped, None for those that fit)."""
    prompts = [alpaca_prompt(i, x or "") for i, x in zip(instructions, inputs)]
    truncation = scorer.truncations(prompts, list(outputs), max_length)
    conditioned = scorer.response_losses(prompts, list(outputs), max_length, desc="IFD (conditioned)")
    direct = scorer.response_losses([""] * len(outputs), list(outputs), max_length, desc="IFD (direct)",
                                    room_from=prompts)
    with np.errstate(divide="ignore", invalid="ignore"):
        ifd = np.where(direct > 0, conditioned / direct, np.nan)
    return ifd, conditioned, direct, truncation
