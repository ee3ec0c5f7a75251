"""The whole `instruction-tuning` flow under Prefect's test harness, on configs/tiny.yaml and a tiny model."""

import asyncio
import json
from pathlib import Path

import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import instruction_tuning
from tasks.artifacts import STAGES, stage_dirname

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


async def _task_states(flow_run_id) -> dict[str, str]:
    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.split(" ")[0]: run.state.name for run in runs}


async def _artifacts(flow_run_id) -> dict[str, object]:
    async with get_client() as client:
        found = await client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {a.key: json.loads(a.data) if a.type == "table" else a.data for a in found if a.key}


def run_flow(overrides):
    state = instruction_tuning(config=str(ROOT / "configs" / "tiny.yaml"), overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    states = asyncio.run(_task_states(state.state_details.flow_run_id))
    summary["artifacts"] = asyncio.run(_artifacts(state.state_details.flow_run_id))
    return summary, states


def test_flow_runs_caches_and_reruns_only_changed_stages(harness, tiny_model_dir, tmp_path):
    base = [f"llm.model={tiny_model_dir}", f"run.artifacts_dir={tmp_path / 'artifacts'}",
            f"run.runs_dir={tmp_path / 'runs'}", f"seeds.path={ROOT / 'data' / 'seed_tasks.jsonl'}"]

    first, states = run_flow(base)
    assert states == {stage: "Completed" for stage in STAGES}
    assert [s["reused"] for s in first["stages"]] == [False] * 7
    for stage in STAGES:
        (key_dir,) = (tmp_path / "artifacts" / stage_dirname(stage)).iterdir()
        assert {"data.parquet", "stats.json", "_SUCCESS"} <= {p.name for p in key_dir.iterdir()}
    run_dir = Path(first["run_dir"])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed" and list(manifest["stages"]) == list(STAGES)
    assert (run_dir / "config.yaml").is_file()
    assert Path(first["model_path"], "config.json").is_file()
    assert first["stages"][0]["rows_out"] == 40  # seeds.limit in tiny.yaml

    # The UI's view of the stats: per-stage tables, Self-Instruct's usage, Evol-Instruct's pass rates.
    artifacts = first["artifacts"]
    si_stats = {row["metric"]: row["value"] for row in artifacts["self-instruct-stats"]}
    assert {"requests", "llm_calls", "prompt_tokens", "completion_tokens", "generated", "kept",
            "kept_instances", "stop_reason"} <= set(si_stats) and si_stats["prompt_tokens"] > 0
    evol_stats = json.loads((tmp_path / "artifacts").joinpath(
        stage_dirname("evol_instruct")).glob("*/stats.json").__next__().read_text())
    pass_rates = {row["operation"]: row for row in artifacts["evol-instruct-operations"]}
    assert set(pass_rates) == set(evol_stats["operations"]) and len(pass_rates) == 6
    assert [row["round"] for row in artifacts["evol-instruct-rounds"]] == ["1"]
    # The quality report: an HTML page in the run directory, its figures as Prefect artifacts.
    assert "Data quality report" in (run_dir / "quality_report.html").read_text()
    assert "rows scored" in artifacts["quality-report"] and "## Drops per reason" in artifacts["quality-report"]
    scores = {row["score"]: row for row in artifacts["quality-scores"]}
    assert {"score_total", "score_judge", "score_deita", "score_ifd"} <= set(scores)
    assert scores["score_ifd"]["rows"] > 0 and scores["score_deita"]["rows"] > 0
    (quality_dir,) = (tmp_path / "artifacts" / stage_dirname("quality")).iterdir()
    assert {"report.html", "report.md"} <= {p.name for p in quality_dir.iterdir()}
    # Base and tuned answers side by side, and the run summary.
    report = artifacts["evaluate-report"]
    assert "| set | instruction | base model | tuned model | reference |" in report
    assert report.count("\n| eval split |") == 4 and report.count("\n| held-out |") == 4
    assert "Eval loss:" in artifacts["run-summary"] and "evaluate-report" in artifacts["run-summary"]
    assert "Held-out loss per reference token" in artifacts["run-summary"] and set(first["heldout_loss"]) == {
        "base", "tuned"}

    (mix_dir,) = (tmp_path / "artifacts" / stage_dirname("mix")).iterdir()
    manifest = json.loads((mix_dir / "manifest.json").read_text())
    assert manifest["train"] == 16 and set(manifest["sources"]) == {row["source"] for row in artifacts["mix-sources"]}
    assert {"train.parquet", "eval.parquet", "train.alpaca.json", "eval.messages.jsonl", "hf_dataset"} <= {
        p.name for p in mix_dir.iterdir()}

    second, states = run_flow(base)
    assert states == {stage: "Cached" for stage in STAGES}
    assert [s["reused"] for s in second["stages"]] == [True] * 7
    assert second["model_path"] == first["model_path"]

    third, states = run_flow(base + ["mix.seed=2", "evaluate.ablation=true"])
    assert [s["reused"] for s in third["stages"]] == [True] * 4 + [False] * 3
    assert states["mix"] == states["finetune"] == states["evaluate"] == "Completed"
    assert third["model_path"] != first["model_path"]
    # The ablation: two more models with the run's budget, on the held-out set beside the run's own.
    evaluate_dir = Path(next(s["path"] for s in third["stages"] if s["stage"] == "evaluate"))
    ablation = json.loads((evaluate_dir / "stats.json").read_text())["ablation"]
    arms = ablation["arms"]
    assert list(arms) == ["base", "tuned", "seeds_only", "without_quality"]
    assert all(arms[arm]["steps"] == ablation["steps"] for arm in ("tuned", "seeds_only", "without_quality"))
    quality_rows = pd.read_parquet(Path(next(s["path"] for s in third["stages"] if s["stage"] == "quality"))
                                   / "data.parquet")
    seed_rows = quality_rows[(quality_rows["origin"] == "seed") & quality_rows["keep"]]
    # the arm's mix draws seed rows only; finetune may then drop an over-long one (finetune.truncation)
    assert arms["seeds_only"]["train_rows"] <= sum(arms["seeds_only"]["sources"].values()) <= len(seed_rows)
    assert "## Ablation: same fine-tuning budget" in third["artifacts"]["evaluate-report"]
    assert not (evaluate_dir / "ablation" / "seeds_only" / "model").exists()


def test_deleted_artifact_is_rebuilt_not_returned(harness, tiny_model_dir, tmp_path):
    import shutil

    base = [f"llm.model={tiny_model_dir}", f"run.artifacts_dir={tmp_path / 'artifacts'}",
            f"run.runs_dir={tmp_path / 'runs'}", f"seeds.path={ROOT / 'data' / 'seed_tasks.jsonl'}",
            "finetune.max_steps=1"]
    first, _ = run_flow(base)
    mix_dir = Path(next(s["path"] for s in first["stages"] if s["stage"] == "mix"))
    (mix_dir / "_SUCCESS").unlink()  # a half-written artifact must never be read as done
    shutil.rmtree(Path(first["model_path"]).parent)
    second, states = run_flow(base)
    assert states["mix"] == "Completed" and states["finetune"] == "Completed" and states["quality"] == "Cached"
    assert (mix_dir / "_SUCCESS").is_file() and Path(second["model_path"]).is_dir()

    # A truncated Parquet file under a valid _SUCCESS is detected and recomputed; the recomputed mix has
    # the same content, so what was trained on it is still reused.
    data = (mix_dir / "data.parquet").read_bytes()
    (mix_dir / "data.parquet").write_bytes(data[: len(data) // 2])
    third, states = run_flow(base)
    assert states["mix"] == "Completed" and states["quality"] == "Cached" and states["finetune"] == "Cached"
    assert (mix_dir / "data.parquet").read_bytes() == data


def test_bad_config_fails_before_any_stage(harness, tmp_path):
    state = instruction_tuning(config=str(ROOT / "configs" / "tiny.yaml"),
                               overrides=["mix.sed=2", f"run.runs_dir={tmp_path}"], return_state=True)
    assert state.is_failed()
    assert "unknown key `mix.sed`" in state.message or "unknown key `mix.sed`" in str(state.result(raise_on_failure=False))
    assert list(tmp_path.iterdir()) == []


def test_failed_stage_marks_run_failed_and_nothing_done(harness, tmp_path):
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"id": "a", "instruction": "Say hi.", "instances": [{"input": "", "output": "Hi"}]}\n{oops\n')
    state = instruction_tuning(config=str(ROOT / "configs" / "tiny.yaml"), return_state=True, overrides=[
        f"seeds.path={bad}", f"run.artifacts_dir={tmp_path / 'artifacts'}", f"run.runs_dir={tmp_path / 'runs'}"])
    assert state.is_failed()
    (run_dir,) = (tmp_path / "runs").iterdir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed" and f"{bad}:2: malformed JSON" in manifest["error"]
    assert not list((tmp_path / "artifacts").rglob("_SUCCESS"))


def test_instructflow_resume_continues_a_failed_local_run(harness, tiny_model_dir, tmp_path, capsys):
    import shutil

    from flows.cli import main

    late_model = tmp_path / "late-model"  # the fine-tuning base model is not there yet: finetune fails
    sets = [f"llm.model={tiny_model_dir}", f"run.artifacts_dir={tmp_path / 'artifacts'}",
            f"run.runs_dir={tmp_path / 'runs'}", f"seeds.path={ROOT / 'data' / 'seed_tasks.jsonl'}",
            f"finetune.base_model={late_model}"]
    args = ["run", "--config", str(ROOT / "configs" / "tiny.yaml")] + [x for s in sets for x in ("--set", s)]
    assert main(args) == 1
    assert "instructflow resume" in capsys.readouterr().err
    (run_dir,) = (tmp_path / "runs").iterdir()
    failed = json.loads((run_dir / "manifest.json").read_text())
    assert failed["status"] == "failed" and list(failed["stages"]) == list(STAGES)[:5]

    shutil.copytree(tiny_model_dir, late_model)
    assert main(["resume", run_dir.name, "--runs-dir", str(tmp_path / "runs")]) == 0
    resumed = json.loads((run_dir / "manifest.json").read_text())
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run_dir.name]  # the same run, continued
    assert resumed["status"] == "completed" and resumed["attempt"] == 2
    assert resumed["config"] == failed["config"] and resumed["overrides"] == failed["overrides"]
    assert {s: r["reused"] for s, r in resumed["stages"].items()} == {
        **{s: True for s in list(STAGES)[:5]}, "finetune": False, "evaluate": False}

    capsys.readouterr()
    assert main(["resume", run_dir.name, "--runs-dir", str(tmp_path / "runs")]) == 0
    assert "completed already" in capsys.readouterr().out
    assert main(["resume", "no-such-run", "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "no-such-run: no run here (no manifest.json)" in capsys.readouterr().err


def test_an_alpaca_file_with_generation_off_stops_until_mix_and_a_full_run_trains_on_it(harness, tiny_model_dir,
                                                                                         tmp_path, capsys):
    from flows.cli import main

    subjects = ["rivers", "volcanoes", "bridges", "glaciers", "deserts", "forests", "harbors", "canyons",
                "islands", "lakes", "meadows", "caves", "reefs", "valleys", "dunes", "marshes", "fjords", "plains"]
    alpaca = [{"instruction": f"Explain how {s} form and give one famous example.", "input": "",
               "output": f"Most {s} form over long periods through natural processes such as erosion, deposition "
                         f"and movement of material; one well known example is described in many atlases."}
              for s in subjects]
    source = tmp_path / "alpaca.json"
    source.write_text(json.dumps(alpaca))
    # Nothing listens on port 9: with generation off and no judge, no stage may ask the endpoint anything.
    sets = [f"seeds.path={source}", "seeds.limit=null", "self_instruct.enabled=false", "evol_instruct.enabled=false",
            "quality.judge.enabled=false", "quality.dedup.enabled=false", "llm.backend=openai", "llm.base_url=http://127.0.0.1:9/v1",
            "llm.model=absent", f"finetune.base_model={tiny_model_dir}", f"run.artifacts_dir={tmp_path / 'artifacts'}",
            f"run.runs_dir={tmp_path / 'runs'}"]
    args = ["run", "--config", str(ROOT / "configs" / "tiny.yaml")] + [x for s in sets for x in ("--set", s)]
    assert main([*args, "--until", "mix"]) == 0
    assert "stopped after mix (--until)" in capsys.readouterr().out
    (run_dir,) = (tmp_path / "runs").iterdir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["until"] == "mix"
    assert list(manifest["stages"]) == list(STAGES)[:5] and manifest["last_artifact"].endswith(
        manifest["stages"]["mix"]["path"].split("/")[-1])
    # The loaded rows pass through both generating stages unchanged.
    assert [manifest["stages"][s]["rows_out"] for s in ("seeds", "self_instruct", "evol_instruct")] == [18] * 3
    passed = pd.read_parquet(Path(manifest["stages"]["evol_instruct"]["path"]) / "data.parquet")
    assert passed["instruction"].tolist() == [a["instruction"] for a in alpaca] and passed["round"].isna().all()
    assert not (tmp_path / "artifacts" / stage_dirname("finetune")).exists()

    # The whole run reuses those stages and trains on the mix.
    assert main(args) == 0
    runs = sorted((tmp_path / "runs").iterdir())
    full = json.loads((runs[-1] / "manifest.json").read_text())
    assert full["status"] == "completed" and full["until"] is None
    assert {s: r["reused"] for s, r in full["stages"].items()} == {
        **{s: True for s in list(STAGES)[:5]}, "finetune": False, "evaluate": False}


def test_two_datasets_are_weighted_sources_of_one_mix(harness, tmp_path, capsys):
    """An Alpaca JSON file and a Parquet table, generation off: each row keeps the dataset it came from
    through every stage, and the mix draws them 3 : 1 by dataset."""
    from flows.cli import main

    words = ["rivers", "volcanoes", "bridges", "glaciers", "deserts", "forests", "harbors", "canyons", "islands",
             "lakes", "meadows", "caves", "reefs", "valleys", "dunes", "marshes", "fjords", "plains", "comets", "tides"]
    (tmp_path / "alpaca.json").write_text(json.dumps([
        {"instruction": f"Explain how {w} form, in two sentences.", "input": "",
         "output": f"Most {w} form slowly through natural processes over long periods; many atlases describe one."}
        for w in words]))
    pd.DataFrame({"instruction": [f"Write a short poem about {w} at dawn." for w in words],
                  "input": [""] * 20, "category": ["creative"] * 20,
                  "output": [f"Quiet {w} wake in light, a soft and silver song that greets the rising day."
                             for w in words]}).to_parquet(tmp_path / "poems.parquet")
    sources = json.dumps([{"path": str(tmp_path / "alpaca.json"), "name": "alpaca"},
                          {"path": str(tmp_path / "poems.parquet")}])
    sets = [f"seeds.sources={sources}", "seeds.limit=null", "self_instruct.enabled=false",
            "evol_instruct.enabled=false", "quality.judge.enabled=false", "quality.dedup.enabled=false",
            "mix.source_by=dataset", "mix.mode=weights", "mix.weights={alpaca: 3, poems: 1}", "mix.total=16",
            "mix.cot_share=null", "mix.min_eval=4", f"run.artifacts_dir={tmp_path / 'artifacts'}",
            f"run.runs_dir={tmp_path / 'runs'}"]
    args = ["run", "--config", str(ROOT / "configs" / "tiny.yaml"), "--until", "mix"]
    assert main(args + [x for s in sets for x in ("--set", s)]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    seeds_stats = json.loads((Path(stages["seeds"]["path"]) / "stats.json").read_text())
    assert {k: v["rows"] for k, v in seeds_stats["datasets"].items()} == {"alpaca": 20, "poems": 20}
    quality = pd.read_parquet(Path(stages["quality"]["path"]) / "data.parquet")
    assert quality.groupby("dataset")["id"].apply(lambda ids: ids.str.startswith("alpaca/").all()).to_dict() == {
        "alpaca": True, "poems": False}
    train = pd.read_parquet(Path(stages["mix"]["path"]) / "train.parquet")
    assert train["dataset"].value_counts().to_dict() == {"alpaca": 12, "poems": 4}
