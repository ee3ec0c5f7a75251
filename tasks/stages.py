"""The seven stages as data: what each reads, what its artifact key covers, and how it runs.

Nothing here imports Prefect. `plan` names a stage's output artifact from the config and its inputs;
`execute` runs the stage into that artifact unless it is already done, and writes `stats.json` and
`_SUCCESS` last. The Prefect tasks (tasks/prefect_tasks.py) and the flow only call these two.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from tasks import (conversation, evaluate, evol_instruct, exports, finetune, mix, multigpu, quality, ray_train,
                   report, seeds, self_chat, self_instruct, shards)
from tasks.artifacts import (KEY_LENGTH, Artifact, PartWriter, StorageError, artifact_key, atomic_write_json,
                             atomic_write_parquet, atomic_write_text, input_hashes, source_hash, storage_refusal)
from tasks.codehash import code_hash
from tasks.config import Config, LLMConfig
from tasks.llm import get_llm
from tasks.llm.factory import DeferredLLM, model_identity
from tasks.llm.models import fingerprint
from tasks.locks import holding, me
from tasks.shards import Sharding

Inputs = dict[str, Artifact]
StageOutput = tuple[pd.DataFrame | pa.Table, dict[str, Any]]


def _table(data: pd.DataFrame | pa.Table) -> pa.Table:
    table = data if isinstance(data, pa.Table) else pa.Table.from_pandas(data, preserve_index=False)
    if conversation.COLUMN in table.column_names:  # typed even when every row is one exchange (all null)
        at = table.column_names.index(conversation.COLUMN)
        table = table.set_column(at, conversation.COLUMN, table.column(at).cast(conversation.MESSAGES))
    return table


def _frame(artifact: Artifact) -> pd.DataFrame:
    return artifact.read_table().to_pandas()


def _run_seeds(cfg: Config, inputs: Inputs, out: Artifact) -> StageOutput:
    return seeds.load_seeds(cfg.seeds)


def _run_self_instruct(cfg: Config, inputs: Inputs, out: Artifact) -> StageOutput:
    seed_table = inputs["seeds"].read_table()
    examples = self_instruct.seed_examples(seed_table)
    stats: dict[str, Any] = {"rows_in": seed_table.num_rows, "seed_examples": len(examples)}
    if cfg.self_instruct.enabled:
        generated, made = self_instruct.generate_tasks(seed_table, cfg.self_instruct, get_llm(cfg.llm), cfg.run.seed,
                                                       PartWriter(out.parts_dir), batch_size=cfg.llm.batch_size)
        rows = pd.concat([examples, generated], ignore_index=True) if len(generated) else examples
        stats.update(made)
    else:  # generation off: the loaded rows go on as they are
        rows = examples
        stats["enabled"] = False
    if cfg.self_chat.enabled:  # then extend rows to multi-turn conversations (its own checkpoints)
        rows, stats["self_chat"] = self_chat.extend(rows, cfg.self_chat, get_llm(cfg.llm), cfg.run.seed,
                                                    PartWriter(out.parts_dir / "self_chat"),
                                                    batch_size=cfg.llm.batch_size)
    return rows, stats


def _run_evol(cfg: Config, inputs: Inputs, out: Artifact, sharding: Sharding | None = None) -> StageOutput:
    rows = _frame(inputs["self_instruct"])
    if not cfg.evol_instruct.enabled:  # evolution off: the rows go on as they are (with the evol columns)
        return evol_instruct.unevolved(rows), {"rows_in": len(rows), "enabled": False}
    parts, extra = PartWriter(out.parts_dir), {}
    if sharding is not None and cfg.llm.backend == "transformers":  # chains in shards on the cluster first
        chosen = evol_instruct.chosen_rows(rows, cfg.evol_instruct, cfg.run.seed)
        results = shards.run_items(sharding, "evol_instruct", "tasks.evol_instruct:evolve_shard",
                                   [rows["id"].iat[i] for i in chosen], parts,
                                   {"source": str(inputs["self_instruct"].data_path),
                                    "cfg": cfg.evol_instruct.model_dump(mode="json"),
                                    "llm": cfg.llm.model_dump(mode="json"), "seed": cfg.run.seed,
                                    "batch_size": cfg.llm.batch_size})
        llm, extra = DeferredLLM(cfg.llm), {"shards": shards.summary(results) if results else None}
    else:
        llm = get_llm(cfg.llm)
    evolved, stats = evol_instruct.evolve(rows, cfg.evol_instruct, llm, cfg.run.seed, parts,
                                          batch_size=cfg.llm.batch_size)
    return evolved, {"rows_in": len(rows), **stats, **extra}


def _local_llm(cfg: Config, model: str | None = None, mode: str = "completions") -> LLMConfig:
    """A local completion-style (or `chat`) model: `model`, else the run's own model when it is local, else
    the fine-tuning base model. In the default profile this equals the run's `llm` section, so the stages
    share one loaded model (get_llm caches by section)."""
    model = model or (cfg.llm.model if cfg.llm.backend == "transformers" else cfg.finetune.base_model)
    return cfg.llm.model_copy(update={"backend": "transformers", "model": model, "mode": mode})


def _answering(cfg: Config) -> str:
    """How the evaluate stage asks models: as the tuned model was trained (`finetune.template`)."""
    return "chat" if cfg.finetune.template == "chat" else "completions"


def _scorer_llm(cfg: Config) -> LLMConfig | None:
    """The model DEITA and IFD read log-probabilities from: a local one, or the run's endpoints."""
    q = cfg.quality
    if not (q.deita.enabled or q.ifd.enabled):
        return None
    if q.scorer == "endpoint":  # an openai completions section (checked when the config is read)
        return cfg.llm
    return _local_llm(cfg, q.scorer_model)


