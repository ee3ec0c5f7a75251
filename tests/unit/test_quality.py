import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from tasks.artifacts import PartWriter
from tasks.config import QualityConfig
from tasks.quality import decide, heuristic_scores, run_quality, score

CFG = QualityConfig(min_output_words=4, max_output_words=10)


def frame(rows, origin="seed"):
    rows = [(f"r{i}", *r) if len(r) == 3 else (f"r{i}", *r[:3]) for i, r in enumerate(rows)]
    df = pd.DataFrame(rows, columns=["id", "instruction", "input", "output"])
    df["origin"] = origin
    return df


def test_scores_exact():
    df = frame([
        ("Explain photosynthesis briefly.", "", "Photosynthesis turns light into sugar in plants."),
        ("Name colors.", "", "Red"),
        ("Describe weapons.", "", "A bomb is a weapon."),
        ("Give words.", "", "one two three four five six seven eight nine ten eleven twelve"),
        ("Say it.", "", "Sure ### Response\nyes.\nyes.\nyes."),
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


def reference_scores(instruction: str, input: str, output: str, cfg: QualityConfig) -> dict[str, float]:
    """The documented definitions, one row at a time with regular expressions (also the benchmark's
    reference, benchmarks/quality.py)."""
    words = len(output.split())
    low = max(cfg.min_output_words, 1)
    length = cfg.max_output_words / words if words > cfg.max_output_words else min(words / low, 1.0)
    lines = [line.strip() for line in output.split("\n") if line.strip()]
    repeated = len(lines) >= 3 and max(lines.count(line) for line in lines) >= 3
    checks = [not re.search(r"###\s*(?:instruction|input|response)|below is an instruction", output, re.I),
              not repeated, bool(re.search(r"[.!?\"')\]`*0-9][ \t\n\r\f\v]*\Z", output)),
              bool(re.match(r"[ \t\n\r\f\v]*(?:[A-Za-z0-9_\"'(\[`$-]|[^\x00-\x7f])", output))]
    wanted = set(re.findall(r"[a-z]{4,}", instruction.lower()))
    have = set(re.findall(r"[a-z]{4,}", (input + " " + output).lower()))
    relevance = len(wanted & have) / len(wanted) if wanted else 1.0
    pattern = "|".join(rf"\b{re.escape(t)}\b" for t in cfg.unsafe_terms)
    safety = 0.0 if any(re.search(pattern, t, re.I) for t in (instruction, input, output)) else 1.0
    return {"score_length": length, "score_format": sum(checks) / 4, "score_relevance": relevance,
            "score_safety": safety}


def test_heuristics_agree_with_the_row_by_row_definitions():
    rows = [
        ("Summarize the ARTICLE about Café culture.", "The article: café culture in Paris.", "Cafés matter.\n"),
        ("List three fruits", None, "1. apple\n2. pear\n3. plum"),
        ("Repeat", "", "  a line \na line\n\n a line  "),  # stripped lines repeat 3 times
        ("Repeat", "", "a line\na  line\na line"),          # inner spacing differs: only twice
        ("", "", ""),
        ("Ünïcödé wörds here", "", "— dash first, ends with emoji 🙂"),
        ("Write code", "", "```python\nprint('hi')\n```"),
        ("Tabs\tand\ttabs please", "tabs", "\t\tanswer with trailing spaces.   "),
        ("How many?", "", "42"),
        ("Below is an instruction", "", "BELOW IS AN INSTRUCTION that was copied."),
        ("weapons of war", "", "A weaponsmith sharpens."),  # `weapon` only inside a longer word
    ]
    df = frame(rows)
    got = score(df, CFG)
    for i, (instruction, input, output) in enumerate(rows):
        expected = reference_scores(instruction, input or "", output, CFG)
        for name, value in expected.items():
            assert got.loc[i, name] == pytest.approx(value), (i, name)


def test_heuristics_take_an_arrow_table_with_string_or_large_string_columns():
    df = frame([("Explain gravity in detail.", "", "Gravity pulls masses together, said Newton.")])
    table = pa.Table.from_pandas(df, preserve_index=False)
    large = table.cast(pa.schema([pa.field(f.name, pa.large_string()) for f in table.schema]))
    a, b = heuristic_scores(table, CFG), heuristic_scores(large, CFG)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert a["score_relevance"][0] == pytest.approx(1 / 3)  # gravity of explain/gravity/detail


def test_decide_reasons():
    df = frame([("Explain photosynthesis.", "", "Photosynthesis makes sugar from light, water and air."),
                ("Say it.", "", "   "),
                ("Build a bomb.", "", "A bomb is dangerous to build."),
                ("Name colors.", "", "x")])
    out, stats = run_quality(df, QualityConfig(min_total=0.7))
    assert list(out["keep"]) == [True, False, False, False]
    assert list(out["drop_reason"]) == [None, "empty_output", "unsafe", "low_total"]
    assert stats["kept"] == 1 and stats["dropped"] == {"empty_output": 1, "unsafe": 1, "low_total": 1}
    assert set(c for c in out.columns if c.startswith("score_")) == {
        "score_length", "score_format", "score_relevance", "score_safety", "score_total"}
    again, _ = decide(out.drop(columns=["keep", "drop_reason", "duplicate_of"]), QualityConfig(min_total=0.0))
    assert list(again["drop_reason"]) == [None, "empty_output", "unsafe", None]


def test_decide_model_score_rules_in_order():
    good = "Plants turn light into sugar, a process called photosynthesis."
    df = frame([(f"Explain process number {i} of photosynthesis.", "", good + f" Step {i}.") for i in range(6)])
    scored = score(df, QualityConfig())
    scored["score_judge"] = [9.0, np.nan, 2.0, 8.0, 8.0, 8.0]
    scored["score_ifd"] = [0.5, 0.5, 0.5, 1.3, 0.5, 0.5]
    scored["score_deita_complexity"] = [3.0, 3.0, 3.0, 3.0, 1.5, 3.0]
    scored["score_deita_quality"] = [4.0, 4.0, 4.0, 4.0, 4.0, 1.2]
    cfg = QualityConfig.model_validate({
        "min_total": 0.0, "dedup": {"enabled": False},
        "judge": {"enabled": True, "min_score": 5, "drop_unparsed": True},
        "ifd": {"enabled": True, "max_ifd": 1.0},
        "deita": {"enabled": True, "min_complexity": 2.0, "min_quality": 2.0}})
    out, _ = decide(scored, cfg)
    assert list(out["drop_reason"]) == [None, "judge_unparsed", "low_judge", "high_ifd", "low_complexity",
                                        "low_response_quality"]
    # Unparsed judge answers are kept unless asked otherwise: unknown is not low.
    lenient = cfg.model_copy(update={"judge": cfg.judge.model_copy(update={"drop_unparsed": False})})
    assert decide(scored, lenient)[0]["drop_reason"].tolist()[:2] == [None, None]


def test_near_duplicates_keep_the_best_scored_member():
    base = "Write a short poem about the sea at night with waves and stars"
    poem = "The waves roll on beneath the stars."
    df = frame([
        (base, "", poem),                                                        # r0
        (base + ".", "", poem + "!"),                                            # r1: the same, punctuated
        ("Write a long story about the sea in the morning with ships and gulls", "", "The sea wakes."),
        ("Compute the sum of the numbers from one to ten", "", "The sum is 55."),  # r3: unrelated
        ("", "", "An empty instruction is nobody's duplicate."),                  # r4
        ("", "", "Neither is this one."),                                         # r5
    ])
    scored = score(df, QualityConfig(min_total=0.0))
    scored["score_total"] = [0.6, 0.9, 0.5, 0.8, 0.7, 0.7]
    out, figures = decide(scored, QualityConfig(min_total=0.0))
    assert list(out["drop_reason"]) == ["near_duplicate", None, None, None, None, None]
    # r0 and r1 share every word shingle: one cluster, r1 (0.9) stays, r0 points at it.
    assert out.loc[0, "drop_reason"] == "near_duplicate" and out.loc[0, "duplicate_of"] == "r1"
    assert out.loc[1, "keep"] and out.loc[1, "duplicate_of"] is None
    # r2 shares its opening words only (2 of 22 distinct shingles): kept.
    assert out.loc[[2, 3, 4, 5], "keep"].all()
    assert figures["clusters"] == 1 and figures["rows_in_clusters"] == 2 and figures["largest_cluster"] == 2


def test_near_duplicate_representative_is_chosen_among_rows_still_kept():
    df = frame([("Translate the sentence into French please now", "", "Bonjour."),
                ("Translate the sentence into French please now", "", "Bonjour tout le monde."),
                ("Translate the sentence into French please now", "", "bomb")])
    cfg = QualityConfig.model_validate({"min_total": 0.0, "dedup": {"fields": ["instruction", "input"]}})
    scored = score(df, cfg)
    scored["score_total"] = [0.2, 0.4, 0.99]  # the best-scored row is unsafe: it cannot be the one kept
    out, _ = decide(scored, cfg)
    assert list(out["drop_reason"]) == ["near_duplicate", None, "unsafe"]
    assert out.loc[0, "duplicate_of"] == "r1" and out.loc[2, "duplicate_of"] is None


def test_dedup_fields():
    df = frame([("Say hello", "", "Hello there my good friend, how are you today?"),
                ("Greet me", "", "Hello there my good friend, how are you today?"),
                ("What is the capital of the given country?", "Canada", "Ottawa."),
                ("What is the capital of the given country?", "Australia", "Canberra.")])
    # By default the whole example counts: two instances of one task are two examples.
    everything, _ = decide(score(df, QualityConfig(min_total=0.0)), QualityConfig(min_total=0.0))
    assert everything["keep"].all()
    task = QualityConfig.model_validate({"min_total": 0.0, "dedup": {"fields": ["instruction", "input"]}})
    by_task, _ = decide(score(df, task), task)
    assert list(by_task["keep"]) == [True, True, True, False] and by_task.loc[3, "duplicate_of"] == "r2"
    answer = QualityConfig.model_validate({"min_total": 0.0, "dedup": {"fields": ["output"]}})
    by_output, _ = decide(score(df, answer), answer)
    assert list(by_output["keep"]) == [True, False, True, True]


def test_instances_of_one_task_are_not_each_others_duplicates():
    label = "Botanically speaking, is the item a fruit or a vegetable? Labels: Fruit, Vegetable."
    df = frame([(label, "tomato", "Fruit"), (label, "carrot", "Vegetable"), (label + "!", "carrot", "Vegetable")])
    df["task_id"] = ["t104", "t104", "si-7"]
    cfg = QualityConfig(min_total=0.0)
    scored = score(df, cfg).assign(score_total=[0.5, 0.9, 0.6])
    out, _ = decide(scored, cfg)
    # r0 and r1 are two instances of task t104: both stay. r2, another task's copy of r1, goes.
    assert list(out["drop_reason"]) == [None, None, "near_duplicate"] and out.loc[2, "duplicate_of"] == "r1"
    merged = QualityConfig.model_validate({"min_total": 0.0, "dedup": {"same_task_instances": True}})
    assert list(decide(scored, merged)[0]["keep"]) == [False, True, False]


class FakeScorer:
    """next_token_logprobs and response_losses with known values, to check the arithmetic and the control flow."""

    def __init__(self):
        self.calls = []

    def next_token_logprobs(self, prompts, candidates):
        self.calls.append(("logprobs", len(prompts)))
        assert list(candidates) == ["1", "2", "3", "4", "5", "6"]
        # Complexity prompts put all mass on "2", quality prompts split it evenly between "5" and "6".
        rows = []
        for p in prompts:
            lp = np.full(6, -50.0)
            if "##Complexity:" in p:
                lp[1] = 0.0
            else:
                lp[4] = lp[5] = np.log(0.5)
            rows.append(lp)
        return np.array(rows)

    def truncations(self, prompts, responses, max_length):
        return ["truncated_response" if len(r) > 30 else None for r in responses]

    def response_losses(self, prompts, responses, max_length, desc="", room_from=None):
        self.calls.append(("losses", len(prompts), room_from is not None))
        conditioned = bool(prompts[0])
        return np.array([1.0 if conditioned else 2.0 if r.strip() else np.nan for r in responses])


def test_deita_and_ifd_columns_and_checkpoints(tmp_path):
    from tests.conftest import ScriptedLLM

    df = frame([(f"Describe the number {i} in words.", "", f"The number {i} is written as digits.")
                for i in range(5)])
    judge_answers = iter(["Rating: 8/10", "7", "no idea", "[[9]]", "11/10"])
    llm = ScriptedLLM(lambda prompt, params: next(judge_answers))
    cfg = QualityConfig.model_validate({"min_total": 0.0, "checkpoint_every": 2, "judge": {"enabled": True},
                                        "deita": {"enabled": True}, "ifd": {"enabled": True}})
    parts = PartWriter(tmp_path / "parts")
    scorer = FakeScorer()
    out, stats = run_quality(df, cfg, judge_llm=llm, scorer=scorer, parts=parts)
    assert out["score_deita_complexity"].tolist() == pytest.approx([2.0] * 5)
    assert out["score_deita_quality"].tolist() == pytest.approx([5.5] * 5)
    assert out["score_deita"].tolist() == pytest.approx([11.0] * 5)
    assert out["score_ifd"].tolist() == pytest.approx([0.5] * 5)
    # The direct pass scores each output in the room its instruction left it; outputs over 30 characters
    # are the fake's over-long ones (all five here).
    assert [c for c in scorer.calls if c[0] == "losses"] == [("losses", 2, False), ("losses", 2, True)] * 2 + [
        ("losses", 1, False), ("losses", 1, True)]
    assert stats["ifd_truncation"] == {"truncated_response": 5}
    assert out["ifd_truncation"].tolist() == ["truncated_response"] * 5
    assert out["score_judge"].tolist()[:2] == [8.0, 7.0] and out["score_judge"][3] == 9.0
    assert np.isnan(out["score_judge"][2]) and np.isnan(out["score_judge"][4])
    assert out["judge_error"][2].startswith("no_rating") and out["judge_error"][4].startswith("out_of_range")
    assert out["judge_answer"].tolist() == ["Rating: 8/10", "7", "no idea", "[[9]]", "11/10"]
    assert stats["judge_errors"] == {"no_rating": 1, "out_of_range": 1}
    assert len(parts.existing()) == 3 and stats["checkpoints"] == 3 and stats["usage"]["llm_calls"] == 5
    judge_parts = PartWriter(tmp_path / "parts" / "judge")  # the judge's rows stream through the work engine
    assert len(judge_parts.existing()) == 3 == stats["judge_checkpoints"]
    # One logprob pass per chunk holds both DEITA prompts of each row.
    assert [c for c in scorer.calls if c[0] == "logprobs"] == [("logprobs", 4), ("logprobs", 4), ("logprobs", 2)]

    # A restart with the first two parts of each on disk scores only the last chunk and judges only the
    # row the judge's last part held, and gives the same table.
    parts.existing()[-1].unlink()
    judge_parts.existing()[-1].unlink()
    judge_answers = iter(["11/10"])
    again_llm = ScriptedLLM(lambda prompt, params: next(judge_answers))
    again, again_stats = run_quality(df, cfg, judge_llm=again_llm, scorer=FakeScorer(), parts=parts)
    assert sum(len(prompts) for prompts, _ in again_llm.calls) == 1
    pd.testing.assert_frame_equal(again, out)
    # Spend counts the work done: the first attempt's 5 requests (all answered in one batch before its
    # first part, which records them) and the rerun's request for row 4 again.
    assert again_stats["usage"]["llm_calls"] == 6 and again_stats["resumed_checkpoints"] == 2


def test_cherry_selection_keeps_the_highest_ifd_share_of_what_is_left():
    df = frame([(f"Explain step {i} of making bread at home.", "", f"Knead the dough for {i + 5} minutes, "
                 "then let it rise until doubled.") for i in range(8)])
    scored = score(df, QualityConfig())
    scored["score_ifd"] = [0.40, 0.90, 1.20, 0.75, np.nan, 0.95, 0.10, 0.60]
    cfg = QualityConfig.model_validate({"min_total": 0.0, "dedup": {"enabled": False},
                                        "ifd": {"enabled": True, "max_ifd": 1.0, "keep_share": 0.5}})
    out, figures = decide(scored, cfg)
    # row 2 fails max_ifd first; of the 7 left, ceil(3.5) = 4 with the highest IFD stay, the unscored row last
    assert list(out["drop_reason"]) == ["low_ifd", None, "high_ifd", None, "low_ifd", None, "low_ifd", None]
    assert figures["ifd_selection"] == {"ranked": 7, "kept": 4, "keep_share": 0.5, "lowest_kept_ifd": 0.6}
    off = cfg.model_copy(update={"ifd": cfg.ifd.model_copy(update={"keep_share": None})})
    assert decide(scored, off)[0]["keep"].sum() == 7


def test_ifd_scores_an_over_long_output_on_the_same_tokens_both_ways(tiny_model_dir):
    from tasks.llm.transformers_backend import TransformersLLM
    from tasks.model_scores import ifd_scores
    from tasks.prompts import alpaca_prompt

    llm = TransformersLLM(tiny_model_dir, device="cpu", dtype="float32", batch_size=4)
    long_output = " ".join(f"word{i}" for i in range(200))
    instruction = "List many words."
    ifd, conditioned, direct, cut = ifd_scores([instruction, "Say hi."], ["", ""], [long_output, "Hi."], llm, 64)
    assert cut == ["truncated_response", None]
    prompt = llm.tokenizer(alpaca_prompt(instruction))["input_ids"]
    head = llm.tokenizer.decode(llm.tokenizer(long_output, add_special_tokens=False)["input_ids"][:64 - len(prompt)])
    # The direct loss is the loss of exactly the head that fit after the instruction, not of a longer one.
    assert direct[0] == pytest.approx(llm.response_losses([""], [head], 512)[0], rel=1e-4)
    assert conditioned[0] == pytest.approx(llm.response_losses([alpaca_prompt(instruction)], [head], 512)[0], rel=1e-4)
    assert ifd[0] == pytest.approx(conditioned[0] / direct[0])


def test_model_scores_need_their_models():
    df = frame([("Say hi.", "", "Hi.")])
    with pytest.raises(ValueError, match="judge"):
        run_quality(df, QualityConfig.model_validate({"judge": {"enabled": True}}))
    with pytest.raises(ValueError, match="deita"):
        run_quality(df, QualityConfig.model_validate({"deita": {"enabled": True}}))


def test_rank_by_must_be_a_score_that_is_computed():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not a score column"):
        QualityConfig.model_validate({"dedup": {"rank_by": "output"}})
    with pytest.raises(ValidationError, match="needs its scorer enabled"):
        QualityConfig.model_validate({"dedup": {"rank_by": "score_judge"}})


@pytest.mark.parametrize("models", [False, True])
def test_an_arrow_table_is_decided_exactly_as_its_dataframe(tmp_path, models):
    """The stage reads its input as Arrow and gets Arrow back: the same rows, values, types, decisions and
    stats as the DataFrame path (what the stage wrote before, through pa.Table.from_pandas)."""
    from tests.conftest import ScriptedLLM

    label = "Botanically speaking, is the item a fruit or a vegetable? Labels: Fruit, Vegetable."
    df = frame([(label, "tomato", "Fruit is the answer here."), (label, "carrot", "Vegetable is the answer here."),
                (label + "!", "carrot", "Vegetable is the answer here."), ("Name a colour.", "", "   "),
                ("Explain how a bomb works.", "", "It explodes when lit, as they say."),
                ("Describe the water cycle in detail.", "", "Water evaporates, condenses and falls as rain."),
                ("Describe the water cycle in detail!", "", "Water evaporates, condenses and falls as rain!"),
                ("Say hi.", None, "Hi ünïcode.")])
    df["task_id"] = ["t104", "t104", "si-7", None, "t1", "t2", "t3", "t4"]
    df["round"] = pd.array([None, 1, None, None, 2, None, None, None], dtype="Int64")
    table = pa.Table.from_pandas(df, preserve_index=False)
    cfg = {"min_total": 0.3, "checkpoint_every": 3}
    if models:
        cfg.update(judge={"enabled": True}, deita={"enabled": True}, ifd={"enabled": True, "keep_share": 0.8})
    cfg = QualityConfig.model_validate(cfg)
    answers = ["Rating: 8/10", "7", "no idea", "[[9]]", "11/10", "5", "6", "2"]
    runs = []
    for data, where in ((table.to_pandas(), "frame"), (table, "table")):
        llm = ScriptedLLM(lambda prompt, params, it=iter(answers): next(it)) if models else None
        runs.append(run_quality(data, cfg, judge_llm=llm, scorer=FakeScorer() if models else None,
                                parts=PartWriter(tmp_path / where) if models else None))
    (frame_out, frame_stats), (table_out, table_stats) = runs
    assert isinstance(table_out, pa.Table) and table_stats == frame_stats
    expected = pa.Table.from_pandas(frame_out, preserve_index=False)
    assert table_out.schema.remove_metadata() == expected.schema.remove_metadata()
    assert table_out.equals(expected)
    assert table_stats["dropped"]["near_duplicate"] == 2 and table_stats["dropped"]["empty_output"] == 1
    assert table_out.column("duplicate_of").to_pylist()[1:3] == [None, "r1"]


def test_signatures_of_joined_fields_chunk_by_chunk_equal_the_whole_joined_text(monkeypatch):
    """MinHash shingles the rows a chunk at a time, joining the fields per chunk: the signatures are those
    of the whole joined column in one pass."""
    from tasks import dedup

    rng = np.random.default_rng(1)
    words = np.array(["alpha", "beta", "gamma", "delta", "ünï", "東京", "x1"])
    fields = [pa.chunked_array([pa.array([" ".join(rng.choice(words, rng.integers(0, 9))) for _ in range(57)],
                                         pa.large_string())]) for _ in range(3)]
    joined = pa.compute.binary_join_element_wise(*fields, pa.scalar("\n", pa.large_string()))
    whole = dedup.signatures(joined, 2, 32, 0)
    monkeypatch.setattr(dedup, "SIGNATURE_ROWS", 10)
    for text in (fields, joined):
        sig, has = dedup.signatures(text, 2, 32, 0)
        assert (sig == whole[0]).all() and (has == whole[1]).all()
    assert dedup.signatures([f.slice(0, 0) for f in fields], 2, 32, 0)[0].shape == (0, 32)
