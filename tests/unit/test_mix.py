import json

import numpy as np
import pandas as pd
import pytest

from tasks.config import MixConfig
from tasks.conversation import messages_array
from tasks.exports import export_all
from tasks.mix import MixError, draw, largest_remainder, mix, source_labels, target_shares


def table(counts, keep_all=True, **extra):
    rows = []
    for cat, n in counts.items():
        rows += [{"id": f"{cat}-{i}", "category": cat, "keep": keep_all, "origin": "seed",
                  "instruction": f"Do {cat} {i}.", "input": "", "output": f"Done {i}.", **extra} for i in range(n)]
    return pd.DataFrame(rows)


def train_counts(out):
    return out[out["split"] == "train"]["category"].value_counts().to_dict()


NO_COT = {"cot_share": None}


def test_largest_remainder_sums_exactly():
    assert largest_remainder(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}
    assert largest_remainder(7, {"a": 0.5, "b": 0.25, "c": 0.25}) == {"a": 3, "b": 2, "c": 2}
    assert largest_remainder(0, {"a": 1}) == {"a": 0}


def test_weights_mode_exact_counts_and_eval_disjoint():
    df = table({"qa": 50, "math": 50, "coding": 20})
    out, stats, mixed = mix(df, MixConfig(mode="weights", weights={"qa": 2, "math": 1, "coding": 1}, total=40,
                                          eval_fraction=0.1, min_eval=5, seed=3, **NO_COT))
    train, evals = out[out["split"] == "train"], out[out["split"] == "eval"]
    assert train_counts(out) == {"qa": 20, "math": 10, "coding": 10}
    assert len(evals) == 12 and evals["category"].value_counts().to_dict() == {"qa": 5, "math": 5, "coding": 2}
    assert not set(train["id"]) & set(evals["id"]) and train["id"].is_unique
    assert stats["sources"]["qa"]["requested_share"] == 0.5 and stats["sources"]["qa"]["achieved_share"] == 0.5
    assert mixed.manifest["train_ids"] == list(train["id"]) and mixed.manifest["seed"] == 3


def test_proportional_with_cap():
    df = table({"qa": 100, "math": 30, "coding": 10})
    out, stats, _ = mix(df, MixConfig(mode="proportional", cap=20, min_eval=3, eval_fraction=0.01, **NO_COT))
    # eval takes 3 rows (qa 2, math 1: in proportion to n - 1); then qa and math are capped at 20
    assert train_counts(out) == {"qa": 20, "math": 20, "coding": 10}
    assert stats["sources"]["qa"]["available"] == 20 and stats["sources"]["coding"]["requested_share"] == 0.2
    out, _, _ = mix(df, MixConfig(mode="proportional", total=28, min_eval=3, eval_fraction=0.01, **NO_COT))
    assert train_counts(out) == {"qa": 20, "math": 6, "coding": 2}  # 98 : 29 : 10 of 28, largest remainder


def test_temperature_one_equals_proportional_and_large_t_approaches_uniform():
    df = table({"qa": 90, "math": 30, "coding": 12})
    common = dict(total=30, min_eval=3, eval_fraction=0.01, **NO_COT)
    prop, _, _ = mix(df, MixConfig(mode="proportional", **common))
    t1, _, _ = mix(df, MixConfig(mode="temperature", temperature=1.0, **common))
    assert train_counts(t1) == train_counts(prop) == {"qa": 20, "math": 7, "coding": 3}
    t3, _, _ = mix(df, MixConfig(mode="temperature", temperature=3.0, **common))
    assert train_counts(t3) == {"qa": 14, "math": 9, "coding": 7}  # 88^(1/3) : 29^(1/3) : 12^(1/3) of 30
    big, _, _ = mix(df, MixConfig(mode="temperature", temperature=1000.0, **common))
    assert train_counts(big) == {"qa": 10, "math": 10, "coding": 10}
    shares = target_shares({"a": 1000, "b": 10}, MixConfig(mode="temperature", temperature=1e6))
    assert abs(shares["a"] - 0.5) < 1e-4


