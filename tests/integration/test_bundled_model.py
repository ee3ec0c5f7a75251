"""The real bundled Gemma 3 270M: conversion from GGUF, generation, log-probs, and the LLM stages on it."""

import json

import pandas as pd
import pytest

from tasks.config import EvolInstructConfig, LLMConfig, SeedsConfig, SelfChatConfig, SelfInstructConfig
from tasks.evol_instruct import evolve
from tasks.llm import GenerationParams, get_llm
from tasks.llm.models import bundled_model_dir
from tasks.seeds import load_seeds
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm():
    return get_llm(LLMConfig(batch_size=4))


def test_conversion_is_cached_and_plain_safetensors():
    path = bundled_model_dir()
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "gemma3_text"
    assert (path / "model.safetensors").is_file() and (path / "_COMPLETE").is_file()
    assert bundled_model_dir() == path


def test_generate_and_logprobs(llm):
    prompts = ["Monday, Tuesday, Wednesday,", "1, 2, 3, 4,"]
    out = llm.generate(prompts, GenerationParams(max_new_tokens=6, temperature=0.0))
    assert len(out) == 2 and out[0].text.strip().startswith("Thursday") and out[1].text.strip().startswith("5")
    assert all(c.completion_tokens <= 6 and c.prompt_tokens > 3 for c in out)
    lp = llm.next_token_logprobs(["The capital of France is"], [" Paris", " banana"])
    assert lp.shape == (1, 2) and lp[0, 0] > lp[0, 1]


def test_self_instruct_and_evol_on_real_model(llm):
    from tasks.self_instruct import generate_tasks

    seeds, _ = load_seeds(SeedsConfig(), base_dir=ROOT)
    cfg = SelfInstructConfig(num_instructions=2, max_requests=2, requests_per_batch=2, max_new_tokens=48,
                             temperature=1.0, top_p=0.9, instances_per_task=2, instance_max_new_tokens=64)
    generated, stats = generate_tasks(seeds, cfg, llm, seed=0)
    assert stats["requests"] == 2 and stats["classification_method"].startswith("log-odds")
    instruction_drops = sum(n for reason, n in stats["dropped"].items() if not reason.startswith("instance_"))
    assert stats["generated"] == stats["kept"] + instruction_drops
    assert stats["kept"] == generated["task_id"].nunique() and stats["kept_instances"] == len(generated)
    rows = pd.DataFrame([{"id": "a#0", "task_id": "a", "instruction": "Describe the water cycle.", "input": "",
                          "output": "x", "category": "qa", "is_classification": False, "origin": "seed"}])
    out, estats = evolve(rows, EvolInstructConfig(rounds=2, max_new_tokens=48, response_max_new_tokens=48), llm, 0)
    assert estats["attempted"] == 2 and len(out) == 1 + estats["kept"]  # kept, or its parent retried
    assert estats["attempted"] == estats["kept"] + sum(estats["dropped"].values())


def test_self_chat_on_real_model(llm):
    """Two rows to two turns on the real base model (completion prompts, per-request seeds): each row comes
    back a well-formed conversation that opens with its own exchange, or as it was with the drops counted."""
    from tasks.conversation import check
    from tasks.self_chat import extend

    rows = pd.DataFrame({"id": ["a#0", "b#0"], "task_id": ["a", "b"], "origin": ["seed", "seed"],
                         "instruction": ["Name three animals that live in the ocean.", "Explain why the sky is blue."],
                         "input": ["", ""], "output": ["Dolphins, sharks and octopuses.",
                                                       "Air scatters blue sunlight more than red sunlight."]})
    cfg = SelfChatConfig(enabled=True, turns=2, max_rows=None, max_new_tokens=48, user_max_new_tokens=32)
    out, stats = extend(rows, cfg, llm, seed=0)
    assert stats["drawn"] == 2 and stats["prompt_style"] == "completion" and stats["llm_calls"] >= 2
    assert stats["extended"] == out["messages"].notna().sum() == stats["complete"]
    assert stats["drawn"] - stats["extended"] == sum(stats["stopped"].values())
    assert sum(stats["dropped"].values()) >= sum(stats["stopped"].values())
    for row in out.itertuples():
        if row.messages is None:
            continue
        assert check(row.messages, row.id) == row.messages and len(row.messages) == 4
        assert row.messages[:2] == [{"role": "user", "content": row.instruction},
                                    {"role": "assistant", "content": row.output}]
        assert "User:" not in row.messages[2]["content"] and "Assistant:" not in row.messages[3]["content"]
    assert out.drop(columns="messages").equals(rows)


