"""LLM-as-judge: the backend rates an example from 1 to 10 against a stated rubric, and a parser reads the rating.

The rubric asks for helpfulness, correctness and instruction following. A base model (completion style) is
shown two rated demonstrations and continues after `Rating:`; a chat model is asked for `Rating: [[N]]`.
A conversation (a row with `messages`, tasks/conversation.py) is rated whole (`conversation_prompt`): the
rubric asks about every assistant turn, the transcript shows every turn (`User: ...`, `Assistant: ...`,
`System: ...`), and the demonstrations are shown as one-exchange conversations in the same form. One
rating per conversation: a weak answer anywhere weighs on it.

Answers come in many shapes ("7", "7/10", "Rating: [[7]]", "**Score:** 8 out of 10", "I'd rate it an 8.",
"seven", "4/5"). `parse_rating` tries the forms from the most explicit to the least and takes the first
that matches: [[N]] markup, a labelled rating (rating/score/grade: N), a fraction (N/10, N out of 10),
a rating verb (rate it N, give it an N), and finally a number opening or closing the answer. Within a form,
two different values are ambiguous. Fractions over 5 or 100 are rescaled to 10. An answer with no readable
rating, a range ("7-8"), or a value outside 1..10 gives no score and says why, never a default number.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from tasks.conversation import Message, transcript
from tasks.llm.base import LLM, GenerationParams, Mode, Prompt, Usage, chat_prompt

LOW, HIGH = 1.0, 10.0

RUBRIC = ("Rate how good the response is as an answer to the task, from 1 (useless) to 10 (excellent). "
          "Judge helpfulness (is it useful?), correctness (is it right?) and instruction following (does it do "
          "exactly what the task asks, in the asked form?).")

CONVERSATION_RUBRIC = (
    "Rate how good the assistant's responses are in the conversation, from 1 (useless) to 10 (excellent). "
    "Judge every assistant turn: helpfulness (is it useful?), correctness (is it right?) and instruction "
    "following (does it do exactly what the user's turn before it asks, in the asked form, consistently with "
    "the conversation so far?). One rating for the whole conversation.")

_DEMOS = (
    ("Name the three primary colors of paint.", "Red, yellow and blue.", 9),
    ("Translate into French: Good morning.", "Good morning is a greeting used before noon.", 2),
)


def _block(instruction: str, input: str, response: str) -> str:
    task = f"### Task:\n{instruction.strip()}\n\n"
    if input and input.strip():
        task += f"### Input:\n{input.strip()}\n\n"
    return f"{task}### Response:\n{response.strip()}\n\n"


def judge_prompt(instruction: str, input: str, output: str, mode: Mode) -> Prompt:
    example = _block(instruction, input, output)
    if mode == "chat":
        return chat_prompt(f"{example}Answer with the rating only, as `Rating: [[N]]`.", system=RUBRIC)
    demos = "".join(f"{_block(t, '', r)}Rating: {n}/10\n\n" for t, r, n in _DEMOS)
    return f"{RUBRIC}\n\n{demos}{example}Rating:"


def _conversation_block(messages: Sequence[Message]) -> str:
    return f"### Conversation:\n{transcript(messages)}\n\n"


def conversation_prompt(messages: Sequence[Message], mode: Mode) -> Prompt:
    """The judge's prompt for a whole conversation (every turn shown), in the shape of `judge_prompt`."""
    example = _conversation_block(messages)
    if mode == "chat":
        return chat_prompt(f"{example}Answer with the rating only, as `Rating: [[N]]`.", system=CONVERSATION_RUBRIC)
    demos = "".join(f"{_conversation_block([{'role': 'user', 'content': t}, {'role': 'assistant', 'content': r}])}"
                    f"Rating: {n}/10\n\n" for t, r, n in _DEMOS)
    return f"{CONVERSATION_RUBRIC}\n\n{demos}{example}Rating:"


