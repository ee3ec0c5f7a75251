import numpy as np
import pandas as pd
import pytest

from tasks.artifacts import PartWriter, decode_counts, part_metadata
from tasks.config import EVOL_OPERATIONS, EvolInstructConfig
from tasks.evol_instruct import (
    DEFAULT_TEMPLATES, equality_prompt, evol_prompt, evolution_drop_reason, evolve, is_scaffold_leak,
    response_drop_reason, template_labels)
from tests.conftest import ScriptedLLM

LABELS = template_labels(DEFAULT_TEMPLATES)


@pytest.mark.parametrize("evolved,reason", [
    ("", "empty"),
    ("  describe the   water cycle. ", "unchanged"),
    (" ".join(["word"] * 30), "too_long"),
    ("#Rewritten Prompt#: Describe the water cycle in detail.", "scaffold_leak"),
    ("Describe the water cycle in four sentences, naming a river.", None),
])
def test_evolution_drops(evolved, reason):
    assert evolution_drop_reason("Describe the water cycle.", evolved, max_words=20, labels=LABELS) == reason


@pytest.mark.parametrize("text", [
    "#Rewritten Prompt#: Describe the water cycle in detail.",
    "# Rewritten Prompt #\nDescribe rain.",
    "#Given Prompt#: Describe rain.",
    "#Created Prompt#: Describe hail.",
    "Here is the rewritten prompt: describe rain in three sentences.",
    "The given prompt asks to describe rain; describe rain and snow instead.",
    "Rewritten task: Describe the water cycle for a child.",
    "**Rewritten task:** Describe the water cycle for a child.",
    "Describe the water cycle for a child, in the rewritten task style.",
    "Task: Describe the water cycle for a child.",
    "Harder task: Describe the water cycle for a child.",
    "Describe rain.\nNew task: Describe hail.",
    "Describe snow.\nTask: Describe hail.",
    "  **Task**: Describe hail in two sentences.",
])
def test_scaffold_leaks_are_caught(text):
    assert is_scaffold_leak(text, LABELS)


@pytest.mark.parametrize("text", [
    "Complete the following task: sort the list 3, 1, 2 in descending order.",
    "Describe the main task of a firefighter during a forest fire.",
    "List three tasks a project manager does in the first week of a project.",
    "Explain what a prompt is in a command-line shell, with one example.",
])
def test_scaffold_rule_keeps_honest_instructions(text):
    assert not is_scaffold_leak(text, LABELS)


@pytest.mark.parametrize("response,reason", [
    ("", "empty_response"),
    ("Sorry, I cannot help with that.", "response_sorry"),
    ("I'm sorry, but as a small model I do not know.", "response_sorry"),
    ("I am sorry " + "word " * 90, None),  # long answers that apologise are kept
    ("the and of it ... !", "response_only_stop_words"),
    ("It is what it is.", "response_only_stop_words"),
    ("?!", "response_only_stop_words"),
    ("Yes.", None),
    ("Water evaporates, condenses and falls as rain.", None),
])
def test_response_drops(response, reason):
    assert response_drop_reason(response) == reason


def test_prompts_hold_demonstration_and_task():
    prompt = evol_prompt(DEFAULT_TEMPLATES["concretize"], "Give advice.", "for students")
    assert prompt.startswith("Each task below is rewritten into a harder version by replacing general concepts")
    assert prompt.endswith("Task: Give advice. for students\nHarder task:")
    assert DEFAULT_TEMPLATES["breadth"].endswith("Task: {instruction}\nNew task:")
    assert LABELS == ["harder task", "new task", "task"]
    assert set(DEFAULT_TEMPLATES) == set(EVOL_OPERATIONS)
    chat = evol_prompt(DEFAULT_TEMPLATES["breadth"], "Name a bird.", chat=True)
    assert chat[-1]["role"] == "user" and chat[-1]["content"].endswith("without any label or comment.")
    assert equality_prompt("A.", "B.").endswith("First task: A.\nSecond task: B.\nEqual?")
    assert evol_prompt("Make {instruction} harder, keep {{braces}}.", "this") == "Make this harder, keep {braces}."


def rows(n):
    return pd.DataFrame({"id": [f"r{i}" for i in range(n)], "task_id": [f"t{i}" for i in range(n)],
                         "instruction": [f"Explain topic {i}." for i in range(n)], "input": [""] * n,
                         "output": ["x"] * n, "category": ["qa"] * n, "is_classification": [False] * n,
                         "origin": ["seed"] * n})


def _task(prompt):
    return prompt.rsplit("Task: ", 1)[1].split("\n")[0]


