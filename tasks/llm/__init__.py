"""LLM access: one protocol (`LLM.generate`) and its backends."""

from tasks.llm.base import LLM, Completion, GenerationParams, Usage
from tasks.llm.factory import get_llm

__all__ = ["LLM", "Completion", "GenerationParams", "Usage", "get_llm"]
