import json
import re

import pyarrow as pa
import pytest

from tasks.artifacts import PartWriter, decode_counts, part_metadata
from tasks.config import SelfInstructConfig
from tasks.self_instruct import (
    classification_prompt, filter_instances, generate_tasks, instance_drop_reason, instance_prompt,
    instance_stops, instruction_drop_reason, instruction_prompt, parse_instances, parse_yes_no, seed_examples)
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
    shots = [{"instruction": "Is it spam?", "instances": [{"input": "Win money", "output": "spam"},
                                                          {"input": "Lunch at 1?", "output": "not spam"}]}]
    cls = instance_prompt("Label the mood.", shots, output_first=True, n=2)
    gen = instance_prompt("Name a color.", [{"instruction": "Say hi", "instances": [{"input": "", "output": "Hi"}]}],
                          output_first=False, n=3)
    assert cls.endswith("Task: Label the mood.\nClass label:")
    assert "Class label: spam\nInput: Win money\nClass label: not spam\nInput: Lunch at 1?" in cls
    assert gen.endswith("Task: Name a color.\nExample 1\nInput:") and "Example 1\nInput: <noinput>\nOutput: Hi" in gen
    assert instance_prompt("Label the mood.", shots, output_first=True, n=1).count("Class label:") == 2  # 1 shot + open
    assert instance_stops(3) == ("\nTask:", "\nExample 4\n")


def test_parse_instances_label_first_and_input_first():
    pairs, bad = parse_instances(" happy\nInput: I won the game!\nClass label: sad\nInput: It rained\nall day.",
                                 output_first=True)
    assert pairs == [("I won the game!", "happy"), ("It rained\nall day.", "sad")] and bad == 0
    pairs, bad = parse_instances(" <noinput>\nOutput: Blue.\nExample 2\nInput: sky\nOutput: Blue\n\nExample 3\nInput: x",
                                 output_first=False)
    assert pairs == [("", "Blue."), ("sky", "Blue")] and bad == 1
    assert parse_instances(" no output field", output_first=False) == ([], 1)
    chat_reply = "Sure! Here they are:\nExample 1\nInput: 2+2\nOutput: 4\nExample 2\nInput: <noinput>\nOutput: 7"
    assert parse_instances(chat_reply, output_first=False, chat=True) == ([("2+2", "4"), ("", "7")], 0)


def test_instance_set_filters():
    kept, dropped = filter_instances([("a", "1"), ("a", "1"), ("b", "b"), ("", "x"), ("", "y")])
    assert kept == [("a", "1"), ("", "x"), ("", "y")]  # empty inputs with different outputs are fine
    assert dropped == {"duplicate": 1, "input_equals_output": 1}
    kept, dropped = filter_instances([("text one", "positive"), ("text one", "negative"), ("two", "neutral")])
    assert kept == [] and dropped == {"conflicting_outputs": 3}


def test_chat_prompts_are_messages():
    prompt = instruction_prompt(["First task", "Second task"], chat=True, new=4)
    assert prompt[-1]["role"] == "user" and "1. First task\n2. Second task" in prompt[-1]["content"]
    assert "from 3 to 6" in prompt[-1]["content"]
    assert classification_prompt("X", [], chat=True)[-1]["content"].endswith("Answer Yes or No.")
    assert parse_yes_no("**Yes**, it is.") is True


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
        task = re.findall(r"Task: (.*)\nExample 1\nInput:$", prompt)[0]
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
    assert df["id"].is_unique and (df["origin"] == "self_instruct").all() and "messages" not in df  # one exchange
    # ROUGE-L F1 against the seeds and the instructions kept before: "of" is the only word ITEMS[4] (7 tokens)
    # shares with ITEMS[0] (10): 2*1/(7+10); "the ... of" is what ITEMS[6] (10) shares with ITEMS[0]: 2*2/20.
    assert df["rouge_l_max"].tolist() == pytest.approx([0.0, 0.0, 2 / 17, 0.0, 0.2], abs=1e-12)
    assert df["most_similar"].tolist()[2::2] == [ITEMS[0], ITEMS[0]]


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
    cfg = SelfInstructConfig(num_instructions=5, requests_per_batch=1, max_requests=10, checkpoint_every=1)
    full, full_stats = generate_tasks(seeds_table(), cfg, ScriptedLLM(scripted(ITEMS)), seed=1)

    parts = PartWriter(tmp_path / "parts")
    stop_after_two = cfg.model_copy(update={"max_requests": 2})
    _, first = generate_tasks(seeds_table(), stop_after_two, ScriptedLLM(scripted(ITEMS)), seed=1, parts=parts)
    assert first["stop_reason"] == "max_requests" and first["kept"] == 4
    assert len(parts.existing()) == 6  # two requests and four tasks, one finished item a part
    llm = ScriptedLLM(scripted(ITEMS[6:]))  # the first two requests' items were consumed before the "crash"
    resumed, stats = generate_tasks(seeds_table(), cfg, llm, seed=1, parts=parts)
    assert resumed.to_dict("records") == full.to_dict("records")
    assert stats["requests"] == 3 and len(llm.calls) == 3  # one request, classification, instances
    # Counted across the restart (the third request's in-context examples are what was kept when it went
    # out, so its prompt need not be word for word the uninterrupted run's).
    for kind in ("prompt_tokens", "completion_tokens"):
        assert stats[kind] == first[kind] + stats["usage_this_attempt"][kind] > first[kind] > 0