def test_without_replacement_a_short_source_gives_all_and_others_fill():
    df = table({"qa": 20, "math": 4})
    out, stats, _ = mix(df, MixConfig(mode="weights", weights={"qa": 1, "math": 1}, total=16, min_eval=2,
                                      eval_fraction=0.1, **NO_COT))
    assert train_counts(out) == {"qa": 12, "math": 4}  # eval took 2 qa rows; math gives all 4, qa fills in
    out, _, _ = mix(df, MixConfig(mode="weights", weights={"qa": 1, "math": 1}, total=20, min_eval=2,
                                  replace=True, **NO_COT))
    assert train_counts(out) == {"qa": 10, "math": 10}


def test_cot_share():
    df = pd.concat([table({"qa": 60, "math": 20}), table({"writing": 20})], ignore_index=True)
    df["evol_operation"] = None
    df.loc[df["category"] == "writing", "evol_operation"] = "increase_reasoning"
    out, stats, _ = mix(df, MixConfig(total=50, min_eval=3, eval_fraction=0.01, cot_share=0.1))
    train = out[out["split"] == "train"]
    cot = train["category"].isin(["math"]) | (train["evol_operation"] == "increase_reasoning")
    assert cot.sum() == 5 and stats["cot"]["achieved_share"] == 0.1 and stats["cot"]["rows"] == 5
    assert len(train) == 50
    out, stats, _ = mix(table({"qa": 30, "math": 2}), MixConfig(total=20, min_eval=2, cot_share=0.5))
    assert stats["cot"]["rows"] == 2 and stats["train"] == 20  # only 2 math rows (eval took qa): qa fills in


def test_sources_by_origin_and_evol_round():
    df = table({"qa": 4})
    evol = table({"qa": 4}).assign(origin="evol", round=[1, 1, 2, 2], id=lambda d: d["id"] + ">e")
    both = pd.concat([df, evol], ignore_index=True)
    assert list(source_labels(both, "origin")) == ["seed"] * 4 + ["evol_r1"] * 2 + ["evol_r2"] * 2
    assert source_labels(both, "origin_category").iloc[-1] == "evol_r2/qa"


def test_datasets_are_sources_with_exact_weights():
    """Rows from three seed datasets (and the tasks Self-Instruct made) mixed 2 : 1 : 1 : 0 by dataset."""
    df = pd.concat([table({"qa": 30, "math": 30}).assign(dataset="alpaca"), table({"qa": 40}).assign(dataset="dolly"),
                    table({"coding": 20}).assign(dataset="ours"),
                    table({"qa": 10}).assign(dataset="self_instruct", origin="self_instruct")], ignore_index=True)
    df["id"] = df["dataset"] + "/" + df["id"]
    assert list(source_labels(df, "dataset").unique()) == ["alpaca", "dolly", "ours", "self_instruct"]
    out, stats, _ = mix(df, MixConfig(mode="weights", source_by="dataset", total=40, min_eval=4, seed=1,
                                      weights={"alpaca": 2, "dolly": 1, "ours": 1, "self_instruct": 0}, **NO_COT))
    train = out[out["split"] == "train"]
    assert train["dataset"].value_counts().to_dict() == {"alpaca": 20, "dolly": 10, "ours": 10}
    assert stats["sources"]["alpaca"]["requested_share"] == 0.5
    with pytest.raises(ValueError, match="no `dataset` column"):
        mix(table({"qa": 10}), MixConfig(source_by="dataset", min_eval=2))


def test_quality_weight_prefers_high_scores():
    df = table({"qa": 200})
    df["score_total"] = np.where(np.arange(200) < 20, 1.0, 0.0)
    out, _, _ = mix(df, MixConfig(total=20, quality_weight="score_total", min_eval=2, eval_fraction=0.01, **NO_COT))
    train = out[out["split"] == "train"]
    assert (train["score_total"] == 1.0).sum() >= 18  # the 2 eval rows may have taken some
    with pytest.raises(MixError, match="mix.quality_weight: no column `score_x`; score columns: score_total"):
        mix(df, MixConfig(quality_weight="score_x"))


def test_deterministic_per_seed():
    df = table({"qa": 30, "math": 30})
    a, _, _ = mix(df, MixConfig(total=20, seed=1))
    b, _, _ = mix(df, MixConfig(total=20, seed=1))
    c, _, _ = mix(df, MixConfig(total=20, seed=2))
    assert list(a["id"]) == list(b["id"]) and list(a["id"]) != list(c["id"])