_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}
_NUM = r"(?<![\w.])(-?\d+(?:\.\d+)?)(?![\w.]*\d)"
_DENOM = r"(?:\s*(?:/|out\s+of)\s*(\d+(?:\.\d+)?))?"
_LABEL = r"(?:rating|score|grade|overall|verdict)"
_FORMS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("markup", re.compile(r"\[\[\s*" + _NUM + _DENOM + r"\s*\]\]")),
    ("label", re.compile(_LABEL + r"\s*(?:is|of|:|=|-)?\s*(?:a\s+|an\s+)?\[?\s*" + _NUM + _DENOM, re.I)),
    ("fraction", re.compile(_NUM + r"\s*(?:/|out\s+of)\s*(\d+(?:\.\d+)?)", re.I)),
    ("verb", re.compile(r"\b(?:rate|rated|give|gives|assign|award)\b(?:\s+(?:it|this|the|that|response|answer|"
                        r"this response|the response))*\s+(?:a\s+|an\s+)?" + _NUM + _DENOM, re.I)),
    ("opening", re.compile(r"^\s*" + _NUM + _DENOM + r"\s*(?:[.!:)\-,;]|$)")),
    ("closing", re.compile(r"(?:^|\s)" + _NUM + _DENOM + r"\s*[.!]?\s*$")),
)
_RANGE = re.compile(_LABEL + r"\s*(?:is|of|:|=|-)?\s*(\d+(?:\.\d+)?)\s*(?:-|–|to|or)\s*(\d+(?:\.\d+)?)", re.I)
_SCALES = {10.0: 1.0, 5.0: 2.0, 100.0: 0.1}


def _normalise(text: str) -> str:
    text = text.replace("**", "").replace("__", "")
    return re.sub(r"\b(" + "|".join(_NUMBER_WORDS) + r")\b",
                  lambda m: _NUMBER_WORDS[m.group(1).lower()], text, flags=re.I)


def parse_rating(answer: str) -> tuple[float | None, str | None]:
    """(rating, None) for an answer holding one rating in 1..10, else (None, why not).

    The reason starts with its kind (empty, range, scale, ambiguous, out_of_range, no_rating) and a colon.
    """
    text = _normalise(answer).strip()
    if not text:
        return None, "empty: the answer is blank"
    if (m := _RANGE.search(text)) and m.group(1) != m.group(2):
        return None, f"range: {m.group(0).strip()!r} gives a range, not one rating"
    for form, pattern in _FORMS:
        values = []
        for match in pattern.finditer(text):
            value, denom = float(match.group(1)), match.group(2)
            if denom is not None:
                scale = _SCALES.get(float(denom))
                if scale is None:
                    return None, f"scale: a rating out of {denom}, not 5, 10 or 100"
                value *= scale
            values.append(round(value, 4))
        if not values:
            continue
        distinct = sorted(set(values))
        if len(distinct) > 1:
            return None, f"ambiguous: several ratings ({', '.join(f'{v:g}' for v in distinct)})"
        value = distinct[0]
        if not LOW <= value <= HIGH:
            return None, f"out_of_range: rating {value:g} outside {LOW:g}-{HIGH:g}"
        return value, None
    return None, "no_rating: no rating found in the answer"


def judge_params(mode: Mode, max_new_tokens: int) -> GenerationParams:
    """Greedy, and one line for a base model (it goes on with a next demonstration otherwise)."""
    return GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0,
                            stop=("\n",) if mode == "completions" else ())


def judge(instructions: Sequence[str], inputs: Sequence[str], outputs: Sequence[str], llm: LLM,
          max_new_tokens: int, usage: Usage, conversations: Sequence[Sequence[Message] | None] | None = None,
          ) -> tuple[np.ndarray, list[str | None], list[str]]:
    """Ratings (NaN where none could be read), the reason for each missing one, and the raw answers, in one
    batch (the evaluate stage's few rows; quality's judge runs its rows through the work engine). A row
    with a conversation (`conversations[i]`, its last turn the answer rated) is judged whole."""
    conversations = conversations if conversations is not None else [None] * len(outputs)
    prompts = [judge_prompt(i, x, o, llm.mode) if c is None else conversation_prompt(c, llm.mode)
               for i, x, o, c in zip(instructions, inputs, outputs, conversations)]
    params = judge_params(llm.mode, max_new_tokens)
    completions = llm.generate(prompts, params, desc="judge")
    usage.add("judge", completions)
    scores = np.full(len(prompts), np.nan)
    errors: list[str | None] = []
    for i, completion in enumerate(completions):
        value, error = parse_rating(completion.text)
        if value is not None:
            scores[i] = value
        errors.append(error)
    return scores, errors, [c.text for c in completions]
