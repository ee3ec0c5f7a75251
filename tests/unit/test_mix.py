import pandas as pd
import pytest

from tasks.config import MixConfig
from tasks.mix import MixError, largest_remainder, mix


def table(counts, keep_all=True):
    rows = []
    for cat, n in counts.items():
        rows += [{"id": f"{cat}-{i}", "category": cat, "keep": keep_all} for i in range(n)]
    return pd.DataFrame(rows)


def test_largest_remainder_sums_exactly():
    assert largest_remainder(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}
    assert largest_remainder(7, {"a": 0.5, "b": 0.25, "c": 0.25}) == {"a": 3, "b": 2, "c": 2}
    assert largest_remainder(0, {"a": 1}) == {"a": 0}


def test_weighted_counts_exact_and_eval_disjoint():
    df = table({"qa": 50, "math": 50, "coding": 20})
    out, stats = mix(df, MixConfig(weights={"qa": 2, "math": 1, "coding": 1}, total=40, eval_fraction=0.1,
                                   min_eval=5, seed=3))
    train, evals = out[out["split"] == "train"], out[out["split"] == "eval"]
    assert train["category"].value_counts().to_dict() == {"qa": 20, "math": 10, "coding": 10}
    assert len(evals) == 12 and evals["category"].value_counts().to_dict() == {"qa": 5, "math": 5, "coding": 2}
    assert not set(train["id"]) & set(evals["id"]) and train["id"].is_unique
    assert stats["categories"]["qa"]["requested_share"] == 0.5 and stats["categories"]["qa"]["achieved_share"] == 0.5


def test_deterministic_per_seed():
    df = table({"qa": 30, "math": 30})
    a, _ = mix(df, MixConfig(total=20, seed=1))
    b, _ = mix(df, MixConfig(total=20, seed=1))
    c, _ = mix(df, MixConfig(total=20, seed=2))
    assert list(a["id"]) == list(b["id"]) and list(a["id"]) != list(c["id"])


def test_caps_without_replacement_and_fills_with():
    df = table({"qa": 20, "math": 4})
    out, stats = mix(df, MixConfig(weights={"qa": 1, "math": 1}, total=16, min_eval=2, eval_fraction=0.1))
    train = out[out["split"] == "train"]
    # math has 4 rows (none went to eval): it gives all 4, and qa fills the rest of the 16
    assert train["category"].value_counts().to_dict() == {"qa": 12, "math": 4}
    assert stats["categories"]["math"]["achieved_share"] == 0.25
    out, _ = mix(df, MixConfig(weights={"qa": 1, "math": 1}, total=20, min_eval=2, replace=True))
    assert out[out["split"] == "eval"]["category"].value_counts().to_dict() == {"qa": 2}
    assert out[out["split"] == "train"]["category"].value_counts().to_dict() == {"qa": 10, "math": 10}


def test_only_kept_rows_and_errors():
    df = pd.concat([table({"qa": 10}), table({"math": 5}, keep_all=False)])
    out, stats = mix(df, MixConfig(min_eval=2))
    assert set(out["category"]) == {"qa"} and stats["dropped"]["not_kept"] == 5
    with pytest.raises(MixError, match="categories with no rows: poetry"):
        mix(df, MixConfig(weights={"qa": 1, "poetry": 1}, min_eval=2))
    with pytest.raises(MixError, match="at least 2 kept rows"):
        mix(table({"qa": 3}, keep_all=False), MixConfig())