def test_only_kept_rows_and_errors(caplog):
    df = pd.concat([table({"qa": 10}), table({"math": 5}, keep_all=False)])
    out, stats, _ = mix(df, MixConfig(min_eval=2))
    assert set(out["category"]) == {"qa"} and stats["dropped"]["not_kept"] == 5
    with pytest.raises(MixError, match="mix.weights names sources with no rows: poetry; sources \\(by category\\): qa"):
        mix(df, MixConfig(mode="weights", weights={"qa": 1, "poetry": 1}, min_eval=2))
    out, stats, _ = mix(df, MixConfig(mode="weights", weights={"qa": 1, "poetry": 1}, min_eval=2,
                                      unknown_sources="warn"))
    assert stats["warnings"] and "poetry" in caplog.text and len(out) == 10
    with pytest.raises(MixError, match="mix.weights is empty"):
        mix(df, MixConfig(mode="weights", min_eval=2))
    with pytest.raises(MixError, match="at least 2 kept rows, got 0"):
        mix(table({"qa": 3}, keep_all=False), MixConfig())
    with pytest.raises(MixError, match="at least 2 kept rows, got 0"):
        mix(table({}).reindex(columns=["id", "category", "keep", "origin"]), MixConfig())


def test_draw_takes_exact_counts_per_group():
    rng = np.random.default_rng(0)
    codes = np.array([0, 1, 0, 2, 1, 0, 2, 2])
    picked = draw(codes, np.array([2, 1, 3]), rng, replace=False)
    assert sorted(np.bincount(codes[picked]).tolist()) == [1, 2, 3] and len(set(picked.tolist())) == 6


def test_exports_round_trip(tmp_path):
    from datasets import load_dataset, load_from_disk

    df = table({"qa": 12, "math": 8})
    df.loc[0, "input"] = "Some context, with \"quotes\" and ünïcode."
    _, _, mixed = mix(df, MixConfig(min_eval=4))
    splits = {"train": mixed.train, "eval": mixed.eval}
    written = export_all(splits, tmp_path, ["alpaca", "sharegpt", "messages", "prompt_completion", "hf_dataset"])
    assert written["alpaca"] == ["train.alpaca.json", "eval.alpaca.json"]
    for split, frame in splits.items():
        alpaca = load_dataset("json", data_files=str(tmp_path / f"{split}.alpaca.json"), split="train")
        assert alpaca.column_names == ["instruction", "input", "output"] and len(alpaca) == len(frame)
        assert alpaca["output"] == list(frame["output"]) and alpaca["input"] == list(frame["input"])
        share = load_dataset("json", data_files=str(tmp_path / f"{split}.sharegpt.jsonl"), split="train")
        assert [c[1]["value"] for c in share["conversations"]] == list(frame["output"])
        assert share[0]["conversations"][0]["from"] == "human"
        msgs = load_dataset("json", data_files=str(tmp_path / f"{split}.messages.jsonl"), split="train")
        assert [m[0]["role"] for m in msgs["messages"]] == ["user"] * len(frame)
        pc = load_dataset("json", data_files=str(tmp_path / f"{split}.prompt_completion.jsonl"), split="train")
        assert pc["completion"] == list(frame["output"]) and pc[0]["prompt"].endswith("### Response:\n")
    hf = load_from_disk(str(tmp_path / "hf_dataset"))
    assert set(hf) == {"train", "eval"} and hf["train"]["id"] == list(mixed.train["id"])
    with_input = [m for m in load_dataset("json", data_files=str(tmp_path / "train.messages.jsonl"),
                                          split="train")["messages"] if "ünïcode" in m[0]["content"]]
    assert all(m[0]["content"].startswith("Do qa 0.\n\nSome context") for m in with_input)
    assert json.loads((tmp_path / "train.alpaca.json").read_text())[0].keys() == {"instruction", "input", "output"}


