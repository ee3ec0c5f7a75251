"""Stage 7, evaluate: the base and the tuned model answer the same held-out instructions, side by side.

Both models answer greedily in the training format (the Alpaca prompt), with the same token limit and
repetition penalty, the first `max_generations` rows of the mix's eval split. The table keeps the reference
output and both answers. With `evaluate.judge` on, the run's LLM rates every answer (tasks/judge.py) and
the tuned-vs-base win rate counts a win when the tuned answer's rating is higher, half a win for a tie,
over the pairs where both answers got a rating. The eval loss before and after comes from finetune.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from tasks.judge import judge
from tasks.llm.base import LLM, GenerationParams, Usage
from tasks.prompts import ALPACA_STOPS, alpaca_prompt


def answers(llm: LLM, rows: pd.DataFrame, max_new_tokens: int, repetition_penalty: float, desc: str) -> list[str]:
    prompts = [alpaca_prompt(r.instruction, r.input or "") for r in rows.itertuples()]
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=ALPACA_STOPS,
                              repetition_penalty=repetition_penalty)
    return [c.text.strip() for c in llm.generate(prompts, params, desc=desc)]


def win_rate(base: np.ndarray, tuned: np.ndarray) -> tuple[float | None, dict[str, int]]:
    """Tuned-vs-base: (wins + ties / 2) / pairs with both ratings; None when no pair has both."""
    rated = ~(np.isnan(base) | np.isnan(tuned))
    counts = {"wins": int((tuned[rated] > base[rated]).sum()), "ties": int((tuned[rated] == base[rated]).sum()),
              "losses": int((tuned[rated] < base[rated]).sum()), "unrated": int((~rated).sum())}
    pairs = int(rated.sum())
    return ((counts["wins"] + counts["ties"] / 2) / pairs if pairs else None), counts


def side_by_side(eval_rows: pd.DataFrame, base: LLM, tuned: LLM, max_new_tokens: int, repetition_penalty: float,
                 judge_llm: LLM | None = None, judge_tokens: int = 16) -> tuple[pd.DataFrame, dict[str, Any]]:
    table = eval_rows[["id", "instruction", "input", "output"]].rename(columns={"output": "reference"})
    table = table.reset_index(drop=True)
    table["base_answer"] = answers(base, table, max_new_tokens, repetition_penalty, "answers (base)")
    table["tuned_answer"] = answers(tuned, table, max_new_tokens, repetition_penalty, "answers (tuned)")
    stats: dict[str, Any] = {"generations": len(table)}
    if judge_llm is not None:
        usage = Usage()
        args = (table["instruction"].tolist(), table["input"].fillna("").tolist())
        table["base_judge"], table["base_judge_error"], _ = judge(*args, table["base_answer"].tolist(), judge_llm,
                                                                   judge_tokens, usage)
        table["tuned_judge"], table["tuned_judge_error"], _ = judge(*args, table["tuned_answer"].tolist(), judge_llm,
                                                                     judge_tokens, usage)
        rate, counts = win_rate(table["base_judge"].to_numpy(float), table["tuned_judge"].to_numpy(float))
        stats.update(win_rate=rate, judged=counts, usage=usage.as_dict())
    return table, stats


def _cell(text: Any, limit: int = 220) -> str:
    text = " ".join(str(text or "").split())
    return (text[:limit] + "…" if len(text) > limit else text).replace("|", "\\|") or "(empty)"


def markdown(table: pd.DataFrame, stats: dict[str, Any], title: str) -> str:
    lines = [f"# {title}", "",
             f"Eval loss (response tokens of the held-out split): {stats['eval_loss_before']:.4f} (base) -> "
             f"{stats['eval_loss_after']:.4f} (tuned).", ""]
    if stats.get("win_rate") is not None:
        j = stats["judged"]
        lines += [f"Judge win rate, tuned vs base: {stats['win_rate']:.2f} ({j['wins']} wins, {j['ties']} ties, "
                  f"{j['losses']} losses, {j['unrated']} unrated).", ""]
    lines += ["| instruction | base model | tuned model | reference |", "|---|---|---|---|"]
    for r in table.itertuples():
        task = r.instruction if not r.input else f"{r.instruction} — {r.input}"
        lines.append(f"| {_cell(task, 160)} | {_cell(r.base_answer)} | {_cell(r.tuned_answer)} | {_cell(r.reference)} |")
    return "\n".join(lines) + "\n"