def _run_quality(cfg: Config, inputs: Inputs, out: Artifact, sharding: Sharding | None = None) -> StageOutput:
    rows = inputs["evol_instruct"].read_table()
    q = cfg.quality
    scorer = _scorer_llm(cfg)
    judge_llm = cfg.llm if q.judge.enabled else None
    # In shards on the cluster: the model work of in-process models (an endpoint's is not sharded).
    local = {name: section for name, section in (("judge", judge_llm), ("scorer", scorer))
             if section is not None and section.backend == "transformers"}
    remote = None
    if sharding is not None and local:
        remote = shards.StageShards(sharding, str(inputs["evol_instruct"].data_path),
                                    {name: section.model_dump(mode="json") for name, section in local.items()})

    def model(section: LLMConfig | None):
        if section is None:
            return None
        return DeferredLLM(section) if remote is not None and section.backend == "transformers" else get_llm(section)

    # Arrow in, Arrow out: the score and decision columns are appended to the rows, nothing copied.
    scorer_llm = model(scorer)
    asked = (getattr(scorer_llm, "logprob_rows", 0), getattr(scorer_llm, "logprob_misses", 0))
    decided, stats = quality.run_quality(rows, q, judge_llm=model(judge_llm), scorer=scorer_llm,
                                         parts=PartWriter(out.parts_dir), remote=remote)
    if scorer is not None and scorer.backend == "openai":  # DEITA's score tokens the endpoint did not list
        stats["scorer_logprobs"] = {"rows": scorer_llm.logprob_rows - asked[0],
                                    "rows_with_a_score_outside_the_top": scorer_llm.logprob_misses - asked[1]}
    # The report beside the data: report.html for people, report.md for the Prefect UI.
    title = f"Data quality report ({cfg.run.name}, {out.path.name})"
    frame = decided.to_pandas()  # pandas' strings stay in Arrow memory
    for name, render in (("report.html", report.html_report), ("report.md", report.markdown_report)):
        atomic_write_text(out.path / name, render(frame, stats, q.dedup.rank_by, q.report_examples, title))
    return decided, {"rows_in": rows.num_rows, **stats}


def _quality_key(c: Config) -> dict[str, Any]:
    scorer = _scorer_llm(c)
    return {"quality": c.section("quality"), "judge_llm": model_identity(c.llm) if c.quality.judge.enabled else None,
            "scorer": model_identity(scorer) if scorer else None}


def _run_mix(cfg: Config, inputs: Inputs, out: Artifact) -> StageOutput:
    rows = inputs["quality"].read_table()  # Arrow throughout: the splits are slices of `table`
    table, stats, mixed = mix.mix(rows, cfg.mix)
    # Beside data.parquet (both splits, column `split`): each split alone, the manifest, the exports.
    atomic_write_parquet(out.path / "train.parquet", mixed.train)
    atomic_write_parquet(out.path / "eval.parquet", mixed.eval)
    atomic_write_json(out.path / "manifest.json", mixed.manifest)
    written = exports.export_all({"train": mixed.train, "eval": mixed.eval}, out.path, list(cfg.mix.exports))
    return table, {"rows_in": rows.num_rows, **stats, "exports": written}


