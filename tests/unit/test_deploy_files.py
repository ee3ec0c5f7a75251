"""prefect.yaml, docker-compose.yml and the Dockerfile: what they name exists and fits together."""

import asyncio
import inspect
import json
import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.flows import Flow
from prefect.server.api.server import create_api_app
from prefect.settings import (PREFECT_API_AUTH_STRING, PREFECT_API_URL, PREFECT_SERVER_API_AUTH_STRING,
                              temporary_settings)
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from flows.deployments import ENTRYPOINT, DeploymentError, read_deployments, runner_deployments
from flows.pipeline import instruction_tuning
from tasks.config import load_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
# The secrets docker-compose.yml takes from the environment or .env, each a required variable.
SECRETS = ["POSTGRES_PASSWORD", "PREFECT_API_AUTH_STRING"]
BIND = "${INSTRUCTFLOW_BIND_ADDRESS:-127.0.0.1}"
PREFECT_CLIENTS = {"cpu-worker", "gpu-worker", "deploy"}
needs_compose = pytest.mark.skipif(shutil.which("docker-compose") is None,
                                   reason="docker-compose (Debian package) not installed")


def required(name: str) -> str:
    return "${%s:?set %s in .env (see README)}" % (name, name)


def strings(node, where: str = ""):
    """Every string in parsed YAML with where it is (`services.postgres.environment.POSTGRES_PASSWORD`)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from strings(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from strings(value, f"{where}[{i}]")
    elif isinstance(node, str):
        yield where, node


def compose_config(tmp_path: Path, variables: dict[str, str], env_file: Path | None = None):
    """`docker-compose config` seeing only `variables` (and env_file): no shell variables, no checkout .env."""
    if env_file is None:
        env_file = tmp_path / "empty.env"
        env_file.write_text("")
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(tmp_path)), **variables}
    return subprocess.run(["docker-compose", "--env-file", str(env_file), "--profile", "vllm", "--profile", "tools",
                           "--profile", "ray",
                           "-f", str(ROOT / "docker-compose.yml"), "config"],
                          capture_output=True, text=True, cwd=tmp_path, env=env)


def published(service: dict) -> list[str]:
    """A resolved service's ports as `host_ip:published:target/protocol` (compose 1.x short or 2.x long form)."""
    return [p if isinstance(p, str) else f"{p.get('host_ip', '')}:{p['published']}:{p['target']}/{p['protocol']}"
            for p in service.get("ports", [])]


def generated_secrets() -> dict[str, str]:
    """What a user puts in .env, made as .env.example says."""
    return {"POSTGRES_PASSWORD": secrets.token_urlsafe(24),
            "PREFECT_API_AUTH_STRING": "admin:" + secrets.token_urlsafe(24)}


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
    assert server["healthcheck"]["test"]
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


def test_compose_ray_profile_head_and_gpu_worker_share_the_storage_and_the_workers_point_at_it():
    services = COMPOSE["services"]
    head, gpu_node = services["ray-head"], services["ray-gpu-worker"]
    assert head["profiles"] == gpu_node["profiles"] == ["ray"]
    assert head["command"][:3] == ["ray", "start", "--head"] and "6379" in head["command"]
    assert gpu_node["command"] == ["ray", "start", "--address", "ray-head:6379", "--block"]
    assert gpu_node["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for node in (head, gpu_node):  # the images with the project (and the extra `ray`) installed
        assert node["image"] in (services["cpu-worker"]["image"], services["gpu-worker"]["image"])
        assert set(services["cpu-worker"]["volumes"]) <= set(node["volumes"])
    assert "'.[lora,ray]'" in (ROOT / "Dockerfile").read_text()
    for name in ("cpu-worker", "gpu-worker"):
        assert services[name]["environment"]["RAY_ADDRESS"] == "${INSTRUCTFLOW_RAY_ADDRESS:-}"


def test_dockerfile_copies_what_exists_and_works_where_prefect_yaml_pulls():
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    copied = [part for line in lines if line.startswith("COPY ") for part in line.split()[1:-1]]
    assert copied and all((ROOT / part).exists() for part in copied), copied
    pull = yaml.safe_load((ROOT / "prefect.yaml").read_text())["pull"][0]
    assert "WORKDIR " + pull["prefect.deployments.steps.set_working_directory"]["directory"] in lines


def test_compose_file_holds_no_secret_only_required_variables():
    services = COMPOSE["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == required("POSTGRES_PASSWORD")
    server = services["prefect-server"]["environment"]
    assert server["PREFECT_API_DATABASE_CONNECTION_URL"] == (
        f"postgresql+asyncpg://prefect:{required('POSTGRES_PASSWORD')}@postgres:5432/prefect")
    assert server["PREFECT_SERVER_API_AUTH_STRING"] == required("PREFECT_API_AUTH_STRING")
    clients = {name for name, s in services.items()
               if name != "prefect-server" and "prefect" in json.dumps(s.get("command", ""))}
    assert clients == PREFECT_CLIENTS
    for name in clients:
        assert services[name]["environment"]["PREFECT_API_AUTH_STRING"] == required("PREFECT_API_AUTH_STRING"), name
    # Anywhere in the file: a secret-looking key, or the password of a URL, is a required variable and nothing else.
    for where, value in strings(COMPOSE):
        key = where.rsplit(".", 1)[-1]
        if re.search(r"PASSWORD|AUTH_STRING|SECRET|TOKEN|API_KEY", key):
            assert value in map(required, SECRETS), f"{where}: {value}"
        for password in re.findall(r"://[^/@\s:]+:([^@\s]+)@", value):
            assert password in map(required, SECRETS), f"{where}: {value}"


def test_env_example_lists_every_secret_empty_and_says_how_to_make_one():
    text = (ROOT / ".env.example").read_text()
    assignments = dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert assignments == {name: "" for name in SECRETS}  # no value to copy: compose refuses until one is set
    assert "python -c 'import secrets; print(secrets.token_urlsafe(24))'" in text
    assert "# INSTRUCTFLOW_BIND_ADDRESS=0.0.0.0" in text


def test_dot_env_stays_out_of_git_and_the_image_build_context():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "-q", ".env"], cwd=ROOT)
    assert ignored.returncode == 0, ".gitignore must list .env"
    kept = subprocess.run(["git", "check-ignore", "--no-index", "-q", ".env.example"], cwd=ROOT)
    assert kept.returncode == 1, ".env.example must stay tracked"
    assert ".env" in (ROOT / ".dockerignore").read_text().splitlines()