def rewriter(fail_on=(), equal_on=()):
    """Rewrites append ' with an example'; tasks containing a `fail_on` text come back unchanged; the
    equality judge says Yes for pairs whose second task contains an `equal_on` text."""
    def respond(prompt, params):
        if prompt.startswith("Two tasks are equal"):
            second = prompt.rsplit("Second task: ", 1)[1].split("\n")[0]
            return " Yes" if any(t in second for t in equal_on) else " No"
        if prompt.startswith("Each task below"):
            task = _task(prompt)
            return task if any(t in task for t in fail_on) else f"{task.rstrip('.')} with an example"
        return "A fine answer."
    return respond


def assert_lineage(inp, out):
    evolved = out[out["origin"] == "evol"]
    rounds = dict(zip(out["id"], out["round"].fillna(0).astype(int)))
    assert set(evolved["root_id"]) <= set(inp["id"])
    for row in evolved.itertuples():
        assert row.parent_id in rounds and rounds[row.parent_id] == row.round - 1, row


def test_evolve_two_rounds_lineage_and_pass_rates():
    cfg = EvolInstructConfig(rounds=2, max_per_round=None, retry_failed=False)
    inp = rows(3)
    out, stats = evolve(inp, cfg, ScriptedLLM(rewriter(fail_on=["topic 1"])), seed=0)
    evolved = out[out["origin"] == "evol"]
    assert len(out) == 3 + 2 + 2 and stats["kept"] == 4 and stats["dropped"] == {"unchanged": 1}
    assert list(evolved.loc[evolved["round"] == 2, "instruction"]) == [
        "Explain topic 0 with an example with an example", "Explain topic 2 with an example with an example"]
    assert_lineage(inp, out)
    assert sum(op["attempts"] for op in stats["operations"].values()) == 5
    assert sum(op["kept"] for op in stats["operations"].values()) == 4
    assert stats["rounds"] == {"1": {"attempts": 3, "kept": 2, "pass_rate": 0.6667},
                               "2": {"attempts": 2, "kept": 2, "pass_rate": 1.0}}
    assert set(stats["operations"]) == set(EVOL_OPERATIONS)


def test_failed_evolution_returns_parent_with_another_operation():
    calls = []

    def respond(prompt, params):
        if prompt.startswith("Each task below"):
            calls.append(prompt.split("\n", 1)[0])
            if "topic 1" in _task(prompt) and len(calls) <= 3:  # fails the first time only
                return _task(prompt)
        return rewriter()(prompt, params)

    cfg = EvolInstructConfig(rounds=2, max_per_round=None, equality_check=False)
    inp = rows(3)
    out, stats = evolve(inp, cfg, ScriptedLLM(respond), seed=0)
    retried = out[out["id"] == "r1>e2"].iloc[0]
    assert retried["parent_id"] == "r1" and retried["round"] == 1 and retried["instruction"] == "Explain topic 1 with an example"
    # The header line names the operation; round 2's pool keeps attempt order: r0>e1, r1 (again), r2>e1.
    assert len(calls) == 6 and calls[4] != calls[1]
    assert stats["retried"] == 1 and stats["rounds"]["2"]["attempts"] == 3
    assert_lineage(inp, out)


def test_retry_draws_a_different_operation():
    from tasks.evol_instruct import draw_operation

    cfg = EvolInstructConfig()
    rng = np.random.default_rng(0)
    drawn = [draw_operation(cfg, "deepen", rng) for _ in range(300)]
    assert "deepen" not in drawn and set(drawn) == set(EVOL_OPERATIONS) - {"deepen"}
    only = EvolInstructConfig(operations={"deepen": 1.0, "breadth": 0.0})
    assert {draw_operation(only, None, rng) for _ in range(50)} == {"deepen"}
    assert {draw_operation(only, "deepen", rng) for _ in range(5)} == {"deepen"}  # no other to take


def test_equality_rule_drops_no_information_gain_but_not_breadth():
    cfg = EvolInstructConfig(rounds=1, max_per_round=None, operations={"deepen": 1.0, "breadth": 1.0},
                             retry_failed=False)
    out, stats = evolve(rows(12), cfg, ScriptedLLM(rewriter(equal_on=["with an example"])), seed=3)
    ops = stats["operations"]
    assert ops["deepen"]["attempts"] > 0 and ops["deepen"]["kept"] == 0 and ops["breadth"]["kept"] == ops["breadth"]["attempts"] > 0
    assert stats["dropped"] == {"no_information_gain": ops["deepen"]["attempts"]}
    assert stats["equality_method"] == "generated yes/no"


