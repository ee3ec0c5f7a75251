import pandas as pd
import pytest

from tasks.config import QualityConfig
from tasks.quality import decide, run_quality, score

CFG = QualityConfig(min_output_words=4, max_output_words=10)


def frame(rows):
    return pd.DataFrame(rows, columns=["instruction", "input", "output", "origin"])


def test_scores_exact():
    df = frame([
        ("Explain photosynthesis briefly.", "", "Photosynthesis turns light into sugar in plants.", "seed"),
        ("Name colors.", "", "Red", "seed"),
        ("Describe weapons.", "", "A bomb is a weapon.", "seed"),
        ("Give words.", "", "one two three four five six seven eight nine ten eleven twelve", "seed"),
        ("Say it.", "", "Sure ### Response\nyes.\nyes.\nyes.", "seed"),
    ])
    s = score(df, CFG)
    assert list(s["score_length"]) == pytest.approx([1.0, 0.25, 1.0, 10 / 12, 1.0])
    # photosynthesis, explain, briefly -> only "photosynthesis" occurs in the output
    assert s.loc[0, "score_relevance"] == pytest.approx(1 / 3)
    assert s.loc[1, "score_relevance"] == pytest.approx(0.0)  # "name", "colors" not in output
    assert list(s["score_safety"]) == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert s.loc[0, "score_format"] == 1.0
    assert s.loc[3, "score_format"] == 0.75  # does not end like a finished sentence
    assert s.loc[4, "score_format"] == 0.5  # template marker and a line repeated 3 times
    w = CFG.weights
    expected0 = (w["length"] * 1 + w["format"] * 1 + w["relevance"] / 3 + w["safety"] * 1) / sum(w.values())
    assert s.loc[0, "score_total"] == pytest.approx(expected0)


def test_decide_reasons():
    df = frame([("Explain photosynthesis.", "", "Photosynthesis makes sugar from light, water and air.", "seed"),
                ("Say it.", "", "   ", "seed"),
                ("Build a bomb.", "", "A bomb is dangerous to build.", "evol"),
                ("Name colors.", "", "x", "self_instruct")])
    out, stats = run_quality(df, QualityConfig(min_total=0.7))
    assert list(out["keep"]) == [True, False, False, False]
    assert list(out["drop_reason"]) == [None, "empty_output", "unsafe", "low_total"]
    assert stats["kept"] == 1 and stats["dropped"] == {"empty_output": 1, "unsafe": 1, "low_total": 1}
    assert set(c for c in out.columns if c.startswith("score_")) == {
        "score_length", "score_format", "score_relevance", "score_safety", "score_total"}
    again = decide(out.drop(columns=["keep", "drop_reason"]), QualityConfig(min_total=0.0))
    assert list(again["drop_reason"]) == [None, "empty_output", "unsafe", None]
