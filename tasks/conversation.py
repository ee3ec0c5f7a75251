"""Conversations: rows that an instruction, an input and an output cannot say.

Every row of every stage has `instruction`, `input` and `output`. A row that is more than one exchange, or
that has a system prompt, also carries the whole conversation in `messages` (a list of {role, content}):

    messages = [{"role": "system", "content": ...}?,           # optional, first only
                {"role": "user", ...}, {"role": "assistant", ...},   # one exchange
                {"role": "user", ...}, {"role": "assistant", ...},   # ... and more
               ]

and its `instruction` and `output` are its first exchange (the first user turn and the first answer), so
what reads tasks (Self-Instruct's prompts, the novelty filter, the mix's task keys) reads a conversation's
opening request. For every other row `messages` is null (or the column is absent): its conversation is one
user turn (the instruction, and the input below it) and one assistant turn, `messages_of` builds it. So a
one-exchange conversation without a system prompt is loaded as a plain row (`from_messages`), and "is this
row multi-turn?" is "is its `messages` set?".

Roles are `system`, `user` and `assistant`; ShareGPT's `from` names map onto them (`SHAREGPT_ROLES`). A
conversation alternates user and assistant turns, starts with a user turn (after the system prompt) and
ends with an assistant turn; no turn is empty. `check` says what is wrong, naming where.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

COLUMN = "messages"
ROLES = ("system", "user", "assistant")
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)
# ShareGPT's speaker names (Vicuna's data used human/gpt; other dumps use the assistant's product name).
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system"}
ROLE_NAMES = {"user": "User", "assistant": "Assistant", "system": "System"}

Message = dict[str, str]


class ConversationError(ValueError):
    """A conversation that cannot be used; the message starts with where it was found."""


def user_turn(instruction: str, input: str = "") -> str:
    """A row's user turn: the instruction, and its input (if any) below it after a blank line."""
    return f"{instruction.strip()}\n\n{input.strip()}" if input and input.strip() else instruction.strip()


def _a(role: str) -> str:
    return f"an {role}" if role == "assistant" else f"a {role}"


def check(messages: Any, where: str) -> list[Message]:
    """`messages` as a checked conversation (contents stripped), or ConversationError naming `where`."""
    if not isinstance(messages, list) or not messages:
        raise ConversationError(f"{where}: a conversation is a non-empty list of turns")
    out: list[Message] = []
    for n, turn in enumerate(messages):
        if not isinstance(turn, dict):
            raise ConversationError(f"{where}: turn {n} must be an object with `role` and `content`")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise ConversationError(f"{where}: turn {n} has unknown role {role!r}; one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise ConversationError(f"{where}: turn {n} ({role}) is empty")
        out.append({"role": role, "content": content.strip()})
    system = 1 if out[0]["role"] == "system" else 0
    for n, turn in enumerate(out[system:], start=system):
        expected = "user" if (n - system) % 2 == 0 else "assistant"
        if turn["role"] != expected:
            after = f"after {_a(out[n - 1]['role'])} turn" if n else "to open the conversation"
            raise ConversationError(f"{where}: turn {n} is {_a(turn['role'])} turn {after}; expected {expected} "
                                    f"(a system turn comes first, then user and assistant alternate)")
    if len(out) == system:
        raise ConversationError(f"{where}: a system prompt and no turns")
    if out[-1]["role"] != "assistant":
        raise ConversationError(f"{where}: the conversation ends with a user turn; it must end with the "
                                f"assistant's answer")
    return out


def from_sharegpt(turns: Any, where: str) -> list[Message]:
    """ShareGPT's `conversations` ({from, value} turns) as checked messages."""
    if not isinstance(turns, list) or not turns:
        raise ConversationError(f"{where}: `conversations` must be a non-empty list of turns")
    messages = []
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ConversationError(f"{where}: conversations[{n}] must be an object with `from` and `value`")
        speaker = turn["from"]
        role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            raise ConversationError(f"{where}: conversations[{n}] has unknown speaker {speaker!r}; one of "
                                    f"{', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": turn["value"]})
    return check(messages, where)


