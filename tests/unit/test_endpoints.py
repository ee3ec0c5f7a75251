"""The openai backend and the work engine against the simulated endpoint (tests/simulated_endpoint.py): the
simulated server itself, streaming stages that give the same rows at any concurrency, routing over two
endpoints with one failing, adaptive concurrency on 429, and a fleet that fails everything."""

import json
import statistics
import time
import urllib.request

import pandas as pd
import pytest

from tasks.config import EvolInstructConfig, SelfInstructConfig
from tasks.evol_instruct import evolve
from tasks.llm.base import GenerationParams
from tasks.llm.openai_backend import LLMRequestError, OpenAILLM
from tasks.self_instruct import generate_tasks
from tests.faults import FaultProxy
from tests.simulated_endpoint import Profile, SimulatedEndpoint, answer, kind_of
from tests.unit.test_self_instruct import seeds_table

FAST = dict(ttft_s=0.01, tokens_per_s=5000.0)


def backend(url, **kwargs) -> OpenAILLM:
    kwargs.setdefault("max_concurrency", 16)
    return OpenAILLM("simulated", base_url=url if isinstance(url, str) else None,
                     base_urls=url if isinstance(url, list) else (), backoff_base_s=0.01, backoff_max_s=0.05,
                     **kwargs)


def test_the_simulated_endpoint_answers_each_stage_prompt_in_kind_and_deterministically():
    from tasks.evol_instruct import DEFAULT_TEMPLATES, equality_prompt, evol_prompt
    from tasks.judge import judge_prompt
    from tasks.prompts import alpaca_prompt
    from tasks.self_instruct import classification_prompt, instance_prompt, instruction_prompt

    shots = [{"instruction": "Name a color.", "instances": [{"input": "", "output": "Red."}]}]
    prompts = {"instructions": instruction_prompt(["Name a color.", "Add two numbers."]),
               "classification": classification_prompt("Is this spam?", [("Name a color.", False)]),
               "instances_label_first": instance_prompt("Is this spam?", shots, output_first=True),
               "instances_input_first": instance_prompt("Add 2 and 3.", shots, output_first=False),
               "rewrite": evol_prompt(DEFAULT_TEMPLATES["deepen"], "Why is the sky blue?"),
               "equality": equality_prompt("Why is the sky blue?", "Why is the sky blue at noon?"),
               "judge": judge_prompt("Add 2 and 3.", "", "5", "completions"),
               "response": alpaca_prompt("Why is the sky blue?")}
    profile = Profile()
    for kind, prompt in prompts.items():
        assert kind_of(prompt) == kind
        body = {"prompt": prompt, "seed": 3, "max_tokens": 400}
        assert answer(body, profile) == answer(dict(body), profile)  # same request, same answer
        assert answer({**body, "seed": 4}, profile)[0] != answer(body, profile)[0] or kind in (
            "classification", "equality")
    text, finish, _, tokens, _ = answer({"prompt": prompts["response"], "max_tokens": 5}, profile)
    assert finish == "length" and tokens == 5 and len(text.split()) == 5  # cut at the budget


def test_the_simulated_endpoint_holds_requests_for_the_modelled_time_and_counts_its_slots():
    with SimulatedEndpoint(slots=2, ttft_s=0.2, tokens_per_s=100.0) as ep:
        llm = backend(ep.base_url, max_concurrency=4)
        t0 = time.perf_counter()
        out = llm.generate(["Below is an instruction. Why is the sky blue?\n\n### Response:\n"] * 4,
                           GenerationParams(max_new_tokens=10, seed=0))
        wall = time.perf_counter() - t0
        stats = json.loads(urllib.request.urlopen(ep.base_url.replace("/v1", "/stats")).read())
        llm.close()
    assert all(c.completion_tokens == 10 and c.finish_reason == "length" for c in out)
    # Each request holds a slot for 0.2 s + 10 tokens / 100 per s = 0.3 s; two slots, four requests: two waves.
    assert stats["requests"] == 4 and stats["completion_tokens"] == 40 and stats["max_waiting"] == 2
    assert 4 * 0.3 <= stats["busy_slot_s"] < 4 * 0.3 + 0.2 and wall >= 0.6
    assert 0.8 < stats["utilisation"] <= 1.0 and stats["ideal_s"] == pytest.approx(stats["busy_slot_s"] / 2, abs=1e-3)