def test_evol_instruct_on_real_model_all_operations(llm):
    """Every operation, two rounds, the equality judge calibrated on the real model's log-probabilities."""
    seeds, _ = load_seeds(SeedsConfig(limit=12), base_dir=ROOT)
    from tasks.self_instruct import seed_examples

    rows = seed_examples(seeds).drop_duplicates("task_id")
    cfg = EvolInstructConfig(rounds=2, max_per_round=12, max_new_tokens=64, response_max_new_tokens=64,
                             temperature=0.7)
    out, stats = evolve(rows, cfg, llm, seed=0)
    assert "balanced accuracy" in stats["equality_method"]  # the judge was scored on known pairs
    assert stats["rounds"]["1"]["attempts"] == 12 and stats["attempted"] == stats["kept"] + sum(stats["dropped"].values())
    assert stats["kept"] >= 1 and set(stats["operations"]) == set(EvolInstructConfig().operations)
    evolved = out[out["origin"] == "evol"]
    assert set(evolved["root_id"]) <= set(rows["id"]) and evolved["output"].str.strip().astype(bool).all()


def test_quality_scorers_on_real_model(llm):
    """Judge, DEITA and IFD on the real model: DEITA's expectation over the real log-probabilities (the
    complexity prompt sees the query only), IFD the ratio of its two losses and separating a matched answer
    from a mismatched one, and a rating read from every judge answer of the few-shot prompt."""
    import numpy as np

    from tasks.config import QualityConfig
    from tasks.judge import parse_rating
    from tasks.quality import run_quality

    rows = pd.DataFrame({
        "id": ["a", "b", "c", "d"], "origin": "seed",
        "instruction": ["Translate into French: Thank you very much.", "List the first five prime numbers.",
                        "Translate into French: Thank you very much.", "Name the capital of Japan."],
        "input": ["", "", "", ""],
        "output": ["Merci beaucoup.", "2, 3, 5, 7, 11", "The mitochondria is the powerhouse of the cell.", "Tokyo."]})
    cfg = QualityConfig.model_validate({"min_total": 0.0, "judge": {"enabled": True}, "deita": {"enabled": True},
                                        "ifd": {"enabled": True, "max_ifd": None}})
    out, stats = run_quality(rows, cfg, judge_llm=llm, scorer=llm)
    # Rows a and c share their instruction: one complexity, two response qualities.
    assert out.loc[0, "score_deita_complexity"] == out.loc[2, "score_deita_complexity"]
    assert out.loc[0, "score_deita_quality"] != out.loc[2, "score_deita_quality"]
    # Row a's expected scores by hand: sum i * p(i) / sum p(i) over the score tokens after DEITA's prompts.
    query = "Translate into French: Thank you very much."
    lp = llm.next_token_logprobs([
        "You are a helpful assistant. Please identify the complexity score of the following user query. \n"
        f"##Query: {query}\n##Complexity: ",
        "You are a helpful assistant. Please identify the quality score of the Response corresponding to the "
        f"Question. \n#Question#:\n{query}\n#Response#:\nMerci beaucoup. \n##Quality: "], list("123456"))
    p = np.exp(lp)
    by_hand = (p * np.arange(1, 7)).sum(axis=1) / p.sum(axis=1)
    assert [out.loc[0, "score_deita_complexity"], out.loc[0, "score_deita_quality"]] == pytest.approx(by_hand,
                                                                                                       rel=1e-4)
    assert out["score_deita"].tolist() == pytest.approx(
        (out["score_deita_complexity"] * out["score_deita_quality"]).tolist(), rel=1e-12)
    assert out["score_ifd"].tolist() == pytest.approx(
        (out["ifd_loss_conditioned"] / out["ifd_loss_direct"]).tolist(), rel=1e-12)
    # The instruction helps predict its own translation far more than an unrelated sentence.
    assert out.loc[0, "score_ifd"] < out.loc[2, "score_ifd"]
    # The few-shot prompt gets a readable rating out of the real model for every row, and that is the score.
    assert out["judge_error"].isna().all() and stats["judge_errors"] == {}
    assert out["score_judge"].tolist() == [parse_rating(a)[0] for a in out["judge_answer"]]
    assert stats["usage"]["llm_calls"] == 4
