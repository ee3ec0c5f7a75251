"""Runs that share an artifacts directory: two real processes that need the same artifact never both
compute it; a killed holder never blocks the next run; a run directory is continued by one process only."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest

from tasks.artifacts import Artifact
from tasks.config import load_config
from tasks.runs import RunBusy, RunRecord, live_holder
from tests.conftest import ROOT, ScriptedLLM
from tests.killing import kill_after_parts
from tests.unit.test_finetune import mixed_frame
from tests.unit.test_self_instruct_resume import respond

TINY = ROOT / "configs" / "tiny.yaml"
SELF_INSTRUCT = ["self_instruct.num_instructions=6", "self_instruct.max_requests=40",
                 "self_instruct.requests_per_batch=1", "self_instruct.checkpoint_every=1",
                 "self_instruct.instances_per_task=2"]

GENERATE = """
    import json, os, pathlib, sys, time
    import tasks.stages as stages
    from tasks.config import load_config
    from tests.conftest import ScriptedLLM
    from tests.unit.test_self_instruct_resume import respond

    def slow(prompt, params):  # every request this process sends, logged with its pid
        with open({calls!r}, "a") as fh:
            fh.write(f"{{os.getpid()}}\\n")
        time.sleep({delay})
        while {gate!r} and not os.path.exists({gate!r}):  # held until the test opens the gate
            time.sleep(0.05)
        return respond(prompt, params)

    llm = ScriptedLLM(slow)
    stages.get_llm = lambda cfg: llm
    cfg = load_config({config!r}, {overrides!r})
    out = stages.execute("self_instruct", cfg, {{"seeds": {seeds!r}}}, run_id={run_id!r})
    print(json.dumps({{"pid": os.getpid(), "path": str(out.path)}}))
"""

FINETUNE = """
    import dataclasses, json, os, pathlib, sys
    import tasks.stages as stages
    from tasks.config import load_config

    spec = stages.STAGES["finetune"]
    def trained(cfg, inputs, out):  # marks the process that really trains
        pathlib.Path({marks!r}, f"trained-{{os.getpid()}}").touch()
        return spec.run(cfg, inputs, out)
    trained.__name__ = spec.run.__name__  # the same code key as the real stage
    stages.STAGES["finetune"] = dataclasses.replace(spec, run=trained)
    cfg = load_config({config!r}, {overrides!r})
    out = stages.execute("finetune", cfg, {{"mix": {mix!r}}}, run_id={run_id!r})
    print(json.dumps({{"pid": os.getpid(), "path": str(out.path)}}))
