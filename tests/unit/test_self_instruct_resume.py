"""Kill -9 the self_instruct stage in a subprocess at several points (after the first finished items,
later on); the re-run keeps every finished item, finishes the target, and does nothing twice. (Its rows
need not be the uninterrupted run's: a request lost in the kill goes out again with the in-context
examples kept by then.)"""

import hashlib
import json

import pytest

from tasks.artifacts import PartWriter, part_metadata
from tasks.config import SelfInstructConfig
from tasks.self_instruct import generate_tasks
from tests.conftest import ScriptedLLM
from tests.killing import kill_after_parts
from tests.unit.test_self_instruct import seeds_table

CFG = SelfInstructConfig(num_instructions=6, requests_per_batch=1, max_requests=40, checkpoint_every=1,
                         instances_per_task=2)


def respond(prompt, params):
    """Deterministic in the prompt alone, so a restarted process answers exactly as the first did."""
    h = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)
    if prompt.startswith("Come up with a series"):
        first = int(prompt.rsplit("\n", 1)[1].rstrip("."))
        topics = ["volcanoes", "tides", "glaciers", "comets", "bridges", "bees", "clouds", "rivers", "deserts",
                  "magnets", "forests", "engines", "violins"]
        readers = ["young", "curious", "busy", "retired", "skeptical", "sleepy", "new"]
        items = [f"Compare {topics[(h >> (4 * k)) % 13]} and {topics[(h >> (4 * k + 2)) % 13 - 1]} "
                 f"for a {readers[(h >> (3 * k)) % 7]} reader" for k in range(3)]
        return "\n".join([f" {items[0]}"] + [f"{first + k}. {t}" for k, t in enumerate(items[1:], 1)])
    if prompt.startswith("Can the following task"):
        return " No"
    return f" <noinput>\nOutput: Answer {h % 1000}.\nExample 2\nInput: case {h % 7}\nOutput: Answer {h % 13}."


SCRIPT = """
    import pathlib, time
    from tasks.artifacts import PartWriter, part_metadata
    from tasks.self_instruct import generate_tasks
    from tests.conftest import ScriptedLLM
    from tests.unit.test_self_instruct import seeds_table
    from tests.unit.test_self_instruct_resume import CFG, respond

    def slow(prompt, params):
        time.sleep(0.05)
        return respond(prompt, params)

    generate_tasks(seeds_table(), CFG, ScriptedLLM(slow), 3, PartWriter(pathlib.Path({parts!r})))
"""


@pytest.mark.parametrize("n_parts", [1, 2, 5])
def test_kill_9_mid_stage_then_resume_keeps_every_finished_item(tmp_path, n_parts):
    expected, full_stats = generate_tasks(seeds_table(), CFG, ScriptedLLM(respond), 3)
    assert full_stats["kept"] == 6 and expected["bootstrap_round"].nunique() >= 3
    assert full_stats["checkpoints"] > 5
    again, _ = generate_tasks(seeds_table(), CFG, ScriptedLLM(respond), 3)
    assert again.to_dict("records") == expected.to_dict("records")  # in-process runs are deterministic

    parts_dir = tmp_path / "parts"
    written = kill_after_parts(SCRIPT.format(parts=str(parts_dir)), parts_dir, n_parts, tmp_path)
    assert n_parts <= written < full_stats["checkpoints"]  # killed mid-stage, with work left to do
    finished = [row for part in PartWriter(parts_dir).read_all() for row in part.to_pylist()]

    resumed, stats = generate_tasks(seeds_table(), CFG, ScriptedLLM(respond), 3, PartWriter(parts_dir))
    # Same final counts, no duplicate.
    assert stats["kept"] == 6 == resumed["task_id"].nunique() and stats["kept_instances"] == len(resumed)
    assert resumed["id"].is_unique
    # Nothing lost: every example the killed run finished is in the output as it was written.
    by_id = {r["id"]: r for r in resumed.to_dict("records")}
    examples = [{k: v for k, v in row.items() if k != "record"} for row in finished if row["record"] == "example"]
    assert all(by_id[row["id"]] == row for row in examples)
    # Nothing done twice: every request and task is closed by exactly one part, over both attempts.
    closed = [key for part in PartWriter(parts_dir).read_all() for key in json.loads(part_metadata(part)["items"])]
    assert len(closed) == len(set(closed)) and stats["checkpoints"] == len(PartWriter(parts_dir).existing())
    assert stats["requests"] == sum(key.startswith("req-") for key in closed)
