"""The deployment topology of docker-compose.yml without Docker: PostgreSQL, `prefect server start` on it,
and `instructflow serve`, all on loopback. Runs go through the Prefect CLI as a user would start them; a
failed stage is retried with `prefect flow-run retry`; a headless Chromium reads the result in the UI."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.servers import _stop, postgres_bin, postgres_server, prefect_server

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENT = "instruction-tuning/adhoc"
STAGES = ["seeds", "self_instruct", "evol_instruct", "quality", "mix", "finetune", "evaluate"]

pytestmark = pytest.mark.skipif(postgres_bin() is None or shutil.which("runuser") is None and os.geteuid() == 0,
                                reason="needs Debian's `postgresql` package (make test installs it)")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    """PostgreSQL, the Prefect server on it, and the adhoc deployment served from this checkout."""
    root = tmp_path_factory.mktemp("stack")
    with postgres_server() as database_url, \
            prefect_server(database_url, root / "prefect-home", root / "server.log") as api:
        # The worker's profiles: the project's, and those the tests write (each with its own directories).
        (root / "profiles").mkdir()
        env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(root / "prefect-home"),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1",
               "INSTRUCTFLOW_PROFILE_DIRS": f"{ROOT / 'configs'}{os.pathsep}{root / 'profiles'}"}
        log = (root / "serve.log").open("w")
        serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "adhoc"], cwd=ROOT, env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 120
            while prefect(env, "deployment", "inspect", DEPLOYMENT, check=False).returncode != 0:
                if serve.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"serve did not come up:\n{(root / 'serve.log').read_text()[-3000:]}")
                time.sleep(1)
            yield {"env": env, "api": api, "root": root, "tiny": tiny_model_dir, "database_url": database_url}
        finally:
            _stop(serve)
            log.close()


def prefect(env: dict[str, str], *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "prefect", *args], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def run_deployment(stack, profile: Path, overrides: list[str],
                   check: bool = True) -> tuple[str, subprocess.CompletedProcess]:
    params = json.dumps({"config": str(profile), "overrides": overrides})
    result = prefect(stack["env"], "deployment", "run", DEPLOYMENT, "--params", params, "--watch",
                     "--watch-timeout", "800", check=check)
    found = re.search(r"UUID: ([0-9a-f-]{36})", result.stdout)
    assert found, result.stdout
    return found.group(1), result


def tiny_profile(stack, name: str, **extra: str) -> Path:
    """configs/tiny.yaml with its model, seeds and output directories: a profile the worker trusts, since
    a caller's overrides may not set paths."""
    from tasks.config import load_config

    where = stack["root"] / name
    base = {"llm.model": str(stack["tiny"]), "run.artifacts_dir": str(where / "artifacts"),
            "run.runs_dir": str(where / "runs"), "seeds.path": str(ROOT / "data" / "seed_tasks.jsonl")}
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"{k}={v}" for k, v in {**base, **extra}.items()])
    path = stack["root"] / "profiles" / f"{name}.yaml"
    path.write_text(cfg.to_yaml())
    return path


