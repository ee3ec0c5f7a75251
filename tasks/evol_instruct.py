"""Stage 3, evol_instruct: rewrite instructions into harder ones (Xu et al., 2023, WizardLM) and answer them.

Each round draws up to `max_per_round` instructions (round 1 from the input rows, round r from the
survivors of round r-1), picks an in-depth operation for each with a seeded generator and the configured
weights, asks the model for the rewrite with a completion-style prompt written for this project, drops
failed evolutions (each with a reason), and generates a response in the Alpaca format for every survivor.

Output: the input rows unchanged, then the evolved rows (origin `evol`) with `parent_id`, `root_id`,
`round` and `evol_operation`.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd

from tasks.config import EvolInstructConfig
from tasks.llm.base import LLM, GenerationParams, Usage
from tasks.prompts import ALPACA_STOPS, alpaca_prompt
from tasks.text import word_count

# One demonstration per operation: what the rewrite does, and an example of it.
OPERATIONS: dict[str, tuple[str, str, str]] = {
    "add_constraints": (
        "adding one more constraint or requirement",
        "Describe the water cycle.",
        "Describe the water cycle in exactly four sentences, naming one place on Earth where each stage is "
        "easy to observe."),
    "deepen": (
        "asking about the topic in more depth and breadth",
        "Why do leaves change color in autumn?",
        "Why do leaves change color in autumn, which pigments are involved, and how do temperature and "
        "daylight affect how bright the colors become?"),
    "concretize": (
        "replacing general concepts with more specific ones",
        "Give advice on saving money.",
        "Give a university student who spends too much on takeout food three concrete ways to save 100 "
        "dollars a month."),
    "increase_reasoning": (
        "requiring explicit multi-step reasoning",
        "How many minutes are there in a week?",
        "How many minutes are there in a week? Work it out step by step, first hours per week and then "
        "minutes, and check the result a second way."),
}
HEADER = "Each task below is rewritten into a harder version by {what}.\n\n"
SCAFFOLD = re.compile(r"(#\s*rewritten|rewritten (prompt|task)|given (prompt|task)|harder (version|task)|"
                      r"^\s*task\s*:)", re.IGNORECASE)


def evol_prompt(operation: str, instruction: str, input: str = "") -> str:
    what, before, after = OPERATIONS[operation]
    task = instruction.strip() if not input.strip() else f"{instruction.strip()} {input.strip()}"
    task = " ".join(task.split())
    return HEADER.format(what=what) + f"Task: {before}\nHarder task: {after}\n\nTask: {task}\nHarder task:"


def evolution_drop_reason(parent: str, evolved: str, max_words: int) -> str | None:
    text = evolved.strip()
    if not text:
        return "empty"
    if " ".join(text.lower().split()) == " ".join(parent.lower().split()):
        return "unchanged"
    if word_count(text) > max_words:
        return "too_long"
    if SCAFFOLD.search(text):
        return "scaffold_leak"
    return None


_STOP_WORDS = frozenset("a an the and or but of to in on at for with is are was were be it this that as by "
                        "i you he she we they".split())


def response_drop_reason(response: str) -> str | None:
    text = response.strip()
    if not text:
        return "empty_response"
    if "sorry" in text.lower() and word_count(text) < 80:
        return "response_sorry"
    words = re.findall(r"[a-z0-9]+", text.lower())
    if not words or all(w in _STOP_WORDS for w in words):
        return "response_only_stop_words"
    return None


def evolve(rows: pd.DataFrame, cfg: EvolInstructConfig, llm: LLM, seed: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    ops = [op for op, w in cfg.operations.items() if w > 0]
    weights = np.array([cfg.operations[op] for op in ops], dtype=float)
    weights /= weights.sum()
    usage = Usage()
    dropped: Counter = Counter()
    attempts: Counter = Counter()
    passed: Counter = Counter()
    evolved_rows: list[dict[str, Any]] = []
    pool = [{**r, "root_id": r["id"]} for r in rows.to_dict("records")]

    for round_no in range(1, cfg.rounds + 1):
        rng = np.random.default_rng([seed, round_no])
        if not pool:
            break
        if cfg.max_per_round is not None and len(pool) > cfg.max_per_round:
            pool = [pool[i] for i in sorted(rng.choice(len(pool), cfg.max_per_round, replace=False))]
        chosen_ops = [ops[i] for i in rng.choice(len(ops), len(pool), p=weights)]
        prompts = [evol_prompt(op, p["instruction"], p.get("input") or "") for op, p in zip(chosen_ops, pool)]
        rewrites = llm.generate(prompts, GenerationParams(
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, stop=("\n",),
            seed=int(rng.integers(2**31))), desc=f"evol round {round_no}")
        usage.add("evolve", rewrites)

        survivors = []
        for parent, op, completion in zip(pool, chosen_ops, rewrites):
            attempts[op] += 1
            reason = "truncated" if completion.finish_reason == "length" else None
            reason = reason or evolution_drop_reason(parent["instruction"], completion.text,
                                                     cfg.max_instruction_words)
            if reason:
                dropped[reason] += 1
                continue
            survivors.append((parent, op, completion.text.strip()))

        answers = llm.generate([alpaca_prompt(text) for _, _, text in survivors], GenerationParams(
            max_new_tokens=cfg.response_max_new_tokens, temperature=0.0, stop=ALPACA_STOPS),
            desc=f"evol responses {round_no}")
        usage.add("respond", answers)

        next_pool = []
        for (parent, op, text), answer in zip(survivors, answers):
            reason = "response_truncated" if answer.finish_reason == "length" else response_drop_reason(answer.text)
            if reason:
                dropped[reason] += 1
                continue
            passed[op] += 1
            row = {"id": f"{parent['id']}>e{round_no}", "task_id": parent.get("task_id"), "instruction": text,
                   "input": "", "output": answer.text.strip(), "category": parent["category"],
                   "is_classification": False, "origin": "evol", "parent_id": parent["id"],
                   "root_id": parent["root_id"], "round": round_no, "evol_operation": op}
            evolved_rows.append(row)
            next_pool.append(row)
        pool = next_pool

    evolved = pd.DataFrame(evolved_rows, columns=list(rows.columns) + [
        c for c in ("parent_id", "root_id", "round", "evol_operation") if c not in rows.columns])
    out = pd.concat([rows, evolved], ignore_index=True) if len(evolved) else rows.reindex(columns=evolved.columns)
    pass_rates = {op: {"attempts": attempts[op], "kept": passed[op],
                       "pass_rate": round(passed[op] / attempts[op], 4) if attempts[op] else None} for op in ops}
    stats = {"attempted": sum(attempts.values()), "kept": len(evolved), "dropped": dict(dropped),
             "operations": pass_rates, "usage": usage.as_dict()}
    return out, stats