def _tokens_root(cfg: Config) -> Path:
    """Where training examples are tokenized once, for every fine-tune of the same rows and tokenizer."""
    return Path(cfg.run.artifacts_dir) / "tokenized"


def _run_finetune(cfg: Config, inputs: Inputs, out: Artifact) -> StageOutput:
    from tasks.llm.models import resolve_model

    mix_artifact = inputs["mix"]
    model_dir = resolve_model(cfg.finetune.base_model or cfg.llm.model)
    data = {"mix artifact": mix_artifact.path.name, "mix content hash": mix_artifact.content_hash()}
    if cfg.finetune.launcher == "ray":  # a Ray Train job of `processes` workers on the run's cluster
        per_example, stats = ray_train.launch(mix_artifact.data_path, cfg.finetune, cfg.evaluate, model_dir, out.path,
                                              cfg.run.seed, data, _tokens_root(cfg), cfg.run,
                                              max_failures=cfg.run.ray_shard_retries)
    elif cfg.finetune.processes > 1:  # data parallel under torchrun: each process reads the mix itself
        per_example, stats = multigpu.launch(mix_artifact.data_path, cfg.finetune, cfg.evaluate, model_dir,
                                             out.path, cfg.run.seed, data, _tokens_root(cfg))
    else:
        per_example, stats = finetune.finetune(mix_artifact.read_table(), cfg.finetune, cfg.evaluate, model_dir,
                                               out.path, cfg.run.seed, data, _tokens_root(cfg))
    return per_example, {"rows_in": mix_artifact.marker()["rows"], **stats, "launcher": cfg.finetune.launcher}


def _run_evaluate(cfg: Config, inputs: Inputs, out: Artifact) -> StageOutput:
    e = cfg.evaluate
    mixed = _frame(inputs["mix"])
    heldout = evaluate.load_heldout(e.heldout_path) if e.heldout_path else None
    # Side by side: rows of the mix's eval split spread across origins, held-out tasks across categories.
    rows = [evaluate.draw_across(mixed[mixed["split"] == "eval"], e.max_generations, "origin", cfg.run.seed)
            .assign(set="eval split")]
    if heldout is not None:
        rows.append(evaluate.draw_across(heldout, e.heldout_generations, "category", cfg.run.seed)
                    .assign(set="held-out"))
    shown = pd.concat(rows, ignore_index=True)
    trained = inputs["finetune"].stats()
    mode = _answering(cfg)
    base = get_llm(_local_llm(cfg, cfg.finetune.base_model, mode))
    tuned = get_llm(_local_llm(cfg, str(inputs["finetune"].path / "model"), mode))
    table, stats = evaluate.side_by_side(shown, base, tuned, e.max_new_tokens, e.repetition_penalty,
                                         judge_llm=get_llm(cfg.llm) if e.judge else None, chat=mode == "chat")
    stats.update(eval_loss_before=trained["eval_loss_before"], eval_loss_after=trained["eval_loss_after"],
                 model_path=trained["model_path"])
    if heldout is not None:
        losses = {name: evaluate.reference_loss(llm, heldout, cfg.finetune.max_length, e.batch_size, mode == "chat")
                  for name, llm in (("base", base), ("tuned", tuned))}
        stats["heldout"] = {"path": e.heldout_path, "tasks": len(heldout), **losses}
    if e.ablation:
        stats["ablation"] = _ablation(cfg, inputs, out, heldout, shown[shown["set"] == "held-out"], table, stats)
    title = f"Base vs tuned answers ({cfg.run.name}, {out.path.name})"
    atomic_write_text(out.path / "report.md", evaluate.markdown(table, stats, title))
    return table, {"rows_in": len(shown), **stats}


