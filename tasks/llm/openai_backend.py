"""OpenAI-compatible endpoints (OpenAI, vLLM, SGLang, llama.cpp server, Ollama): completions or chat.

A backend holds one event loop (in a thread of its own) and one HTTP session per endpoint for the life of
the process, so connections are reused across requests, calls and stages. The work engine sends its items'
requests one by one with `agenerate`; `generate` sends a batch from synchronous code.

Requests go out through aiohttp with the JSON body of the OpenAI API, not through the `openai` SDK's
client: the SDK spends 5-8 ms of CPU per request (request-body transforms, response models, httpx's pool
scan), which on a 2-core client caps a stage at about 150 requests/s, below what a 256-slot vLLM server
answers; aiohttp spends about 0.4 ms (measured against the simulated endpoint; the same reason vLLM's own
serving benchmark uses aiohttp). Errors keep the OpenAI API's names (RateLimitError (HTTP 429), ...).

Several endpoints serving the same model (`llm.base_urls`) share the load: each request goes to the endpoint
with the fewest outstanding requests, at most `max_concurrency` in flight there. That limit adapts: 429 or
503 halves it, and so does a time to first token past `max_ttft_s` (measured on one request in
`ttft_probe_every`, sent streaming); successes grow it back (see `Endpoint`). An endpoint that fails
several times in a row is set aside for a cool-down while the others carry on.

No request goes out faster than the client-side limits allow (`requests_per_minute`, `tokens_per_minute`,
over a sliding minute; a request counts its prompt estimate plus `max_new_tokens` until the server reports
usage). A request that fails with 429, 5xx, a timeout or a dropped connection is retried with exponential
backoff and full jitter, waiting at least what the server's Retry-After asks; after `max_retries` retries
it raises `LLMRequestError` naming the state of every endpoint, and the stage stops at its last checkpoint.
Other errors (a bad request, a wrong key, an unknown model) are not retried.

Scoring (DEITA, IFD: tasks/model_scores.py) reads log-probabilities from `/v1/completions` through the same
requests, limits and accounting, with the legacy `logprobs` object vLLM returns (as OpenAI's legacy
completions did): `next_token_logprobs` reads the top list of one greedy token, `response_losses` and
`truncations` read the prompt's own tokens echoed back (`echo: true, max_tokens: 0`). The semantics are
those of the in-process backend (TransformersLLM); what differs over text is said where it is done.

The API key comes from a Prefect Secret block or the environment variable the config names, is handed to
the client and nowhere else: it is not logged, not part of the backend's name and not in any error message
this module writes.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import email.utils
import functools
import json
import logging
import os
import random
import threading
import time
import urllib.parse
import urllib.request
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aiohttp
import numpy as np
import openai
from tqdm.auto import tqdm

from tasks.llm.base import Completion, GenerationParams, Mode, Prompt, chat_prompt, truncate_at_stop
from tasks.llm.losses import TRUNCATED, fit_response

log = logging.getLogger(__name__)

# OpenAI accepts at most four stop sequences; the rest are applied to the returned text.
MAX_SERVER_STOPS = 4
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
# Candidates looked up in one token's top list: vLLM's default cap (`--max-logprobs`); a server started with a
# higher cap can be asked for more (OpenAILLM's `top_logprobs`).
TOP_LOGPROBS = 20
MEASURED_CACHE = 4096  # scored texts kept: IFD reads each pair twice (its truncation, then its loss)

T = TypeVar("T")


class LLMRequestError(RuntimeError):
    """A request that failed for good: not retryable, or still failing after every retry."""


# The OpenAI API's names for the statuses, so a message reads as users know it from the SDK.
STATUS_NAMES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
                404: "NotFoundError", 409: "ConflictError", 422: "UnprocessableEntityError", 429: "RateLimitError"}


class EndpointStatusError(Exception):
    """An answer with an error status (4xx, 5xx): its status, headers (Retry-After) and the server's message."""

    def __init__(self, status_code: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code, self.message = status_code, message
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}

    @property
    def kind(self) -> str:
        return STATUS_NAMES.get(self.status_code,
                                "InternalServerError" if self.status_code >= 500 else "APIStatusError")


class EndpointConnectionError(Exception):
    """No answer: the connection failed or dropped, the request timed out, or the body was not JSON."""

    def __init__(self, message: str, timeout: bool = False):
        super().__init__(message)
        self.message, self.timeout = message, timeout

    @property
    def kind(self) -> str:
        return "APITimeoutError" if self.timeout else "APIConnectionError"


class UnusableAnswer(Exception):
    """A well-formed completion that lacks what the request asked for (log-probabilities); the server would
    answer the same again, so it is never retried."""


class BudgetExhausted(LLMRequestError):
    """The run's token or cost budget is spent: no more requests; the stage stops at its last checkpoint."""


