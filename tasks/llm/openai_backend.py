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

The API key comes from a Prefect Secret block or the environment variable the config names, is handed to
the client and nowhere else: it is not logged, not part of the backend's name and not in any error message
this module writes.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import email.utils
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
from typing import Any

import aiohttp
import openai
from tqdm.auto import tqdm

from tasks.llm.base import Completion, GenerationParams, Mode, Prompt, chat_prompt, truncate_at_stop

log = logging.getLogger(__name__)

# OpenAI accepts at most four stop sequences; the rest are applied to the returned text.
MAX_SERVER_STOPS = 4
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}


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
                 failures_to_cool: int = 5, max_ttft_s: float | None = None, ttft_probe_every: int = 16):
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
        return await self._with_retries(prompt, params, self.limiter)

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams,
                 desc: str = "generate") -> list[Completion]:
        """All `prompts` at once (at most `max_concurrency` in flight), in prompt order. Prompt i is sent
        with seed `params.seed + i`: one stream per prompt, the same on a re-run."""
        if not prompts:
            return []
        return self.run_coroutine(self._generate_all(list(prompts), params, desc))

    async def _generate_all(self, prompts: list[Prompt], params: GenerationParams,
                            desc: str) -> list[Completion]:
        with tqdm(total=len(prompts), desc=desc, unit="request", leave=False) as bar:
            async def one(index: int, prompt: Prompt) -> Completion:
                seeded = params if params.seed is None else dataclasses.replace(params, seed=params.seed + index)
                completion = await self.agenerate(prompt, seeded)
                bar.update(1)
                return completion

            tasks = [asyncio.create_task(one(i, p)) for i, p in enumerate(prompts)]
            try:
                return list(await asyncio.gather(*tasks))
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

    async def _with_retries(self, prompt: Prompt, params: GenerationParams, limiter: RateLimiter) -> Completion:
        attempt = 0
        while True:
            self.spend.check()  # a spent budget sends nothing more
            estimate = estimate_tokens(prompt, params.max_new_tokens)
            endpoint = await self.pool.acquire()
            sent_at = endpoint.clock()
            probe = self.max_ttft_s is not None and endpoint.probe_due(self.ttft_probe_every)
            try:
                grant = await limiter.acquire(estimate)  # retries count too
                completion, ttft = await self._request(endpoint, prompt, params, stream=probe)
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
                              completion.completion_tokens, retries=attempt)

    def _body(self, prompt: Prompt, params: GenerationParams) -> dict[str, Any]:
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
        return body

    async def _request(self, endpoint: Endpoint, prompt: Prompt, params: GenerationParams,
                       stream: bool = False) -> tuple[Completion, float | None]:
        """One request; with `stream`, sent streaming to measure its time to first token (else None)."""
        url = f"{endpoint.base}/{'chat/completions' if self.mode == 'chat' else 'completions'}"
        body = self._body(prompt, params)
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
        text, hit_stop = truncate_at_stop(text, params.stop)
        finish = "length" if reason == "length" and not hit_stop else "stop"
        return Completion(text=text, finish_reason=finish, prompt_tokens=int(usage.get("prompt_tokens") or 0),
                          completion_tokens=int(usage.get("completion_tokens") or 0)), ttft


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