def lineage_table():
    """Tempts a row-level split: 12 tasks of 3 instances each, every instance evolved twice (root_id, task_id
    inherited), a generated task that repeats a seed's instruction word for word (another task_id, other
    case and spacing), and an evolution whose root lost its own row but whose task is kept."""
    rows = []
    for t in range(12):
        cat = ("qa", "math", "coding")[t % 3]
        for k in range(3):
            iid = f"seed_{t}#{k}"
            rows.append({"id": iid, "task_id": f"seed_{t}", "root_id": None, "instruction": f"Task {t} asks this.",
                         "input": f"case {k}", "output": f"answer {t}.{k}", "category": cat, "origin": "seed"})
            for r in (1, 2):
                rows.append({"id": f"{iid}>e{r}", "task_id": f"seed_{t}", "root_id": iid,
                             "instruction": f"Task {t}, evolved {k}.{r}.", "input": "", "output": f"deeper {t}.{k}.{r}",
                             "category": cat, "origin": "evol"})
    rows.append({"id": "si-1#0", "task_id": "si-1", "root_id": None, "instruction": "  task 0 ASKS   this. ",
                 "input": "", "output": "a copy", "category": "math", "origin": "self_instruct"})
    rows.append({"id": "si-2#0>e1", "task_id": "si-2", "root_id": "si-2#0", "instruction": "Orphan evolved.",
                 "input": "", "output": "x", "category": "qa", "origin": "evol"})
    rows.append({"id": "si-2#1", "task_id": "si-2", "root_id": None, "instruction": "Orphan task.",
                 "input": "", "output": "y", "category": "qa", "origin": "self_instruct"})
    return pd.DataFrame(rows).assign(keep=True)


def test_lineage_groups_link_tasks_roots_and_instruction_text():
    from tasks.mix import lineage_groups

    df = lineage_table()
    groups = pd.Series(lineage_groups(df), index=df["id"])
    assert groups.nunique() == 12 + 1  # the copied instruction joins seed_0; si-2's rows are one group
    assert groups["si-1#0"] == groups["seed_0#2>e1"] and groups["si-2#0>e1"] == groups["si-2#1"]
    assert groups["seed_1#0"] != groups["seed_2#0"]


@pytest.mark.parametrize("seed", range(5))
def test_eval_split_shares_no_task_root_or_instruction_with_train(seed):
    df = lineage_table()
    out, stats, _ = mix(df, MixConfig(mode="proportional", eval_fraction=0.25, min_eval=8, seed=seed, **NO_COT))
    train, evals = out[out["split"] == "train"], out[out["split"] == "eval"]
    norm = lambda s: set(s.str.split().str.join(" ").str.lower())  # noqa: E731
    roots = lambda d: set(d["root_id"].dropna()) | set(d["id"])  # noqa: E731
    assert len(evals) >= 8 and len(train) == len(df) - len(evals)
    assert not set(train["task_id"]) & set(evals["task_id"])
    assert not set(train["root_id"].dropna()) & roots(evals) and not set(evals["root_id"].dropna()) & roots(train)
    assert not norm(train["instruction"]) & norm(evals["instruction"])
    assert set(evals["category"]) == {"qa", "math", "coding"}  # still stratified by source


@pytest.mark.parametrize("cfg", [
    MixConfig(min_eval=4, seed=1),
    MixConfig(mode="weights", weights={"qa": 2, "math": 1, "coding": 1}, total=20, min_eval=4, seed=2),
    MixConfig(mode="temperature", source_by="origin_category", cap=6, quality_weight="score_total", min_eval=4),
    MixConfig(mode="proportional", source_by="origin", replace=True, total=50, min_eval=4, cot_share=0.2),
])
def test_an_arrow_table_mixes_exactly_as_its_dataframe(cfg):
    """The stage mixes the quality artifact as Arrow: the same rows in the same order, the same values and
    types as the DataFrame path, and the splits are slices of the stage's table."""
    import pyarrow as pa

    df = lineage_table()
    rng = np.random.default_rng(0)
    df = df.assign(keep=rng.random(len(df)) < 0.9, score_total=rng.random(len(df)),
                   input=df["input"].where(rng.random(len(df)) < 0.8, None),
                   round=pd.array(np.where(df["origin"] == "evol", 1, None), dtype="Int64"),
                   evol_operation=np.where(rng.random(len(df)) < 0.3, "increase_reasoning", None),
                   drop_reason=pd.Series([None] * len(df), dtype=object))
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.set_column(table.column_names.index("drop_reason"), "drop_reason",  # as quality writes it
                             pa.array([None] * len(df), pa.string()))
    chat = [{"role": "user", "content": "Task 0 asks this."}, {"role": "assistant", "content": "answer"},
            {"role": "user", "content": "More?"}, {"role": "assistant", "content": "more"}]
    table = table.append_column("messages", messages_array(chat if i % 5 == 0 else None for i in range(len(df))))
    out_t, stats_t, mixed_t = mix(table, cfg)
    out_d, stats_d, mixed_d = mix(table.to_pandas(), cfg)
    assert isinstance(out_t, pa.Table) and stats_t == stats_d and mixed_t.manifest == mixed_d.manifest
    assert out_t.equals(pa.Table.from_pandas(out_d, preserve_index=False))
    assert out_t.column_names == list(out_d.columns) and out_t.schema.field("round").type == pa.int64()
    pd.testing.assert_frame_equal(out_t.to_pandas(), out_d)
    assert mixed_t.train.equals(out_t.slice(0, stats_t["train"])) and mixed_t.eval.num_rows == stats_t["eval"]
    assert out_t.column("messages").type == table.column("messages").type  # the conversations travel too
    assert sum(v["multi_turn"] for v in stats_t["sources"].values()) == sum(
        m is not None for m in mixed_t.train.column("messages").to_pylist())