class Spend:
    """Tokens and dollars spent by one backend instance (one run), against optional limits."""

    def __init__(self, max_tokens: int | None = None, max_cost_usd: float | None = None,
                 prompt_price_per_1m: float = 0.0, completion_price_per_1m: float = 0.0):
        self.max_tokens, self.max_cost_usd = max_tokens, max_cost_usd
        self.prompt_price, self.completion_price = prompt_price_per_1m, completion_price_per_1m
        self.prompt_tokens = self.completion_tokens = self.requests = 0

    @property
    def cost_usd(self) -> float:
        return (self.prompt_tokens * self.prompt_price + self.completion_tokens * self.completion_price) / 1e6

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.requests += 1

    def check(self) -> None:
        tokens = self.prompt_tokens + self.completion_tokens
        if self.max_tokens is not None and tokens >= self.max_tokens:
            raise BudgetExhausted(f"llm.max_tokens ({self.max_tokens}) spent: {tokens} tokens over {self.requests} "
                                  f"requests; the stage stopped at its last checkpoint: raise llm.max_tokens and "
                                  f"run again to continue")
        if self.max_cost_usd is not None and self.cost_usd >= self.max_cost_usd:
            raise BudgetExhausted(f"llm.max_cost_usd ({self.max_cost_usd:.2f}) spent: ${self.cost_usd:.4f} over "
                                  f"{self.requests} requests; the stage stopped at its last checkpoint: raise "
                                  f"llm.max_cost_usd and run again to continue")


def _status(exc: Exception) -> int | None:
    return getattr(exc, "status_code", None)


def is_retryable(exc: Exception) -> bool:
    if isinstance(exc, EndpointConnectionError):
        return True
    status = _status(exc)
    return status is not None and (status in RETRYABLE_STATUS or status >= 500)


