"""Stage 7, evaluate: does the tuned model follow instructions better than the base model, and did the
generated data and the quality selection help?

Three measurements, all on instructions the model did not train on:
- held-out set (`evaluate.heldout_path`, data/heldout.jsonl: tasks written for this project, none of them a
  seed or derived from one): the mean loss per reference-answer token (its end-of-sequence token included,
  as in training) of the base and the tuned model, and answers to a seeded draw of
  `heldout_generations` of its instructions spread across categories;
- the mix's eval split: answers to a seeded draw of `max_generations` rows spread across origins (seed,
  self_instruct, evol); its eval loss before and after comes from finetune;
- `ablation`: the same fine-tuning budget (same mix settings, same number of optimizer steps) on the seed
  rows alone and on rows drawn without the quality stage's decisions, each evaluated on the held-out set
  beside the run's own model. So a run says whether its generated rows and its quality selection helped.

Answers are greedy, in the training format, with the same token limit and repetition penalty for every
model, and without stop strings, so each answer shows how it ended: `clean` (the model emitted its
end-of-sequence token, or its end-of-turn token), `runaway` (it went on into another `### Instruction` or a
new Alpaca header), or `length` (the token limit cut it). The training format is `finetune.template`'s:
the Alpaca prompt, or with `chat` the conversation before its last answer through the chat template (the
tuned model's own, saved with it; the base model is asked the same way), so a multi-turn row of the eval
split is asked its last user turn with every earlier turn before it, and its reference is its last answer.
The table shows each answer cut at the first Alpaca stop.
With `evaluate.judge` on, the run's LLM rates every answer (tasks/judge.py); the tuned-vs-base win rate
counts a win when the tuned answer's rating is higher, half a win for a tie, over pairs with both ratings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.conversation import COLUMN, Message, as_messages, messages_of, turn_count
from tasks.judge import judge
from tasks.jsonl import json_lines
from tasks.llm.base import LLM, Completion, GenerationParams, Usage, truncate_at_stop
from tasks.prompts import ALPACA_STOPS, alpaca_prompt

STOP_KINDS = ("clean", "runaway", "length")
RUNAWAY_MARKERS = ("### Instruction", "### Input", "### Response", "Below is an instruction")


class HeldoutError(ValueError):
    pass


# --- inputs -------------------------------------------------------------------------------------------------

def load_heldout(path: str | Path) -> pd.DataFrame:
    """The held-out tasks of a JSON-lines file: `instruction` and `output` (the reference answer) required,
    `input`, `category` and `id` optional. A bad line stops with its file and line number."""
    path = Path(path)
    if not path.is_file():
        raise HeldoutError(f"evaluate.heldout_path: {path} does not exist (set it to a JSON-lines file of "
                           f"instruction/input/output tasks, or to null to skip the held-out set)")
    rows, first_line = [], {}
    for where, obj in json_lines(path, HeldoutError, "the held-out set"):
        if not isinstance(obj, dict):
            raise HeldoutError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for field in ("instruction", "output"):
            if not isinstance(obj.get(field), str) or not obj[field].strip():
                raise HeldoutError(f"{where}: `{field}` must be a non-empty string")
        for field in ("input", "category", "id"):
            if obj.get(field) is not None and not isinstance(obj[field], str):
                raise HeldoutError(f"{where}: `{field}` must be a string")
        lineno = where.rsplit(":", 1)[1]
        row_id = obj.get("id") or f"{path.stem}:{lineno}"
        if row_id in first_line:
            raise HeldoutError(f"{where}: id `{row_id}` already used on line {first_line[row_id]}")
        first_line[row_id] = lineno
        rows.append({"id": row_id, "category": obj.get("category") or "uncategorized",
                     "instruction": obj["instruction"], "input": obj.get("input") or "", "output": obj["output"]})
    if not rows:
        raise HeldoutError(f"{path}: no tasks in the file")
    return pd.DataFrame(rows)


def draw_across(rows: pd.DataFrame, k: int, by: str, seed: int) -> pd.DataFrame:
    """`k` rows drawn at random (seeded) and spread across the values of column `by`: the groups, in a
    random order, take turns giving their next row in a random order, so no group is left out while
    another gives two (table order plays no part)."""
    if k <= 0 or rows.empty:
        return rows.iloc[:0]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(rows))
    codes, uniques = pd.factorize(rows[by].fillna("unknown").astype(str).to_numpy()[perm])
    turn = rng.permutation(len(uniques))[codes]  # each group's place in a round
    within = pd.Series(codes).groupby(codes).cumcount().to_numpy()  # the row's round within its group
    return rows.iloc[perm[np.lexsort((turn, within))[:k]]]


# --- answers ------------------------------------------------------------------------------------------------

def stop_kind(completion: Completion) -> str:
    """How an answer generated without stop strings ended: clean, runaway or length (see the module)."""
    if any(marker in completion.text for marker in RUNAWAY_MARKERS):
        return "runaway"
    return "clean" if completion.finish_reason == "stop" else "length"


def conversations_of(rows: pd.DataFrame) -> list[list[Message]]:
    """Each row's whole conversation (its `messages`, or its one exchange)."""
    messages = [as_messages(m) for m in rows[COLUMN]] if COLUMN in rows else [None] * len(rows)
    return [messages_of(r.instruction, r.input or "", r.output or "", m) for r, m in zip(rows.itertuples(), messages)]


