"""Build the backend a run's `llm` section names; one instance per process and setting."""

from __future__ import annotations

import functools

from tasks.config import LLMConfig
from tasks.llm.base import LLM


@functools.lru_cache(maxsize=None)
def _endpoint_state(cfg: LLMConfig):
    """The run's rate limiter and spend for an endpoint, one per process and setting: a backend rebuilt
    after the cache below let it go (the evaluate stage loads two local models) keeps both."""
    from tasks.llm.openai_backend import RateLimiter, Spend

    return (RateLimiter(cfg.requests_per_minute, cfg.tokens_per_minute),
            Spend(cfg.max_tokens, cfg.max_cost_usd, cfg.prompt_price_per_1m or 0.0, cfg.completion_price_per_1m or 0.0))


@functools.lru_cache(maxsize=2)
def _cached(cfg: LLMConfig) -> LLM:
    if cfg.backend == "openai":
        from tasks.llm.openai_backend import OpenAILLM, api_key

        limiter, spend = _endpoint_state(cfg)
        return OpenAILLM(cfg.model, base_url=cfg.base_url, mode=cfg.mode,
                         api_key=api_key(cfg.api_key_env, cfg.api_key_secret), max_concurrency=cfg.max_concurrency,
                         timeout_s=cfg.request_timeout_s, max_retries=cfg.max_retries, limiter=limiter, spend=spend,
                         base_urls=cfg.base_urls, adaptive_concurrency=cfg.adaptive_concurrency,
                         cooldown_s=cfg.endpoint_cooldown_s, failures_to_cool=cfg.endpoint_failures_to_cool,
                         max_ttft_s=cfg.max_ttft_s, ttft_probe_every=cfg.ttft_probe_every)
    from tasks.llm.models import resolve_model
    from tasks.llm.transformers_backend import TransformersLLM

    return TransformersLLM(resolve_model(cfg.model), device=cfg.device, dtype=cfg.dtype, mode=cfg.mode,
                           batch_size=cfg.batch_size, max_prompt_tokens=cfg.max_prompt_tokens)


def get_llm(cfg: LLMConfig) -> LLM:
    return _cached(cfg)


def model_identity(cfg: LLMConfig) -> dict:
    """What decides the text this backend produces, for artifact keys: the section's result-deciding
    settings with the model named by its content. A local model is its files' fingerprint (not its path);
    an endpoint's model is its name plus what the server reports about it, asked on every call, since a
    server can be restarted with other weights (the endpoint's address is not part of it: the same model
    moved to another host keeps its artifacts)."""
    identity = cfg.identity()
    if cfg.backend == "openai":
        from tasks.llm.openai_backend import api_key, served_model

        identity.pop("base_url", None)
        key = api_key(cfg.api_key_env, cfg.api_key_secret)
        served = {url: served_model(url, key, cfg.model, timeout_s=min(cfg.request_timeout_s, 30.0))
                  for url in cfg.base_urls or [cfg.base_url]}
        first_url, first = next(iter(served.items()))
        for url, other in served.items():  # a fleet must serve one model, or the rows would mix two
            if other != first:
                raise ValueError(f"llm.base_urls: {url} serves {other['served']}, but {first_url} serves "
                                 f"{first['served']}; every endpoint must serve the same model")
        identity["model"] = first
    else:
        from tasks.llm.models import fingerprint

        identity["model"] = fingerprint(cfg.model)
    return identity


class DeferredLLM:
    """An in-process model (llm.backend: transformers) loaded on its first call, not before.

    A sharded stage's own process assembles what its shards finished; when they finished everything, it
    never asks the model anything and so never loads it. What the work engine reads without calling
    (`mode`, `batch_size`, having log-probabilities) comes from the section."""

    def __init__(self, cfg: LLMConfig):
        if cfg.backend != "transformers":
            raise ValueError(f"DeferredLLM is for in-process models; this section's backend is {cfg.backend}")
        self.cfg = cfg
        self.mode = cfg.mode
        self.batch_size = cfg.batch_size

    def generate(self, *args, **kwargs):
        return get_llm(self.cfg).generate(*args, **kwargs)

    def next_token_logprobs(self, *args, **kwargs):
        return get_llm(self.cfg).next_token_logprobs(*args, **kwargs)

    def truncations(self, *args, **kwargs):
        return get_llm(self.cfg).truncations(*args, **kwargs)

    def response_losses(self, *args, **kwargs):
        return get_llm(self.cfg).response_losses(*args, **kwargs)