def retry_after_s(exc: Exception) -> float | None:
    """The wait the server asked for (Retry-After as seconds or an HTTP date, or retry-after-ms), if any."""
    headers = getattr(exc, "headers", None)
    if not headers:
        return None
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:  # an HTTP date
        return max(0.0, email.utils.parsedate_to_datetime(raw).timestamp() - time.time())
    except (TypeError, ValueError):
        return None  # unreadable: fall back to our own backoff


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(max_s, base_s * 2**attempt)]."""
    return rng.uniform(0.0, min(max_s, base_s * 2 ** attempt))


def describe(exc: Exception) -> str:
    status = _status(exc)
    kind = getattr(exc, "kind", None) or type(exc).__name__
    message = getattr(exc, "message", None) or str(exc)
    return f"{kind}{f' (HTTP {status})' if status else ''}: {message[:300]}"


class RateLimiter:
    """At most `rpm` requests and `tpm` tokens started in any `window_s` seconds (None: no limit).

    Each grant is recorded as [start time, tokens, in the window]; `settle` replaces the estimate with the
    usage the server reported, and the window's running total with it. A request alone larger than `tpm` is
    let through when nothing else is in the window, or it would wait forever. `clock` and `sleep` are
    injectable so tests can run on virtual time.
    """

    def __init__(self, rpm: int | None, tpm: int | None, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.rpm, self.tpm, self.window_s = rpm, tpm, window_s
        self.clock, self.sleep = clock, sleep
        self.grants: collections.deque[list[float]] = collections.deque()
        self.used = 0.0  # tokens of the grants in the window
        self.waited_s = 0.0

    async def acquire(self, tokens: int) -> list[float]:
        if self.rpm is None and self.tpm is None:  # no limit: nothing to record (O(1) per request)
            return [self.clock(), float(tokens), 0.0]
        while True:
            now = self.clock()
            while self.grants and self.grants[0][0] <= now - self.window_s:
                gone = self.grants.popleft()
                self.used -= gone[1]
                gone[2] = 0.0  # out of the window
            fits_requests = self.rpm is None or len(self.grants) < self.rpm
            fits_tokens = self.tpm is None or self.used + tokens <= self.tpm or not self.grants
            if fits_requests and fits_tokens:
                grant = [now, float(tokens), 1.0]  # start, tokens, still in the window
                self.grants.append(grant)
                self.used += grant[1]
                return grant
            wait = max(self.grants[0][0] + self.window_s - now, 1e-3)  # until the oldest grant leaves
            self.waited_s += wait
            await self.sleep(wait)

    def settle(self, grant: list[float], tokens: int) -> None:
        """The server's count replaces the estimate (in the window's running total too, if still in it)."""
        if grant[2]:
            self.used += tokens - grant[1]
        grant[1] = float(tokens)


def estimate_tokens(prompt: Prompt, max_new_tokens: int) -> int:
    """Before the server says: about four characters per prompt token, plus the whole completion budget."""
    text = prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)
    return len(text) // 4 + 1 + max_new_tokens


class Endpoint:
    """One server of the fleet: its client, the requests outstanding there, and its concurrency limit.

    The limit adapts (AIMD, as TCP does): an answer that says the server is overloaded (429, 503) halves
    it, once per round trip (only a request sent after the last halving halves it again: the others were
    sent under the old limit); each success adds 1/limit, so it grows back by one per limit's worth of
    successes, up to `max_concurrency`. Failures in a row (5xx, timeouts, dropped connections) set the
    endpoint aside for `cooldown_s`, while the others carry on."""

    def __init__(self, url: str | None, max_concurrency: int, adaptive: bool, cooldown_s: float,
                 failures_to_cool: int | None, clock: Callable[[], float] = time.monotonic):
        self.url = url
        # With no address, where the openai SDK would go: $OPENAI_BASE_URL, else OpenAI's API.
        self.base = (url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        self.max_concurrency = max_concurrency
        self.limit = float(max_concurrency)
        self.adaptive = adaptive
        self.cooldown_s, self.failures_to_cool = cooldown_s, failures_to_cool
        self.clock = clock
        self.outstanding = 0
        self.failures_in_a_row = 0
        self.cooling_until = 0.0
        self.last_decrease = -1e9
        self.decreases = self.cooldowns = 0
        self.sent = 0
        self.ttft_s: collections.deque[float] = collections.deque(maxlen=64)  # the last probes' measures
        self.client: aiohttp.ClientSession | None = None
        self.proxy: str | None = None

    @property
    def label(self) -> str:
        return self.base

    @property
    def cap(self) -> int:
        return max(1, int(self.limit))

    def available(self, now: float) -> bool:
        return self.cooling_until <= now and self.outstanding < self.cap

    def succeeded(self) -> None:
        self.failures_in_a_row = 0
        if self.adaptive:
            self.limit = min(float(self.max_concurrency), self.limit + 1.0 / self.limit)

    def overloaded(self, sent_at: float, why: str = "") -> None:
        now = self.clock()
        if self.adaptive and sent_at >= self.last_decrease:
            self.limit = max(1.0, self.limit / 2)
            self.last_decrease = now
            self.decreases += 1
            log.warning("%s is overloaded%s: %d requests in flight there at most, for now", self.label,
                        f" ({why})" if why else "", self.cap)

    def probe_due(self, every: int) -> bool:
        """Whether this request is the one in `every` sent streaming to measure time to first token."""
        self.sent += 1
        return self.sent % every == 1 % every

    def failed(self) -> None:
        self.failures_in_a_row += 1
        if self.failures_to_cool is None:
            return
        if self.failures_in_a_row >= self.failures_to_cool and self.cooling_until <= self.clock():
            self.cooling_until = self.clock() + self.cooldown_s
            self.cooldowns += 1
            log.warning("%s failed %d times in a row: set aside for %.0f s", self.label, self.failures_in_a_row,
                        self.cooldown_s)

    def state(self, now: float) -> str:
        if self.cooling_until > now:
            return f"{self.label} set aside after {self.failures_in_a_row} failures in a row"
        return f"{self.label} ({self.outstanding} in flight, limit {self.cap})"


class EndpointPool:
    """Routes each request to the available endpoint with the fewest outstanding requests; a request that
    finds none waits (first come, first served) for a place or for the end of a cool-down."""

    def __init__(self, endpoints: list[Endpoint]):
        self.endpoints = endpoints
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    @property
    def in_flight(self) -> int:
        return sum(e.outstanding for e in self.endpoints)

    def _pick(self) -> Endpoint | None:
        now = self.endpoints[0].clock()
        ready = [e for e in self.endpoints if e.available(now)]
        return min(ready, key=lambda e: (e.outstanding / e.cap, e.outstanding)) if ready else None

    async def acquire(self) -> Endpoint:
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiters or self._waiters[0].done():
                endpoint = self._pick()
                if endpoint is not None:
                    endpoint.outstanding += 1
                    return endpoint
            waiter = loop.create_future()
            self._waiters.append(waiter)
            now = self.endpoints[0].clock()
            cooling = [e.cooling_until - now for e in self.endpoints if e.cooling_until > now]
            timeout = min(cooling) if cooling and len(cooling) == len(self.endpoints) else None
            try:
                await asyncio.wait([waiter], timeout=timeout)
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken, then cancelled before taking the place: pass the wake on
                raise
            finally:
                if not waiter.done():  # timed out or cancelled while still queued (a woken one was popped)
                    waiter.cancel()
                    try:
                        self._waiters.remove(waiter)
                    except ValueError:
                        pass
            endpoint = self._pick()
            if endpoint is not None:
                endpoint.outstanding += 1
                self._wake()  # room may be left for the next one too
                return endpoint

    def release(self, endpoint: Endpoint) -> None:
        endpoint.outstanding -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def describe(self) -> str:
        now = self.endpoints[0].clock()
        return "; ".join(e.state(now) for e in self.endpoints)


class OpenAILLM:
    """One endpoint, one event loop and one HTTP client for the life of the process (connections are
    reused); `agenerate` for the work engine's items, `generate` for a batch from synchronous code."""

    def __init__(self, model: str, base_url: str | None = None, mode: Mode = "completions",
                 api_key: str | None = None, max_concurrency: int = 8, timeout_s: float = 120.0,
                 max_retries: int = 6, backoff_base_s: float = 0.5, backoff_max_s: float = 30.0,
                 limiter: RateLimiter | None = None, spend: Spend | None = None,
                 base_urls: Sequence[str] = (), adaptive_concurrency: bool = True, cooldown_s: float = 30.0,
                 failures_to_cool: int = 5, max_ttft_s: float | None = None, ttft_probe_every: int = 16,
                 top_logprobs: int = TOP_LOGPROBS):
        self.model = model
        self.base_url = base_url
        self.base_urls = list(base_urls) or [base_url]
        self.mode = mode
        where = (base_url or "api.openai.com") if len(self.base_urls) == 1 else f"{len(self.base_urls)} endpoints"
        self.name = f"openai:{model}@{where}"
        # One endpoint is never set aside: there is nowhere else to go, and the retries' backoff spaces it.
        cool_after = failures_to_cool if len(self.base_urls) > 1 else None
        self.pool = EndpointPool([Endpoint(url, max_concurrency, adaptive_concurrency, cooldown_s, cool_after)
                                  for url in self.base_urls])
        self._api_key = api_key
        self.max_concurrency = max_concurrency
        self.max_ttft_s, self.ttft_probe_every = max_ttft_s, ttft_probe_every
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        # The limiter and the spend outlive each call: the limits hold across calls and stages.
        self.limiter = limiter or RateLimiter(None, None)
        self.spend = spend or Spend()
        self._rng = random.Random(0)  # backoff jitter
        # Scoring: the top list's length, and how many next-token rows missed a candidate (scored -inf) of all
        # rows asked, for the caller to report; texts already scored, and their prompts' token counts.
        self.top_logprobs = top_logprobs
        self.logprob_rows = self.logprob_misses = 0
        self._measured: collections.OrderedDict[tuple[str, str], Measured] = collections.OrderedDict()
        self._prompt_tokens: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._text_start = 1  # tokens the server puts before a text (a BOS), as its last echo showed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._finalizer: weakref.finalize | None = None
        self._owner_pid = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never show the key
        return f"OpenAILLM({self.name!r}, mode={self.mode!r})"

    # -- the process's loop and client --

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._owner_pid != os.getpid():  # none yet, or inherited through fork
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=_serve, args=(loop,), name=f"llm-loop {self.name}", daemon=True)
                thread.start()
                self._loop, self._owner_pid = loop, os.getpid()
                for endpoint in self.pool.endpoints:
                    endpoint.client, endpoint.outstanding = None, 0
                # A backend let go without close() (the factory's cache drops it) still closes its
                # connections and stops its thread, instead of leaking both until the process ends.
                # Not at interpreter exit (the daemon thread ends with the process anyway), and never in a
                # forked child, which holds a copy of the loop but not its thread.
                self._finalizer = weakref.finalize(self, _shut_down, loop, thread, self.pool.endpoints, os.getpid())
                self._finalizer.atexit = False
            return self._loop

    def run_coroutine(self, coro: Awaitable[Any]) -> Any:
        """Run `coro` on this backend's loop and wait for it, from synchronous code in another thread."""
        loop = self._ensure_loop()
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def _session(self, endpoint: Endpoint) -> aiohttp.ClientSession:
        if endpoint.client is None:  # made on the loop, used only there; connections kept for the next request
            headers = {"Content-Type": "application/json"}
            if self._api_key:
                headers["Authorization"] = f"Bearer {self._api_key}"
            # The proxy settings ($HTTPS_PROXY, $NO_PROXY, ...) are read once here: aiohttp's trust_env
            # reads them and ~/.netrc again for every request, most of its CPU per request.
            endpoint.client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=endpoint.max_concurrency, limit_per_host=0),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s), headers=headers, trust_env=False)
            endpoint.proxy = _proxy_for(endpoint.base)
        return endpoint.client

    @property
    def in_flight(self) -> int:
        return self.pool.in_flight

    def close(self) -> None:
        """Close the connections and stop the loop's thread (a later request starts them again)."""
        if self._loop is not None and self._owner_pid == os.getpid():
            self._finalizer()
            self._loop = None

    # -- requests --

    async def agenerate(self, prompt: Prompt, params: GenerationParams) -> Completion:
        """One request, to the endpoint with the fewest outstanding requests once one has room (at most
        `max_concurrency` there, fewer while it is overloaded); retried there or elsewhere on failure."""
        completion, _ = await self._with_retries(prompt, params, self.limiter)
        return completion

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams,
                 desc: str = "generate") -> list[Completion]:
        """All `prompts` at once (at most `max_concurrency` in flight), in prompt order. Prompt i is sent
        with seed `params.seed + i`: one stream per prompt, the same on a re-run."""
        if not prompts:
            return []

        def call(index: int, prompt: Prompt) -> Callable[[], Awaitable[Completion]]:
            seeded = params if params.seed is None else dataclasses.replace(params, seed=params.seed + index)
            return lambda: self.agenerate(prompt, seeded)

        return self.run_coroutine(self._all([call(i, p) for i, p in enumerate(prompts)], desc))

    async def _all(self, calls: list[Callable[[], Awaitable[T]]], desc: str) -> list[T]:
        """Every call at once (the endpoints' limits decide how many are in flight), results in call order;
        the first failure cancels the rest."""
        with tqdm(total=len(calls), desc=desc, unit="request", leave=False) as bar:
            async def one(call: Callable[[], Awaitable[T]]) -> T:
                result = await call()
                bar.update(1)
                return result

            tasks = [asyncio.create_task(one(c)) for c in calls]
            try:
                return list(await asyncio.gather(*tasks))
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

    async def _with_retries(self, prompt: Prompt, params: GenerationParams, limiter: RateLimiter,
                            extra: dict[str, Any] | None = None,
                            read: Callable[[dict[str, Any]], Any] | None = None) -> tuple[Completion, Any]:
        """One request with its retries; `extra` body fields and `read` as in `_request` (what `read` made of
        the answer comes back beside the completion, None without it)."""
        attempt = 0
        while True:
            self.spend.check()  # a spent budget sends nothing more
            estimate = estimate_tokens(prompt, params.max_new_tokens)
            endpoint = await self.pool.acquire()
            sent_at = endpoint.clock()
            # A scoring request is never the streamed probe: a stream carries no log-probabilities here.
            probe = self.max_ttft_s is not None and read is None and endpoint.probe_due(self.ttft_probe_every)
            try:
                grant = await limiter.acquire(estimate)  # retries count too
                completion, ttft, value = await self._request(endpoint, prompt, params, stream=probe, extra=extra,
                                                              read=read)
            except (EndpointStatusError, EndpointConnectionError) as exc:
                self.pool.release(endpoint)
                if _status(exc) in (429, 503):
                    endpoint.overloaded(sent_at)
                elif is_retryable(exc):
                    endpoint.failed()
                if not is_retryable(exc):
                    raise LLMRequestError(f"{self.name}: request failed, not retryable: {describe(exc)}") from None
                if attempt >= self.max_retries:
                    raise LLMRequestError(f"{self.name}: request still failing after {attempt} retries: "
                                          f"{describe(exc)}; endpoints: {self.pool.describe()}") from None
                wait = max(retry_after_s(exc) or 0.0,
                           backoff_s(attempt, self.backoff_base_s, self.backoff_max_s, self._rng))
                log.warning("%s: %s; retry %d/%d in %.1fs", endpoint.label, describe(exc), attempt + 1,
                            self.max_retries, wait)
                attempt += 1
                await asyncio.sleep(wait)
                continue
            except BaseException:
                self.pool.release(endpoint)
                raise
            endpoint.succeeded()
            if ttft is not None:
                endpoint.ttft_s.append(ttft)
                if ttft > self.max_ttft_s:
                    endpoint.overloaded(sent_at, f"time to first token {ttft:.1f} s > llm.max_ttft_s")
            self.pool.release(endpoint)
            prompt_tokens, completion_tokens = completion.prompt_tokens, completion.completion_tokens
            if prompt_tokens + completion_tokens == 0:  # a server that reports no usage: count the estimate
                prompt_tokens, completion_tokens = estimate - params.max_new_tokens, params.max_new_tokens
            limiter.settle(grant, prompt_tokens + completion_tokens)
            self.spend.add(prompt_tokens, completion_tokens)
            return Completion(completion.text, completion.finish_reason, completion.prompt_tokens,
                              completion.completion_tokens, retries=attempt), value

    def _body(self, prompt: Prompt, params: GenerationParams, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": params.max_new_tokens,
                                "temperature": params.temperature, "top_p": params.top_p}
        if params.stop:
            body["stop"] = list(params.stop[:MAX_SERVER_STOPS])
        if params.seed is not None:
            body["seed"] = params.seed
        if self.mode == "chat":
            body["messages"] = chat_prompt(prompt) if isinstance(prompt, str) else prompt
        elif isinstance(prompt, str):
            body["prompt"] = prompt
        else:
            raise TypeError("llm.mode is `completions` but a stage built chat messages; this is a bug")
        return {**body, **(extra or {})}

    async def _request(self, endpoint: Endpoint, prompt: Prompt, params: GenerationParams, stream: bool = False,
                       extra: dict[str, Any] | None = None, read: Callable[[dict[str, Any]], Any] | None = None
                       ) -> tuple[Completion, float | None, Any]:
        """One request; with `stream`, sent streaming to measure its time to first token (else None). `extra`
        adds body fields (`echo`, `logprobs`); `read` takes what it needs from the parsed answer (not
        streamed), and an `UnusableAnswer` it raises fails the request for good, naming the endpoint."""
        url = f"{endpoint.base}/{'chat/completions' if self.mode == 'chat' else 'completions'}"
        body = self._body(prompt, params, extra)
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        ttft = None
        try:
            started = time.monotonic()
            async with self._session(endpoint).post(url, data=json.dumps(body), proxy=endpoint.proxy) as response:
                status, headers = response.status, dict(response.headers)
                if status >= 400 or not stream:
                    raw = await response.read()
                else:
                    events = []
                    async for line in response.content:
                        if line.startswith(b"data:"):
                            ttft = time.monotonic() - started if ttft is None else ttft
                            if line[5:].strip() == b"[DONE]":
                                break
                            events.append(line[5:])
        except (asyncio.TimeoutError, TimeoutError):
            raise EndpointConnectionError(f"no answer within {self.timeout_s:g} s (llm.request_timeout_s)",
                                          timeout=True) from None
        except aiohttp.ClientError as exc:
            raise EndpointConnectionError(f"{type(exc).__name__}: {exc}") from None
        if status >= 400:
            raise EndpointStatusError(status, _error_message(raw), headers)
        answer: dict[str, Any] = {}
        try:
            if stream:
                text, reason, usage = _assemble_stream(events, chat=self.mode == "chat")
            else:
                answer = json.loads(raw)
                choice = answer["choices"][0]
                text = (choice["message"]["content"] if self.mode == "chat" else choice["text"]) or ""
                reason, usage = choice.get("finish_reason"), answer.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError):
            raise EndpointConnectionError(f"HTTP {status} but not an OpenAI completion"
                                          f"{' stream' if stream else f': {raw[:200]!r}'}") from None
        value = None
        if read is not None:
            try:
                value = read(answer)
            except UnusableAnswer as exc:
                asked = ", ".join(f"{k}: {json.dumps(v)}" for k, v in (extra or {}).items())
                raise LLMRequestError(f"{self.name}: {url} answered ({asked}) without usable log-probabilities: "
                                      f"{exc}. Scoring over endpoints needs a server that returns them in the "
                                      f"legacy completions format (vLLM does); else use quality.scorer: local"
                                      ) from None
        text, hit_stop = truncate_at_stop(text, params.stop)
        finish = "length" if reason == "length" and not hit_stop else "stop"
        return Completion(text=text, finish_reason=finish, prompt_tokens=int(usage.get("prompt_tokens") or 0),
                          completion_tokens=int(usage.get("completion_tokens") or 0)), ttft, value

    # -- scoring: the in-process backend's three methods, read from the endpoints --

    def _scoring(self, what: str) -> None:
        if self.mode != "completions":
            raise ValueError(f"{self.name}: {what} reads prompt log-probabilities from /v1/completions, but "
                             f"llm.mode is `{self.mode}`; score with llm.mode: completions, or quality.scorer: local")

    def _ask_all(self, prompts: Sequence[str], params: GenerationParams, extra: dict[str, Any],
                 reads: Sequence[Callable[[dict[str, Any]], T]], desc: str) -> list[T]:
        """One request per prompt, through the endpoints' limits, retries and accounting as generation goes;
        what `reads[i]` makes of prompt i's answer, in prompt order."""
        async def ask(prompt: str, read: Callable[[dict[str, Any]], T]) -> T:
            return (await self._with_retries(prompt, params, self.limiter, extra, read))[1]

        calls = [functools.partial(ask, p, r) for p, r in zip(prompts, reads)]
        return self.run_coroutine(self._all(calls, desc)) if calls else []

    def next_token_logprobs(self, prompts: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        """Log-probability of each candidate as the next token after each prompt: shape (prompts, candidates).

        One greedy token per prompt (`max_tokens: 1, logprobs: top_logprobs`), its top list read. A candidate
        is the text of one token and is found by that exact text ("1" and " 1" are different tokens, as in the
        in-process backend; a candidate that is no single token is never found). A candidate missing from the
        list is less likely than every listed token: -inf, and the row counts in `logprob_misses`.
        """
        self._scoring("next_token_logprobs")
        if len(set(candidates)) != len(candidates):
            raise ValueError(f"candidates {list(candidates)} are not distinct")
        params = GenerationParams(max_new_tokens=1, temperature=0.0)
        tops = self._ask_all(prompts, params, {"logprobs": self.top_logprobs}, [_next_token_top] * len(prompts),
                             "next-token log-probabilities")
        out = np.array([[top.get(c, -np.inf) for c in candidates] for top in tops], dtype=float)
        out = out.reshape(len(tops), len(candidates))
        missed = int(np.isneginf(out).any(axis=1).sum())
        self.logprob_rows += len(tops)
        self.logprob_misses += missed
        if missed:
            log.warning("%s: %d of %d rows had a candidate of %s outside the top %d tokens: scored -inf there",
                        self.name, missed, len(tops), list(candidates), self.top_logprobs)
        return out

    def truncations(self, prompts: Sequence[str], responses: Sequence[str], max_length: int) -> list[str | None]:
        """What `response_losses` does to each pair that does not fit in `max_length` (see fit_response)."""
        self._scoring("truncations")
        return [fit_response(m.prompt_tokens, len(m.response_logprobs), max_length)[1]
                for m in self._measure(prompts, responses, "token counts")]

    def response_losses(self, prompts: Sequence[str], responses: Sequence[str], max_length: int,
                        desc: str = "response loss", room_from: Sequence[str] | None = None) -> np.ndarray:
        """Mean loss per token of each response after its prompt (an empty prompt: after BOS alone), as the
        in-process backend computes it: the prompt kept whole, an over-long response scored on its head
        (fit_response; with `room_from`, the head that fits after those prompts), NaN for a response with no
        tokens or when the prompt leaves no room.

        One request per pair, its text `prompt + response.strip()` echoed with each token's log-probability;
        the token counts the endpoint returns decide the head. A causal model's log-probability of a token
        does not depend on what follows it, so the head of the whole text scores as the head alone would.
        """
        self._scoring("response_losses")
        measured = self._measure(prompts, responses, desc)
        rooms = [None] * len(measured) if room_from is None else self._room(list(room_from), desc)
        losses = np.full(len(measured), np.nan)
        for i, (m, room) in enumerate(zip(measured, rooms)):
            keep, why = fit_response(m.prompt_tokens, len(m.response_logprobs), max_length, room_tokens=room)
            # The first token of a text without BOS has no log-probability: nothing predicts it here either.
            scored = [lp for lp in m.response_logprobs[:keep] if lp is not None]
            if why in (None, TRUNCATED) and scored:
                losses[i] = -float(np.mean(scored))
        return losses

    def _measure(self, prompts: Sequence[str], responses: Sequence[str], desc: str) -> list[Measured]:
        """Each pair as the endpoint tokenizes and scores `prompt + response.strip()` (the in-process backend
        strips the response too), one request per text not scored recently."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        pairs = [(p, r.strip()) for p, r in zip(prompts, responses)]
        have = {pair: self._measured[pair] for pair in dict.fromkeys(pairs) if pair in self._measured}
        todo = [pair for pair in dict.fromkeys(pairs) if pair not in have and pair[0] + pair[1]]
        params = GenerationParams(max_new_tokens=0, temperature=0.0)
        # `logprobs: 1`, not 0: some servers read 0 as "none".
        found = self._ask_all([p + r for p, r in todo], params, {"echo": True, "logprobs": 1},
                              [functools.partial(_read_echo, p, r) for p, r in todo], desc)
        for pair, (measured, text_start) in zip(todo, found):
            have[pair] = measured
            self._remember(pair, measured)
            self._text_start = text_start
        # An empty text is not sent (servers refuse an empty prompt): only the tokens put before any text.
        return [have[pair] if pair[0] + pair[1] else Measured(self._text_start, ()) for pair in pairs]

    def _remember(self, pair: tuple[str, str], measured: Measured) -> None:
        for cache, key, value in ((self._measured, pair, measured),
                                  (self._prompt_tokens, pair[0], measured.prompt_tokens)):
            cache[key] = value
            cache.move_to_end(key)
            while len(cache) > MEASURED_CACHE:
                cache.popitem(last=False)

    def _room(self, prompts: list[str], desc: str) -> list[int]:
        """Each prompt's token count as it was scored before its response (IFD's conditioned pass: the direct
        loss then keeps the head it kept), else as the endpoint tokenizes the prompt alone."""
        counts = {p: self._prompt_tokens[p] for p in dict.fromkeys(prompts) if p in self._prompt_tokens}
        missing = [p for p in dict.fromkeys(prompts) if p not in counts]
        for p, m in zip(missing, self._measure(missing, [""] * len(missing), f"{desc}: prompt token counts")):
            counts[p] = m.prompt_tokens
        return [counts[p] for p in prompts]


def _assemble_stream(events: list[bytes], chat: bool) -> tuple[str, str | None, dict]:
    """Text, finish reason and usage from a streamed answer's `data:` events (usage from the last event that
    carries it; a server that sends none leaves the token counts to the estimate)."""
    pieces, reason, usage = [], None, {}
    for raw in events:
        event = json.loads(raw)
        for choice in event.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            pieces.append(piece or "")
            reason = choice.get("finish_reason") or reason
        usage = event.get("usage") or usage
    return "".join(pieces), reason, usage


@dataclasses.dataclass(frozen=True)
class Measured:
    """A prompt and response as the endpoint tokenized and scored them: the tokens before the response (a
    BOS included, as the in-process backend counts a prompt), and each response token's log-probability
    (None for a first token nothing predicts: a text without BOS)."""

    prompt_tokens: int
    response_logprobs: tuple[float | None, ...]


def _logprobs_object(answer: dict[str, Any]) -> dict[str, Any]:
    found = answer["choices"][0].get("logprobs")
    if not isinstance(found, dict):
        raise UnusableAnswer("its choice has no `logprobs` object")
    return found


def _next_token_top(answer: dict[str, Any]) -> dict[str, float]:
    """The generated token's top list: {token text: log-probability}."""
    top = _logprobs_object(answer).get("top_logprobs") or [None]
    if not isinstance(top[0], dict) or not top[0]:
        raise UnusableAnswer("no `logprobs.top_logprobs` list for the generated token")
    return top[0]


