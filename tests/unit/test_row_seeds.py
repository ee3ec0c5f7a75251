"""Sampling with a seed per request: a row's text depends on its prompt, its seed and the model, never on
which other requests share its batch or where it sits there (a stage split into shards must give the same
rows as one process)."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest

from tasks.engine import Engine, Finished
from tasks.llm.base import GenerationParams
from tasks.llm.transformers_backend import TransformersLLM

PROMPTS = ["Write a poem about the sea.", "Hi", "Explain how tides form, step by step, for a child of ten.",
           "Name three fruits.", "Translate 'good morning' into French, then into German.", "Why?"]
SEEDS = [11, 22, 33, 44, 55, 66]


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir):
    return TransformersLLM(tiny_model_dir, device="cpu", dtype="float32", batch_size=6)


def texts(llm: TransformersLLM, prompts, params, seeds, batch_size: int) -> list[str]:
    llm.batch_size = batch_size
    try:
        return [c.text for c in llm.generate(prompts, params, seeds=seeds)]
    finally:
        llm.batch_size = 6


@pytest.mark.parametrize("top_p", [0.9, 1.0])
def test_a_row_samples_the_same_text_in_any_batch(tiny_llm, top_p):
    # Few tokens: over a random model's flat 262K-token distribution a nucleus of 0.9 needs a full sort.
    params = GenerationParams(max_new_tokens=8, temperature=1.0, top_p=top_p, repetition_penalty=1.3)
    whole = texts(tiny_llm, PROMPTS, params, SEEDS, batch_size=6)
    assert texts(tiny_llm, PROMPTS, params, SEEDS, batch_size=2) == whole
    assert texts(tiny_llm, PROMPTS[::-1], params, SEEDS[::-1], batch_size=6)[::-1] == whole
    assert texts(tiny_llm, PROMPTS, params, SEEDS, batch_size=1) == whole
    # The seeds do matter (so the assertions above could fail).
    assert texts(tiny_llm, PROMPTS, params, [s + 1 for s in SEEDS], batch_size=6) != whole


def test_a_row_samples_what_do_sample_draws_from_the_same_generator(tiny_llm):
    """Alone in its batch, a row sampled with its seed gets the tokens `do_sample=True` draws after
    `torch.manual_seed(seed)` (the path without `seeds`): the same processed distribution, repetition
    penalty and nucleus included, and the same draw from it."""
    params = GenerationParams(max_new_tokens=8, temperature=0.8, top_p=0.9, repetition_penalty=1.3)
    for prompt, seed in zip(PROMPTS[:2], SEEDS):
        per_row = tiny_llm.generate([prompt], params, seeds=[seed])
        shared = tiny_llm.generate([prompt], dataclasses.replace(params, seed=seed))
        assert per_row == shared, prompt


def test_engine_items_get_the_same_texts_whatever_the_batch_size(tiny_llm):
    params = GenerationParams(max_new_tokens=10, temperature=1.0, top_p=0.95)
    prompts = PROMPTS + ["Tell me a joke about cats.", "List the planets of the solar system in order."]
    schema = pa.schema([("item", pa.string()), ("text", pa.string())])

    def run(batch_size: int) -> dict[str, str]:
        engine = Engine(tiny_llm, None, schema, max_open=len(prompts), batch_size=batch_size)

        async def item(i: int) -> Finished:
            completion = await engine.model.generate(prompts[i], dataclasses.replace(params, seed=1000 + i),
                                                     "test")
            return Finished(f"item-{i}", rows=[{"item": f"item-{i}", "text": completion.text}])

        async def stage(engine: Engine) -> None:
            for i in range(len(prompts)):
                await engine.spawn(f"item-{i}", lambda i=i: item(i))

        engine.run(stage)
        return {row["item"]: row["text"] for done in engine.finished_items for row in done.rows}

    eight = run(8)
    assert len(eight) == len(prompts)
    assert run(3) == eight
