"""Stage 2, self_instruct: bootstrap new tasks from the seeds with the model itself (Wang et al., 2023).

Each round sends a batch of completion-style prompts, each listing in-context instructions (some seeds, some
generated earlier, shuffled and numbered), and parses the numbered list the model continues. New
instructions pass filters (length, keywords, program requests, punctuation, novelty by ROUGE-L against
everything kept so far); the survivors are judged classification or not, and get an instance: output-first
for classification (label, then input), input-first otherwise. Each round is written as a checkpoint part,
so a killed stage continues where it stopped.

Output: one row per example (instruction, input, output), the seed tasks' instances first (origin `seed`),
then the generated ones (origin `self_instruct`) with their novelty columns.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from tasks.artifacts import PartWriter
from tasks.config import SelfInstructConfig
from tasks.llm.base import LLM, GenerationParams, Usage
from tasks.text import RougeIndex, parse_numbered_list, word_count

EXAMPLE_COLUMNS = ["id", "task_id", "instruction", "input", "output", "category", "is_classification",
                   "origin"]


def seed_examples(seeds: pa.Table) -> pd.DataFrame:
    """One row per seed instance, ids `<task id>#<n>`."""
    rows = []
    for task in seeds.to_pylist():
        for n, inst in enumerate(task["instances"]):
            rows.append({"id": f"{task['id']}#{n}", "task_id": task["id"], "instruction": task["instruction"],
                         "input": inst["input"], "output": inst["output"], "category": task["category"],
                         "is_classification": task["is_classification"], "origin": "seed"})
    return pd.DataFrame(rows, columns=EXAMPLE_COLUMNS)


# --- prompts --------------------------------------------------------------------------------------------

def instruction_prompt(instructions: list[str]) -> str:
    lines = ["Come up with a series of tasks:"]
    for n, text in enumerate(instructions, start=1):
        lines.append(f"{n}. " + " ".join(text.split()).rstrip(":"))
    lines.append(f"{len(instructions) + 1}.")
    return "\n".join(lines)


CLASSIFY_HEADER = "Can the following task be regarded as a classification task with finite output labels?\n\n"


def classification_prompt(instruction: str, shots: list[tuple[str, bool]]) -> str:
    parts = [CLASSIFY_HEADER]
    for text, is_cls in shots:
        parts.append(f"Task: {text}\nIs it classification? {'Yes' if is_cls else 'No'}\n\n")
    parts.append(f"Task: {instruction}\nIs it classification?")
    return "".join(parts)


def parse_yes_no(text: str) -> bool | None:
    m = re.match(r"\s*(yes|no)\b", text, flags=re.IGNORECASE)
    return None if m is None else m.group(1).lower() == "yes"


NO_INPUT = "<noinput>"


def instance_prompt(instruction: str, shots: list[dict[str, Any]], output_first: bool) -> str:
    """Few-shot prompt for one instance; classification tasks get the label first, then the input."""
    if output_first:
        header = ("Given a classification task and one of its class labels, write an input that belongs to "
                  "that label.\n\n")
        shot = "Task: {instruction}\nClass label: {output}\nInput: {input}\n\n"
        tail = "Task: {instruction}\nClass label:"
    else:
        header = ("Come up with an example for each task: an input (or <noinput> if the task needs none) and "
                  "a correct output.\n\n")
        shot = "Task: {instruction}\nInput: {input}\nOutput: {output}\n\n"
        tail = "Task: {instruction}\nInput:"
    body = "".join(shot.format(instruction=s["instruction"], input=s["input"].strip() or NO_INPUT,
                               output=s["output"].strip()) for s in shots)
    return header + body + tail.format(instruction=instruction)


def parse_instance(text: str, output_first: bool) -> tuple[str, str] | None:
    """(input, output) from the model's continuation of `instance_prompt`, or None when a field is missing."""
    if output_first:
        m = re.match(r"\s*(.*?)\s*\nInput:\s*(.*)", text, flags=re.DOTALL)
        if not m:
            return None
        label, inp = m.group(1).strip(), m.group(2).strip()
        return inp, label
    m = re.match(r"\s*(.*?)\s*\nOutput:\s*(.*)", text, flags=re.DOTALL)
    if not m:
        return None
    inp = m.group(1).strip()
    return ("" if inp == NO_INPUT else inp), m.group(2).strip()


INSTANCE_STOPS = ("\nTask:", "\n\n\n")


# --- filters ------------------------------------------------------------------------------------------------