def _read_echo(prompt: str, response: str, answer: dict[str, Any]) -> tuple[Measured, int]:
    """The echoed text `prompt + response` split into prompt and response tokens, and how many tokens the
    server put before the text (its BOS)."""
    found = _logprobs_object(answer)
    tokens, logprobs = found.get("tokens"), found.get("token_logprobs")
    if not tokens or not isinstance(logprobs, list) or len(logprobs) != len(tokens):
        raise UnusableAnswer("no `logprobs.tokens` and `logprobs.token_logprobs` of the prompt (is `echo` "
                             "supported?)")
    if logprobs[0] is not None:  # an echo's first token has none: nothing comes before it
        raise UnusableAnswer("its first token has a log-probability, so the tokens are not the prompt echoed "
                             "(the server ignores `echo`?)")
    # The echo comes first; a token generated after it (a server that reads max_tokens 0 as unset) is not ours.
    n = int((answer.get("usage") or {}).get("prompt_tokens") or len(tokens))
    tokens, logprobs = tokens[:n], logprobs[:n]
    start = _response_start(tokens, prompt, response)
    if any(lp is None for lp in logprobs[max(start, 1):]):
        raise UnusableAnswer("a token after the first has no log-probability")
    text = prompt + response
    return Measured(start, tuple(logprobs[start:])), int(not text.startswith(tokens[0]))