def _ablation(cfg: Config, inputs: Inputs, out: Artifact, heldout: pd.DataFrame, shown: pd.DataFrame,
              table: pd.DataFrame, stats: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune on each ablation arm's mix with the run's budget (its mix settings and its number of
    optimizer steps), then measure each model on the held-out set as the run's own models were."""
    from tasks.llm.models import resolve_model

    e, trained = cfg.evaluate, inputs["finetune"].stats()
    budget = cfg.finetune.model_copy(update={"max_steps": trained["steps"]})
    held = table[table["set"] == "held-out"]
    arms: dict[str, Any] = {
        name: {"train_rows": rows, "steps": steps, "heldout_loss": stats["heldout"][name]["loss"],
               "stops": evaluate.stop_shares(held[f"{name}_stop"])}
        for name, rows, steps in (("base", None, None), ("tuned", trained["train_examples"], trained["steps"]))}
    for name, rows in evaluate.ablation_inputs(_frame(inputs["quality"])).items():
        arm_dir = out.path / "ablation" / name
        mixed = mix.mix_rows(rows, cfg.mix)
        _, arm_stats = finetune.finetune(pd.concat([mixed.train, mixed.eval], ignore_index=True), budget, e,
                                         resolve_model(cfg.finetune.base_model or cfg.llm.model), arm_dir,
                                         cfg.run.seed, tokens_root=_tokens_root(cfg))
        llm = get_llm(_local_llm(cfg, str(arm_dir / "model"), _answering(cfg)))
        _, kinds = evaluate.answers(llm, shown, e.max_new_tokens, e.repetition_penalty, f"answers ({name})",
                                    _answering(cfg) == "chat")
        arms[name] = {"train_rows": arm_stats["train_examples"], "steps": arm_stats["steps"],
                      "train_real_tokens": arm_stats["train_real_tokens"],
                      "sources": {s: v["rows"] for s, v in mixed.manifest["sources"].items()},
                      "heldout_loss": evaluate.reference_loss(llm, heldout, cfg.finetune.max_length,
                                                              e.batch_size, _answering(cfg) == "chat")["loss"],
                      "stops": evaluate.stop_shares(pd.Series(kinds))}
        shutil.rmtree(arm_dir / "model")  # measured; a gigabyte of float32 weights the run does not need
    return {"arms": arms, "steps": trained["steps"],
            "generated_data_helped": arms["tuned"]["heldout_loss"] < arms["seeds_only"]["heldout_loss"],
            "quality_selection_helped": arms["tuned"]["heldout_loss"] < arms["without_quality"]["heldout_loss"]}


def _seeds_key(c: Config) -> dict[str, Any]:
    # The seed file is an input too: editing it must give a new key, not a stale cached table.
    return {"seeds": c.section("seeds"), "source": [source_hash(src.path) for src in c.seeds.datasets()]}


def _self_instruct_key(c: Config) -> dict[str, Any]:
    chat = c.self_chat.identity() if c.self_chat.enabled else {"enabled": False}
    if not c.self_instruct.enabled and not c.self_chat.enabled:  # no model asked: the key names none
        return {"self_instruct": {"enabled": False}}
    si = c.self_instruct.identity() if c.self_instruct.enabled else {"enabled": False}
    return {"seed": c.run.seed, "llm": model_identity(c.llm), "self_instruct": si, "self_chat": chat}


def _evol_key(c: Config) -> dict[str, Any]:
    if not c.evol_instruct.enabled:
        return {"evol_instruct": {"enabled": False}}
    return {"seed": c.run.seed, "llm": model_identity(c.llm), "evol_instruct": c.evol_instruct.identity()}


def _mix_key(c: Config) -> dict[str, Any]:
    return {"mix": c.section("mix")}


def _finetune_key(c: Config) -> dict[str, Any]:
    template = c.finetune.chat_template
    return {"seed": c.run.seed, "model": fingerprint(c.finetune.base_model or c.llm.model),
            "finetune": c.finetune.identity(),
            # the template file's content, not only its path: a template edited in place trains anew
            "chat_template": source_hash(template) if template and Path(template).is_file() else None,
            "eval_loss": {k: c.section("evaluate")[k] for k in ("max_examples", "batch_size")}}


def _evaluate_key(c: Config) -> dict[str, Any]:
    e = c.evaluate
    return {"evaluate": c.section("evaluate"), "seed": c.run.seed,
            "base": model_identity(_local_llm(c, c.finetune.base_model, _answering(c))),
            "judge_llm": model_identity(c.llm) if e.judge else None,
            "heldout": source_hash(e.heldout_path) if e.heldout_path else None,
            "max_length": c.finetune.max_length,
            # the ablation's models are trained here, as finetune trains the run's own
            "ablation": {"mix": c.section("mix"), "finetune": c.finetune.identity()} if e.ablation else None}


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]
    key_config: Callable[[Config], dict[str, Any]]
    run: Callable[[Config, Inputs, Artifact], StageOutput]
    code: tuple[str, ...]  # the modules the stage calls; the project modules they import are followed
    shardable: bool = False  # its run takes `sharding` (run.executor: ray)

    def version(self) -> str:
        """The hash of every piece of code the stage runs: its modules and their project imports, and its
        glue here (its run and key functions, `execute`, and what those call), as code: comments and
        docstrings do not count."""
        digest, _ = code_hash(self.code, glue_module=__name__, glue_roots=(self.run.__name__,
                              self.key_config.__name__, "execute"), glue_stop=("STAGES",),
                              exclude=("tasks.prefect_tasks",))
        return digest[:KEY_LENGTH]


