import numpy as np
import pandas as pd
import pytest

from tasks.evaluate import markdown, side_by_side, win_rate
from tests.conftest import ScriptedLLM


def test_win_rate_counts_wins_ties_and_skips_unrated():
    base = np.array([5.0, 7.0, 6.0, np.nan, 8.0])
    tuned = np.array([8.0, 7.0, 2.0, 9.0, np.nan])
    rate, counts = win_rate(base, tuned)
    assert counts == {"wins": 1, "ties": 1, "losses": 1, "unrated": 2}
    assert rate == pytest.approx(0.5)
    assert win_rate(np.array([np.nan]), np.array([3.0]))[0] is None


def test_side_by_side_with_a_judge():
    rows = pd.DataFrame({"id": ["a", "b"], "instruction": ["Name a color.", "Add 2 and 2."], "input": ["", ""],
                         "output": ["Blue.", "4"], "split": "eval"})
    base = ScriptedLLM(lambda prompt, params: "Name a color. Name a color.")
    tuned = ScriptedLLM(lambda prompt, params: "Blue." if "color" in prompt else "4")
    verdicts = iter(["2/10", "3/10", "9/10", "no idea"])
    judge = ScriptedLLM(lambda prompt, params: next(verdicts))
    table, stats = side_by_side(rows, base, tuned, max_new_tokens=16, repetition_penalty=1.3, judge_llm=judge)
    assert table["tuned_answer"].tolist() == ["Blue.", "4"] and table["reference"].tolist() == ["Blue.", "4"]
    assert table["base_judge"].tolist() == [2.0, 3.0] and table["tuned_judge"][0] == 9.0
    assert stats["win_rate"] == 1.0 and stats["judged"] == {"wins": 1, "ties": 0, "losses": 0, "unrated": 1}
    params = base.calls[0][1]
    assert params.temperature == 0.0 and params.repetition_penalty == 1.3 and "### Response:" in base.calls[0][0][0]
    md = markdown(table, {**stats, "eval_loss_before": 2.5, "eval_loss_after": 2.0}, "Side by side")
    assert "2.5000 (base) -> 2.0000 (tuned)" in md and "win rate, tuned vs base: 1.00" in md
    assert "| Name a color. | Name a color. Name a color. | Blue. | Blue. |" in md