def instruction_drop_reason(text: str, cfg: SelfInstructConfig) -> str | None:
    """The first filter `text` fails, or None. The novelty filter runs separately (it needs the pool)."""
    n = word_count(text)
    if n < cfg.min_words:
        return "too_short"
    if n > cfg.max_words:
        return "too_long"
    lowered = text.lower()
    if any(re.search(rf"\b{re.escape(k.lower())}\b", lowered) for k in cfg.blocklist):
        return "blocklisted_keyword"
    if lowered.startswith("write a program"):
        return "program_request"
    if not text[0].isascii():
        return "starts_non_ascii"
    if not text[0].isalnum():
        return "starts_with_punctuation"
    return None


def instance_drop_reason(inp: str, out: str) -> str | None:
    if not out.strip() or out.strip() == NO_INPUT:
        return "empty_output"
    if inp.strip() == out.strip():
        return "input_equals_output"
    if out.rstrip().endswith(":"):
        return "output_ends_with_colon"
    return None


# --- the loop -----------------------------------------------------------------------------------------------

@dataclass
class Progress:
    """What a restarted stage needs to continue: kept rows, requests spent, drop counts."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    pool_added: list[str] = field(default_factory=list)
    tokens: Counter = field(default_factory=Counter)  # prompt_tokens, completion_tokens, llm_calls
    requests: int = 0
    rounds: int = 0
    generated: int = 0
    dropped: Counter = field(default_factory=Counter)


def _restore(parts: list[pa.Table]) -> Progress:
    progress = Progress()
    for part in parts:
        meta = part.schema.metadata or {}
        progress.requests += int(meta.get(b"requests", b"0"))
        progress.generated += int(meta.get(b"generated", b"0"))
        progress.tokens.update(_decode_counts(meta.get(b"tokens", b"")))
        for reason, count in _decode_counts(meta.get(b"dropped", b"")).items():
            progress.dropped[reason] += count
        progress.rounds += 1
        progress.rows.extend(part.to_pylist())
        progress.pool_added.extend(json.loads(meta.get(b"pool_added", b"[]")))
    return progress


def _encode_counts(counts: Counter) -> bytes:
    return ",".join(f"{k}={v}" for k, v in sorted(counts.items())).encode()


def _decode_counts(raw: bytes) -> Counter:
    counts: Counter = Counter()
    for item in raw.decode().split(","):
        if item:
            key, _, value = item.partition("=")
            counts[key] = int(value)
    return counts


GENERATED_COLUMNS = EXAMPLE_COLUMNS + ["rouge_l_max", "most_similar", "bootstrap_round"]


def generate_tasks(seeds: pa.Table, cfg: SelfInstructConfig, llm: LLM, seed: int,
                   parts: PartWriter | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Bootstrap `cfg.num_instructions` new tasks with instances, or stop when `cfg.max_requests` is spent."""
    seed_rows = seeds.to_pylist()
    seed_instructions = [t["instruction"] for t in seed_rows]
    seed_index = RougeIndex(seed_instructions)  # nearest seed gives a generated task its category
    progress = _restore(parts.read_all()) if parts else Progress()
    pool = RougeIndex(seed_instructions + progress.pool_added)
    usage = Usage()
    cls_shots = _classification_shots(seed_rows)
    cls_threshold: float | None = None
    if len(progress.rows) < cfg.num_instructions:
        cls_threshold = classification_threshold(llm, cls_shots, seed_rows)

    while len(progress.rows) < cfg.num_instructions and progress.requests < cfg.max_requests:
        rng = np.random.default_rng([seed, progress.rounds])  # a resumed round draws what it would have
        before = (usage.requests, usage.prompt_tokens, usage.completion_tokens)
        n_requests = _requests_for_round(cfg, progress)
        generated_so_far = [r["instruction"] for r in progress.rows]
        contexts = [_in_context(seed_instructions, generated_so_far, cfg, rng) for _ in range(n_requests)]
        prompts = [instruction_prompt(context) for context in contexts]
        completions = llm.generate(prompts, GenerationParams(
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
            stop=("\n\n",), seed=int(rng.integers(2**31))), desc=f"self_instruct round {progress.rounds}")
        usage.add("instructions", completions)

        dropped: Counter = Counter()
        candidates: list[tuple[str, float, str]] = []
        n_generated = 0
        for context, completion in zip(contexts, completions):
            items, ended = parse_numbered_list(completion.text, len(context) + 1)
            if completion.finish_reason == "length" and not ended and items:
                items = items[:-1]
                dropped["truncated"] += 1
                n_generated += 1
            for item in items:
                n_generated += 1
                reason = instruction_drop_reason(item, cfg)
                if reason is None:
                    score, nearest = pool.most_similar(item)
                    if score > cfg.rouge_threshold:
                        reason = "too_similar"
                    elif len(candidates) >= cfg.num_instructions - len(progress.rows):
                        reason = "over_target"
                    else:
                        candidates.append((item, score, pool.texts[nearest] if nearest >= 0 else ""))
                        pool.add(item)
                if reason:
                    dropped[reason] += 1

        new_rows = _complete_tasks(candidates, seed_rows, seed_index, cls_shots, cls_threshold, cfg, llm, rng,
                                   usage, dropped,
                                   progress.rounds)
        round_tokens = Counter({"llm_calls": usage.requests - before[0],
                                "prompt_tokens": usage.prompt_tokens - before[1],
                                "completion_tokens": usage.completion_tokens - before[2]})
        part = pa.Table.from_pylist(new_rows, schema=_generated_schema()).replace_schema_metadata({
            "requests": str(n_requests), "generated": str(n_generated), "dropped": _encode_counts(dropped),
            "pool_added": json.dumps([c[0] for c in candidates]), "tokens": _encode_counts(round_tokens)})
        if parts:
            parts.write(part)
        progress.rows.extend(new_rows)
        progress.requests += n_requests
        progress.generated += n_generated
        progress.dropped.update(dropped)
        progress.tokens.update(round_tokens)
        progress.pool_added.extend(c[0] for c in candidates)
        progress.rounds += 1

    stop_reason = "target_reached" if len(progress.rows) >= cfg.num_instructions else "max_requests"
    generated = pd.DataFrame(progress.rows, columns=GENERATED_COLUMNS)
    stats = {"requests": progress.requests, "rounds": progress.rounds, "generated": progress.generated,
             "classification_method": "generated yes/no" if cls_threshold is None else
             f"log-odds > {cls_threshold:.3f} (fitted on seeds)",
             "kept": len(generated), "dropped": dict(progress.dropped), "stop_reason": stop_reason,
             "llm_calls": progress.tokens["llm_calls"], "prompt_tokens": progress.tokens["prompt_tokens"],
             "completion_tokens": progress.tokens["completion_tokens"], "usage_this_attempt": usage.as_dict()}
    return generated, stats


