"""prefect.yaml, docker-compose.yml and the Dockerfile: what they name exists and fits together."""

import inspect
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prefect.flows import Flow

from flows.deployments import ENTRYPOINT, DeploymentError, read_deployments, runner_deployments
from flows.pipeline import instruction_tuning
from tasks.config import load_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_prefect_yaml_deployments_point_at_the_flow_and_real_profiles():
    deployments = {d["name"]: d for d in read_deployments(ROOT / "prefect.yaml")}
    assert list(deployments) == ["nightly", "adhoc", "gpu"]
    path, func = ENTRYPOINT.split(":")
    assert (ROOT / path).is_file() and isinstance(instruction_tuning, Flow) and func == instruction_tuning.fn.__name__
    accepted = set(inspect.signature(instruction_tuning.fn).parameters)
    for name, d in deployments.items():
        assert set(d["parameters"]) == {"config", "overrides"} <= accepted, name
        load_config(ROOT / d["parameters"]["config"])  # the profile exists and is valid
        assert d["enforce_parameter_schema"] is True
    assert deployments["nightly"]["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC", "active": True}]
    assert "schedules" not in deployments["adhoc"]
    assert {n: d["work_pool"]["name"] for n, d in deployments.items()} == {"nightly": "cpu", "adhoc": "cpu",
                                                                          "gpu": "gpu"}
    assert deployments["gpu"]["parameters"]["config"] == "configs/gpu.yaml"


def test_served_deployments_carry_prefect_yaml_settings():
    served = {d.name: d for d in runner_deployments()}
    assert set(served) == {"nightly", "adhoc", "gpu"}
    (schedule,) = served["nightly"].schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "UTC"
    assert served["adhoc"].schedules == [] and served["gpu"].parameters["config"] == "configs/gpu.yaml"
    assert served["nightly"].tags == ["instructflow", "nightly"] and served["adhoc"].enforce_parameter_schema
    assert all(d.entrypoint == ENTRYPOINT for d in served.values())
    with pytest.raises(DeploymentError, match="no deployment named weekly; there are: nightly, adhoc, gpu"):
        runner_deployments(["weekly"])


def test_a_deployment_with_another_entrypoint_is_refused(tmp_path):
    bad = tmp_path / "prefect.yaml"
    bad.write_text("deployments:\n  - name: x\n    entrypoint: flows/other.py:main\n")
    with pytest.raises(DeploymentError, match=r"deployments\[0\] \(x\): entrypoint must be flows/pipeline.py"):
        read_deployments(bad)


def test_compose_stack_postgres_server_workers_and_vllm():
    services = COMPOSE["services"]
    assert {"postgres", "prefect-server", "cpu-worker", "gpu-worker", "vllm"} <= set(services)
    pg = services["postgres"]
    assert pg["image"].startswith("postgres:") and "pg_isready" in pg["healthcheck"]["test"][1]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in pg["volumes"])
    server = services["prefect-server"]
    assert server["image"].startswith("prefecthq/prefect:3.9.")
    assert "4200:4200" in server["ports"] and server["healthcheck"]["test"]
    assert server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "@postgres:5432/" in server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    pools = {d["work_pool"]["name"] for d in read_deployments(ROOT / "prefect.yaml")}
    for name, pool in (("cpu-worker", "cpu"), ("gpu-worker", "gpu")):
        worker = services[name]
        assert worker["build"]["context"] == "." and worker["command"][:4] == ["prefect", "worker", "start", "--pool"]
        assert worker["command"][4] == pool and pool in pools
        assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert {"artifacts:/app/data/artifacts", "runs:/app/data/runs"} <= set(worker["volumes"])
    gpu = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert services["vllm"]["image"].startswith("vllm/vllm-openai:") and services["vllm"]["profiles"] == ["vllm"]
    assert {"postgres", "artifacts", "runs"} <= set(COMPOSE["volumes"])


def test_dockerfile_copies_what_exists_and_works_where_prefect_yaml_pulls():
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    copied = [part for line in lines if line.startswith("COPY ") for part in line.split()[1:-1]]
    assert copied and all((ROOT / part).exists() for part in copied), copied
    pull = yaml.safe_load((ROOT / "prefect.yaml").read_text())["pull"][0]
    assert "WORKDIR " + pull["prefect.deployments.steps.set_working_directory"]["directory"] in lines


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian package) not installed")
def test_docker_compose_validates_the_file():
    result = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