def _response_start(tokens: list[str], prompt: str, response: str) -> int:
    """Where the response's tokens begin among the echoed `tokens` of `prompt + response`.

    Read off the token texts, not `text_offset`: vLLM's offsets are the running sum of its token texts
    starting with the BOS token's ("<bos>", not part of the prompt), and the texts can be checked against
    the text sent. From the front: past a first token that is not part of the text (BOS), as many tokens as
    spell the prompt; a token across the join (the prompt's end and the response's start merged into one)
    counts as the prompt's, so it is not scored. Where a token text differs from the text there (vLLM
    decodes tokens one by one, so a character split into byte tokens reads as several "\ufffd"), the same
    from the back over the response. Neither side spelled out: UnusableAnswer, never a guess.
    """
    text = prompt + response
    i = 1 if tokens and not text.startswith(tokens[0]) else 0
    at = 0
    while at < len(prompt) and i < len(tokens) and text.startswith(tokens[i], at):
        at, i = at + len(tokens[i]), i + 1
    if at >= len(prompt):
        return i
    j, end = len(tokens), len(text)
    while end > len(prompt) and j > 0 and text.endswith(tokens[j - 1], 0, end):
        j, end = j - 1, end - len(tokens[j - 1])
    if end <= len(prompt):
        return j if end == len(prompt) else j + 1
    raise UnusableAnswer(f"its token texts spell neither the prompt nor the response sent (tokens "
                         f"{tokens[:8]!r}...), so the response's tokens cannot be told apart")


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    loop.run_forever()
    loop.close()