def test_unparsable_equality_answer_is_its_own_drop_reason():
    def respond(prompt, params):
        return " Perhaps" if prompt.startswith("Two tasks") else rewriter()(prompt, params)
    cfg = EvolInstructConfig(rounds=1, operations={"deepen": 1.0})
    _, stats = evolve(rows(2), cfg, ScriptedLLM(respond), seed=0)
    assert stats["dropped"] == {"equality_unparsed": 2}


def test_equality_threshold_fitted_on_known_pairs():
    def same(a, b):
        norm = lambda t: " ".join(t.lower().removeprefix("please ").strip(" .?!").split())  # noqa: E731
        return norm(a) == norm(b)

    class LogprobLLM(ScriptedLLM):
        # Leans to " Yes" always (log-odds 1), more so (3) when the tasks are the same up to "please".
        def next_token_logprobs(self, prompts, candidates):
            pairs = [(p.rsplit("First task: ", 1)[1].split("\n")[0], p.rsplit("Second task: ", 1)[1].split("\n")[0])
                     for p in prompts]
            return np.array([[0.0, -3.0 if same(a, b) else -1.0] for a, b in pairs])

    def respond(prompt, params):
        if prompt.startswith("Each task"):
            task = _task(prompt)
            return f"Please {task[0].lower()}{task[1:]}" if "topic 1" not in task else "Explain topic 1 with an example."
        return "A fine answer."

    cfg = EvolInstructConfig(rounds=1, operations={"add_constraints": 1.0}, retry_failed=False)
    llm = LogprobLLM(respond)
    out, stats = evolve(rows(3), cfg, llm, seed=0)
    assert stats["equality_method"] == "log-odds > 2.000 (balanced accuracy 1.00 on known pairs)"
    assert stats["dropped"] == {"no_information_gain": 2}
    assert list(out.loc[out["origin"] == "evol", "parent_id"]) == ["r1"]
    assert not any(p.startswith("Two tasks") for prompts, _ in llm.calls for p in prompts)  # no generated answers


def test_uninformative_judge_falls_back_to_measuring_the_change():
    """A model whose Yes/No log-odds do not depend on the pair (Gemma 3 270M is close to that) is not
    trusted: rule 1 then drops evolutions whose ROUGE-L F1 against the parent is above the threshold."""
    class NoiseLLM(ScriptedLLM):
        def next_token_logprobs(self, prompts, candidates):
            return np.array([[0.0, -1.0 - 0.01 * (i % 3)] for i in range(len(prompts))])

    def respond(prompt, params):
        if prompt.startswith("Each task"):
            task = _task(prompt)
            return f"{task} Now." if "topic 0" in task else f"{task.rstrip('.')} for a child, with two examples from daily life."
        return "A fine answer."

    cfg = EvolInstructConfig(rounds=1, operations={"deepen": 1.0}, retry_failed=False)
    out, stats = evolve(rows(2), cfg, NoiseLLM(respond), seed=0)
    assert stats["equality_method"].startswith("ROUGE-L F1 > 0.8 (the model's judgement scored balanced accuracy")
    assert stats["dropped"] == {"no_information_gain": 1}  # "Explain topic 0. Now.": F1 0.89 against its parent
    assert list(out.loc[out["origin"] == "evol", "parent_id"]) == ["r1"]


def test_custom_template_is_used_and_its_labels_count_as_leaks():
    template = "Make this task harder.\nOriginal: {instruction}\nHarder version:"
    seen = []

    def respond(prompt, params):
        if prompt.startswith("Make this task harder"):
            seen.append(prompt)
            return " Harder version: explain it twice" if "topic 0" in prompt else " Explain it with a diagram."
        return "A fine answer."
    cfg = EvolInstructConfig(rounds=1, operations={"deepen": 1.0}, templates={"deepen": template},
                             equality_check=False, retry_failed=False)
    out, stats = evolve(rows(2), cfg, ScriptedLLM(respond), seed=0)
    assert seen[0] == "Make this task harder.\nOriginal: Explain topic 0.\nHarder version:"
    assert stats["dropped"] == {"scaffold_leak": 1} and stats["kept"] == 1


def test_operations_are_seeded_and_weighted():
    cfg = EvolInstructConfig(rounds=1, max_per_round=None, equality_check=False,
                             operations={"deepen": 3.0, "breadth": 1.0, "concretize": 0.0})
    a, sa = evolve(rows(40), cfg, ScriptedLLM(rewriter()), seed=5)
    b, sb = evolve(rows(40), cfg, ScriptedLLM(rewriter()), seed=5)
    assert list(a["evol_operation"].dropna()) == list(b["evol_operation"].dropna())
    assert set(sa["operations"]) == {"deepen", "breadth"}
    assert sa["operations"]["deepen"]["attempts"] > sa["operations"]["breadth"]["attempts"] > 0