def read_back(stack, flow_run_id: str) -> dict:
    """The flow run, its task runs and its artifacts, through the Prefect client."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack["api"]}):
        with get_client(sync_client=True) as client:
            only = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            flow_run = client.read_flow_run(flow_run_id)
            tasks = client.read_task_runs(flow_run_filter=only)
            artifacts = client.read_artifacts(flow_run_filter=only)
    return {"flow_run": flow_run, "tasks": tasks, "artifacts": artifacts}


def wait_terminal(stack, flow_run_id: str, timeout_s: float = 800):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        state = read_back(stack, flow_run_id)["flow_run"].state
        if state.is_final() and not state.is_scheduled():
            return state
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} not finished after {timeout_s}s")


def test_deployment_run_completes_and_its_artifacts_read_back(stack):
    flow_run_id, result = run_deployment(stack, tiny_profile(stack, "completed"), ["mix.seed=1"])
    assert "Completed" in result.stdout, result.stdout
    seen = read_back(stack, flow_run_id)
    assert seen["flow_run"].state.is_completed() and seen["flow_run"].deployment_id is not None
    # One readable task run per stage, tagged with its stage and the model.
    by_stage = {t.name.split(" [")[0]: t for t in seen["tasks"]}
    assert sorted(by_stage) == sorted(STAGES) and all(t.state.is_completed() for t in by_stage.values())
    assert all(re.fullmatch(rf"{s} \[[0-9a-f]+\]", by_stage[s].name) for s in STAGES)
    assert all(f"stage:{s}" in by_stage[s].tags and any(t.startswith("model:") for t in by_stage[s].tags)
               for s in STAGES)
    # The UI's artifacts: the summary, a stats table per stage, progress that reached 100%.
    artifacts = {a.key: a for a in seen["artifacts"] if a.key}
    summary = artifacts["run-summary"].data
    assert "| finetune |" in summary and "Eval loss:" in summary and "Tuned model:" in summary
    assert {f"{s.replace('_', '-')}-stats" for s in STAGES} <= set(artifacts)
    progress = {a.key: a for a in seen["artifacts"] if a.type == "progress"}
    assert {f"{s.replace('_', '-')}-progress" for s in STAGES} <= set(progress)
    assert all(float(a.data) == 100.0 for a in progress.values())
    stats = {row["metric"]: row["value"] for row in json.loads(artifacts["finetune-stats"].data)}
    # The UI's table holds the stage's own figures, as its stats.json on the worker wrote them.
    (written,) = (stack["root"] / "completed" / "artifacts" / "06_finetune").glob("*/stats.json")
    on_disk = json.loads(written.read_text())
    figures = ("steps", "train_examples", "eval_examples", "eval_loss_before", "eval_loss_after")
    assert stats["steps"] == 2 and {k: stats[k] for k in figures} == {k: on_disk[k] for k in figures}
    stack["completed"] = flow_run_id


def test_a_failed_stage_is_retried_alone_with_prefect_flow_run_retry(stack):
    # The fine-tuning base model is not there yet (a volume not mounted, say): the run fails at finetune.
    late_model = stack["root"] / "late-model"
    profile = tiny_profile(stack, "retried", **{"finetune.base_model": str(late_model)})
    flow_run_id, result = run_deployment(stack, profile, [], check=False)
    assert result.returncode != 0 and "Failed" in result.stdout, result.stdout
    first = read_back(stack, flow_run_id)
    states = {t.name.split(" [")[0]: t.state.name for t in first["tasks"]}
    # finetune's key names its base model by content: the run stops as it plans finetune, naming the model.
    assert states == {s: "Completed" for s in STAGES[:5]}
    assert f"model `{late_model}`: not a local Hugging Face model directory" in first["flow_run"].state.message
    ran_first = {t.name: t.start_time for t in first["tasks"]}

    shutil.copytree(stack["tiny"], late_model)  # the model arrives; retry the flow run
    prefect(stack["env"], "flow-run", "retry", flow_run_id)
    assert wait_terminal(stack, flow_run_id).is_completed()

    # Only the failed stage and those after it ran again: the first five kept their first run.
    again = read_back(stack, flow_run_id)
    latest = {}
    for t in sorted(again["tasks"], key=lambda t: t.start_time or t.expected_start_time):
        latest[t.name.split(" [")[0]] = t
    assert all(latest[s].state.name in ("Completed", "Cached") for s in STAGES)
    rerun = [s for s in STAGES if latest[s].state.name == "Completed" and latest[s].start_time != ran_first.get(
        latest[s].name)]
    assert rerun == ["finetune", "evaluate"], {s: (latest[s].state.name, latest[s].start_time) for s in STAGES}
    (run_dir,) = (stack["root"] / "retried" / "runs").iterdir()  # the retry continued the same run record
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["attempt"] == 2
    assert {s: r["reused"] for s, r in manifest["stages"].items()} == {
        **{s: True for s in STAGES[:5]}, "finetune": False, "evaluate": False}
    stack["retried_flow_run"] = flow_run_id


def test_bad_parameters_are_refused_naming_the_key(stack):
    flow_run_id, result = run_deployment(stack, tiny_profile(stack, "bad"), ["mix.sed=3"], check=False)
    seen = read_back(stack, flow_run_id)
    assert seen["flow_run"].state.is_failed() and seen["tasks"] == []
    assert "unknown key `mix.sed`" in seen["flow_run"].state.message
    # A parameter of the wrong type never becomes a run: the deployment's schema refuses it.
    refused = prefect(stack["env"], "deployment", "run", DEPLOYMENT, "--params", json.dumps({"overrides": "mix.seed=2"}),
                      check=False)
    assert refused.returncode != 0 and "overrides" in refused.stdout + refused.stderr


def test_parameters_cannot_redirect_the_key_or_leave_the_data_directories(stack):
    """A caller of the deployment sends the worker's key nowhere else and reaches no path on the worker:
    the run fails before any stage, naming each refused key; a profile from elsewhere is refused too."""
    profile = tiny_profile(stack, "guarded")
    hostile = ["llm.base_url=http://attacker.example/v1", "llm.api_key_secret=someone-elses-key",
               "run.artifacts_dir=/", "seeds.path=/etc/passwd"]
    flow_run_id, result = run_deployment(stack, profile, hostile, check=False)
    seen = read_back(stack, flow_run_id)
    assert seen["flow_run"].state.is_failed() and seen["tasks"] == []
    message = seen["flow_run"].state.message
    assert "a flow-run parameter may not override" in message
    for key in ("llm.base_url", "llm.api_key_secret", "run.artifacts_dir", "seeds.path"):
        assert f"`{key}` (" in message, message
    assert not (stack["root"] / "guarded").exists()  # no run directory, no artifact

    elsewhere = stack["root"] / "elsewhere.yaml"
    elsewhere.write_text(profile.read_text())
    flow_run_id, _ = run_deployment(stack, elsewhere, [], check=False)
    seen = read_back(stack, flow_run_id)
    assert seen["flow_run"].state.is_failed() and seen["tasks"] == []
    assert "a deployment run takes its profile from" in seen["flow_run"].state.message


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="needs Debian's chromium and chromium-driver (make test installs them)")
def test_the_ui_shows_the_stage_task_runs_and_the_run_summary(stack):
    pytest.importorskip("selenium", reason="needs selenium (the dev extra)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    flow_run_id = stack.get("completed") or run_deployment(stack, tiny_profile(stack, "ui"), [])[0]
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1200"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        ui = stack["api"].removesuffix("/api")
        browser.get(f"{ui}/runs/flow-run/{flow_run_id}")
        wait = WebDriverWait(browser, 90)

        def page() -> str:
            return browser.find_element(By.TAG_NAME, "body").text

        wait.until(lambda b: b.find_elements(By.ID, "task-runs"))[0].click()
        wait.until(lambda b: all(f"{stage} [" in page() for stage in STAGES))
        assert "stage:finetune" in page() and "7 Task runs" in page()
        browser.find_element(By.ID, "artifacts").click()
        wait.until(lambda b: b.find_elements(By.XPATH, "//*[normalize-space(text())='run-summary']"))[0].click()
        wait.until(lambda b: "Eval loss:" in page())
        text = page()
        assert "/artifacts/artifact/" in browser.current_url
        assert "instruction-tuning run " in text and "Tuned model:" in text and "(tuned)" in text
        assert all(re.search(rf"^{stage} \d+ \d+ ", text, re.M) for stage in STAGES), text[:2000]
    finally:
        browser.quit()