def test_instruction_codes_fold_as_python_does():
    """Column-wise folding (ASCII rows) and Python's split/join/lower (the rest) group the same rows as
    Python's own folding of every row."""
    from tasks.mix import _fold, instruction_codes

    rng = np.random.default_rng(0)
    pieces = ["Task", "task", "TASK", " ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x1f", "\xa0", "\u2003",
              "İ", "ß", "Straße", "ǅ", "Σ", "é", "x", "", "\x85", "\u3000"]
    texts = ["".join(rng.choice(pieces, rng.integers(0, 6))) for _ in range(3000)] + [None, None]
    series = pd.Series(texts, dtype=object)
    codes = instruction_codes(series)
    expected = pd.factorize(_fold(series).to_numpy(dtype=object))[0]
    pairs = rng.integers(0, len(texts), (20000, 2))
    same = codes[pairs[:, 0]] == codes[pairs[:, 1]]
    assert (same == (expected[pairs[:, 0]] == expected[pairs[:, 1]])).all()
    assert len(set(codes)) == len(set(expected))


def test_conversations_are_rows_of_their_source_with_their_turns_counted():
    """Conversation rows are drawn as rows of their category, carry `messages` into train and eval, and each
    source's manifest entry counts the assistant turns and the conversations of its training rows."""
    import pyarrow as pa

    df = table({"qa": 12, "math": 8})
    chats = {}
    for i in range(0, 12, 3):  # qa-0, qa-3, qa-6, qa-9: 3 exchanges, the last with a system prompt too
        chats[f"qa-{i}"] = ([{"role": "system", "content": "Be brief."}] if i == 9 else []) + [
            {"role": "user" if k % 2 == 0 else "assistant", "content": f"{'Do' if k == 0 else 'turn'} qa {i} {k}."}
            for k in range(6)]
    chats["math-0"] = [{"role": "system", "content": "Show work."}, {"role": "user", "content": "Do math 0."},
                       {"role": "assistant", "content": "Done 0."}]  # one exchange and a system prompt
    messages = messages_array(chats.get(i) for i in df["id"])
    table_in = pa.Table.from_pandas(df, preserve_index=False).append_column("messages", messages)
    cfg = MixConfig(min_eval=4, seed=0, **NO_COT)
    out, stats, mixed = mix(table_in, cfg)
    rows = out.to_pandas()
    for _, r in rows.iterrows():  # every row keeps its own conversation, whichever split it is in
        expected = chats.get(r["id"])
        assert (r["messages"] is None) if expected is None else [dict(m) for m in r["messages"]] == expected
    train = rows[rows["split"] == "train"]
    for source in ("qa", "math"):
        mine = train[train["category"] == source]
        n_chats = int(mine["messages"].notna().sum())
        turns = sum(3 if i in chats and i != "math-0" else 1 for i in mine["id"])
        assert stats["sources"][source]["multi_turn"] == n_chats and stats["sources"][source]["turns"] == turns
        assert mixed.manifest["sources"][source]["rows"] == len(mine)
    assert sum(v["turns"] for v in stats["sources"].values()) > len(train)  # some conversations were drawn
    # The DataFrame path (Python lists of turns) draws and counts the same.
    frame = table_in.to_pandas()
    frame["messages"] = [chats.get(i) for i in frame["id"]]
    _, frame_stats, frame_mixed = mix(frame, cfg)
    assert frame_stats == stats and frame_mixed.manifest == mixed.manifest