"""


def _script(tmp_path: Path, name: str, code: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n" + textwrap.dedent(code))
    return path


def _start(script: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout_s: float = 300) -> tuple[int, dict | None, str]:
    out, err = proc.communicate(timeout=timeout_s)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return proc.returncode, json.loads(lines[-1]) if lines else None, err


@pytest.fixture
def seeds_artifact(tmp_path):
    import tasks.stages as stages

    cfg = load_config(TINY, [f"run.artifacts_dir={tmp_path / 'artifacts'}"])
    return str(stages.execute("seeds", cfg, {}).path)


def _generate(tmp_path, seeds, run_id, delay=0.05, extra=(), gate=""):
    overrides = [f"run.artifacts_dir={tmp_path / 'artifacts'}", *SELF_INSTRUCT, *extra]
    code = GENERATE.format(calls=str(tmp_path / "calls.log"), delay=delay, gate=gate, config=str(TINY),
                           overrides=overrides, seeds=seeds, run_id=run_id)
    return _script(tmp_path, f"generate-{run_id}", code), overrides


def test_two_runs_generating_the_same_artifact_compute_it_once(tmp_path, seeds_artifact, monkeypatch):
    # Slow enough requests (about 10 s of stage) that the second process always finds the first computing.
    script_a, overrides = _generate(tmp_path, seeds_artifact, "run-a", delay=0.2)
    script_b, _ = _generate(tmp_path, seeds_artifact, "run-b", delay=0.2)
    a, b = _start(script_a), _start(script_b)  # started together
    (rc_a, out_a, err_a), (rc_b, out_b, err_b) = _finish(a), _finish(b)
    assert rc_a == rc_b == 0, (err_a[-2000:], err_b[-2000:])
    assert out_a["path"] == out_b["path"]

    artifact = Artifact(Path(out_a["path"]))
    assert artifact.is_done(verify=True) and not artifact.parts_dir.exists()
    callers = set((tmp_path / "calls.log").read_text().split())
    computed_by = artifact.stats()["computed_by"]
    assert callers == {str(computed_by["pid"])}  # every request came from the one process that computed
    waiter_err = err_b if computed_by["run_id"] == "run-a" else err_a
    assert f"run {computed_by['run_id']} (pid {computed_by['pid']} on " in waiter_err  # it said whom it waited for

    # The same rows as one run alone: the waiter neither added nor removed anything.
    import tasks.stages as stages
    llm = ScriptedLLM(respond)
    monkeypatch.setattr(stages, "get_llm", lambda _: llm)
    cfg = load_config(TINY, [f"run.artifacts_dir={tmp_path / 'alone'}", *SELF_INSTRUCT])
    single = stages.execute("self_instruct", cfg, {"seeds": seeds_artifact})
    assert artifact.read_table().equals(single.read_table())


def _wait_for_holder(lock: Path, timeout_s: float = 60) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if lock.is_file() and lock.read_text().strip():
            return json.loads(lock.read_text())
        time.sleep(0.05)
    raise AssertionError(f"nobody took {lock}")


def _planned(tmp_path, seeds, overrides):
    from tasks.stages import plan

    return plan("self_instruct", load_config(TINY, overrides), {"seeds": seeds})


def test_with_waiting_off_the_second_run_stops_naming_the_artifact_and_its_holder(tmp_path, seeds_artifact):
    # run-a holds the artifact until the test opens its gate, however slowly run-b starts.
    gate = tmp_path / "gate"
    script_a, overrides = _generate(tmp_path, seeds_artifact, "run-a", gate=str(gate))
    script_b, _ = _generate(tmp_path, seeds_artifact, "run-b", extra=["run.wait_for_artifacts=false"])
    artifact = _planned(tmp_path, seeds_artifact, overrides)
    a = _start(script_a)
    try:
        holder = _wait_for_holder(artifact.path / ".lock")
        assert holder["run_id"] == "run-a" and holder["pid"] == a.pid
        rc_b, out_b, err_b = _finish(_start(script_b))
        assert rc_b != 0 and out_b is None, (out_b, err_b[-2000:])
        last = err_b.strip().splitlines()[-1]
        assert f"self_instruct artifact {artifact.path} is busy: run run-a (pid {a.pid}" in last
        assert set((tmp_path / "calls.log").read_text().split()) == {str(a.pid)}  # b sent nothing
        gate.touch()
        rc_a, out_a, err_a = _finish(a)
        assert rc_a == 0 and out_a["path"] == str(artifact.path), err_a[-2000:]  # the holder finished its work
    finally:
        gate.touch()
        a.kill()
        a.wait()


def test_a_killed_holder_does_not_block_the_next_run_which_continues_its_parts(tmp_path, seeds_artifact, monkeypatch):
    import tasks.stages as stages

    script, overrides = _generate(tmp_path, seeds_artifact, "run-a", delay=0.1)
    artifact = _planned(tmp_path, seeds_artifact, overrides)
    code = script.read_text().split("\n", 2)[2]  # kill_after_parts adds the path line itself
    left = kill_after_parts(code, artifact.parts_dir, 2, tmp_path)
    assert left >= 2 and not artifact.is_done()
    assert json.loads((artifact.path / ".lock").read_text())["run_id"] == "run-a"  # its note is still there

    from tasks.artifacts import PartWriter

    killed = [row for part in PartWriter(artifact.parts_dir).read_all() for row in part.to_pylist()]
    llm = ScriptedLLM(respond)
    monkeypatch.setattr(stages, "get_llm", lambda _: llm)
    # Waiting off: a lock still held by the dead process would stop this at once.
    cfg = load_config(TINY, [*overrides, "run.wait_for_artifacts=false"])
    done = stages.execute("self_instruct", cfg, {"seeds": seeds_artifact}, run_id="run-b")
    assert done.is_done(verify=True) and done.stats()["computed_by"]["run_id"] == "run-b"
    asked = [p for prompts, _ in llm.calls for p in prompts]

    # Continued, not restarted: every example the killed run finished is in the output as it was written,
    # run-b asked for less than one uninterrupted run does, and the target was met.
    alone_llm = ScriptedLLM(respond)
    monkeypatch.setattr(stages, "get_llm", lambda _: alone_llm)
    alone = stages.execute("self_instruct", load_config(TINY, [f"run.artifacts_dir={tmp_path / 'alone'}",
                                                               *SELF_INSTRUCT]), {"seeds": seeds_artifact})
    everything = [p for prompts, _ in alone_llm.calls for p in prompts]
    assert 0 < len(asked) < len(everything)
    out = {r["id"]: r for r in done.read_table().to_pylist()}
    examples = [row for row in killed if row["record"] == "example"]
    assert examples and all(out[row["id"]]["output"] == row["output"] for row in examples)
    assert done.stats()["kept"] == alone.stats()["kept"] == 6 and len(out) == done.read_table().num_rows


def test_two_runs_finetuning_the_same_artifact_train_once(tmp_path, tiny_model_dir):
    mix = Artifact(tmp_path / "mix")
    mix.begin()
    mix.commit(pa.Table.from_pandas(mixed_frame(), preserve_index=False), {"rows_in": 12})
    overrides = [f"run.artifacts_dir={tmp_path / 'artifacts'}", f"llm.model={tiny_model_dir}",
                 "finetune.max_steps=3", "finetune.device=cpu"]
    marks = tmp_path / "marks"
    marks.mkdir()
    scripts = [_script(tmp_path, f"finetune-{run}", FINETUNE.format(marks=str(marks), config=str(TINY),
                                                                   overrides=overrides, mix=str(mix.path), run_id=run))
               for run in ("run-a", "run-b")]
    procs = [_start(s) for s in scripts]
    results = [_finish(p) for p in procs]
    assert [rc for rc, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    assert results[0][1]["path"] == results[1][1]["path"]
    trained = [p.name for p in marks.iterdir()]
    artifact = Artifact(Path(results[0][1]["path"]))
    assert trained == [f"trained-{artifact.stats()['computed_by']['pid']}"]  # one process trained
    assert artifact.is_done(verify=True) and (artifact.path / "model" / "config.json").is_file()
    assert not (artifact.path / "checkpoints").exists()


HOLD_RUN = """
    import pathlib, time
    from tasks.config import load_config
    from tasks.runs import RunRecord

    cfg = load_config({config!r}, ["run.runs_dir={runs}"])
    record = RunRecord.start(cfg, {config!r}, [])
    print(record.run_id, flush=True)
    time.sleep(120)