def _requests_for_round(cfg: SelfInstructConfig, progress: Progress) -> int:
    """A full batch, or fewer near the target: enough for what is missing at the yield seen so far (x1.5)."""
    budget = min(cfg.requests_per_batch, cfg.max_requests - progress.requests)
    if not progress.rows or not progress.requests:
        return budget
    per_request = len(progress.rows) / progress.requests
    wanted = math.ceil(1.5 * (cfg.num_instructions - len(progress.rows)) / per_request)
    return max(1, min(budget, wanted))


def _generated_schema() -> pa.Schema:
    return pa.schema([("id", pa.string()), ("task_id", pa.string()), ("instruction", pa.string()),
                      ("input", pa.string()), ("output", pa.string()), ("category", pa.string()),
                      ("is_classification", pa.bool_()), ("origin", pa.string()),
                      ("rouge_l_max", pa.float64()), ("most_similar", pa.string()), ("bootstrap_round", pa.int64())])


def _in_context(seed_instructions: list[str], generated: list[str], cfg: SelfInstructConfig,
                rng: np.random.Generator) -> list[str]:
    n_gen = min(cfg.prompt_generated_tasks, len(generated))
    n_seed = min(cfg.prompt_seed_tasks + cfg.prompt_generated_tasks - n_gen, len(seed_instructions))
    picked = [seed_instructions[i] for i in rng.choice(len(seed_instructions), n_seed, replace=False)]
    if n_gen:
        picked += [generated[i] for i in rng.choice(len(generated), n_gen, replace=False)]
    rng.shuffle(picked)
    return picked


def _classification_shots(seed_rows: list[dict[str, Any]], n_yes: int = 4, n_no: int = 8) -> list[tuple[str, bool]]:
    """In-context examples for the yes/no judgement: more No than Yes, as among real tasks, interleaved so
    that a No comes last (a small model tends to repeat the last label it saw)."""
    yes = [(t["instruction"], True) for t in seed_rows if t["is_classification"]][:n_yes]
    no = [(t["instruction"], False) for t in seed_rows if not t["is_classification"]][:n_no]
    shots: list[tuple[str, bool]] = []
    while yes or no:  # no, yes, no, no, yes, no, ...
        shots += [no.pop()] if no else []
        shots += [yes.pop()] if yes else []
        shots += [no.pop()] if no else []
    if shots and shots[-1][1] and not all(label for _, label in shots):
        last_no = max(i for i, (_, label) in enumerate(shots) if not label)
        shots.append(shots.pop(last_no))
    return shots


def _yes_no_margins(llm: LLM, texts: list[str], shots: list[tuple[str, bool]]) -> np.ndarray:
    lp = llm.next_token_logprobs([classification_prompt(t, shots) for t in texts], [" Yes", " No"])
    return lp[:, 0] - lp[:, 1]


