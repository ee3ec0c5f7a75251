"""Build the backend a run's `llm` section names; one instance per process and setting."""

from __future__ import annotations

import functools

from tasks.config import LLMConfig
from tasks.llm.base import LLM


@functools.lru_cache(maxsize=2)
def _cached(cfg: LLMConfig) -> LLM:
    from tasks.llm.models import resolve_model
    from tasks.llm.transformers_backend import TransformersLLM

    return TransformersLLM(resolve_model(cfg.model), device=cfg.device, dtype=cfg.dtype,
                           batch_size=cfg.batch_size, max_prompt_tokens=cfg.max_prompt_tokens)


def get_llm(cfg: LLMConfig) -> LLM:
    return _cached(cfg)
