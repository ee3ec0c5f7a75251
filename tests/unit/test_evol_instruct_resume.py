"""Kill -9 the evol_instruct stage in a subprocess after the first, a middle and the last but one finished
chain; the re-run must give the same rows as an uninterrupted run: no duplicate, nothing lost. (A chain's
draws depend only on the seed, its row and its round, so a re-run redoes the lost chains exactly.)"""

import pytest

from tasks.artifacts import PartWriter
from tasks.config import EvolInstructConfig
from tasks.evol_instruct import evolve
from tests.conftest import ScriptedLLM
from tests.killing import kill_after_parts
from tests.unit.test_evol_instruct import rewriter, rows

CFG = EvolInstructConfig(rounds=3, max_per_round=None, checkpoint_every=1)
RESPOND = rewriter(fail_on=["topic 3"], equal_on=["topic 4 with"])

SCRIPT = """
    import pathlib, time
    from tasks.artifacts import PartWriter
    from tasks.evol_instruct import evolve
    from tests.conftest import ScriptedLLM
    from tests.unit.test_evol_instruct_resume import CFG, RESPOND
    from tests.unit.test_evol_instruct import rows

    def slow(prompt, params):
        time.sleep(0.02)
        return RESPOND(prompt, params)

    # Two chains open at a time (batch_size 1), so they finish one after another.
    evolve(rows(6), CFG, ScriptedLLM(slow), 1, PartWriter(pathlib.Path({parts!r})), batch_size=1)
"""


@pytest.mark.parametrize("n_parts", [1, 3, 5])
def test_kill_9_then_resume_matches_uninterrupted(tmp_path, n_parts):
    expected, full_stats = evolve(rows(6), CFG, ScriptedLLM(RESPOND), 1)
    assert full_stats["checkpoints"] == 6 and full_stats["retried"] > 0  # one part per finished chain

    parts_dir = tmp_path / "parts"
    written = kill_after_parts(SCRIPT.format(parts=str(parts_dir)), parts_dir, n_parts, tmp_path)
    assert n_parts <= written < full_stats["checkpoints"]

    resumed, stats = evolve(rows(6), CFG, ScriptedLLM(RESPOND), 1, PartWriter(parts_dir))
    assert resumed["id"].is_unique
    assert resumed.to_dict("records") == expected.to_dict("records")
    same = ("attempted", "kept", "dropped", "operations", "rounds", "retried", "checkpoints")
    assert {k: stats[k] for k in same} == {k: full_stats[k] for k in same}
    # Tokens count what was spent: at least the uninterrupted run's (a chain in flight at the kill is redone).
    assert stats["prompt_tokens"] >= full_stats["prompt_tokens"]