def test_seed_examples_one_row_per_instance():
    table = seeds_table(3)
    df = seed_examples(table)
    assert list(df["id"]) == ["s0#0", "s1#0", "s2#0"] and set(df["origin"]) == {"seed"}
    assert set(df["dataset"]) == {"seeds"}  # the table does not say which file
    several = pa.Table.from_pylist([
        {"id": "a", "name": "a", "instruction": "Do a.", "is_classification": True, "category": "x",
         "instances": [{"input": "1", "output": "one"}, {"input": "", "output": "two"}, {"input": "3", "output": "c"}]},
        {"id": "b", "name": "b", "instruction": "Do b.", "is_classification": False, "category": "y",
         "instances": [{"input": "", "output": "bee"}]}], schema=SCHEMA).slice(0)
    df = seed_examples(several)
    assert df.to_dict("records") == [
        {"id": f"a#{n}", "task_id": "a", "instruction": "Do a.", "input": i, "output": o, "category": "x",
         "is_classification": True, "origin": "seed", "dataset": "seeds", "messages": None}
        for n, (i, o) in enumerate([("1", "one"), ("", "two"), ("3", "c")])] + [
        {"id": "b#0", "task_id": "b", "instruction": "Do b.", "input": "", "output": "bee", "category": "y",
         "is_classification": False, "origin": "seed", "dataset": "seeds", "messages": None}]
    assert seed_examples(several.slice(1)).to_dict("records")[0]["id"] == "b#0"  # a slice: offsets not at 0


def test_seed_examples_carry_the_seeds_conversations():
    """A seed conversation (more than one exchange, or a system prompt) keeps its `messages`; one-exchange
    seeds have none, with or without the column in the seeds table."""
    from tasks import conversation

    talk = [{"role": "user", "content": "Name a bird."}, {"role": "assistant", "content": "A robin."},
            {"role": "user", "content": "And a fish?"}, {"role": "assistant", "content": "A trout."}]
    table = seeds_table(3)
    if "messages" in table.column_names:  # the seeds schema may carry the column already
        table = table.drop_columns(["messages"])
    table = table.append_column("messages", conversation.messages_array([None, talk, None]))
    df = seed_examples(table)
    assert [None if m is None else list(m) for m in df["messages"]] == [None, talk, None]
    assert pa.Table.from_pandas(df, preserve_index=False).column("messages").type == conversation.MESSAGES


def test_requests_go_out_only_for_what_is_missing():
    """Each request yields three new instructions, all kept. The first request is expected to yield
    `new_per_request` (8): one is enough to open for 6. It yields 3, so one more goes out, which covers
    the rest: two requests in all, none of their instructions left over."""
    queue = [ITEMS[1], ITEMS[4], ITEMS[5], ITEMS[6], "Describe how glaciers carve valleys over centuries.",
             "Suggest a weekly food budget for a student who lives alone.",
             "Write a limerick about a forgetful robot.", "Translate good morning into Spanish and German.",
             "Summarize the plot of Romeo and Juliet in two sentences."]

    def respond(prompt, params):
        if prompt.startswith("Come up with a series"):
            first = int(prompt.rsplit("\n", 1)[1].rstrip("."))
            items = [queue.pop(0) for _ in range(3)]
            return "\n".join([f" {items[0]}"] + [f"{first + k}. {t}" for k, t in enumerate(items[1:], 1)])
        return scripted([])(prompt, params)

    cfg = SelfInstructConfig(num_instructions=6, requests_per_batch=8, max_requests=30)
    df, stats = generate_tasks(seeds_table(), cfg, ScriptedLLM(respond), seed=1)
    assert stats["requests"] == 2 and stats["kept"] == 6 and stats["candidates"] == 6
    assert stats["dropped"] == {} and df["task_id"].nunique() == 6


