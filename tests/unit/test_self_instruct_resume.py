"""Kill -9 the self_instruct stage in a subprocess at several points (after a round's candidates, mid-round
after a chunk of finished tasks, later rounds); the re-run must give the same rows as an uninterrupted run:
no duplicate, nothing lost."""

import hashlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tasks.artifacts import PartWriter
from tasks.config import SelfInstructConfig
from tasks.self_instruct import generate_tasks
from tests.conftest import ROOT, ScriptedLLM
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


SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from tasks.artifacts import PartWriter
    from tests.conftest import ScriptedLLM
    from tests.unit.test_self_instruct import seeds_table
    from tests.unit.test_self_instruct_resume import CFG, respond

    def slow(prompt, params):
        time.sleep(0.05)
        return respond(prompt, params)

    generate_tasks_args = (seeds_table(), CFG, ScriptedLLM(slow), 3, PartWriter(__import__("pathlib").Path({parts!r})))
    from tasks.self_instruct import generate_tasks
    generate_tasks(*generate_tasks_args)
    print("finished without being killed")
""")


@pytest.mark.parametrize("kill_after_parts", [1, 2, 5])
def test_kill_9_mid_stage_then_resume_matches_uninterrupted(tmp_path, kill_after_parts):
    expected, full_stats = generate_tasks(seeds_table(), CFG, ScriptedLLM(respond), 3)
    assert full_stats["kept"] == 6 and expected["bootstrap_round"].nunique() >= 3
    assert full_stats["checkpoints"] > 5

    parts_dir = tmp_path / "parts"
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(root=str(ROOT), parts=str(parts_dir)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and len(PartWriter(parts_dir).existing()) < kill_after_parts:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (out, err)
    written = len(PartWriter(parts_dir).existing())
    assert kill_after_parts <= written < full_stats["checkpoints"]  # killed mid-stage, with work left to do

    resumed, stats = generate_tasks(seeds_table(), CFG, ScriptedLLM(respond), 3, PartWriter(parts_dir))
    assert resumed["id"].is_unique
    assert list(resumed["id"]) == list(expected["id"])
    assert resumed.to_dict("records") == expected.to_dict("records")
    assert stats["rounds"] == full_stats["rounds"] and stats["requests"] == full_stats["requests"]
    assert stats["checkpoints"] == full_stats["checkpoints"]
    assert (stats["prompt_tokens"], stats["completion_tokens"]) == (full_stats["prompt_tokens"],
                                                                    full_stats["completion_tokens"])
