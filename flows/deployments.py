"""The deployments of prefect.yaml, served from this machine (`instructflow serve`) instead of by workers.

prefect.yaml stays the one place that names them, their parameters, schedules and tags; `prefect deploy`
reads it for work pools, and this module turns the same entries into `flow.serve` deployments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = ROOT / "prefect.yaml"
ENTRYPOINT = "flows/pipeline.py:instruction_tuning"


class DeploymentError(ValueError):
    pass


def read_deployments(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """prefect.yaml's deployment entries, checked for what serving them needs."""
    entries = (yaml.safe_load(path.read_text()) or {}).get("deployments") or []
    if not entries:
        raise DeploymentError(f"{path}: no `deployments`")
    for i, entry in enumerate(entries):
        where = f"{path}: deployments[{i}]"
        if not entry.get("name"):
            raise DeploymentError(f"{where}: every deployment needs a `name`")
        if entry.get("entrypoint") != ENTRYPOINT:
            raise DeploymentError(f"{where} ({entry['name']}): entrypoint must be {ENTRYPOINT}, "
                                  f"not {entry.get('entrypoint')!r}")
    return entries


def runner_deployments(names: list[str] | None = None, path: Path = PREFECT_YAML) -> list[Any]:
    """`instruction_tuning.to_deployment(...)` for each entry (those in `names`, if given)."""
    from prefect.schedules import Cron

    from flows.pipeline import instruction_tuning

    entries = read_deployments(path)
    known = [e["name"] for e in entries]
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise DeploymentError(f"{path}: no deployment named {', '.join(unknown)}; there are: {', '.join(known)}")
    chosen = [e for e in entries if not names or e["name"] in names]
    return [instruction_tuning.to_deployment(
        name=e["name"], description=e.get("description"), parameters=e.get("parameters") or {},
        tags=e.get("tags") or [], enforce_parameter_schema=e.get("enforce_parameter_schema", True),
        concurrency_limit=e.get("concurrency_limit"),
        schedules=[Cron(s["cron"], timezone=s.get("timezone", "UTC"), active=s.get("active", True))
                   for s in e.get("schedules") or []]) for e in chosen]
