import json

import numpy as np
import pandas as pd
import pytest

from tasks.evaluate import HeldoutError, ablation_inputs, draw_across, load_heldout, markdown, side_by_side, win_rate
from tests.conftest import ScriptedLLM


def test_win_rate_counts_wins_ties_and_skips_unrated():
    base = np.array([5.0, 7.0, 6.0, np.nan, 8.0])
    tuned = np.array([8.0, 7.0, 2.0, 9.0, np.nan])
    rate, counts = win_rate(base, tuned)
    assert counts == {"wins": 1, "ties": 1, "losses": 1, "unrated": 2}
    assert rate == pytest.approx(0.5)
    assert win_rate(np.array([np.nan]), np.array([3.0]))[0] is None


def test_side_by_side_with_a_judge_and_how_answers_ended():
    rows = pd.DataFrame({"id": ["a", "b", "c"], "set": ["eval split", "eval split", "held-out"],
                         "instruction": ["Name a color.", "Add 2 and 2.", "Say hi."], "input": ["", "", ""],
                         "output": ["Blue.", "4", "Hi."]})
    base = ScriptedLLM(lambda prompt, params: ("Name a color.\n\n### Instruction:\nName a color.", "length"))
    tuned = ScriptedLLM(lambda prompt, params: "Blue." if "color" in prompt else
                        ("4 4 4 4", "length") if "Add" in prompt else "Hi.")
    verdicts = iter(["2/10", "3/10", "4/10", "9/10", "no idea", "8/10"])
    judge = ScriptedLLM(lambda prompt, params: next(verdicts))
    table, stats = side_by_side(rows, base, tuned, max_new_tokens=16, repetition_penalty=1.3, judge_llm=judge)
    assert table["tuned_answer"].tolist() == ["Blue.", "4 4 4 4", "Hi."]
    assert table["base_answer"].tolist() == ["Name a color."] * 3  # cut at the Alpaca header it ran into
    assert table["base_stop"].tolist() == ["runaway"] * 3 and table["tuned_stop"].tolist() == ["clean", "length", "clean"]
    assert stats["stops"]["eval split"]["tuned"] == {"answers": 2, "clean_share": 0.5, "runaway_share": 0.0,
                                                     "length_share": 0.5}
    assert stats["stops"]["held-out"]["base"]["runaway_share"] == 1.0
    assert table["base_judge"].tolist() == [2.0, 3.0, 4.0] and table["tuned_judge"][0] == 9.0
    assert stats["win_rate"] == 1.0 and stats["judged"] == {"wins": 2, "ties": 0, "losses": 0, "unrated": 1}
    params = base.calls[0][1]
    assert params.temperature == 0.0 and params.repetition_penalty == 1.3 and "### Response:" in base.calls[0][0][0]
    assert params.stop == ()  # generated to the end, so that a runaway shows
    held = {"tasks": 3, "base": {"loss": 3.25}, "tuned": {"loss": 2.5}}
    md = markdown(table, {**stats, "eval_loss_before": 2.5, "eval_loss_after": 2.0, "heldout": held}, "Side by side")
    assert "2.5000 (base) -> 2.0000 (tuned)" in md and "win rate, tuned vs base: 1.00" in md
    assert "token 3.2500 (base) -> 2.5000 (tuned)" in md
    assert "How answers ended (held-out): base 0% clean, 100% runaway, 0% cut; tuned 100% clean" in md
    assert "| eval split | Name a color. | Name a color. (runaway) | Blue. (clean) | Blue. |" in md


def test_draw_across_spreads_over_groups_at_random_and_is_seeded():
    rows = pd.DataFrame({"id": [f"r{i}" for i in range(30)],
                         "origin": ["seed"] * 24 + ["self_instruct"] * 4 + ["evol"] * 2})
    picked = draw_across(rows, 6, "origin", seed=1)
    assert picked["origin"].value_counts().to_dict() == {"seed": 2, "self_instruct": 2, "evol": 2}
    assert picked["id"].is_unique and picked["id"].tolist() == draw_across(rows, 6, "origin", seed=1)["id"].tolist()
    firsts = {tuple(draw_across(rows, 3, "origin", seed=s)["id"]) for s in range(8)}
    assert len(firsts) > 4  # not the first rows in table order
    assert set(draw_across(rows, 3, "origin", seed=3)["origin"]) == {"seed", "self_instruct", "evol"}
    assert len(draw_across(rows, 50, "origin", seed=0)) == 30 and draw_across(rows, 0, "origin", 0).empty


