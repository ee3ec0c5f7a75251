"""The openai backend's retry decisions, on the exception types the openai client raises."""

import random

import httpx
import openai
import pytest

from tasks.llm.openai_backend import backoff_s, is_retryable, retry_after_s


def status_error(status, headers=None):
    request = httpx.Request("POST", "http://127.0.0.1/v1/completions")
    response = httpx.Response(status, headers=headers or {}, request=request)
    cls = {429: openai.RateLimitError, 400: openai.BadRequestError, 401: openai.AuthenticationError,
           404: openai.NotFoundError}.get(status, openai.InternalServerError if status >= 500 else openai.APIStatusError)
    return cls(f"HTTP {status}", response=response, body=None)


@pytest.mark.parametrize("status,retry", [(429, True), (500, True), (502, True), (503, True), (408, True),
                                          (400, False), (401, False), (404, False)])
def test_which_statuses_are_retried(status, retry):
    assert is_retryable(status_error(status)) is retry


def test_connection_errors_and_timeouts_are_retried():
    request = httpx.Request("POST", "http://127.0.0.1/v1/completions")
    assert is_retryable(openai.APIConnectionError(request=request))
    assert is_retryable(openai.APITimeoutError(request=request))


def test_retry_after_forms():
    assert retry_after_s(status_error(429, {"retry-after": "7"})) == 7.0
    assert retry_after_s(status_error(429, {"retry-after-ms": "250"})) == 0.25
    assert retry_after_s(status_error(429, {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0  # past
    assert retry_after_s(status_error(429, {"retry-after": "soon"})) is None
    assert retry_after_s(status_error(429)) is None


def test_backoff_is_full_jitter_and_capped():
    rng = random.Random(0)
    waits = [backoff_s(attempt, 0.5, 30.0, rng) for attempt in range(12) for _ in range(50)]
    assert min(waits) >= 0.0 and max(waits) <= 30.0
    assert max(backoff_s(0, 0.5, 30.0, rng) for _ in range(100)) <= 0.5