def asked(rows: pd.DataFrame) -> list[list[Message]]:
    """Each row's conversation before its last answer: what a chat-tuned model is asked."""
    return [c[:-1] for c in conversations_of(rows)]


def answers(llm: LLM, rows: pd.DataFrame, max_new_tokens: int, repetition_penalty: float,
            desc: str, chat: bool = False) -> tuple[list[str], list[str]]:
    """Each row's answer (cut at the first Alpaca stop, for reading) and how it ended. With `chat`, the
    row's conversation before its last answer is sent as messages (`llm` renders them with its template)."""
    prompts = asked(rows) if chat else [alpaca_prompt(r.instruction, r.input or "") for r in rows.itertuples()]
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=(),
                              repetition_penalty=repetition_penalty)
    completions = llm.generate(prompts, params, desc=desc)
    return ([truncate_at_stop(c.text, ALPACA_STOPS)[0].strip() for c in completions],
            [stop_kind(c) for c in completions])


def stop_shares(kinds: pd.Series) -> dict[str, float | int]:
    counts = kinds.value_counts()
    return {"answers": len(kinds), **{f"{k}_share": round(int(counts.get(k, 0)) / max(len(kinds), 1), 4)
                                      for k in STOP_KINDS}}


def win_rate(base: np.ndarray, tuned: np.ndarray) -> tuple[float | None, dict[str, int]]:
    """Tuned-vs-base: (wins + ties / 2) / pairs with both ratings; None when no pair has both."""
    rated = ~(np.isnan(base) | np.isnan(tuned))
    counts = {"wins": int((tuned[rated] > base[rated]).sum()), "ties": int((tuned[rated] == base[rated]).sum()),
              "losses": int((tuned[rated] < base[rated]).sum()), "unrated": int((~rated).sum())}
    pairs = int(rated.sum())
    return ((counts["wins"] + counts["ties"] / 2) / pairs if pairs else None), counts


def side_by_side(rows: pd.DataFrame, base: LLM, tuned: LLM, max_new_tokens: int, repetition_penalty: float,
                 judge_llm: LLM | None = None, judge_tokens: int = 16,
                 chat: bool = False) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Both models' answers to `rows` (column `set` names where each row comes from), how each ended, the
    share of clean stops per set and model, and, with a judge, ratings and the win rate. With `chat` the
    models are asked through their chat templates (see `answers`); a multi-turn row shows its last user
    turn as `instruction` (`turn` says which) and its last answer as the reference."""
    rows = rows.reset_index(drop=True)
    table = rows[["id", "set", "instruction", "input", "output"]].rename(columns={"output": "reference"})
    for name, llm in (("base", base), ("tuned", tuned)):
        table[f"{name}_answer"], table[f"{name}_stop"] = answers(llm, rows, max_new_tokens, repetition_penalty,
                                                                  f"answers ({name})", chat)
    whole = conversations_of(rows)
    table.insert(5, "turn", [turn_count(c) for c in whole])
    if chat:  # a multi-turn row: the question actually asked is its last user turn, the reference its last answer
        multi = [c[-2]["content"] if turn_count(c) > 1 else None for c in whole]
        table["instruction"] = [m if m is not None else i for m, i in zip(multi, table["instruction"])]
        table["input"] = ["" if m is not None else x for m, x in zip(multi, table["input"])]
        table["reference"] = [c[-1]["content"] for c in whole]
    stats: dict[str, Any] = {"generations": len(table), "template": "chat" if chat else "alpaca", "stops": {
        s: {name: stop_shares(part[f"{name}_stop"]) for name in ("base", "tuned")}
        for s, part in table.groupby("set", sort=True)}}
    if judge_llm is not None:
        usage = Usage()
        args = (table["instruction"].tolist(), table["input"].fillna("").tolist())
        for name in ("base", "tuned"):  # a multi-turn row is judged as its whole conversation, this answer last
            said = [c[:-1] + [{"role": "assistant", "content": a}] if turn_count(c) > 1 else None
                    for c, a in zip(whole, table[f"{name}_answer"])]
            table[f"{name}_judge"], table[f"{name}_judge_error"], _ = judge(
                *args, table[f"{name}_answer"].tolist(), judge_llm, judge_tokens, usage, conversations=said)
        rate, counts = win_rate(table["base_judge"].to_numpy(float), table["tuned_judge"].to_numpy(float))
        stats.update(win_rate=rate, judged=counts, usage=usage.as_dict())
    return table, stats


# --- held-out loss and the ablation -------------------------------------------------------------------------

def reference_loss(llm, rows: pd.DataFrame, max_length: int, batch_size: int, chat: bool = False) -> dict[str, Any]:
    """Mean loss per reference-answer token (end-of-sequence included) of a local model (tasks/llm's
    transformers backend: `model`, `tokenizer`, `device`, `dtype`), as finetune measures eval loss: in the
    Alpaca format, or with `chat` through the model's chat template (a tuned model's own; Gemma's turn format
    for the base Gemma), the end-of-turn token included."""
    from tasks.chat_template import template_for
    from tasks.finetune import build_examples, evaluate_loss, token_counts

    seq2seq = getattr(llm, "encoder_decoder", False)  # an encoder-decoder model: the prompt in its encoder
    template = template_for(llm.tokenizer) if chat and not seq2seq else None
    examples, kept, cut = build_examples(llm.tokenizer, rows, max_length, chat_template=template,
                                         encoder_decoder=seq2seq)
    loss, _ = evaluate_loss(llm.model, examples, batch_size, llm.tokenizer.pad_token_id, llm.device, llm.dtype,
                            desc="held-out loss")
    return {"loss": round(float(loss), 4), "examples": len(examples),
            "reference_tokens": int(token_counts(examples)[1].sum()), "truncation": cut}


def ablation_inputs(scored: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The quality stage's table as each ablation arm sees it: `seeds_only`, the kept seed rows (the
    generated and evolved rows taken away); `without_quality`, every row kept (the stage's decisions
    ignored, so the mix draws from everything the generators made)."""
    is_seed = (scored["origin"] == "seed").to_numpy()
    return {"seeds_only": scored[is_seed & scored["keep"].fillna(False).astype(bool).to_numpy()],
            "without_quality": scored.assign(keep=True)}