def is_multi_turn(messages: Sequence[Message] | None) -> bool:
    """Whether a checked conversation needs `messages`: more than one exchange, or a system prompt."""
    return messages is not None and (len(messages) > 2 or messages[0]["role"] == "system")


def from_messages(messages: list[Message]) -> dict[str, Any]:
    """A checked conversation as a row's text columns: its first exchange, and `messages` when it is more."""
    system = 1 if messages[0]["role"] == "system" else 0
    return {"instruction": messages[system]["content"], "input": "", "output": messages[system + 1]["content"],
            COLUMN: list(messages) if is_multi_turn(messages) else None}


def messages_of(instruction: str, input: str, output: str, messages: Sequence[Message] | None = None) -> list[Message]:
    """A row's whole conversation: its `messages`, or its one user turn and the answer."""
    if messages is not None:
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    return [{"role": "user", "content": user_turn(instruction, input or "")},
            {"role": "assistant", "content": (output or "").strip()}]


def as_messages(value: Any) -> list[Message] | None:
    """A `messages` cell as read from pandas or Arrow (None, NaN, a list or a numpy array of dicts)."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    return [{"role": m["role"], "content": m["content"]} for m in value]


def has_messages(frame: Any) -> np.ndarray:
    """Which rows of a DataFrame carry a conversation in `messages` (all False without the column)."""
    if COLUMN not in frame.columns:
        return np.zeros(len(frame), dtype=bool)
    return frame[COLUMN].notna().to_numpy(dtype=bool)


def rows_messages(table: pa.Table) -> list[list[Message] | None]:
    """The `messages` of each row of a table (None for a one-exchange row, or all None without the column)."""
    if COLUMN not in table.column_names:
        return [None] * table.num_rows
    return table.column(COLUMN).to_pylist()


def conversations(table: pa.Table) -> list[list[Message]]:
    """Every row's whole conversation (`messages_of` per row)."""
    def texts(name: str) -> list[str]:
        if name not in table.column_names:
            return [""] * table.num_rows
        return [v or "" for v in table.column(name).to_pylist()]
    return [messages_of(i, x, o, m) for i, x, o, m in zip(texts("instruction"), texts("input"), texts("output"),
                                                          rows_messages(table))]


def assistant_turns(messages: Iterable[Message]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "assistant"]


def turn_count(messages: Sequence[Message] | None) -> int:
    """Assistant turns in a conversation: 1 for a row without `messages`."""
    return 1 if messages is None else sum(1 for m in messages if m["role"] == "assistant")


def turn_counts(messages: pa.Array | pa.ChunkedArray | None, n: int) -> np.ndarray:
    """Assistant turns per row of a `messages` column (`turn_count`, column-wise): 1 for a row without."""
    turns = np.ones(n, dtype=np.int64)
    if messages is None:
        return turns
    if isinstance(messages, pa.ChunkedArray):
        messages = messages.combine_chunks()
    counts = np.asarray(pc.list_value_length(messages).fill_null(0), dtype=np.int64)
    parent = np.repeat(np.arange(n), counts)  # list_flatten skips null rows, as counts does
    answers = np.asarray(pc.equal(pc.list_flatten(messages).field("role"), "assistant"), dtype=bool)
    valid = np.asarray(messages.is_valid(), dtype=bool)
    turns[valid] = np.bincount(parent[answers], minlength=n)[valid]
    return turns


def transcript(messages: Iterable[Message]) -> str:
    """The conversation as plain text, one `Role: content` block per turn (judge prompts, dedup, reports)."""
    return "\n\n".join(f"{ROLE_NAMES[m['role']]}: {m['content']}" for m in messages)


def messages_array(values: Iterable[list[Message] | None]) -> pa.Array:
    return pa.array(list(values), MESSAGES)
