"""Self-chat: extend rows to multi-turn conversations, the model playing both sides (Baize, Xu et al., 2023;
UltraChat, Ding et al., 2023).

A seeded draw of up to `max_rows` rows (of `rows`: all, the seeds' examples, or the generated tasks; a row
that already has `turns` assistant turns is not drawn) is extended one exchange at a time until it has
`turns` assistant turns: the model writes the user's next turn (a follow-up a user would ask, given the
conversation so far), then the assistant's answer to it.

Prompts, by the backend's `mode`:
- completions (a base model, the embedded default): a transcript, `User: ...` and `Assistant: ...` blocks
  after a header and one demonstration conversation; it ends with `User:` for the user's turn and with
  `Assistant:` for the answer, and generation stops at the next role label.
- chat: the user's turn is asked for in one user message that shows the conversation and asks the model to
  role-play the user; the answer is an ordinary chat reply to the conversation's messages.

Filters. A user turn is dropped when it is cut at `user_max_new_tokens`, empty, shorter than `min_words` or
longer than `max_words`, writes a role label (the model playing the assistant too), holds a `blocklist`
word (as Self-Instruct's filter), or repeats an earlier user turn (ROUGE-L F1 above `rouge_threshold`). An
answer is dropped when it is empty or cut at `max_new_tokens` (finish reason `length`: its end is missing,
as Evol-Instruct's `response_truncated`). A dropped exchange is drawn again with a new seed, `attempts`
times in all (once with `temperature` 0: the same prompt would give the same text); then the conversation
stops. Every dropped attempt is counted by its reason (`dropped`), every conversation that stopped short by
the reason of its last attempt (`stopped`).

What a conversation keeps: every exchange that passed. A row that gained at least one exchange gets its
whole conversation in `messages` (tasks/conversation.py; its first exchange stays in instruction, input and
output); a row that gained none (every attempt at its first new exchange failed), or was not drawn, stays as
it was. A conversation shorter than asked is kept: it is well-formed, and its turns were paid for.

Stats: `eligible` rows (those `rows` names, below `turns`), `drawn`, `extended` (gained an exchange),
`complete` (reached `turns`), `turns` (a histogram of the drawn rows' assistant turns at the end),
`dropped` and `stopped` (above), `prompt_style`, and the engine's checkpoints, requests and tokens.

Each drawn row is one item of the work engine (key: its id), checkpointed as parts: a restarted stage keeps
the finished conversations and extends the rest. A row's seeds depend only on (seed, row position, turn,
attempt), and the in-process backend samples each request with its own seed, so a conversation does not
depend on what shared its batch, nor on a restart.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from tasks import conversation
from tasks.artifacts import PartWriter
from tasks.config import SelfChatConfig
from tasks.conversation import Message
from tasks.engine import Engine, Finished, Model, parallelism
from tasks.llm.base import LLM, GenerationParams, Prompt, chat_prompt
from tasks.self_instruct import blocklisted
from tasks.text import rouge_l_f1, word_count

# --- prompts ------------------------------------------------------------------------------------------------

HEADER = ("Below are conversations between a curious user and a helpful assistant. In each, the user asks a "
          "question, then follow-up questions about the assistant's answers, and the assistant answers every "
          "one of them.")
DEMO: list[Message] = [
    {"role": "user", "content": "What is the boiling point of water?"},
    {"role": "assistant", "content": "Water boils at 100 degrees Celsius (212 degrees Fahrenheit) at sea level."},
    {"role": "user", "content": "Why does it boil at a lower temperature on a high mountain?"},
    {"role": "assistant", "content": "Higher up, the air pressure is lower, so the water molecules need less "
                                     "energy to escape as vapour. On Mount Everest water boils at about 70 "
                                     "degrees Celsius."},
]
SEPARATOR = "###"
# Where a base model that goes on writing starts the next turn (or the next conversation).
STOPS = tuple(f"\n{name}:" for name in conversation.ROLE_NAMES.values()) + (f"\n{SEPARATOR}",)
ROLEPLAY = ("Here is a conversation between a user and an AI assistant:\n\n{transcript}\n\nYou are the user. "
            "Write the user's next message: a natural follow-up question or request about the conversation so "
            "far, in the user's own voice. Reply with that message only, without a label, quotes or an answer.")


def completion_prompt(messages: list[Message], next_role: str) -> str:
    """The transcript prompt a base model continues: the demonstration, then `messages`, then the label of
    `next_role` (`user` or `assistant`)."""
    return (f"{HEADER}\n\n{conversation.transcript(DEMO)}\n\n{SEPARATOR}\n\n"
            f"{conversation.transcript(messages)}\n\n{conversation.ROLE_NAMES[next_role]}:")


def user_turn_prompt(messages: list[Message], chat: bool) -> Prompt:
    if chat:
        return chat_prompt(ROLEPLAY.format(transcript=conversation.transcript(messages)))
    return completion_prompt(messages, "user")


def answer_prompt(messages: list[Message], chat: bool) -> Prompt:
    """`messages` ends with the user turn to answer."""
    return [dict(m) for m in messages] if chat else completion_prompt(messages, "assistant")


# --- filters ------------------------------------------------------------------------------------------------

_LEADING_LABEL = re.compile(r"^\s*[*_#]*\s*(user|human)\s*[*_]*\s*:\s*[*_]*", re.IGNORECASE)
# A role label inside a user turn: the model wrote the next speaker's part too.
_ROLE_LABEL = re.compile(r"(^|\W)(assistant|ai|system|user|human)\s*[*_]*:", re.IGNORECASE)
_QUOTES = ('"', "\u201c", "\u201d", "'")


def clean_user_turn(text: str) -> str:
    """The user's turn as the model wrote it, without a leading `User:` label or surrounding quotes (chat
    models add them when they role-play)."""
    text = _LEADING_LABEL.sub("", text.strip(), count=1).strip()
    if len(text) > 1 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return text


def user_turn_drop_reason(text: str, earlier: list[str], cfg: SelfChatConfig) -> str | None:
    """The first filter a (cleaned) user turn fails, or None. `earlier`: the conversation's user turns."""
    if not text:
        return "user_empty"
    n = word_count(text)
    if n < cfg.min_words:
        return "user_too_short"
    if n > cfg.max_words:
        return "user_too_long"
    if _ROLE_LABEL.search(text):
        return "user_wrote_other_turn"
    if blocklisted(text, cfg.blocklist):
        return "user_blocklisted_keyword"
    if any(rouge_l_f1(text, before) > cfg.rouge_threshold for before in earlier):
        return "user_repeats_earlier_turn"
    return None