def test_published_ports_are_loopback_unless_bind_address_given():
    services = COMPOSE["services"]
    ports = {name: s["ports"] for name, s in services.items() if "ports" in s}
    assert ports == {"prefect-server": [f"{BIND}:4200:4200"], "vllm": [f"{BIND}:8000:8000"],
                     "ray-head": [f"{BIND}:8265:8265"]}  # postgres: none


def test_prefect_api_lets_the_compose_healthcheck_in_and_only_clients_with_the_auth_string():
    # The server as docker-compose.yml configures it: basic auth on, the API mounted at /api.
    with temporary_settings({PREFECT_SERVER_API_AUTH_STRING: "admin:s3cret"}):
        app = Starlette(routes=[Mount("/api", app=create_api_app(ignore_cache=True))])
    healthcheck = " ".join(COMPOSE["services"]["prefect-server"]["healthcheck"]["test"])
    (url,) = re.findall(r"http://localhost:4200(/api/\S+?)'", healthcheck)
    assert url == "/api/health" and "Authorization" not in healthcheck
    with TestClient(app) as http:
        assert http.get(url).status_code == 200  # Prefect exempts GET /api/health from basic auth
        assert http.get("/api/admin/version").status_code == 401

    async def api_version(auth_string: str) -> str:
        # A worker's client: PREFECT_API_URL and PREFECT_API_AUTH_STRING from its environment.
        client_env = {PREFECT_API_URL: "http://prefect-server:4200/api", PREFECT_API_AUTH_STRING: auth_string}
        with temporary_settings(client_env):
            async with get_client(httpx_settings={"transport": httpx.ASGITransport(app=app)}) as client:
                return await client.api_version()

    assert asyncio.run(api_version("admin:s3cret")).startswith("3.9.")
    with pytest.raises(Exception, match="401 Unauthorized"):
        asyncio.run(api_version("admin:wrong"))


@needs_compose
def test_docker_compose_validates_with_a_dot_env_made_from_the_example(tmp_path):
    made = generated_secrets()
    dot_env = tmp_path / ".env"
    dot_env.write_text("".join(f"{line}{made[line[:-1]]}\n" if line[:-1] in made else f"{line}\n"
                               for line in (ROOT / ".env.example").read_text().splitlines()))
    result = compose_config(tmp_path, {}, env_file=dot_env)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == made["POSTGRES_PASSWORD"]
    server = services["prefect-server"]["environment"]
    assert server["PREFECT_API_DATABASE_CONNECTION_URL"] == (
        f"postgresql+asyncpg://prefect:{made['POSTGRES_PASSWORD']}@postgres:5432/prefect")
    assert server["PREFECT_SERVER_API_AUTH_STRING"] == made["PREFECT_API_AUTH_STRING"]
    assert {name: services[name]["environment"]["PREFECT_API_AUTH_STRING"] for name in PREFECT_CLIENTS} == {
        name: made["PREFECT_API_AUTH_STRING"] for name in PREFECT_CLIENTS}


@needs_compose
def test_docker_compose_publishes_on_loopback_by_default_and_all_interfaces_on_request(tmp_path):
    def ports(variables: dict[str, str]) -> dict[str, list[str]]:
        result = compose_config(tmp_path, {**generated_secrets(), **variables})
        assert result.returncode == 0, result.stderr
        return {name: published(s) for name, s in yaml.safe_load(result.stdout)["services"].items() if published(s)}

    assert ports({}) == {"prefect-server": ["127.0.0.1:4200:4200/tcp"], "vllm": ["127.0.0.1:8000:8000/tcp"],
                         "ray-head": ["127.0.0.1:8265:8265/tcp"]}
    assert ports({"INSTRUCTFLOW_BIND_ADDRESS": "0.0.0.0"}) == {"prefect-server": ["0.0.0.0:4200:4200/tcp"],
                                                                 "vllm": ["0.0.0.0:8000:8000/tcp"],
                                                                 "ray-head": ["0.0.0.0:8265:8265/tcp"]}


@needs_compose
@pytest.mark.parametrize("missing", SECRETS)
def test_docker_compose_refuses_a_missing_secret_and_names_it(tmp_path, missing):
    variables = {name: value for name, value in generated_secrets().items() if name != missing}
    result = compose_config(tmp_path, variables)
    assert result.returncode != 0
    assert f"set {missing} in .env (see README)" in result.stderr
