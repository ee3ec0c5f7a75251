import re

import pyarrow as pa
import pytest

from tasks.artifacts import PartWriter
from tasks.config import SelfInstructConfig
from tasks.self_instruct import (
    classification_prompt, generate_tasks, instance_drop_reason, instance_prompt, instruction_drop_reason,
    instruction_prompt, parse_instance, parse_yes_no, seed_examples)
from tasks.seeds import SCHEMA
from tests.conftest import ScriptedLLM

CFG = SelfInstructConfig()


def seeds_table(n=10, n_cls=2):
    rows = []
    for i in range(n):
        cls = i < n_cls
        rows.append({"id": f"s{i}", "name": f"s{i}", "instruction": f"Seed task number {i} about topic {i}.",
                     "instances": [{"input": f"in {i}" if i % 2 else "", "output": "Yes" if cls else f"out {i}"}],
                     "is_classification": cls, "category": "classification" if cls else f"cat{i % 3}"})
    return pa.Table.from_pylist(rows, schema=SCHEMA)


@pytest.mark.parametrize("text,reason", [
    ("Hi there", "too_short"),
    (" ".join(["word"] * 151), "too_long"),
    ("Draw a picture of a cat.", "blocklisted_keyword"),
    ("Describe the images below in detail.", "blocklisted_keyword"),
    ("Tell me how to go to the station.", "blocklisted_keyword"),
    ("Write a program that sorts numbers.", "program_request"),
    ("- List three fruits please.", "starts_with_punctuation"),
    ("Éxplain the rules of chess.", "starts_non_ascii"),
    ("Explain how mapping software routes cars.", None),  # `map` only as a whole word
    ("Summarize the paragraph in one sentence.", None),
])
def test_instruction_filters(text, reason):
    assert instruction_drop_reason(text, CFG) == reason


@pytest.mark.parametrize("inp,out,reason", [
    ("x", "", "empty_output"), ("same", "same", "input_equals_output"), ("", "Here are the steps:", "output_ends_with_colon"),
    ("", "Paris.", None),
])
def test_instance_filters(inp, out, reason):
    assert instance_drop_reason(inp, out) == reason


def test_instruction_prompt_is_numbered_and_open():
    prompt = instruction_prompt(["First task:", "Second   task\nwith newline"])
    assert prompt == "Come up with a series of tasks:\n1. First task\n2. Second task with newline\n3."


def test_instance_prompt_order_depends_on_classification():
    shots = [{"instruction": "Is it spam?", "input": "Win money", "output": "spam"}]
    cls = instance_prompt("Label the mood.", shots, output_first=True)
    gen = instance_prompt("Name a color.", [{"instruction": "Say hi", "input": "", "output": "Hi"}], output_first=False)
    assert cls.endswith("Task: Label the mood.\nClass label:") and "Class label: spam\nInput: Win money" in cls
    assert gen.endswith("Task: Name a color.\nInput:") and "Input: <noinput>\nOutput: Hi" in gen
    assert parse_instance(" happy\nInput: I won the game!", output_first=True) == ("I won the game!", "happy")
    assert parse_instance(" <noinput>\nOutput: Blue.", output_first=False) == ("", "Blue.")
    assert parse_instance(" no output field", output_first=False) is None


def test_yes_no():
    assert parse_yes_no(" Yes") is True and parse_yes_no(" no.") is False and parse_yes_no(" maybe") is None
    assert classification_prompt("X", [("A", True)]).endswith("Task: X\nIs it classification?")


def scripted(new_items):
    """Each instruction request returns the next few items of `new_items`; classification is keyword based."""
    queue = list(new_items)

    def respond(prompt, params):
        if prompt.startswith("Come up with a series of tasks:"):
            first = int(prompt.rsplit("\n", 1)[1].rstrip("."))
            items = [queue.pop(0) for _ in range(min(3, len(queue)))]
            if not items:
                return "", "stop"
            lines = [f" {items[0]}"] + [f"{first + k}. {t}" for k, t in enumerate(items[1:], start=1)]
            return "\n".join(lines), "stop"
        if prompt.startswith("Can the following task"):
            task = prompt.rsplit("Task: ", 1)[1]
            return (" Yes" if "sentiment" in task else " No"), "stop"
        if prompt.rstrip().endswith("Class label:"):
            return " positive\nInput: I loved it.", "stop"
        task = re.findall(r"Task: (.*)\nInput:$", prompt)[0]
        return f" <noinput>\nOutput: An answer to {task}", "stop"
    return respond


ITEMS = ["Classify the sentiment of the review as positive or negative.",
         "Explain photosynthesis to a ten year old.",
         "Seed task number 3 about topic 3.",              # copies a seed: too similar
         "Draw the flag of France.",                        # blocklisted
         "List three uses of copper in electronics.",
         "Give two reasons why sleep matters for memory.",
         "Name the capital city of Canada and one landmark there."]


def test_generate_tasks_filters_and_completes():
    llm = ScriptedLLM(scripted(ITEMS))
    cfg = SelfInstructConfig(num_instructions=5, requests_per_batch=1, max_requests=10)
    df, stats = generate_tasks(seeds_table(), cfg, llm, seed=1)
    assert list(df["instruction"]) == [ITEMS[0], ITEMS[1], ITEMS[4], ITEMS[5], ITEMS[6]]
    assert stats["dropped"] == {"too_similar": 1, "blocklisted_keyword": 1}
    assert stats["stop_reason"] == "target_reached" and stats["kept"] == 5 and stats["requests"] == 3
    first = df.iloc[0]
    assert bool(first["is_classification"]) and (first["input"], first["output"]) == ("I loved it.", "positive")
    assert df.iloc[1]["output"] == f"An answer to {ITEMS[1]}" and df.iloc[1]["input"] == ""
    assert df["id"].is_unique and (df["origin"] == "self_instruct").all()
    assert df["rouge_l_max"].between(0, 0.7).all()


