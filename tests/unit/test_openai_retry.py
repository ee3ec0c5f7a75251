"""The openai backend's retry decisions, on the errors its requests raise."""

import random

import pytest

from tasks.llm.openai_backend import (EndpointConnectionError, EndpointStatusError, backoff_s, describe,
                                      is_retryable, retry_after_s)


def status_error(status, headers=None):
    return EndpointStatusError(status, f"HTTP {status}", headers)


@pytest.mark.parametrize("status,retry", [(429, True), (500, True), (502, True), (503, True), (408, True),
                                          (400, False), (401, False), (404, False)])
def test_which_statuses_are_retried(status, retry):
    assert is_retryable(status_error(status)) is retry


def test_connection_errors_and_timeouts_are_retried():
    assert is_retryable(EndpointConnectionError("ServerDisconnectedError: Server disconnected"))
    assert is_retryable(EndpointConnectionError("no answer within 120 s", timeout=True))


def test_errors_are_described_with_the_openai_api_names():
    assert describe(status_error(429)) == "RateLimitError (HTTP 429): HTTP 429"
    assert describe(status_error(401)) == "AuthenticationError (HTTP 401): HTTP 401"
    assert describe(status_error(502)) == "InternalServerError (HTTP 502): HTTP 502"
    assert describe(EndpointConnectionError("no answer within 5 s", timeout=True)) == (
        "APITimeoutError: no answer within 5 s")


def test_retry_after_forms():
    assert retry_after_s(status_error(429, {"Retry-After": "7"})) == 7.0
    assert retry_after_s(status_error(429, {"retry-after-ms": "250"})) == 0.25
    assert retry_after_s(status_error(429, {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0  # past
    assert retry_after_s(status_error(429, {"retry-after": "soon"})) is None
    assert retry_after_s(status_error(429)) is None


def test_backoff_is_full_jitter_and_capped():
    # One draw u of a generator seeded with 0 (0.8444...) scales the bound 0.5 * 2**attempt, capped at 30.
    u = random.Random(0).random()
    for attempt, bound in [(0, 0.5), (1, 1.0), (3, 4.0), (5, 16.0), (6, 30.0), (11, 30.0)]:
        assert backoff_s(attempt, 0.5, 30.0, random.Random(0)) == pytest.approx(u * bound), attempt
    # Full jitter: the waits spread over the whole of [0, bound], not bunched at the bound.
    rng = random.Random(1)
    waits = [backoff_s(11, 0.5, 30.0, rng) for _ in range(200)]
    assert min(waits) < 1.0 and 29.0 < max(waits) <= 30.0


class VirtualTime:
    """A clock that only moves when someone sleeps: rate limits checked exactly and instantly."""

    def __init__(self):
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def _grants(limiter, sizes, concurrency=4):
    import asyncio

    async def main():
        gate = asyncio.Semaphore(concurrency)
        starts = []

        async def one(tokens):
            async with gate:
                grant = await limiter.acquire(tokens)
                starts.append((limiter.clock(), tokens))
                limiter.settle(grant, tokens // 2)  # the server reported half the estimate

        await asyncio.gather(*(one(t) for t in sizes))
        return starts

    return asyncio.run(main())


def test_rate_limiter_keeps_every_minute_within_requests_and_tokens():
    from tasks.llm.openai_backend import RateLimiter

    t = VirtualTime()
    limiter = RateLimiter(rpm=5, tpm=1000, clock=t.clock, sleep=t.sleep)
    starts = _grants(limiter, [300] * 12)
    assert len(starts) == 12
    for s, _ in starts:  # any sliding minute: at most 5 requests and 1000 settled tokens
        window = [tokens // 2 for start, tokens in starts if s <= start < s + 60]
        assert len(window) <= 5 and sum(window) <= 1000
    # 12 requests at 5 per minute need three minutes' worth of windows: starts at 0, 60 and 120.
    assert sorted({start for start, _ in starts}) == [0.0, 60.0, 120.0] and limiter.waited_s > 0
    # The running total of the window is the settled tokens of the grants still in it.
    assert limiter.used == sum(g[1] for g in limiter.grants) == 2 * 150


def test_rate_limiter_tokens_bound_and_an_oversized_request_still_runs():
    from tasks.llm.openai_backend import RateLimiter

    t = VirtualTime()
    limiter = RateLimiter(rpm=None, tpm=100, clock=t.clock, sleep=t.sleep)
    starts = _grants(limiter, [250, 60, 60], concurrency=1)  # 250 alone exceeds tpm: it runs in an empty window
    assert starts == [(0.0, 250), (60.0, 60), (60.0, 60)]  # settled at 125, 30, 30
    unlimited = RateLimiter(None, None, clock=t.clock, sleep=t.sleep)
    assert len(_grants(unlimited, [10**6] * 50)) == 50 and unlimited.waited_s == 0


def test_limits_and_spend_hold_across_generate_calls_and_rebuilt_backends():
    from tasks.config import LLMConfig
    from tasks.llm.base import GenerationParams
    from tasks.llm.factory import _cached, get_llm
    from tasks.llm.openai_backend import BudgetExhausted

    cfg = LLMConfig(backend="openai", model="m", base_url="http://127.0.0.1:9/v1", requests_per_minute=3,
                    max_tokens=1000)
    first = get_llm(cfg)
    first.spend.add(600, 500)
    _cached.cache_clear()  # the backend cache let it go (another model was loaded)
    again = get_llm(cfg)
    assert again is not first and again.limiter is first.limiter and again.spend is first.spend
    with pytest.raises(BudgetExhausted, match=r"llm.max_tokens \(1000\) spent: 1100 tokens over 1 requests"):
        again.generate(["hello"], GenerationParams())  # refused before any connection is tried
