"""Cutting a stage's model work into shards: even contiguous ranges, shard names, only unfinished items
handed out, each shard its own parts directory, and a shard's function called where it runs."""

import json

import pyarrow as pa
import pytest

from tasks.artifacts import PartWriter
from tasks.shards import Shard, Sharding, cut, plan, run_items, run_shard, summary


def test_cut_gives_contiguous_near_equal_ranges_and_never_an_empty_one():
    assert cut(10, 4) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert cut(3, 8) == [(0, 1), (1, 2), (2, 3)]  # more shards than items: one item each
    assert cut(0, 4) == []
    for n, k in ((1000, 7), (17, 17), (5, 1)):
        ranges = cut(n, k)
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a < b for a, b in ranges) and all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))
        assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_plan_names_each_shard_by_stage_index_and_span():
    shards = plan("quality", "m:f", 5, 2, lambda k, a, b: {"k": k, "span": [a, b]})
    assert [s.name for s in shards] == ["quality shard 1/2 (rows 0-1)", "quality shard 2/2 (rows 2-4)"]
    assert [s.kwargs for s in shards] == [{"k": 0, "span": [0, 2]}, {"k": 1, "span": [2, 5]}]
    assert Shard("evol_instruct", 0, 3, "m:f", {}, 7, 8, "items").name == "evol_instruct shard 1/3 (item 7)"


def _part(keys):
    return pa.table({"x": list(range(len(keys)))}).replace_schema_metadata({"items": json.dumps(keys)})


def test_run_items_hands_out_only_unfinished_items_each_shard_its_own_parts(tmp_path):
    parts = PartWriter(tmp_path / "parts")
    parts.write(_part(["a", "b"]))          # the stage's own earlier attempt
    parts.shard(3).write(_part(["e"]))      # a shard of an earlier sharded attempt
    seen = []

    def run(shards):
        seen.extend(shards)
        return [{"seconds": 1.0, "host": "h", "attempts": 1, "items": s.last - s.first} for s in shards]

    results = run_items(Sharding(run=run, count=lambda: 2), "evol_instruct", "m:f", list("abcdef"), parts,
                        {"seed": 7})
    assert [s.kwargs["only"] for s in seen] == [["c"], ["d", "f"]]
    assert [s.kwargs["parts_dir"] for s in seen] == [str(tmp_path / "parts" / "shard-0000"),
                                                     str(tmp_path / "parts" / "shard-0001")]
    assert all(s.kwargs["seed"] == 7 and s.unit == "items" for s in seen)
    assert summary(results)["shards"] == 2 and summary(results)["seconds_sum"] == 2.0
    # Everything finished: nothing is handed out.
    seen.clear()
    for k, keys in enumerate((["c"], ["d", "f"])):
        parts.shard(k).write(_part(keys))
    assert run_items(Sharding(run=run, count=lambda: 2), "evol_instruct", "m:f", list("abcdef"), parts, {}) == []
    assert seen == []


def test_run_shard_calls_the_named_function_and_says_where_and_how_long():
    out = run_shard("tasks.shards:summary", {"results": []})
    assert out["shards"] == 0 and out["seconds"] >= 0 and out["host"] and out["pid"] > 0
    with pytest.raises(AttributeError):
        run_shard("tasks.shards:no_such_function", {})
