import json

import pyarrow as pa
import pytest

from tasks import artifacts
from tasks.artifacts import Artifact, PartWriter, artifact_key, atomic_write_bytes, stage_dirname


def test_key_is_stable_and_sensitive():
    base = artifact_key("mix", {"seed": 1, "total": 5}, ["h1"], "v1")
    assert base == artifact_key("mix", {"total": 5, "seed": 1}, ["h1"], "v1")  # key order does not matter
    assert len(base) == artifacts.KEY_LENGTH
    variants = {artifact_key("mix", {"seed": 2, "total": 5}, ["h1"], "v1"),
                artifact_key("mix", {"seed": 1, "total": 5}, ["h2"], "v1"),
                artifact_key("mix", {"seed": 1, "total": 5}, ["h1"], "v2"),
                artifact_key("quality", {"seed": 1, "total": 5}, ["h1"], "v1")}
    assert base not in variants and len(variants) == 4


def test_stage_dirnames():
    assert [stage_dirname(s) for s in artifacts.STAGES] == [
        "01_seeds", "02_self_instruct", "03_evol_instruct", "04_quality", "05_mix", "06_finetune", "07_evaluate"]


def test_commit_writes_success_last_with_hash(tmp_path):
    art = Artifact.at(tmp_path, "mix", "abc")
    art.begin()
    assert not art.is_done()
    PartWriter(art.parts_dir).write(pa.table({"x": [1]}))
    art.commit(pa.table({"x": [1, 2, 3]}), {"rows_out": 3})
    assert art.is_done()
    marker = json.loads(art.success_path.read_text())
    assert marker["rows"] == 3 and marker["content_hash"] == artifacts.sha256_file(art.data_path)
    assert art.read_table().num_rows == 3 and art.stats() == {"rows_out": 3}
    assert not art.parts_dir.exists()
    assert sorted(p.name for p in art.path.iterdir()) == ["_SUCCESS", "data.parquet", "stats.json"]


def test_directory_without_success_is_not_done(tmp_path):
    art = Artifact.at(tmp_path, "seeds", "k")
    art.path.mkdir(parents=True)
    (art.path / "data.parquet").write_bytes(b"half")
    assert not art.is_done()
    with pytest.raises(FileNotFoundError, match="not a finished artifact"):
        art.read_table()
    art.success_path.write_text("{not json")
    assert not art.is_done()


def test_begin_removes_stale_success_keeps_parts(tmp_path):
    art = Artifact.at(tmp_path, "seeds", "k")
    art.begin()
    art.commit(pa.table({"x": [1]}), {})
    PartWriter(art.parts_dir).write(pa.table({"x": [9]}))
    art.begin()
    assert not art.success_path.exists() and len(PartWriter(art.parts_dir).existing()) == 1


def test_atomic_write_failure_leaves_old_file(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    atomic_write_bytes(target, b"old")

    def boom(*_):
        raise OSError("disk full")
    monkeypatch.setattr(artifacts.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temp file left behind


def test_part_writer_numbers_parts(tmp_path):
    parts = PartWriter(tmp_path / "parts")
    for n in range(3):
        parts.write(pa.table({"n": [n]}))
    assert [p.name for p in parts.existing()] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [t.column("n")[0].as_py() for t in parts.read_all()] == [0, 1, 2]


def test_seeds_key_follows_the_seed_file_content(tmp_path):
    from tasks.config import Config
    from tasks.stages import plan

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"id": "a", "instruction": "Say hi.", "instances": [{"input": "", "output": "Hi"}]}\n')
    cfg = Config.model_validate({"seeds": {"path": str(seeds)}, "run": {"artifacts_dir": str(tmp_path / "a")}})
    first = plan("seeds", cfg, {})
    assert plan("seeds", cfg, {}) == first
    seeds.write_text('{"id": "a", "instruction": "Say hello.", "instances": [{"input": "", "output": "Hi"}]}\n')
    assert plan("seeds", cfg, {}) != first


def test_source_hash_of_directory_and_missing(tmp_path):
    from tasks.artifacts import source_hash

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("1")
    before = source_hash(tmp_path / "d")
    (tmp_path / "d" / "x").write_text("2")
    assert source_hash(tmp_path / "d") != before and source_hash(tmp_path / "nope") == "missing"


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_stats", "no_success", "empty_success"])
def test_a_damaged_artifact_is_not_done(tmp_path, damage):
    art = Artifact.at(tmp_path, "mix", "k")
    art.begin()
    art.commit(pa.table({"x": list(range(1000))}), {"rows_out": 1000})
    assert art.is_done(verify=True)
    data = art.data_path.read_bytes()
    if damage == "truncate":
        art.data_path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # same size, same footer, one byte changed: only the hash sees it
        middle = len(data) // 2
        art.data_path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
        assert art.is_done()
    elif damage == "no_stats":
        art.stats_path.unlink()
    elif damage == "no_success":
        art.success_path.unlink()
    else:
        art.success_path.write_text("")
    assert not art.is_done(verify=True)
