"""The work engine: every stage that calls a model moves its items through their phases here.

An item is one coroutine (a Self-Instruct task: classify, then instances; an Evol-Instruct chain: rewrite,
eliminate, judge equality, respond, and again next round). Items run independently: an item's next request
goes out as soon as its last answer is in, never after a barrier, and at most `max_concurrency` requests
are in flight at any moment (the backend enforces it; see `tasks/llm/openai_backend.py`).

Finished items are checkpointed as numbered Parquet parts every `checkpoint_every` items or
`checkpoint_s` seconds, whichever comes first, without waiting for what is in flight. A part holds the
rows of the items it closes and, in its metadata, their keys, their counts (drop reasons and the like)
and the tokens spent since the last part. A restarted stage reads the parts back (`Engine.restored`),
skips the items they close and runs the rest: nothing is lost and nothing is done twice. A request that
fails for good (or a spent budget) cancels the open items, writes what has finished and re-raises, so
the stage stops at its last checkpoint.

Backends: an OpenAI-compatible endpoint is asynchronous already (`agenerate`). An in-process model (the
transformers backend, or a test double) is batched by `InProcessBatcher`: requests wait until every
open item is waiting, then the largest group of like requests runs as one batch on the loop's thread.
That keeps in-process runs deterministic (the order of events does not depend on timing) and the model's
batches full.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from tasks.artifacts import PartWriter, decode_counts, encode_counts, part_metadata
from tasks.llm.base import LLM, Completion, GenerationParams, Prompt, Usage, UsageTally

log = logging.getLogger(__name__)


@dataclass
class Finished:
    """What an item leaves behind: its rows (the stage's part schema) and its counts."""

    key: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


@dataclass
class Restored:
    """What earlier attempts of this stage finished, read back from the parts."""

    keys: set[str] = field(default_factory=set)
    rows: list[dict[str, Any]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)  # llm_calls, prompt_tokens, completion_tokens, retries
    parts: int = 0
    meta: dict[str, str] = field(default_factory=dict)  # the last part's stage-level metadata


# --- reaching the model -----------------------------------------------------------------------------------------

class InProcessBatcher:
    """A synchronous, batched backend (`generate(prompts, params, seeds=...)`, optionally
    `next_token_logprobs`) behind one-request-at-a-time coroutines.

    Requests are grouped by what they ask (generation parameters, or the candidates of a log-probability
    question). When every runnable coroutine has had its turn, the largest group (at most `batch_size`)
    runs as one call, on the loop's thread: the loop has nothing else to do meanwhile, and the order of
    events stays the same from run to run."""

    def __init__(self, llm: LLM, batch_size: int):
        self.llm = llm
        self.batch_size = max(1, batch_size)
        self.groups: dict[tuple, list[tuple[Any, asyncio.Future]]] = defaultdict(list)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.in_flight = 0

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._serve())

    async def _ask(self, key: tuple, prompt: Prompt) -> Any:
        self._ensure_running()
        future = asyncio.get_running_loop().create_future()
        self.groups[key].append((prompt, future))
        self.in_flight += 1
        self._wake.set()
        try:
            return await future
        finally:
            self.in_flight -= 1

    async def generate(self, prompt: Prompt, params: GenerationParams) -> Completion:
        # Requests differ in their seeds (each item draws its own), so they are grouped by everything else.
        # Each request's seed goes with it to the backend, which samples every row from a generator of its
        # own: an item's text does not depend on what shares its batch (a stage split into shards gives
        # the same rows as one process).
        return await self._ask(("generate", dataclasses.replace(params, seed=None)), (prompt, params.seed))

    async def logprobs(self, prompt: Prompt, candidates: tuple[str, ...]) -> np.ndarray:
        return await self._ask(("logprobs", candidates), prompt)

    async def _serve(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            # Let every runnable coroutine reach its next request before choosing a batch.
            waiting = -1
            while waiting != (waiting := sum(len(g) for g in self.groups.values())):
                await asyncio.sleep(0)
            while self.groups:
                key = max(self.groups, key=lambda k: len(self.groups[k]))
                batch, rest = self.groups[key][:self.batch_size], self.groups[key][self.batch_size:]
                if rest:
                    self.groups[key] = rest
                else:
                    del self.groups[key]
                batch = [(p, f) for p, f in batch if not f.cancelled()]
                if not batch:
                    continue
                try:
                    if key[0] == "generate":
                        answers = self.llm.generate([p for (p, _), _ in batch], key[1], desc=f"batch of {len(batch)}",
                                                    seeds=[seed for (_, seed), _ in batch])
                    else:
                        answers = list(self.llm.next_token_logprobs([p for p, _ in batch], list(key[1])))
                except BaseException as exc:  # every request of the batch fails with it
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                else:
                    for (_, f), a in zip(batch, answers):
                        if not f.done():
                            f.set_result(a)
                await asyncio.sleep(0)  # the answered items go on before the next batch is chosen
                waiting = -1
                while waiting != (waiting := sum(len(g) for g in self.groups.values())):
                    await asyncio.sleep(0)


class Model:
    """What an item's coroutine calls: one request at a time, counted by purpose."""

    def __init__(self, llm: LLM, usage: Usage, batch_size: int = 16):
        self.llm = llm
        self.usage = usage
        self.mode = getattr(llm, "mode", "completions")
        self.remote = hasattr(llm, "agenerate")
        self.batcher = None if self.remote else InProcessBatcher(llm, batch_size)
        # Log-probability questions (classification, equality) go to in-process models only: an endpoint's
        # judge generates its answer, as not every server returns log-probabilities (scoring asks for them).
        self.has_logprobs = not self.remote and hasattr(llm, "next_token_logprobs")
        self.requests = 0

    @property
    def in_flight(self) -> int:
        return self.llm.in_flight if self.remote else self.batcher.in_flight

    @property
    def capacity(self) -> int | None:
        """Requests the endpoints may have in flight at most (remote backends)."""
        return endpoint_capacity(self.llm)

    async def generate(self, prompt: Prompt, params: GenerationParams, purpose: str) -> Completion:
        if self.remote:
            completion = await self.llm.agenerate(prompt, params)
        else:
            completion = await self.batcher.generate(prompt, params)
        self.usage.add(purpose, [completion])
        self.requests += 1
        return completion

    async def logprobs(self, prompt: Prompt, candidates: Sequence[str]) -> np.ndarray:
        """Log-probabilities of each candidate's first token after `prompt` (in-process backends)."""
        return await self.batcher.logprobs(prompt, tuple(candidates))


def endpoint_capacity(llm: LLM) -> int | None:
    """Every endpoint's `max_concurrency` together (several `llm.base_urls`); None for in-process models."""
    pool = getattr(llm, "pool", None)
    return sum(e.max_concurrency for e in pool.endpoints) if pool is not None else None


def parallelism(llm: LLM, batch_size: int) -> int:
    """Requests a stage can have answered at once: the endpoints' capacity, or the in-process model's
    batch. Stages keep about twice this many items open, so an item between two requests never leaves a
    place idle."""
    capacity = endpoint_capacity(llm)
    return capacity if capacity is not None else getattr(llm, "max_concurrency", batch_size)


def finished_keys(parts: PartWriter) -> set[str]:
    """The items the parts close (the stage's own and every shard's)."""
    return {key for part in parts.read_all() for key in json.loads(part_metadata(part).get("items", "[]"))}


# --- the engine -------------------------------------------------------------------------------------------------

class Engine:
    """Runs a stage's items with checkpoints; see the module docstring."""

    def __init__(self, llm: LLM, parts: PartWriter | None, schema: pa.Schema, *, max_open: int,
                 checkpoint_every: int = 256, checkpoint_s: float = 60.0, batch_size: int = 16,
                 desc: str = "items", total: int | None = None, count: Callable[[], int] | None = None,
                 only: Sequence[str] | None = None):
        self.usage = Usage()
        self.model = Model(llm, self.usage, batch_size)
        self.parts = parts
        self.schema = schema
        self.max_open = max(1, max_open)
        self.checkpoint_every = max(1, checkpoint_every)
        self.checkpoint_s = checkpoint_s
        self.desc, self.total = desc, total
        self.count = count  # what the progress bar counts (default: finished items)
        self.only = None if only is None else set(only)  # a shard's items: the others are not this engine's
        self.restored = self._restore()
        self.counts: Counter = Counter(self.restored.counts)
        self.tokens: Counter = Counter(self.restored.tokens)
        self.finished = len(self.restored.keys)
        self.part_meta: dict[str, str] = {}  # stage-level metadata written with every part
        self._buffer: list[Finished] = []
        self.finished_items: list[Finished] = []  # this attempt's, in the order they finished
        self._tally = UsageTally(self.usage)  # what this attempt spent since its last part
        self._written = 0
        self._last_flush = time.monotonic()
        self._open: set[asyncio.Task] = set()
        self._room: asyncio.Semaphore | None = None
        self._failure: BaseException | None = None
        self._bar: tqdm | None = None
        self._started = time.monotonic()

    # -- restore and checkpoint --

    def _restore(self) -> Restored:
        restored = Restored()
        for part in self.parts.read_all() if self.parts else []:
            meta = part_metadata(part)
            restored.keys.update(json.loads(meta.get("items", "[]")))
            restored.rows.extend(part.to_pylist())
            restored.counts.update(decode_counts(meta.get("counts", "")))
            restored.tokens.update(decode_counts(meta.get("tokens", "")))
            restored.meta = {k: v for k, v in meta.items() if k not in ("items", "counts", "tokens")}
            restored.parts += 1
        return restored

    def flush(self) -> None:
        """Write the finished items not yet in a part (and the tokens spent since the last one)."""
        self._last_flush = time.monotonic()
        if not self._buffer:
            return
        done, self._buffer = self._buffer, []
        rows = [row for item in done for row in item.rows]
        counts = sum((item.counts for item in done), Counter())
        tokens = self._tally.take()
        self.tokens.update(tokens)
        self._written += 1
        if self.parts is not None:
            table = pa.Table.from_pylist(rows, schema=self.schema)
            self.parts.write(table.replace_schema_metadata({
                **self.part_meta, "items": json.dumps([item.key for item in done]),
                "counts": encode_counts(counts), "tokens": encode_counts(tokens)}))

    def _record(self, item: Finished) -> None:
        self._buffer.append(item)
        self.finished_items.append(item)
        self.counts.update(item.counts)
        self.finished += 1
        if self._bar is not None:
            self._bar.update(1) if self.count is None else self._bar.update(self.count() - self._bar.n)
        if len(self._buffer) >= self.checkpoint_every:
            self.flush()

    def tokens_spent(self) -> int:
        """Prompt and completion tokens over every attempt, up to now."""
        total = self.tokens + self._tally.pending()
        return total["prompt_tokens"] + total["completion_tokens"]

    def summary(self) -> dict[str, Any]:
        """Figures for stats.json: parts, requests and tokens over every attempt (what this attempt spent
        after its last part included: items cancelled once a target was reached), and this attempt's usage."""
        total = self.tokens + self._tally.pending()
        return {"checkpoints": self.restored.parts + self._written,
                **{name: total[name] for name in UsageTally.FIELDS}, "usage_this_attempt": self.usage.as_dict()}

    # -- items --

    def is_done(self, key: str) -> bool:
        return key in self.restored.keys

    def has_work(self, keys: Sequence[str]) -> bool:
        """Whether any of `keys` is still to run here (not finished, and this engine's)."""
        return any(k not in self.restored.keys and (self.only is None or k in self.only) for k in keys)

    @property
    def open_items(self) -> int:
        return len(self._open)

    async def spawn(self, key: str, work: Callable[[], Awaitable[Finished]]) -> bool:
        """Start an item unless a part already closes it; waits while `max_open` items are open. False
        when the item was skipped or the engine is stopping."""
        if key in self.restored.keys or (self.only is not None and key not in self.only):
            return False
        await self._room.acquire()
        if self._failure is not None:
            self._room.release()
            return False
        task = asyncio.get_running_loop().create_task(work(), name=key)
        self._open.add(task)
        task.add_done_callback(self._closed)
        return True

    def _closed(self, task: asyncio.Task) -> None:
        self._open.discard(task)
        self._room.release()
        self._changed.set()
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            if self._failure is None:
                self._failure = exc
                for other in list(self._open):
                    other.cancel()
            return
        result = task.result()
        if result is not None:
            self._record(result)

    async def wait_open(self) -> None:
        """Until every open item has finished (or the engine has failed)."""
        while self._open:
            await asyncio.wait(list(self._open))

    async def next_change(self) -> None:
        """Until an open item finishes (or fails)."""
        self._changed.clear()
        await self._changed.wait()

    def cancel_open(self) -> int:
        """Drop the items still open (a target was reached); returns how many."""
        n = len(self._open)
        for task in list(self._open):
            task.cancel()
        return n

    def check(self) -> None:
        """Re-raise the failure of an item, if any (the stage stops at its checkpoint)."""
        if self._failure is not None:
            raise self._failure

    # -- running --

    async def _ticker(self) -> None:
        samples = in_flight_sum = 0
        while True:
            await asyncio.sleep(min(1.0, self.checkpoint_s))
            if time.monotonic() - self._last_flush >= self.checkpoint_s:
                self.flush()
            samples, in_flight_sum = samples + 1, in_flight_sum + self.model.in_flight
            if self._bar is not None:
                elapsed = max(time.monotonic() - self._started, 1e-9)
                shown = {"in_flight": self.model.in_flight, "req_s": f"{self.model.requests / elapsed:.1f}",
                         "tok_s": f"{self.usage.completion_tokens / elapsed:.0f}"}
                if self.model.capacity:  # the time-average share of the allowed places in use
                    shown["slots_used"] = f"{in_flight_sum / samples / self.model.capacity:.0%}"
                self._bar.set_postfix(shown, refresh=False)

    async def _main(self, stage: Callable[[Engine], Awaitable[Any]]) -> Any:
        self._room = asyncio.Semaphore(self.max_open)
        self._changed = asyncio.Event()
        ticker = asyncio.get_running_loop().create_task(self._ticker())
        try:
            initial = self.finished if self.count is None else self.count()
            with tqdm(total=self.total, initial=initial, desc=self.desc, unit="item", leave=False) as bar:
                self._bar = bar
                try:
                    result = await stage(self)
                    await self.wait_open()
                    self.check()
                    return result
                except BaseException:
                    self.cancel_open()
                    await asyncio.gather(*self._open, return_exceptions=True)
                    raise
                finally:
                    self._bar = None
                    self.flush()  # what finished is kept, whatever happened
        finally:
            ticker.cancel()

    def run(self, stage: Callable[[Engine], Awaitable[Any]]) -> Any:
        """Run `stage(engine)` (a coroutine function that spawns items) to the end, on the backend's own
        event loop when it has one, else on a fresh one in a worker thread."""
        loop_of = getattr(self.model.llm, "run_coroutine", None)
        if loop_of is not None:
            return loop_of(self._main(stage))
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, self._main(stage)).result()