def test_streaming_stages_give_the_same_evolutions_at_any_concurrency_and_self_instruct_completes():
    with SimulatedEndpoint(slots=64, **FAST) as ep:
        llm = backend(ep.base_url, max_concurrency=32)
        cfg = SelfInstructConfig(num_instructions=12, max_requests=20, requests_per_batch=4, instances_per_task=2)
        generated, si_stats = generate_tasks(seeds_table(), cfg, llm, seed=5)
        assert si_stats["kept"] == 12 == generated["task_id"].nunique() and si_stats["requests"] <= 20
        # Every answered request is counted (the server also serves a request cancelled in flight when the
        # target is reached; its answer never arrives, so it is not).
        assert 0 < si_stats["llm_calls"] <= ep.stats()["requests"] <= si_stats["llm_calls"] + 2 * 32
        # Every instruction parsed is kept or dropped for one reason, tasks cancelled at the target included.
        assert si_stats["generated"] == si_stats["kept"] + sum(
            n for reason, n in si_stats["dropped"].items() if not reason.startswith("instance_"))
        llm.close()
        rows = {}
        for concurrency in (1, 32):
            llm = backend(ep.base_url, max_concurrency=concurrency)
            evol_cfg = EvolInstructConfig(rounds=2, max_per_round=None, checkpoint_every=4)
            rows[concurrency], stats = evolve(generated, evol_cfg, llm, seed=5)
            assert stats["attempted"] == 2 * len(generated) and stats["kept"] > 0
            llm.close()
        # An evolution chain's draws and requests depend on its row alone: the same rows however many are open.
        pd.testing.assert_frame_equal(rows[1], rows[32])


def test_requests_go_to_the_least_loaded_endpoint_and_a_failing_one_is_set_aside():
    with SimulatedEndpoint(slots=8, **FAST) as good, SimulatedEndpoint(slots=8, **FAST) as broken_upstream, \
            FaultProxy(broken_upstream.port) as broken:
        broken.fail_all.set()  # every request to this one: 500
        llm = backend([good.base_url, broken.base_url], max_concurrency=8, failures_to_cool=3, cooldown_s=60)
        out = llm.generate(["Below is an instruction.\n\n### Response:\n"] * 40, GenerationParams(max_new_tokens=8))
        served_good = good.stats()["requests"]
        sent_broken = broken.counts["error_500"]
        cooling = [e.cooldowns for e in llm.pool.endpoints]
        llm.close()
    assert len(out) == 40 and served_good == 40  # every request answered, by the healthy one
    # Set aside after 3 failures in a row: it got those 3, and at most 8 more were in flight there by then.
    assert 3 <= sent_broken <= 3 + 8 and cooling == [0, 1]


def test_adaptive_concurrency_halves_on_429_and_grows_back():
    # Four slots and no queue: a fifth request in flight is refused with 429.
    with SimulatedEndpoint(slots=4, max_queue=0, ttft_s=0.05, tokens_per_s=400.0) as ep:
        llm = backend(ep.base_url, max_concurrency=16, max_retries=20)
        out = llm.generate(["Below is an instruction.\n\n### Response:\n"] * 120, GenerationParams(max_new_tokens=8))
        stats = ep.stats()
        endpoint = llm.pool.endpoints[0]
        llm.close()
    assert len(out) == 120 and stats["requests"] == 120
    assert stats["rejected"] > 0 and endpoint.decreases >= 2  # 16 -> 8 -> 4 (one halving per round trip)
    assert stats["rejected"] < 60  # it backed off: far fewer refusals than requests
    assert endpoint.limit > 4  # and grew back by 1/limit per success since


@pytest.mark.parametrize("fault", ["error_500", "error_429"])
def test_a_fleet_that_fails_everything_stops_with_one_line_naming_each_endpoint(fault):
    # Every endpoint answers 500 (set aside in turn), or 429 (its limit halved down to 1): either way the
    # retries run out and the call stops with one line, never waiting for ever.
    rates = {fault: 1.0}
    with SimulatedEndpoint(**FAST) as a, SimulatedEndpoint(**FAST) as b, \
            FaultProxy(a.port, rates, retry_after_s=0) as pa, FaultProxy(b.port, rates, retry_after_s=0) as pb:
        llm = backend([pa.base_url, pb.base_url], max_retries=3, failures_to_cool=2, cooldown_s=0.05)
        t0 = time.perf_counter()
        with pytest.raises(LLMRequestError) as err:
            llm.generate(["Below is an instruction.\n\n### Response:\n"] * 6, GenerationParams(max_new_tokens=8))
        took = time.perf_counter() - t0
        llm.close()
    message = str(err.value)
    kind = {"error_500": "InternalServerError (HTTP 500)", "error_429": "RateLimitError (HTTP 429)"}[fault]
    assert f"still failing after 3 retries: {kind}" in message and "\n" not in message and took < 30
    assert pa.base_url in message and pb.base_url in message