def test_classification_threshold_fitted_on_seeds():
    import numpy as np

    import asyncio

    from tasks.engine import Model
    from tasks.llm.base import Usage
    from tasks.self_instruct import classification_threshold, classify

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
    model = Model(llm, Usage())

    async def both():
        return await asyncio.gather(*(classify(model, t, [("shot", True)], threshold)
                                      for t in ["Which label fits this review?", "Write a poem."]))
    verdicts = asyncio.run(both())
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


def test_checkpoint_every_n_finished_items(tmp_path):
    """One request yields 5 candidates; with checkpoint_every=2 the finished items (the request, then its
    five tasks) go into parts of 2, 2 and 2, and a stage stopped after the first part continues with the
    other four tasks, asking for nothing new."""
    items = ITEMS[0:2] + ITEMS[4:7]

    def respond(prompt, params):
        if prompt.startswith("Come up with a series"):
            first = int(prompt.rsplit("\n", 1)[1].rstrip("."))
            return "\n".join([f" {items[0]}"] + [f"{first + k}. {t}" for k, t in enumerate(items[1:], 1)])
        return scripted([])(prompt, params)

    cfg = SelfInstructConfig(num_instructions=5, requests_per_batch=1, max_requests=1, checkpoint_every=2)
    parts = PartWriter(tmp_path / "parts")
    full, full_stats = generate_tasks(seeds_table(), cfg, ScriptedLLM(respond), seed=1, parts=parts)
    closed = [json.loads(part_metadata(t)["items"]) for t in parts.read_all()]
    tasks = [f"si-00000-{k:02d}" for k in range(5)]
    assert closed == [["req-00000", tasks[0]], tasks[1:3], tasks[3:5]] and full_stats["checkpoints"] == 3
    assert [t.column("record").to_pylist().count("candidate") for t in parts.read_all()] == [5, 0, 0]
    assert len(full) == 5

    crashed = PartWriter(tmp_path / "crashed")
    crashed.write(parts.read_all()[0])  # as if killed right after the first part
    llm = ScriptedLLM(respond)
    resumed, stats = generate_tasks(seeds_table(), cfg, llm, seed=1, parts=crashed)
    assert resumed.to_dict("records") == full.to_dict("records")
    sent = [p for prompts, _ in llm.calls for p in prompts]
    assert not any(p.startswith("Come up with a series") for p in sent)  # nothing new asked for
    assert sum(p.startswith(("Come up with examples", "Given a classification")) for p in sent) == 4
    # Tokens count what was spent: the first part's (which include work on tasks still open then, redone
    # after the "crash") plus this attempt's.
    before = decode_counts(part_metadata(parts.read_all()[0])["tokens"])["prompt_tokens"]
    assert stats["prompt_tokens"] == before + stats["usage_this_attempt"]["prompt_tokens"] and stats["kept"] == 5


def test_token_budget_stops_the_stage():
    cfg = SelfInstructConfig(num_instructions=50, requests_per_batch=1, max_requests=50)
    # What the first request alone spends (its answer is in before the budget is looked at again).
    _, one = generate_tasks(seeds_table(), cfg.model_copy(update={"max_requests": 1}),
                            ScriptedLLM(scripted(ITEMS * 3)), seed=1)
    first = one["usage_this_attempt"]["by_purpose"]["instructions"]
    spent = first["prompt_tokens"] + first["completion_tokens"]
    # A budget of exactly that: no second request; the first one's tasks still finish (in flight).
    llm = ScriptedLLM(scripted(ITEMS * 3))
    df, at = generate_tasks(seeds_table(), cfg.model_copy(update={"max_tokens": spent}), llm, seed=1)
    assert (at["requests"], at["stop_reason"]) == (1, "max_tokens")
    assert list(df["instruction"]) == ITEMS[:2] and at["dropped"] == {"too_similar": 1}  # ITEMS[2] copies a seed
    assert at["prompt_tokens"] == sum(len(p.split()) for prompts, _ in llm.calls for p in prompts)
    # One token more: the budget is not spent when the first answer is in, so a second request goes out.
    above = generate_tasks(seeds_table(), cfg.model_copy(update={"max_tokens": spent + 1}),
                           ScriptedLLM(scripted(ITEMS * 3)), seed=1)[1]
    assert (above["requests"], above["stop_reason"]) == (2, "max_tokens")