def _shut_down(loop: asyncio.AbstractEventLoop, thread: threading.Thread, endpoints: list[Endpoint],
               owner_pid: int) -> None:
    """Close every endpoint's session on `loop`, then stop it (waits only when called from another thread)."""
    async def close_all() -> None:
        for endpoint in endpoints:
            if endpoint.client is not None:
                await endpoint.client.close()
                endpoint.client = None

    if os.getpid() != owner_pid or loop.is_closed() or not thread.is_alive():
        return
    future = asyncio.run_coroutine_threadsafe(close_all(), loop)
    if threading.current_thread() is not thread:
        try:
            future.result(timeout=10)
        except Exception as exc:  # noqa: BLE001 - closing is best effort; say so, never hide it
            log.warning("closing the endpoint sessions: %s", describe(exc))
    loop.call_soon_threadsafe(loop.stop)


def _proxy_for(url: str) -> str | None:
    """The proxy the environment names for `url` ($HTTP(S)_PROXY), None when $NO_PROXY exempts it."""
    parts = urllib.parse.urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies().get(parts.scheme)


def _error_message(raw: bytes) -> str:
    """The server's own words: OpenAI's `{"error": {"message": ...}}`, a bare `error` or `message`, or text."""
    try:
        body = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace").strip()[:300] or "(empty body)"
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message") or error)[:300]
        return str(error)[:300]
    return str(body)[:300]


