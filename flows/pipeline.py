"""The `instruction-tuning` flow: seeds -> self_instruct -> evol_instruct -> quality -> mix -> finetune -> evaluate.

Each stage reads the artifact of the stage before it and returns the path of its own. A stage whose artifact
already exists for this config and these inputs is not run again (Prefect shows it as Cached).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, runtime, tags
from prefect.artifacts import create_markdown_artifact

from tasks import prefect_tasks
from tasks.artifacts import STAGES, Artifact, check_writable
from tasks.config import Config, ConfigError, load_config, load_for_caller
from tasks.runs import RunRecord, StageRecord
from tasks.stages import plan


class StopAfter(Exception):
    """The run's last stage (`until`) is done: the flow ends there, completed."""

    def __init__(self, stage: str, path: str):
        super().__init__(stage)
        self.stage, self.path = stage, path


def run_stage(stage: str, cfg: Config, run: RunRecord, inputs: dict[str, str]) -> str:
    """Plan the stage's artifact, run its task (or reuse the artifact), and record it in the manifest;
    at the run's last stage (`until`), end the flow there."""
    artifact = plan(stage, cfg, inputs)
    reused = artifact.is_done(verify=True)  # a truncated or altered artifact is recomputed, not reused
    task = getattr(prefect_tasks, stage).with_options(refresh_cache=not reused)
    path = task(key=artifact.path.name, config=cfg.model_dump(mode="json"), inputs=inputs,
                artifacts_dir=str(artifact.path.parent.parent.resolve()), run_id=run.run_id)
    # Made by another run while this one waited for it: reused too.
    made_by = (Artifact(artifact.path).stats().get("computed_by") or {}).get("run_id")
    run.add(StageRecord.of(stage, Artifact(artifact.path), reused or made_by != run.run_id))
    if stage == run.until:
        raise StopAfter(stage, path)
    return path


@flow(name="instruction-tuning", log_prints=True)
def instruction_tuning(config: str = "configs/default.yaml", overrides: list[str] | None = None,
                       run_id: str | None = None, until: str | None = None) -> dict[str, Any]:
    """Run the pipeline with the run profile `config` and dotted-key `overrides` (["mix.seed=2"]), up to
    and including the stage `until` (all of them by default; `mix`, say, for the data without training).
    `run_id` continues that run's record (instructflow resume); a retried flow run continues its own."""
    # 1. Configuration: a bad file, key or value stops here, before any stage. A deployment run's
    #    parameters come from whoever started it: its profile must be one of the worker's, and its
    #    overrides may change only what the profile opens (never the endpoint, its key or a path).
    overrides = list(overrides or [])
    if until is not None and until not in STAGES:
        raise ConfigError(f"until: no stage `{until}`; one of {', '.join(STAGES)}")
    cfg = load_for_caller(config, overrides) if runtime.deployment.id else load_config(config, overrides)
    check_writable(cfg.run.artifacts_dir, "run.artifacts_dir")  # a read-only or missing disk stops here
    check_writable(cfg.run.runs_dir, "run.runs_dir")
    run = RunRecord.start(cfg, config, overrides, flow_run_id=runtime.flow_run.id, run_id=run_id, until=until)
    print(f"run directory: {run.path} (attempt {run.attempt})")

    try:
        with tags(f"model:{cfg.llm.model}", f"profile:{cfg.run.name}"):
            # 2. Data: seed tasks, bootstrapped tasks, evolved tasks.
            seeds = run_stage("seeds", cfg, run, {})
            generated = run_stage("self_instruct", cfg, run, {"seeds": seeds})
            evolved = run_stage("evol_instruct", cfg, run, {"self_instruct": generated})
            # 3. Selection: score and filter, then mix the training set and hold out an eval split.
            scored = run_stage("quality", cfg, run, {"evol_instruct": evolved})
            run.attach(Path(scored) / "report.html", "quality_report.html")
            mixed = run_stage("mix", cfg, run, {"quality": scored})
            # 4. Training: instruction-tune the base model on the mix; eval loss before and after.
            tuned = run_stage("finetune", cfg, run, {"mix": mixed})
            # 5. Evaluation: base and tuned answers to held-out instructions, side by side.
            evaluated = run_stage("evaluate", cfg, run, {"quality": scored, "mix": mixed, "finetune": tuned})
    except StopAfter as stop:  # the run's last stage is done
        return stopped_early(run, stop)
    except BaseException as exc:
        run.save(status="failed", extra={"error": f"{type(exc).__name__}: {exc}"})
        run.close()
        raise

    metrics = Artifact(Path(evaluated)).stats()
    summary = {"run_id": run.run_id, "run_dir": str(run.path), "model_path": metrics["model_path"],
               "eval_loss_before": metrics["eval_loss_before"], "eval_loss_after": metrics["eval_loss_after"],
               "heldout_loss": {k: v["loss"] for k, v in metrics["heldout"].items() if k in ("base", "tuned")}
               if metrics.get("heldout") else None,
               "win_rate": metrics.get("win_rate"), "stages": [s.__dict__ for s in run.stages]}
    run.save(status="completed", extra={"model_path": summary["model_path"],
                                        "eval_loss_before": summary["eval_loss_before"],
                                        "eval_loss_after": summary["eval_loss_after"]})
    run.close()
    create_markdown_artifact(key="run-summary", markdown=summary_markdown(summary),
                             description="instruction-tuning run summary")
    return summary


def stopped_early(run: RunRecord, stop: StopAfter) -> dict[str, Any]:
    """A run that ends at its `until` stage: completed, its last artifact named."""
    run.save(status="completed", extra={"last_artifact": stop.path})
    run.close()
    summary = {"run_id": run.run_id, "run_dir": str(run.path), "until": stop.stage, "last_artifact": stop.path,
               "stages": [s.__dict__ for s in run.stages]}
    create_markdown_artifact(key="run-summary", markdown=summary_markdown(summary),
                             description="instruction-tuning run summary")
    return summary


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [f"# instruction-tuning run `{summary['run_id']}`", "",
             "| stage | rows in | rows out | seconds | reused | dropped |", "|---|---|---|---|---|---|"]
    for s in summary["stages"]:
        dropped = ", ".join(f"{k}: {v}" for k, v in sorted(s["dropped"].items())) or "-"
        lines.append(f"| {s['stage']} | {s['rows_in']} | {s['rows_out']} | {s['seconds']} | "
                     f"{'yes' if s['reused'] else 'no'} | {dropped} |")
    if summary.get("until"):
        return "\n".join(lines + ["", f"Stopped after `{summary['until']}` (until); its artifact: "
                                       f"`{summary['last_artifact']}`"])
    lines += ["", f"Tuned model: `{summary['model_path']}`", "",
              f"Eval loss: {summary['eval_loss_before']:.4f} (base) -> {summary['eval_loss_after']:.4f} (tuned)"]
    if summary.get("heldout_loss"):
        lines.append(f"Held-out loss per reference token: {summary['heldout_loss']['base']:.4f} (base) -> "
                     f"{summary['heldout_loss']['tuned']:.4f} (tuned)")
    if summary.get("win_rate") is not None:
        lines.append(f"Judge win rate, tuned vs base: {summary['win_rate']:.2f}")
    lines.append("Base and tuned answers side by side: the `evaluate-report` artifact.")
    return "\n".join(lines)