_GEN = ("tasks.text", "tasks.prompts", "tasks.calibration", "tasks.llm.factory")
STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("seeds", (), _seeds_key, _run_seeds, ("tasks.seeds",)),
    Stage("self_instruct", ("seeds",), _self_instruct_key, _run_self_instruct,
          ("tasks.self_instruct", "tasks.self_chat", *_GEN)),
    Stage("evol_instruct", ("self_instruct",), _evol_key, _run_evol, ("tasks.evol_instruct", *_GEN), shardable=True),
    Stage("quality", ("evol_instruct",), _quality_key, _run_quality,
          ("tasks.quality", "tasks.report", "tasks.llm.losses", *_GEN), shardable=True),
    Stage("mix", ("quality",), _mix_key, _run_mix, ("tasks.mix", "tasks.exports")),
    Stage("finetune", ("mix",), _finetune_key, _run_finetune, ("tasks.finetune", "tasks.multigpu", "tasks.ray_train",
                                                           "tasks.llm.models")),
    Stage("evaluate", ("quality", "mix", "finetune"), _evaluate_key, _run_evaluate,
          ("tasks.evaluate", "tasks.finetune", "tasks.mix", *_GEN)),
]}


def plan(stage: str, cfg: Config, inputs: dict[str, str | Path]) -> Artifact:
    """The artifact a stage writes for this config and these (finished) input artifacts."""
    spec = STAGES[stage]
    hashes = input_hashes(inputs[name] for name in spec.inputs)
    key = artifact_key(stage, spec.key_config(cfg), hashes, spec.version())
    return Artifact.at(cfg.run.artifacts_dir, stage, key)


def execute(stage: str, cfg: Config, inputs: dict[str, str | Path], run_id: str | None = None,
            sharding: Sharding | None = None) -> Artifact:
    """Run `stage` into its planned artifact unless that is already done; return the artifact. With
    `sharding` (run.executor: ray), a stage's in-process model work runs in shards on the cluster.

    One process computes an artifact at a time: it holds the artifact's lock while it computes, and
    another run that needs the same artifact waits for it (or, with `run.wait_for_artifacts: false`, stops
    naming the holder) and then reuses it. A holder that dies releases the lock; the next one continues
    from its checkpoints."""
    spec = STAGES[stage]
    out = plan(stage, cfg, inputs)
    if out.is_done(verify=True):
        return out
    with holding(out.path / ".lock", me(run_id), what=f"{stage} artifact {out.path}",
                 wait=cfg.run.wait_for_artifacts):
        if out.is_done(verify=True):  # made by the run we waited for
            return out
        try:
            out.begin()
            t0 = time.perf_counter()
            ins = {name: Artifact(Path(inputs[name])) for name in spec.inputs}
            data, stats = (spec.run(cfg, ins, out, sharding) if spec.shardable and sharding is not None
                           else spec.run(cfg, ins, out))
            table = _table(data)
            stats = {"stage": stage, "key": out.path.name, "inputs": {n: str(inputs[n]) for n in spec.inputs},
                     "rows_in": stats.pop("rows_in", None), "rows_out": table.num_rows,
                     "dropped": stats.pop("dropped", {}), **stats, "seconds": round(time.perf_counter() - t0, 3),
                     "computed_by": me(run_id)}
            out.commit(table, stats)
        except Exception as exc:  # a full or read-only disk: say so and where; what is there is not marked done
            refusal = storage_refusal(exc)
            if refusal is None:
                raise
            raise StorageError(f"{stage}: cannot write {getattr(exc, 'filename', None) or out.path}: {refusal} "
                               f"(`run.artifacts_dir` is {cfg.run.artifacts_dir}); free space or fix it, then run "
                               f"again: finished stages and checkpoints are kept") from exc
    return out