def test_budget_stop_is_reported():
    llm = ScriptedLLM(lambda prompt, params: (" ", "stop"))
    df, stats = generate_tasks(seeds_table(), SelfInstructConfig(num_instructions=5, max_requests=3,
                                                                 requests_per_batch=2), llm, seed=1)
    assert df.empty and stats["stop_reason"] == "max_requests" and stats["requests"] == 3


def test_truncated_last_item_is_dropped():
    def respond(p, params):
        if p.startswith("Come up with a series"):
            return " Explain why the sky looks blue.\n10. Explain how tides wo", "length"
        return " No" if p.startswith("Can the following") else " <noinput>\nOutput: Because."
    llm = ScriptedLLM(respond)
    df, stats = generate_tasks(seeds_table(), SelfInstructConfig(num_instructions=1, requests_per_batch=1),
                               llm, seed=1)
    assert list(df["instruction"]) == ["Explain why the sky looks blue."] and stats["dropped"]["truncated"] == 1


def test_resume_from_parts_gives_same_rows(tmp_path):
    cfg = SelfInstructConfig(num_instructions=5, requests_per_batch=1, max_requests=10)
    full, full_stats = generate_tasks(seeds_table(), cfg, ScriptedLLM(scripted(ITEMS)), seed=1)

    parts = PartWriter(tmp_path / "parts")
    stop_after_two = SelfInstructConfig(num_instructions=5, requests_per_batch=1, max_requests=2)
    generate_tasks(seeds_table(), stop_after_two, ScriptedLLM(scripted(ITEMS)), seed=1, parts=parts)
    assert len(parts.existing()) == 2
    llm = ScriptedLLM(scripted(ITEMS[6:]))  # the first two requests' items were consumed before the "crash"
    resumed, stats = generate_tasks(seeds_table(), cfg, llm, seed=1, parts=parts)
    assert resumed.to_dict("records") == full.to_dict("records")
    assert stats["requests"] == 3 and len(llm.calls) == 3  # one request, classification, instances
    assert stats["prompt_tokens"] == full_stats["prompt_tokens"] > 0  # counted across the restart
    assert stats["completion_tokens"] == full_stats["completion_tokens"] > 0


def test_seed_examples_one_row_per_instance():
    table = seeds_table(3)
    df = seed_examples(table)
    assert list(df["id"]) == ["s0#0", "s1#0", "s2#0"] and set(df["origin"]) == {"seed"}


def test_last_round_asks_only_for_what_is_missing():
    from tasks.self_instruct import Progress, _requests_for_round

    cfg = SelfInstructConfig(num_instructions=20, requests_per_batch=8, max_requests=30)
    assert _requests_for_round(cfg, Progress()) == 8
    rows = [{}] * 16
    assert _requests_for_round(cfg, Progress(rows=rows, requests=8)) == 3  # 2 per request, 4 missing: 1.5*4/2
    assert _requests_for_round(cfg, Progress(rows=[{}] * 2, requests=8)) == 8
    assert _requests_for_round(cfg, Progress(rows=[{}] * 2, requests=28)) == 2  # budget left


def test_classification_threshold_fitted_on_seeds():
    import numpy as np

    from tasks.llm.base import Usage
    from tasks.self_instruct import classification_threshold, judge_classification

    class LogprobLLM(ScriptedLLM):
        # Leans to " Yes" for every task (log-odds > 0), a bit more for classification tasks.
        def next_token_logprobs(self, prompts, candidates):
            assert candidates == [" Yes", " No"]
            tasks = [p.rsplit("Task: ", 1)[1].split("\n")[0] for p in prompts]
            return np.array([[0.0, -2.0 if "label" in t else -1.0] for t in tasks])

    seeds = [{"instruction": f"Give the label of text {i}.", "is_classification": True} for i in range(3)]
    seeds += [{"instruction": f"Write a story number {i}.", "is_classification": False} for i in range(5)]
    llm = LogprobLLM(lambda p, params: "unused")
    threshold = classification_threshold(llm, [("shot", True)], seeds)
    assert threshold == 1.5  # halfway between the two groups' log-odds, 1 and 2
    verdicts = judge_classification(["Which label fits this review?", "Write a poem."], [("shot", True)], llm,
                                    Usage(), threshold)
    assert verdicts == [True, False] and llm.calls == []
    assert classification_threshold(ScriptedLLM(lambda p, q: ""), [], seeds) is None  # no log-probs
    assert classification_threshold(llm, [], seeds[3:]) is None  # one label only


def test_unparsable_classification_answer_drops_the_task():
    def respond(prompt, params):
        if prompt.startswith("Come up with a series"):
            return " Explain how rainbows form in the sky.\n10. Describe how bees make honey from nectar.", "stop"
        if prompt.startswith("Can the following task"):
            return (" Maybe", "stop") if "rainbows" in prompt.rsplit("Task:", 1)[1] else (" No", "stop")
        return " <noinput>\nOutput: An answer.", "stop"
    df, stats = generate_tasks(seeds_table(), SelfInstructConfig(num_instructions=2, requests_per_batch=1,
                                                                 max_requests=1), ScriptedLLM(respond), seed=0)
    assert list(df["instruction"]) == ["Describe how bees make honey from nectar."]
    assert stats["dropped"] == {"classification_unparsed": 1}
    assert stats["generated"] == stats["kept"] + sum(stats["dropped"].values())
