"""The protocol every backend implements: batched text generation with finish reasons and token counts.

A prompt is either plain text (completion style, for base models) or a list of chat messages
(`{"role": "user", "content": ...}`, for chat models). A backend's `mode` says which its stages should
build; `chat_prompt` wraps one user turn.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length"]
Mode = Literal["completions", "chat"]
Message = dict[str, str]
Prompt = str | list[Message]


def chat_prompt(user: str, system: str | None = None) -> list[Message]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": user}]


def prompt_text(prompt: Prompt) -> str:
    """The prompt as one string, for logs, hashing and tests: chat messages joined by their roles."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"[{m['role']}] {m['content']}" for m in prompt)


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    retries: int = 0  # failed attempts before this one succeeded (remote backends)


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy decoding
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # > 1 discourages tokens already in the text (the CTRL paper's penalty). Base models decoding greedily
    # fall into loops without it. In-process backend only; OpenAI-compatible servers differ in how they
    # name and apply it, so the openai backend leaves it to the server's defaults.
    repetition_penalty: float = 1.0


@dataclass
class Usage:
    """Token accounting a stage reports in its stats.json."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    by_purpose: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, purpose: str, completions: Sequence[Completion]) -> None:
        bucket = self.by_purpose.setdefault(purpose, {"requests": 0, "prompt_tokens": 0,
                                                      "completion_tokens": 0})
        for c in completions:
            bucket["requests"] += 1
            bucket["prompt_tokens"] += c.prompt_tokens
            bucket["completion_tokens"] += c.completion_tokens
        self.requests += len(completions)
        self.prompt_tokens += sum(c.prompt_tokens for c in completions)
        self.completion_tokens += sum(c.completion_tokens for c in completions)
        self.retries += sum(c.retries for c in completions)

    def as_dict(self) -> dict:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "retries": self.retries, "by_purpose": self.by_purpose}


class UsageTally:
    """Usage since the last `take()`: what a checkpoint part records, so totals survive a restart."""

    FIELDS = ("llm_calls", "prompt_tokens", "completion_tokens", "retries")

    def __init__(self, usage: Usage):
        self.usage = usage
        self.mark = (0, 0, 0, 0)

    def _now(self) -> tuple[int, int, int, int]:
        return self.usage.requests, self.usage.prompt_tokens, self.usage.completion_tokens, self.usage.retries

    def pending(self) -> Counter:
        """Usage since the last `take()`, without taking it."""
        return +Counter(dict(zip(self.FIELDS, (a - b for a, b in zip(self._now(), self.mark)))))

    def take(self) -> Counter:
        delta = self.pending()
        self.mark = self._now()
        return delta


class LLM(Protocol):
    """A text generator. `generate` returns one Completion per prompt, in prompt order.

    `mode` is "completions" when prompts should be plain text, "chat" when they should be messages.
    """

    name: str
    mode: Mode

    # In-process backends also take `seeds` (one per prompt): each prompt then samples from a generator of
    # its own, so its text does not depend on what shares its batch (the work engine always passes them).
    def generate(self, prompts: Sequence[Prompt], params: GenerationParams,
                 desc: str = "generate") -> list[Completion]: ...


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` at the earliest stop string; report whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