# --- the items ----------------------------------------------------------------------------------------------

PART_SCHEMA = pa.schema([("id", pa.string()), (conversation.COLUMN, conversation.MESSAGES),
                         ("turns", pa.int64()), ("stop_reason", pa.string())])
STREAM = 3  # this stage's draws: [seed, STREAM] for the rows, [seed, STREAM, row, turn, attempt] per exchange


async def extend_one(model: Model, messages: list[Message], index: int, cfg: SelfChatConfig, seed: int,
                     key: str) -> Finished:
    """One conversation through its missing exchanges (user turn, then answer), each tried up to
    `cfg.attempts` times. Its part row: the conversation if it gained an exchange (else null), its assistant
    turns, and why it stopped short (null when complete)."""
    chat = model.mode == "chat"
    start = conversation.turn_count(messages)
    attempts = cfg.attempts if cfg.temperature > 0 else 1
    counts: Counter = Counter()
    reason = None
    for turn in range(start + 1, cfg.turns + 1):
        for attempt in range(attempts):
            rng = np.random.default_rng([seed, STREAM, index, turn, attempt])
            user_seed, answer_seed = (int(s) for s in rng.integers(2**31, size=2))
            asked = await model.generate(
                user_turn_prompt(messages, chat),
                GenerationParams(max_new_tokens=cfg.user_max_new_tokens, temperature=cfg.temperature,
                                 top_p=cfg.top_p, stop=() if chat else STOPS, seed=user_seed), "user_turn")
            user = clean_user_turn(asked.text)
            reason = ("user_truncated" if asked.finish_reason == "length" else
                      user_turn_drop_reason(user, [m["content"] for m in messages if m["role"] == "user"], cfg))
            if reason is None:
                exchange = messages + [{"role": "user", "content": user}]
                answered = await model.generate(
                    answer_prompt(exchange, chat),
                    GenerationParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                     top_p=cfg.top_p, stop=() if chat else STOPS, seed=answer_seed), "answer")
                answer = answered.text.strip()
                reason = ("answer_truncated" if answered.finish_reason == "length" else
                          "answer_empty" if not answer else None)
            if reason is None:
                messages = exchange + [{"role": "assistant", "content": answer}]
                break
            counts[reason] += 1
        if reason is not None:
            break
    turns = conversation.turn_count(messages)
    gained = turns > start
    if gained:
        messages = conversation.check(messages, f"self_chat row {key}")
    return Finished(key, [{"id": key, conversation.COLUMN: messages if gained else None, "turns": turns,
                           "stop_reason": reason}], counts)