def api_key(variable: str, secret_block: str | None = None) -> str | None:
    """The API key: from the Prefect Secret block `secret_block` when one is named, else from the
    environment variable `variable` (None when unset: local servers need no key)."""
    if secret_block:
        from prefect.blocks.system import Secret

        try:
            return str(Secret.load(secret_block).get())
        except ValueError as exc:  # no such block: say which key to fix, never echo a value
            raise LLMRequestError(f"llm.api_key_secret: no Prefect Secret block named `{secret_block}` "
                                  f"({type(exc).__name__}); create it with `prefect block create secret`") from None
    return os.environ.get(variable) or None


# Fields of a `/v1/models` entry that describe the served model and stay put between calls. vLLM sets
# `created` to the time of the request and gives each `permission` a fresh id, so those are left out.
STABLE_MODEL_FIELDS = ("id", "object", "owned_by", "root", "parent", "max_model_len", "meta")


def served_model(base_url: str | None, api_key: str | None, model: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """What the endpoint reports about `model` (`GET /v1/models`): its entry's stable fields, or, when
    the server lists no entry of that name (llama.cpp serves one model whatever a request names), every
    entry it lists. Artifact keys include this, so a server that now serves other weights under another
    path or size gives new keys; what it cannot see is in the README."""
    client = openai.OpenAI(api_key=api_key or "not-needed", base_url=base_url, timeout=timeout_s, max_retries=2)
    try:
        listed = [entry.model_dump() for entry in client.models.list()]
    except openai.OpenAIError as exc:
        raise LLMRequestError(f"llm.base_url {base_url or 'https://api.openai.com/v1'}: cannot list its models "
                              f"to identify `{model}` ({describe(exc)})") from None
    finally:
        client.close()
    stable = [{k: entry[k] for k in STABLE_MODEL_FIELDS if entry.get(k) is not None} for entry in listed]
    chosen = [entry for entry in stable if entry.get("id") == model]
    return {"model": model, "served": chosen or sorted(stable, key=lambda e: str(e.get("id")))}