def test_load_heldout_reads_the_project_set_and_names_bad_lines(tmp_path):
    from pathlib import Path

    from tasks.seeds import load_seeds
    from tasks.config import SeedsConfig

    held = load_heldout(Path(__file__).resolve().parents[2] / "data" / "heldout.jsonl")
    assert len(held) >= 50 and held["id"].is_unique and (held["output"].str.strip() != "").all()
    seeds, _ = load_seeds(SeedsConfig(path=str(Path(__file__).resolve().parents[2] / "data" / "seed_tasks.jsonl")))
    from tasks.text import RougeIndex

    assert len(held) == 72 and held["instruction"].tolist()[0] == json.loads(
        (Path(__file__).resolve().parents[2] / "data" / "heldout.jsonl").read_text().splitlines()[0])["instruction"]
    # none a seed, or a near copy of one
    assert RougeIndex(seeds.column("instruction").to_pylist()).scores(held["instruction"].tolist()).max() < 0.5
    assert set(seeds.column("category").to_pylist()) <= set(held["category"])  # every seed category covered
    assert len(set(held["category"]) - set(seeds.column("category").to_pylist())) >= 3  # and some no seed covers

    bad = tmp_path / "held.jsonl"
    bad.write_text('{"instruction": "Say hi.", "output": "Hi."}\n\n{"instruction": "Add.", "output": ""}\n')
    with pytest.raises(HeldoutError, match=r"held.jsonl:3: `output` must be a non-empty string"):
        load_heldout(bad)
    bad.write_text('{"id": "a", "instruction": "x", "output": "y"}\n{"id": "a", "instruction": "z", "output": "w"}\n')
    with pytest.raises(HeldoutError, match="held.jsonl:2: id `a` already used on line 1"):
        load_heldout(bad)
    bad.write_text('{"instruction": "x", "output": "y"\n')
    with pytest.raises(HeldoutError, match="held.jsonl:1: malformed JSON"):
        load_heldout(bad)
    with pytest.raises(HeldoutError, match="evaluate.heldout_path: .*missing.jsonl does not exist"):
        load_heldout(tmp_path / "missing.jsonl")


def test_ablation_inputs_take_seeds_or_ignore_the_decisions():
    scored = pd.DataFrame({"id": list("abcde"), "origin": ["seed", "seed", "self_instruct", "evol", "seed"],
                           "keep": [True, False, True, False, True]})
    arms = ablation_inputs(scored)
    assert arms["seeds_only"]["id"].tolist() == ["a", "e"]
    assert arms["without_quality"]["keep"].all() and arms["without_quality"]["id"].tolist() == list("abcde")


def test_chat_tuned_models_are_asked_the_conversation_before_its_last_answer():
    talk = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"},
            {"role": "assistant", "content": "Green."}]
    rows = pd.DataFrame({"id": ["a", "b"], "set": ["eval split", "held-out"],
                         "instruction": ["Name a color.", "Add 2 and 2."], "input": ["", "Show the sum."],
                         "output": ["Blue.", "4"], "messages": [talk, None]})
    base = ScriptedLLM(lambda prompt, params: "Red.")
    tuned = ScriptedLLM(lambda prompt, params: "Yellow." if len(prompt) > 1 else "4")
    judge = ScriptedLLM(lambda prompt, params: "7/10")
    table, stats = side_by_side(rows, base, tuned, max_new_tokens=8, repetition_penalty=1.0, judge_llm=judge,
                                chat=True)
    # messages, not an Alpaca prompt: every turn before the last answer, system first
    assert tuned.calls[0][0] == [talk[:4], [{"role": "user", "content": "Add 2 and 2.\n\nShow the sum."}]]
    assert base.calls[0][0] == tuned.calls[0][0]
    assert table["tuned_answer"].tolist() == ["Yellow.", "4"] and stats["template"] == "chat"
    # the row shows the question asked (its last user turn, which turn) and the last answer as reference
    assert table["instruction"].tolist() == ["Another one?", "Add 2 and 2."]
    assert table["input"].tolist() == ["", "Show the sum."]
    assert table["turn"].tolist() == [2, 1] and table["reference"].tolist() == ["Green.", "4"]
    # the multi-turn row is judged as its whole conversation, the model's answer in place of the last one
    judged = [p for prompts, _ in judge.calls for p in prompts]
    assert len(judged) == 4 and "Blue." in judged[0] and "Another one?" in judged[0] and "Red." in judged[0]
    assert "Green." not in judged[0] and "Yellow." in judged[2]
    md = markdown(table, {**stats, "eval_loss_before": 2.0, "eval_loss_after": 1.5}, "Side by side")
    assert "| eval split | [turn 2] Another one? |" in md