def test_resume_from_parts_continues_the_unfinished_chains(tmp_path):
    cfg = EvolInstructConfig(rounds=3, max_per_round=None, checkpoint_every=2)
    inp = rows(5)
    respond = rewriter(fail_on=["topic 3"], equal_on=["topic 4 with"])
    parts = PartWriter(tmp_path / "full")
    full, full_stats = evolve(inp, cfg, ScriptedLLM(respond), seed=1, parts=parts)
    written = parts.read_all()
    # 5 chains of 3 attempts (a failed row's parent is retried), in parts of 2, 2 and 1 finished chains.
    assert full_stats["checkpoints"] == len(written) == 3
    assert [t.num_rows for t in written] == [6, 6, 3] and full_stats["attempted"] == 15
    for k in (1, 2):  # killed after the first part, before the last
        crashed = PartWriter(tmp_path / f"crash{k}")
        for table in written[:k]:
            crashed.write(table)
        llm = ScriptedLLM(respond)
        resumed, stats = evolve(inp, cfg, llm, seed=1, parts=crashed)
        assert resumed.to_dict("records") == full.to_dict("records"), k
        assert resumed["id"].is_unique and stats["checkpoints"] == full_stats["checkpoints"]
        assert stats["operations"] == full_stats["operations"] and stats["dropped"] == full_stats["dropped"]
        # Tokens count what was spent: the crashed attempt's parts (their tokens include work on chains still
        # in flight, which the resumed attempt redoes) plus this attempt's.
        before = sum(decode_counts(part_metadata(t)["tokens"])["prompt_tokens"] for t in written[:k])
        assert stats["prompt_tokens"] == before + stats["usage_this_attempt"]["prompt_tokens"] > full_stats["prompt_tokens"]
        rewrites = sum(len(prompts) for prompts, _ in llm.calls if prompts and prompts[0].startswith("Each task"))
        assert rewrites == sum(t.num_rows for t in written[k:])  # only the unfinished chains' attempts


def test_in_process_requests_of_many_chains_run_as_full_batches():
    """Each chain draws its own request seed; the in-process batcher still groups the chains' like requests
    (same settings but the seed) into batches of up to `batch_size`, not one request at a time."""
    llm = ScriptedLLM(rewriter())
    evolve(rows(12), EvolInstructConfig(rounds=2, max_per_round=None), llm, seed=0, batch_size=8)
    rewrites = [len(prompts) for prompts, _ in llm.calls if prompts[0].startswith("Each task")]
    assert rewrites[0] == 8 and max(rewrites) == 8 and sum(rewrites) == 24  # 12 chains, 2 rounds


def test_conversations_pass_through_unevolved():
    """Rows with `messages` (more than one exchange, or a system prompt) are never drawn: rewriting their
    first turn would orphan the rest. They stay as they were; evolutions of the others have none."""
    talk = [{"role": "user", "content": "Explain topic 1."}, {"role": "assistant", "content": "x"},
            {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Explain topic 2."},
              {"role": "assistant", "content": "x"}]
    inp = rows(4).assign(messages=[None, np.array(talk, dtype=object), system, None])  # as read from Parquet
    llm = ScriptedLLM(rewriter())
    out, stats = evolve(inp, EvolInstructConfig(rounds=2, max_per_round=None), llm, seed=0)
    evolved = out[out["origin"] == "evol"]
    assert set(evolved["root_id"]) == {"r0", "r3"} and stats["attempted"] == 4 and stats["kept"] == 4
    assert stats["not_evolved_multi_turn"] == 2 and evolved["messages"].isna().all()
    assert out.iloc[:4].drop(columns=["parent_id", "root_id", "round", "evol_operation"]).equals(inp)
    asked = [p for prompts, _ in llm.calls for p in prompts]
    assert not any("topic 1" in p or "topic 2" in p for p in asked if p.startswith("Each task"))
    # A draw of max_per_round takes one-exchange rows only.
    several = rows(6).assign(messages=[talk, None, talk, None, talk, None])
    evolved, drawn = evolve(several, EvolInstructConfig(rounds=1, max_per_round=3, equality_check=False),
                            ScriptedLLM(rewriter()), seed=0)
    assert drawn["attempted"] == 3 and drawn["not_evolved_multi_turn"] == 3
    assert evolved.loc[evolved["origin"] == "evol", "parent_id"].tolist() == ["r1", "r3", "r5"]
    # Evolution off: the column goes on as it came.
    from tasks.evol_instruct import unevolved
    assert unevolved(inp)["messages"].tolist()[2] == system