def row_messages(rows: pd.DataFrame, i: int) -> list[Message] | None:
    """Row i's `messages` as a list, or None (no column, or a one-exchange row)."""
    return conversation.as_messages(rows[conversation.COLUMN].iat[i]) if conversation.COLUMN in rows.columns else None


def eligible_rows(rows: pd.DataFrame, cfg: SelfChatConfig) -> list[int]:
    """Positions of the rows `cfg.rows` names that have fewer than `cfg.turns` assistant turns."""
    origin = rows["origin"] if "origin" in rows.columns else pd.Series(["seed"] * len(rows), index=rows.index)
    wanted = {"all": np.ones(len(rows), dtype=bool), "seeds": (origin == "seed").to_numpy(),
              "generated": (origin != "seed").to_numpy()}[cfg.rows]
    if conversation.COLUMN in rows.columns:  # conversations already as long as asked are left alone
        for i in np.flatnonzero(wanted & rows[conversation.COLUMN].notna().to_numpy()).tolist():
            wanted[i] = conversation.turn_count(row_messages(rows, i)) < cfg.turns
    return np.flatnonzero(wanted).tolist()


def drawn_rows(eligible: list[int], cfg: SelfChatConfig, seed: int) -> list[int]:
    """`eligible`, or `cfg.max_rows` of them drawn with `seed` (in row order)."""
    if cfg.max_rows is None or len(eligible) <= cfg.max_rows:
        return list(eligible)
    picked = np.random.default_rng([seed, STREAM]).choice(len(eligible), cfg.max_rows, replace=False)
    return [eligible[i] for i in sorted(picked)]


def extend(rows: pd.DataFrame, cfg: SelfChatConfig, llm: LLM, seed: int, parts: PartWriter | None = None,
           batch_size: int = 16) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The rows with a seeded draw of them extended to `cfg.turns` assistant turns (see the module
    docstring), in the same order, with every column; and the stage's stats."""
    eligible = eligible_rows(rows, cfg)
    drawn = drawn_rows(eligible, cfg, seed)
    ids = {i: str(rows["id"].iat[i]) for i in drawn}
    if len(set(ids.values())) < len(drawn):
        raise ValueError("self_chat: the rows' `id`s must be unique (they key the checkpoints)")

    def text(name: str, i: int) -> str:
        value = rows[name].iat[i] if name in rows.columns else None
        return value if isinstance(value, str) else ""

    starts = {i: conversation.check(conversation.messages_of(text("instruction", i), text("input", i),
                                                             text("output", i), row_messages(rows, i)),
                                    f"self_chat row {ids[i]}") for i in drawn}
    engine = Engine(llm, parts, PART_SCHEMA, max_open=2 * parallelism(llm, batch_size),
                    checkpoint_every=cfg.checkpoint_every, checkpoint_s=cfg.checkpoint_seconds,
                    batch_size=batch_size, desc="self_chat", total=len(drawn))

    async def stage(engine: Engine) -> None:
        for i in drawn:
            await engine.spawn(ids[i], lambda i=i: extend_one(engine.model, starts[i], i, cfg, seed, ids[i]))

    engine.run(stage)
    done = {r["id"]: r for r in engine.restored.rows + [r for item in engine.finished_items for r in item.rows]}
    results = [done[ids[i]] for i in drawn]
    cells = ([None if isinstance(c, float) else c for c in rows[conversation.COLUMN].tolist()]  # NaN: null
             if conversation.COLUMN in rows.columns else [None] * len(rows))
    for i, r in zip(drawn, results):
        if r[conversation.COLUMN] is not None:
            cells[i] = [dict(m) for m in r[conversation.COLUMN]]
    out = rows.copy()
    out[conversation.COLUMN] = pd.Series(cells, index=out.index, dtype=object)
    extended = [r for r in results if r[conversation.COLUMN] is not None]
    stats = {"eligible": len(eligible), "drawn": len(drawn), "extended": len(extended),
             "complete": sum(r["turns"] >= cfg.turns for r in results),
             "turns": {str(n): c for n, c in sorted(Counter(r["turns"] for r in results).items())},
             "dropped": dict(sorted(engine.counts.items())),
             "stopped": dict(sorted(Counter(r["stop_reason"] for r in results if r["stop_reason"]).items())),
             "prompt_style": "chat" if engine.model.mode == "chat" else "completion",
             **engine.summary()}
    return out, stats
