import pandas as pd
import pytest

from tasks.config import EvolInstructConfig
from tasks.evol_instruct import evol_prompt, evolution_drop_reason, evolve, response_drop_reason
from tests.conftest import ScriptedLLM


@pytest.mark.parametrize("evolved,reason", [
    ("", "empty"),
    ("  describe the   water cycle. ", "unchanged"),
    (" ".join(["word"] * 30), "too_long"),
    ("#Rewritten Prompt#: Describe the water cycle in detail.", "scaffold_leak"),
    ("Here is the rewritten prompt: describe rain.", "scaffold_leak"),
    ("Harder task: Describe the water cycle.", "scaffold_leak"),
    ("Describe the water cycle in four sentences, naming a river.", None),
])
def test_evolution_drops(evolved, reason):
    assert evolution_drop_reason("Describe the water cycle.", evolved, max_words=20) == reason


@pytest.mark.parametrize("response,reason", [
    ("", "empty_response"),
    ("Sorry, I cannot help with that.", "response_sorry"),
    ("I am sorry " + "word " * 90, None),  # long answers that apologise are kept
    ("the and of it ... !", "response_only_stop_words"),
    ("Water evaporates, condenses and falls as rain.", None),
])
def test_response_drops(response, reason):
    assert response_drop_reason(response) == reason


def test_prompt_holds_demonstration_and_task():
    prompt = evol_prompt("concretize", "Give advice.", "for students")
    assert prompt.startswith("Each task below is rewritten into a harder version by replacing general concepts")
    assert prompt.endswith("Task: Give advice. for students\nHarder task:")


def rows(n):
    return pd.DataFrame({"id": [f"r{i}" for i in range(n)], "task_id": [f"t{i}" for i in range(n)],
                         "instruction": [f"Explain topic {i}." for i in range(n)], "input": [""] * n,
                         "output": ["x"] * n, "category": ["qa"] * n, "is_classification": [False] * n,
                         "origin": ["seed"] * n})


def test_evolve_two_rounds_lineage_and_pass_rates():
    def respond(prompt, params):
        if prompt.startswith("Each task below"):
            task = prompt.rsplit("Task: ", 1)[1].split("\n")[0]
            if "topic 1" in task:
                return task  # unchanged: dropped
            return f"{task.rstrip('.')} with an example"
        return "A fine answer."
    cfg = EvolInstructConfig(rounds=2, max_per_round=None)
    out, stats = evolve(rows(3), cfg, ScriptedLLM(respond), seed=0)
    evolved = out[out["origin"] == "evol"]
    assert len(out) == 3 + 2 + 2 and stats["kept"] == 4 and stats["dropped"] == {"unchanged": 1}
    r2 = evolved[evolved["round"] == 2]
    assert set(r2["parent_id"]) <= set(evolved.loc[evolved["round"] == 1, "id"])
    assert set(evolved["root_id"]) <= {"r0", "r2"}
    assert list(r2["instruction"]) == ["Explain topic 0 with an example with an example",
                                       "Explain topic 2 with an example with an example"]
    assert sum(op["attempts"] for op in stats["operations"].values()) == 5
    assert sum(op["kept"] for op in stats["operations"].values()) == 4