def test_up_to_n_instances_per_task_with_filters():
    def respond(prompt, params):
        if prompt.startswith("Come up with a series"):
            return " Classify the sentiment of the review as positive or negative.\n10. Explain how tides form."
        if prompt.startswith("Can the following task"):
            return " Yes" if "sentiment" in prompt.rsplit("Task: ", 1)[1] else " No"
        if prompt.endswith("Class label:"):
            return " positive\nInput: Great film.\nClass label: negative\nInput: Dull.\nClass label: positive\nInput: Great film."
        return " <noinput>\nOutput: The moon pulls the sea.\nExample 2\nInput: <noinput>\nOutput: Gravity.\nExample 3\nInput: x\nOutput: x"

    cfg = SelfInstructConfig(num_instructions=2, requests_per_batch=1, max_requests=1, instances_per_task=3)
    df, stats = generate_tasks(seeds_table(), cfg, ScriptedLLM(respond), seed=1)
    assert list(zip(df["input"], df["output"])) == [("Great film.", "positive"), ("Dull.", "negative"),
                                                    ("", "The moon pulls the sea."), ("", "Gravity.")]
    assert list(df["id"]) == ["si-00000-00#0", "si-00000-00#1", "si-00000-01#0", "si-00000-01#1"]
    assert stats["kept"] == 2 and stats["kept_instances"] == 4
    assert stats["dropped"] == {"instance_duplicate": 1, "instance_input_equals_output": 1}


def test_chat_mode_end_to_end():
    """A chat model gets messages and replies with a full numbered list, preamble and all."""
    class ChatLLM(ScriptedLLM):
        mode = "chat"

    def respond(messages, params):
        text = messages[-1]["content"]
        if text.startswith("Come up with a series"):
            first = int(re.search(r"numbered list from (\d+)", text).group(1))
            return (f"Here are new tasks:\n{first}. Explain how tides form.\n"
                    f"{first + 1}. Classify the sentiment of the review as positive or negative.")
        if text.startswith("Can the following task"):
            return "Yes." if "sentiment" in text.rsplit("Task: ", 1)[1] else "No."
        if text.startswith("Given a classification task"):
            return "Class label: positive\nInput: Loved it.\nClass label: negative\nInput: Hated it."
        return "Example 1\nInput: <noinput>\nOutput: The moon's gravity."

    llm = ChatLLM(respond)
    cfg = SelfInstructConfig(num_instructions=2, requests_per_batch=1, max_requests=1)
    df, stats = generate_tasks(seeds_table(), cfg, llm, seed=1)
    assert all(isinstance(p, list) for prompts, _ in llm.calls for p in prompts)
    assert stats["prompt_style"] == "chat" and stats["classification_method"] == "generated yes/no"
    assert list(zip(df["instruction"], df["input"], df["output"], df["is_classification"])) == [
        ("Explain how tides form.", "", "The moon's gravity.", False),
        ("Classify the sentiment of the review as positive or negative.", "Loved it.", "positive", True),
        ("Classify the sentiment of the review as positive or negative.", "Hated it.", "negative", True)]


def instruction_level(dropped):
    return sum(n for reason, n in dropped.items() if not reason.startswith("instance_"))


def test_extra_candidates_are_over_target_once_the_target_is_reached():
    """Candidates are completed only while the open tasks, at the share that made it so far, fall short of
    the target; what is left when the target is reached is counted, not completed."""
    def respond(prompt, params):
        if prompt.startswith("Come up with a series"):
            first = int(prompt.rsplit("\n", 1)[1].rstrip("."))
            items = ITEMS[:2] + ITEMS[4:7]
            return "\n".join([f" {items[0]}"] + [f"{first + k}. {t}" for k, t in enumerate(items[1:], 1)])
        return scripted([])(prompt, params)

    llm = ScriptedLLM(respond)
    cfg = SelfInstructConfig(num_instructions=2, requests_per_batch=1, max_requests=1)
    df, stats = generate_tasks(seeds_table(), cfg, llm, seed=1)
    assert list(df["instruction"]) == ITEMS[:2] and stats["kept"] == 2
    # 5 candidates: 2 completed (both made it), 3 never started
    assert stats["dropped"] == {"over_target": 3} and stats["candidates"] == 5
    assert stats["generated"] == stats["kept"] + instruction_level(stats["dropped"])
    sent = [p for prompts, _ in llm.calls for p in prompts]
    assert sum(p.startswith(("Given a classification", "Come up with examples")) for p in sent) == 2