def test_a_growing_time_to_first_token_halves_in_flight_before_any_429():
    # Four slots and an unbounded queue: a client with 32 in flight is never refused, but its requests wait
    # in the server's queue and their time to first token grows. Probes (one request in 4, streamed) see it.
    prompts = [f"Below is an instruction. Task {i}.\n\n### Response:\n" for i in range(160)]
    params = GenerationParams(max_new_tokens=8, seed=3)
    runs = {}
    for bound in (None, 0.3):
        with SimulatedEndpoint(slots=4, ttft_s=0.05, tokens_per_s=400.0) as ep:
            llm = backend(ep.base_url, max_concurrency=32, max_ttft_s=bound, ttft_probe_every=4)
            runs[bound] = [c.text for c in llm.generate(prompts, params)], ep.stats(), llm.pool.endpoints[0]
            llm.close()
    (plain, plain_stats, plain_ep), (probed, probed_stats, probed_ep) = runs[None], runs[0.3]
    assert probed == plain  # a streamed probe assembles the same answer as a plain request
    assert plain_stats["rejected"] == probed_stats["rejected"] == 0
    assert plain_ep.decreases == 0 and not plain_ep.ttft_s and plain_stats["max_waiting"] >= 24
    assert len(probed_ep.ttft_s) >= 160 // 4 - 1 and max(probed_ep.ttft_s) > 0.3  # measured, and over the bound
    # 32 -> 16 -> 8 (once per round trip), then regrown by 1/limit per success towards where the probes stay
    # under the bound: about 17 in flight (13 waiting x 0.07 s / 4 slots + 0.05 s = 0.28 s), not 32.
    assert probed_ep.decreases >= 2 and probed_ep.limit < 24
    # So the late probes wait about the bound, where 32 in flight would make it about 0.5 s.
    assert statistics.median(list(probed_ep.ttft_s)[-10:]) < 0.45


def test_a_backend_let_go_without_close_closes_its_connections_and_stops_its_thread():
    import gc
    import threading

    with SimulatedEndpoint(**FAST) as ep:
        llm = backend(ep.base_url)
        assert len(llm.generate(["Below is an instruction.\n\n### Response:\n"] * 4,
                                GenerationParams(max_new_tokens=4))) == 4
        session, name = llm.pool.endpoints[0].client, f"llm-loop {llm.name}"
        assert not session.closed and [t for t in threading.enumerate() if t.name == name]
        del llm  # as the factory's cache does when it drops a backend
        gc.collect()
        deadline = time.monotonic() + 10
        while [t for t in threading.enumerate() if t.name == name] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert session.closed and not [t for t in threading.enumerate() if t.name == name]


def test_the_quality_judge_streams_every_row_through_the_endpoint_and_resumes_from_its_parts(tmp_path):
    from tasks.artifacts import PartWriter
    from tasks.config import QualityConfig
    from tasks.quality import run_quality

    df = pd.DataFrame({"id": [f"r{i}" for i in range(40)], "instruction": [f"Describe item {i}." for i in range(40)],
                       "input": [""] * 40, "output": [f"Item {i} is a small round thing." for i in range(40)],
                       "origin": ["seed"] * 40, "category": ["qa"] * 40})
    cfg = QualityConfig.model_validate({"min_total": 0.0, "checkpoint_every": 8, "judge": {"enabled": True},
                                        "dedup": {"enabled": False}})
    with SimulatedEndpoint(slots=16, **FAST) as ep:
        llm = backend(ep.base_url, max_concurrency=16, mode="chat")
        out, stats = run_quality(df, cfg, judge_llm=llm, parts=PartWriter(tmp_path / "parts"))
        served = ep.stats()["requests"]
        judge_parts = PartWriter(tmp_path / "parts" / "judge")
        for part in judge_parts.existing()[2:]:  # a crash after the second part
            part.unlink()
        again, again_stats = run_quality(df, cfg, judge_llm=llm, parts=PartWriter(tmp_path / "parts"))
        served_again = ep.stats()["requests"] - served
        llm.close()
    assert served == 40 == stats["usage"]["llm_calls"] and stats["judge_checkpoints"] == 5
    assert out["score_judge"].between(3, 9).all() and out["judge_error"].isna().all()  # the simulated judge's range
    assert served_again == 40 - 16  # only the rows the two kept parts did not hold
    pd.testing.assert_frame_equal(again, out)
    assert again_stats["usage"]["llm_calls"] == 40