"""


def test_resume_refuses_a_live_run_and_continues_a_killed_one(tmp_path, monkeypatch, capsys):
    import flows.cli as cli

    runs = tmp_path / "runs"
    proc = _start(_script(tmp_path, "hold", HOLD_RUN.format(config=str(TINY), runs=str(runs))))
    try:
        run_id = proc.stdout.readline().strip()
        assert run_id, proc.stderr.read()
        continued = []
        monkeypatch.setattr(cli, "_run_flow", lambda config, overrides, run_id=None: continued.append(run_id) or 0)

        assert cli.main(["resume", run_id, "--runs-dir", str(runs)]) == 2
        err = capsys.readouterr().err
        assert f"run {run_id} is still running: run {run_id} (pid {proc.pid} on " in err and not continued
        with pytest.raises(RunBusy, match=f"run {run_id} is still running"):
            RunRecord.resume(runs / run_id)  # a Prefect retry of the same flow run is refused the same way
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    assert live_holder(runs / run_id) is None  # killed: its lock went with it
    assert json.loads((runs / run_id / "manifest.json").read_text())["status"] == "running"  # as it was left
    assert cli.main(["resume", run_id, "--runs-dir", str(runs)]) == 0 and continued == [run_id]
    record = RunRecord.resume(runs / run_id)
    try:
        assert record.attempt == 2 and live_holder(runs / run_id)["pid"] == os.getpid()
    finally:
        record.close()
    assert live_holder(runs / run_id) is None