# --- report -------------------------------------------------------------------------------------------------

def _cell(text: Any, limit: int = 220) -> str:
    text = " ".join(str(text or "").split())
    return (text[:limit] + "…" if len(text) > limit else text).replace("|", "\\|") or "(empty)"


def _share(stops: dict[str, Any]) -> str:
    return f"{stops['clean_share']:.0%} clean, {stops['runaway_share']:.0%} runaway, {stops['length_share']:.0%} cut"


def markdown(table: pd.DataFrame, stats: dict[str, Any], title: str) -> str:
    lines = [f"# {title}", "",
             f"Eval loss (response tokens of the mix's eval split, no task shared with training): "
             f"{stats['eval_loss_before']:.4f} (base) -> {stats['eval_loss_after']:.4f} (tuned).", ""]
    held = stats.get("heldout")
    if held:
        lines += [f"Held-out set ({held['tasks']} tasks written for this project): loss per reference-answer "
                  f"token {held['base']['loss']:.4f} (base) -> {held['tuned']['loss']:.4f} (tuned).", ""]
    for name, by_model in stats.get("stops", {}).items():
        lines.append(f"How answers ended ({name}): base {_share(by_model['base'])}; "
                     f"tuned {_share(by_model['tuned'])}.")
    lines.append("")
    if stats.get("ablation"):
        lines += ["## Ablation: same fine-tuning budget, different data", "",
                  "| model | train rows | steps | held-out loss | held-out answers |", "|---|---|---|---|---|"]
        for arm, a in stats["ablation"]["arms"].items():
            rows = "-" if a.get("train_rows") is None else a["train_rows"]
            steps = "-" if a.get("steps") is None else a["steps"]
            lines.append(f"| {arm} | {rows} | {steps} | {a['heldout_loss']:.4f} | {_share(a['stops'])} |")
        lines.append("")
    if stats.get("win_rate") is not None:
        j = stats["judged"]
        lines += [f"Judge win rate, tuned vs base: {stats['win_rate']:.2f} ({j['wins']} wins, {j['ties']} ties, "
                  f"{j['losses']} losses, {j['unrated']} unrated).", ""]
    lines += ["| set | instruction | base model | tuned model | reference |", "|---|---|---|---|---|"]
    for r in table.itertuples():
        task = r.instruction if not r.input else f"{r.instruction} — {r.input}"
        task = task if getattr(r, "turn", 1) == 1 else f"[turn {r.turn}] {task}"
        lines.append(f"| {r.set} | {_cell(task, 160)} | {_cell(r.base_answer)} ({r.base_stop}) | "
                     f"{_cell(r.tuned_answer)} ({r.tuned_stop}) | {_cell(r.reference)} |")
    return "\n".join(lines) + "\n"