def classification_threshold(llm: LLM, shots: list[tuple[str, bool]], seed_rows: list[dict[str, Any]],
                             max_tasks: int = 64) -> float | None:
    """The log-odds threshold for " Yes" that best separates the labelled seed tasks left out of the shots.

    A small model leans towards one answer whatever the task; its log-odds still rank tasks well (AUC
    0.88 on this project's seeds with Gemma 3 270M), so the cut-off is fitted on labelled seeds, by
    balanced accuracy. None when the backend gives no log-probabilities or the seeds hold only one label.
    """
    if not hasattr(llm, "next_token_logprobs"):
        return None
    used = {text for text, _ in shots}
    held = [t for t in seed_rows if t["instruction"] not in used]
    pos = [t for t in held if t["is_classification"]]
    neg = [t for t in held if not t["is_classification"]]
    if not pos or not neg:
        return None
    pos, neg = pos[: max_tasks // 2], neg[: max_tasks - min(len(pos), max_tasks // 2)]
    margins = _yes_no_margins(llm, [t["instruction"] for t in pos + neg], shots)
    labels = np.array([True] * len(pos) + [False] * len(neg))
    order = np.unique(margins)
    cuts = np.concatenate([[order[0] - 1.0], (order[1:] + order[:-1]) / 2, [order[-1] + 1.0]])
    balanced = [((margins > c) & labels).sum() / len(pos) + ((margins <= c) & ~labels).sum() / len(neg)
                for c in cuts]
    return float(cuts[int(np.argmax(balanced))])


def judge_classification(texts: list[str], shots: list[tuple[str, bool]], llm: LLM, usage: Usage,
                         threshold: float | None = None) -> list[bool | None]:
    """Few-shot yes/no: is each task a classification task with a finite set of labels?

    With a fitted `threshold` (see `classification_threshold`), the answer is whether the log-odds of
    " Yes" over " No" exceed it. Otherwise the backend generates the answer greedily.
    """
    if threshold is not None:
        return [bool(m > threshold) for m in _yes_no_margins(llm, texts, shots)]
    judged = llm.generate([classification_prompt(t, shots) for t in texts],
                          GenerationParams(max_new_tokens=3, temperature=0.0), desc="classify")
    usage.add("classification", judged)
    return [parse_yes_no(c.text) for c in judged]


def _complete_tasks(candidates: list[tuple[str, float, str]], seed_rows: list[dict[str, Any]],
                    seed_index: RougeIndex, cls_shots: list[tuple[str, bool]], cls_threshold: float | None,
                    cfg: SelfInstructConfig,
                    llm: LLM, rng: np.random.Generator, usage: Usage, dropped: Counter,
                    round_no: int) -> list[dict[str, Any]]:
    """Judge classification, generate one instance each, filter; return the finished example rows."""
    if not candidates:
        return []
    verdicts = judge_classification([c[0] for c in candidates], cls_shots, llm, usage, cls_threshold)
    if unparsed := sum(v is None for v in verdicts):
        dropped["classification_unparsed"] += unparsed
    candidates = [c for c, v in zip(candidates, verdicts) if v is not None]
    is_cls = [v for v in verdicts if v is not None]
    texts = [c[0] for c in candidates]
    if not candidates:
        return []

    by_kind = {kind: [t for t in seed_rows if t["is_classification"] == kind] for kind in (True, False)}
    prompts = []
    for text, kind in zip(texts, is_cls):
        pool = by_kind[kind] or seed_rows
        shots = [pool[i] for i in rng.choice(len(pool), min(3, len(pool)), replace=False)]
        shots = [{"instruction": s["instruction"], **s["instances"][0]} for s in shots]
        prompts.append(instance_prompt(text, shots, output_first=kind))
    completions = llm.generate(prompts, GenerationParams(
        max_new_tokens=cfg.instance_max_new_tokens, temperature=cfg.instance_temperature, top_p=cfg.top_p,
        stop=INSTANCE_STOPS, seed=int(rng.integers(2**31))), desc="instances")
    usage.add("instances", completions)

    rows = []
    for (text, score, nearest), kind, completion in zip(candidates, is_cls, completions):
        if completion.finish_reason == "length":
            dropped["instance_truncated"] += 1
            continue
        parsed = parse_instance(completion.text, output_first=kind)
        if parsed is None:
            dropped["instance_unparsable"] += 1
            continue
        reason = instance_drop_reason(*parsed)
        if reason:
            dropped[reason] += 1
            continue
        _, seed_pos = seed_index.most_similar(text)
        task_id = f"si-{round_no:04d}-{len(rows):03d}"
        rows.append({"id": f"{task_id}#0", "task_id": task_id, "instruction": text, "input": parsed[0],
                     "output": parsed[1], "category": seed_rows[seed_pos]["category"],
                     "is_classification": kind, "origin": "self_instruct", "rouge_l_max": score,
                     "most_similar": nearest, "bootstrap_round": round_no})
    return rows
