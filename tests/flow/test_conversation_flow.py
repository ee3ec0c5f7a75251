"""A ShareGPT (Vicuna-style) file through every stage: conversations loaded, extended by self-chat, scored,
mixed, exported with every turn, trained with the chat template (loss on every assistant turn), and the
tuned model asked through its template."""

import asyncio
import json
from pathlib import Path

import pandas as pd
import pytest
from prefect.testing.utilities import prefect_test_harness

from tasks.artifacts import STAGES, stage_dirname
from tests.conversations import write_sharegpt
from tests.flow.test_pipeline_flow import ROOT, _artifacts, _task_states


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_a_sharegpt_file_goes_through_every_stage_and_trains_with_the_chat_template(harness, tiny_model_dir,
                                                                                      tmp_path):
    from transformers import AutoTokenizer

    from flows.pipeline import instruction_tuning

    source = tmp_path / "vicuna.jsonl"
    write_sharegpt(source, n=40, seed=3)
    written = [json.loads(line) for line in source.read_text().splitlines()]
    multi = sum(1 for r in written if sum(t["from"] == "gpt" for t in r["conversations"]) > 1
                or r["conversations"][0]["from"] == "system")
    overrides = [f"llm.model={tiny_model_dir}", f"run.artifacts_dir={tmp_path / 'artifacts'}",
                 f"run.runs_dir={tmp_path / 'runs'}", f"seeds.path={source}", "seeds.limit=null",
                 "self_chat.enabled=true", "self_chat.turns=2", "self_chat.max_rows=4",
                 "self_chat.max_new_tokens=16", "self_chat.user_max_new_tokens=16",
                 "finetune.template=chat", "finetune.max_length=256", "finetune.row_tokens=512",
                 "mix.exports=[alpaca, sharegpt, messages, hf_dataset]"]
    state = instruction_tuning(config=str(ROOT / "configs" / "tiny.yaml"), overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    states = asyncio.run(_task_states(state.state_details.flow_run_id))
    artifacts = asyncio.run(_artifacts(state.state_details.flow_run_id))
    assert states == {stage: "Completed" for stage in STAGES}

    def stage_dir(stage: str) -> Path:
        (found,) = (tmp_path / "artifacts" / stage_dirname(stage)).iterdir()
        return found

    # Seeds: every conversation, multi-turn ones with their `messages`.
    seeds = json.loads((stage_dir("seeds") / "stats.json").read_text())
    assert seeds["format"] == "sharegpt" and seeds["rows_out"] == 40 and seeds["conversations"] == multi
    # Self-chat ran in the self_instruct stage with the real (tiny) model: its figures are there.
    chat = json.loads((stage_dir("self_instruct") / "stats.json").read_text())["self_chat"]
    assert chat["drawn"] == 4
    # Evol-Instruct left the multi-turn rows alone; quality kept their turns.
    quality = pd.read_parquet(stage_dir("quality") / "data.parquet")
    with_turns = quality[quality["messages"].notna()]
    assert len(with_turns) >= multi
    # The mix carries whole conversations; the exports keep every turn.
    mix_dir = stage_dir("mix")
    train = pd.read_parquet(mix_dir / "train.parquet")
    eval_rows = pd.read_parquet(mix_dir / "eval.parquet")
    exported = [json.loads(line) for line in (mix_dir / "train.sharegpt.jsonl").read_text().splitlines()]
    assert len(exported) == len(train)
    for row, record in zip(train.itertuples(), exported):
        expected = 2 if row.messages is None else len(row.messages)
        assert len(record["conversations"]) == expected
    assert train["messages"].notna().any() or eval_rows["messages"].notna().any()

    # Finetune trained with the chat template; the mask report is in the artifact and in the UI.
    finetune_dir = stage_dir("finetune")
    trained = json.loads((finetune_dir / "stats.json").read_text())
    assert trained["template"] == "chat"
    assert (finetune_dir / "mask_report.md").is_file() and "finetune-mask-report" in artifacts
    tokenizer = AutoTokenizer.from_pretrained(summary["model_path"])
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered.endswith("<start_of_turn>model\n") and "<start_of_turn>user\nHi<end_of_turn>" in rendered

    # Evaluate asked both models through the template.
    evaluated = json.loads((stage_dir("evaluate") / "stats.json").read_text())
    assert evaluated["template"] == "chat" and evaluated["generations"] > 0


def test_an_encoder_decoder_model_makes_scores_and_learns_through_every_stage(harness, gemma_tokenizer_dir, tmp_path):
    """FLAN-T5's family (a tiny random T5 here): it writes the tasks, scores them (the judge, DEITA and IFD
    through its decoder), and is fine-tuned with labels on the decoder side, unpacked."""
    from transformers import AutoModelForSeq2SeqLM

    from flows.pipeline import instruction_tuning
    from tests.unit.test_seq2seq import build_tiny_t5

    t5 = build_tiny_t5(gemma_tokenizer_dir, tmp_path / "tiny-t5")
    overrides = [f"llm.model={t5}", f"run.artifacts_dir={tmp_path / 'artifacts'}", f"run.runs_dir={tmp_path / 'runs'}",
                 f"seeds.path={ROOT / 'data' / 'seed_tasks.jsonl'}"]
    state = instruction_tuning(config=str(ROOT / "configs" / "tiny.yaml"), overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    states = asyncio.run(_task_states(state.state_details.flow_run_id))
    assert states == {stage: "Completed" for stage in STAGES}

    def stats(stage: str) -> dict:
        (found,) = (tmp_path / "artifacts" / stage_dirname(stage)).iterdir()
        return json.loads((found / "stats.json").read_text())

    assert stats("self_instruct")["llm_calls"] > 0 and stats("evol_instruct")["rows_in"] > 0
    quality = stats("quality")
    assert {"score_judge", "score_deita", "score_ifd"} <= set(quality["scores"])
    trained = stats("finetune")
    assert trained["packing"] is False and trained["encoder_decoder"] is True
    assert trained["train_flops"] is None and trained["model_flops_per_token"] is None  # no FLOPs model for T5
    assert trained["steps"] == 2 and trained["eval_loss_after"] == trained["eval_loss_after"]  # not NaN
    assert AutoModelForSeq2SeqLM.from_pretrained(summary["model_path"]).config.is_encoder_decoder
    evaluated = stats("evaluate")
    assert evaluated["template"] == "alpaca" and evaluated["heldout"]["tuned"]["examples"] > 0
