"""Stage 2, self_instruct: bootstrap new tasks from the seeds with the model itself (Wang et al., 2023).

A round sends a batch of prompts, each listing in-context instructions (some seeds, some generated earlier,
shuffled and numbered), and parses the numbered list the model writes next: a completion-style prompt for
base models (the paper's "Come up with a series of tasks:"), a chat variant for chat models. New
instructions pass filters (length, keywords, program requests, punctuation, novelty by ROUGE-L against
everything kept so far). The survivors are judged classification or not and get up to N instances each:
output-first for classification (label, then input), input-first otherwise; instance filters follow.

Checkpoints: a round's accepted instructions are written as a `candidates` part, then completed in chunks
of `checkpoint_every`, each written as a `tasks` part. A killed stage, run again, reads the parts and
continues with the first unfinished chunk: nothing is generated twice, nothing is lost.

Output: one row per example (instruction, input, output), the seed tasks' instances first (origin `seed`),
then the generated ones (origin `self_instruct`) with their novelty columns.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from tasks.artifacts import PartWriter, decode_counts, encode_counts, part_metadata
from tasks.config import SelfInstructConfig
from tasks.llm.base import LLM, GenerationParams, Prompt, Usage, UsageTally, chat_prompt
from tasks.calibration import best_threshold
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


# --- prompts ------------------------------------------------------------------------------------------------
# Completion prompts end where the model should go on writing; chat prompts ask for the same format in a
# reply. The parsers below read both.

def _one_line(text: str) -> str:
    return " ".join(text.split()).rstrip(":")


def instruction_prompt(instructions: list[str], chat: bool = False, new: int = 8) -> Prompt:
    listed = [f"{n}. {_one_line(text)}" for n, text in enumerate(instructions, start=1)]
    if not chat:
        return "\n".join(["Come up with a series of tasks:", *listed, f"{len(instructions) + 1}."])
    first = len(instructions) + 1
    return chat_prompt(
        "Come up with a series of tasks. Here are some examples:\n" + "\n".join(listed) + "\n\n"
        f"Write {new} new tasks, different from these and from each other, as a numbered list from {first} "
        f"to {first + new - 1}, one task per line. Write only the list.")


CLASSIFY_HEADER = "Can the following task be regarded as a classification task with finite output labels?\n\n"


def classification_prompt(instruction: str, shots: list[tuple[str, bool]], chat: bool = False) -> Prompt:
    parts = [CLASSIFY_HEADER]
    for text, is_cls in shots:
        parts.append(f"Task: {text}\nIs it classification? {'Yes' if is_cls else 'No'}\n\n")
    parts.append(f"Task: {instruction}\nIs it classification?")
    text = "".join(parts)
    return chat_prompt(text + "\n\nAnswer Yes or No.") if chat else text


def parse_yes_no(text: str) -> bool | None:
    m = re.match(r"\W*(yes|no)\b", text, flags=re.IGNORECASE)
    return None if m is None else m.group(1).lower() == "yes"


NO_INPUT = "<noinput>"
LABEL_FIRST_HEADER = ("Given a classification task, write examples of it: a class label, then an input that "
                      "belongs to that label. Use different labels.\n\n")
INPUT_FIRST_HEADER = ("Come up with examples for each task: an input (or <noinput> if the task needs none) and "
                      "a correct output.\n\n")


def _shot_block(shot: dict[str, Any], output_first: bool, limit: int) -> str:
    lines = [f"Task: {shot['instruction']}"]
    for n, inst in enumerate(shot["instances"][:limit], start=1):
        inp, out = inst["input"].strip() or NO_INPUT, inst["output"].strip()
        lines += [f"Class label: {out}", f"Input: {inp}"] if output_first else [f"Example {n}", f"Input: {inp}",
                                                                               f"Output: {out}"]
    return "\n".join(lines) + "\n\n"


def instance_prompt(instruction: str, shots: list[dict[str, Any]], output_first: bool, n: int = 1,
                    chat: bool = False) -> Prompt:
    """Few-shot prompt for up to `n` instances of one task; classification tasks get the label first.

    `shots` are seed tasks (`instruction` and `instances`), shown with up to `n` instances each.
    """
    header = LABEL_FIRST_HEADER if output_first else INPUT_FIRST_HEADER
    body = "".join(_shot_block(s, output_first, n) for s in shots)
    if not chat:
        opener = "Class label:" if output_first else "Example 1\nInput:"
        return f"{header}{body}Task: {instruction}\n{opener}"
    wanted = (f"Write up to {n} examples for this task in the same format (`Class label:` lines, each followed "
              "by an `Input:` line)" if output_first else
              f"Write up to {n} examples for this task in the same format (`Example 1`, `Input:`, `Output:`)")
    return chat_prompt(f"{header}{body}Task: {instruction}\n\n{wanted}. Write only the examples.")


def instance_stops(n: int) -> tuple[str, ...]:
    """Where an instance completion should end: the next task, or the example after the last one wanted
    (label-first completions have no example headers, so one stop set serves both kinds in one batch)."""
    return ("\nTask:", f"\nExample {n + 1}\n")


_LABEL = re.compile(r"^\s*Class label:", flags=re.MULTILINE)
_EXAMPLE = re.compile(r"^\s*Example \d+\s*$", flags=re.MULTILINE)


def parse_instances(text: str, output_first: bool, chat: bool = False) -> tuple[list[tuple[str, str]], int]:
    """(input, output) pairs from the model's examples, in order, and how many blocks could not be read.

    In completion mode the text continues the prompt's opener (`Class label:` or `Example 1\\nInput:`).
    """
    if output_first:
        text = text if chat else "Class label:" + text
        blocks = _LABEL.split(text)[1:]
        pattern = r"\s*(.*?)\s*\nInput:\s*(.*)"
    else:
        text = text if chat else "Example 1\nInput:" + text
        blocks = [b for b in _EXAMPLE.split(text)[1:]]
        pattern = r"\s*Input:\s*(.*?)\s*\nOutput:\s*(.*)"
    pairs, unreadable = [], 0
    for block in blocks:
        m = re.match(pattern, block, flags=re.DOTALL)
        if not m:
            unreadable += 1
            continue
        first, second = m.group(1).strip(), m.group(2).strip()
        inp, out = (second, first) if output_first else (first, second)
        pairs.append(("" if inp == NO_INPUT else inp, out))
    return pairs, unreadable


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


def filter_instances(pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], Counter]:
    """A task's instances after the paper's filters, and the drops per reason.

    Each instance must pass `instance_drop_reason`; an exact repeat is dropped; and if one non-empty input
    appears with different outputs, the task is ambiguous and all its instances go (as in the paper's code).
    """
    dropped: Counter = Counter()
    kept: list[tuple[str, str]] = []
    for inp, out in pairs:
        reason = instance_drop_reason(inp, out) or ("duplicate" if (inp, out) in kept else None)
        if reason:
            dropped[reason] += 1
        else:
            kept.append((inp, out))
    outputs: dict[str, set[str]] = {}
    for inp, out in kept:
        if inp.strip():
            outputs.setdefault(inp.strip(), set()).add(out.strip())
    if any(len(outs) > 1 for outs in outputs.values()):
        dropped["conflicting_outputs"] += len(kept)
        kept = []
    return kept, dropped


# --- checkpoints ----------------------------------------------------------------------------------------------

GENERATED_COLUMNS = EXAMPLE_COLUMNS + ["rouge_l_max", "most_similar", "bootstrap_round"]
GENERATED_SCHEMA = pa.schema([
    ("id", pa.string()), ("task_id", pa.string()), ("instruction", pa.string()), ("input", pa.string()),
    ("output", pa.string()), ("category", pa.string()), ("is_classification", pa.bool_()),
    ("origin", pa.string()), ("rouge_l_max", pa.float64()), ("most_similar", pa.string()),
    ("bootstrap_round", pa.int64())])
CANDIDATE_SCHEMA = pa.schema([("instruction", pa.string()), ("rouge_l_max", pa.float64()),
                              ("most_similar", pa.string())])


@dataclass
class Candidate:
    instruction: str
    rouge_l_max: float
    most_similar: str


@dataclass
class Progress:
    """What a restarted stage needs to continue, rebuilt from the checkpoint parts."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    kept_tasks: int = 0
    pool_added: list[str] = field(default_factory=list)
    tokens: Counter = field(default_factory=Counter)  # llm_calls, prompt_tokens, completion_tokens, retries
    requests: int = 0
    rounds: int = 0
    generated: int = 0
    dropped: Counter = field(default_factory=Counter)
    pending: list[Candidate] = field(default_factory=list)  # the last round's candidates not yet completed
    pending_from: int = 0  # index of pending[0] within its round
    completed: int = 0  # candidates judged and given instances so far (kept or not)
    checkpoints: int = 0

    def apply(self, part: pa.Table) -> None:
        """Take in one checkpoint part: a round's candidates, or a finished chunk of them."""
        meta = part_metadata(part)
        self.tokens.update(decode_counts(meta.get("tokens", "")))
        self.dropped.update(decode_counts(meta.get("dropped", "")))
        self.checkpoints += 1
        if meta["kind"] == "candidates":
            self.requests += int(meta["requests"])
            self.generated += int(meta["generated"])
            self.rounds += 1
            self.pending, self.pending_from = [Candidate(**row) for row in part.to_pylist()], 0
            self.pool_added.extend(c.instruction for c in self.pending)
        else:
            done = int(meta["end"]) - int(meta["start"])
            self.pending, self.pending_from = self.pending[done:], int(meta["end"])
            self.rows.extend(part.to_pylist())
            self.kept_tasks += int(meta["tasks_kept"])
            self.completed += done


def _restore(parts: list[pa.Table]) -> Progress:
    progress = Progress()
    for part in parts:
        progress.apply(part)
    return progress


# --- the loop -----------------------------------------------------------------------------------------------

def generate_tasks(seeds: pa.Table, cfg: SelfInstructConfig, llm: LLM, seed: int,
                   parts: PartWriter | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Bootstrap `cfg.num_instructions` new tasks with instances, or stop when a budget is spent."""
    chat = getattr(llm, "mode", "completions") == "chat"
    seed_rows = seeds.to_pylist()
    seed_instructions = [t["instruction"] for t in seed_rows]
    seed_index = RougeIndex(seed_instructions)  # nearest seed gives a generated task its category
    progress = _restore(parts.read_all()) if parts else Progress()
    pool = RougeIndex(seed_instructions + progress.pool_added)
    usage = Usage()
    tally = UsageTally(usage)
    cls_shots = _classification_shots(seed_rows)
    cls_threshold: float | None = None
    if progress.kept_tasks < cfg.num_instructions and not chat:
        cls_threshold = classification_threshold(llm, cls_shots, seed_rows)

    def tokens_spent() -> bool:
        spent = progress.tokens["prompt_tokens"] + progress.tokens["completion_tokens"]
        return cfg.max_tokens is not None and spent >= cfg.max_tokens

    def checkpoint(table: pa.Table, meta: dict[str, str]) -> None:
        """Write a part and take it in, exactly as a restarted stage would read it back."""
        part = table.replace_schema_metadata({**meta, "tokens": encode_counts(tally.take())})
        if parts:
            parts.write(part)
        progress.apply(part)

    while True:
        if progress.pending and progress.kept_tasks >= cfg.num_instructions:
            progress.dropped["over_target"] += len(progress.pending)  # not needed: the target is reached
            progress.pending = []
        if progress.pending:  # finish the current round, one checkpoint per chunk
            if tokens_spent():
                stop_reason = "max_tokens"
                break
            round_no = progress.rounds - 1
            start = progress.pending_from
            chunk = progress.pending[:_chunk_size(cfg, progress)]
            rng = np.random.default_rng([seed, round_no, start])  # a resumed chunk draws what it would have
            dropped: Counter = Counter()
            rows, n_tasks = _complete_tasks(chunk, start, round_no, seed_rows, seed_index, cls_shots, cls_threshold,
                                            cfg, llm, chat, rng, usage, dropped)
            if (extra := progress.kept_tasks + n_tasks - cfg.num_instructions) > 0:  # never beyond the target
                keep_ids = list(dict.fromkeys(r["task_id"] for r in rows))[:n_tasks - extra]
                rows = [r for r in rows if r["task_id"] in keep_ids]
                n_tasks -= extra
                dropped["over_target"] += extra
            checkpoint(pa.Table.from_pylist(rows, schema=GENERATED_SCHEMA),
                       {"kind": "tasks", "round": str(round_no), "start": str(start),
                        "end": str(start + len(chunk)), "tasks_kept": str(n_tasks),
                        "dropped": encode_counts(dropped)})
            continue
        if progress.kept_tasks >= cfg.num_instructions:
            stop_reason = "target_reached"
            break
        if progress.requests >= cfg.max_requests:
            stop_reason = "max_requests"
            break
        if tokens_spent():
            stop_reason = "max_tokens"
            break

        rng = np.random.default_rng([seed, progress.rounds])  # a resumed round draws what it would have
        n_requests = _requests_for_round(cfg, progress)
        generated_so_far = [r["instruction"] for r in progress.rows if r["id"].endswith("#0")]
        contexts = [_in_context(seed_instructions, generated_so_far, cfg, rng) for _ in range(n_requests)]
        completions = llm.generate(
            [instruction_prompt(context, chat, cfg.new_per_request) for context in contexts],
            GenerationParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                             stop=() if chat else ("\n\n",), seed=int(rng.integers(2**31))),
            desc=f"self_instruct round {progress.rounds}")
        usage.add("instructions", completions)

        dropped = Counter()
        candidates: list[Candidate] = []
        n_generated = 0
        # Not every candidate ends up with an instance, so keep twice what is missing; the rest is counted
        # as `over_target` once the target is reached.
        room = 2 * (cfg.num_instructions - progress.kept_tasks)
        for context, completion in zip(contexts, completions):
            items, ended = parse_numbered_list(completion.text, len(context) + 1, opened=not chat)
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
                    elif len(candidates) >= room:
                        reason = "over_target"
                    else:
                        candidates.append(Candidate(item, score, pool.texts[nearest] if nearest >= 0 else ""))
                        pool.add(item)
                if reason:
                    dropped[reason] += 1
        checkpoint(pa.Table.from_pylist([c.__dict__ for c in candidates], schema=CANDIDATE_SCHEMA),
                   {"kind": "candidates", "round": str(progress.rounds), "requests": str(n_requests),
                    "generated": str(n_generated), "dropped": encode_counts(dropped)})

    generated = pd.DataFrame(progress.rows, columns=GENERATED_COLUMNS)
    stats = {"stop_reason": stop_reason, "requests": progress.requests, "rounds": progress.rounds,
             "checkpoints": progress.checkpoints, "generated": progress.generated, "kept": progress.kept_tasks,
             "kept_instances": len(generated), "prompt_style": "chat" if chat else "completion",
             "classification_method": "generated yes/no" if cls_threshold is None else
             f"log-odds > {cls_threshold:.3f} (fitted on seeds)",
             "dropped": dict(progress.dropped), "llm_calls": progress.tokens["llm_calls"],
             "prompt_tokens": progress.tokens["prompt_tokens"],
             "completion_tokens": progress.tokens["completion_tokens"], "retries": progress.tokens["retries"],
             "usage_this_attempt": usage.as_dict()}
    return generated, stats


def _requests_for_round(cfg: SelfInstructConfig, progress: Progress) -> int:
    """A full batch, or fewer near the target: enough for what is missing at the yield seen so far (x1.5)."""
    budget = min(cfg.requests_per_batch, cfg.max_requests - progress.requests)
    if not progress.kept_tasks or not progress.requests:
        return budget
    per_request = progress.kept_tasks / progress.requests
    wanted = math.ceil(1.5 * (cfg.num_instructions - progress.kept_tasks) / per_request)
    return max(1, min(budget, wanted))


def _chunk_size(cfg: SelfInstructConfig, progress: Progress) -> int:
    """Candidates to complete next: `checkpoint_every`, or fewer when the target is near (1.5x what is
    missing at the share of candidates that has made it so far), so that few are completed for nothing."""
    missing = cfg.num_instructions - progress.kept_tasks
    share = progress.kept_tasks / progress.completed if progress.kept_tasks else 1.0
    return max(1, min(cfg.checkpoint_every, math.ceil(1.5 * missing / share)))


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
    # Completion mode only: the prompt ends with "Is it classification?", so the answer's first token is
    # " Yes" or " No".
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
    fitted = best_threshold(margins, np.array([True] * len(pos) + [False] * len(neg)))
    return None if fitted is None else fitted[0]


def judge_classification(texts: list[str], shots: list[tuple[str, bool]], llm: LLM, usage: Usage,
                         threshold: float | None = None, chat: bool = False) -> list[bool | None]:
    """Few-shot yes/no: is each task a classification task with a finite set of labels?

    With a fitted `threshold` (see `classification_threshold`), the answer is whether the log-odds of
    " Yes" over " No" exceed it. Otherwise the backend generates the answer greedily.
    """
    if threshold is not None:
        return [bool(m > threshold) for m in _yes_no_margins(llm, texts, shots)]
    judged = llm.generate([classification_prompt(t, shots, chat) for t in texts],
                          GenerationParams(max_new_tokens=4, temperature=0.0), desc="classify")
    usage.add("classification", judged)
    return [parse_yes_no(c.text) for c in judged]


def _complete_tasks(chunk: list[Candidate], start: int, round_no: int, seed_rows: list[dict[str, Any]],
                    seed_index: RougeIndex, cls_shots: list[tuple[str, bool]], cls_threshold: float | None,
                    cfg: SelfInstructConfig, llm: LLM, chat: bool, rng: np.random.Generator, usage: Usage,
                    dropped: Counter) -> tuple[list[dict[str, Any]], int]:
    """Judge classification, generate up to N instances per task, filter; the example rows and tasks kept.

    Task ids are `si-<round>-<index in round>`, so a resumed chunk names its tasks as the first try would.
    """
    texts = [c.instruction for c in chunk]
    verdicts = judge_classification(texts, cls_shots, llm, usage, cls_threshold, chat)
    if unparsed := sum(v is None for v in verdicts):
        dropped["classification_unparsed"] += unparsed
    judged = [(pos, c, v) for pos, (c, v) in enumerate(zip(chunk, verdicts)) if v is not None]
    if not judged:
        return [], 0

    by_kind = {kind: [t for t in seed_rows if t["is_classification"] == kind] for kind in (True, False)}
    prompts = []
    for _, cand, kind in judged:
        shot_pool = by_kind[kind] or seed_rows
        shots = [shot_pool[i] for i in rng.choice(len(shot_pool), min(3, len(shot_pool)), replace=False)]
        prompts.append(instance_prompt(cand.instruction, shots, output_first=kind, n=cfg.instances_per_task,
                                       chat=chat))
    completions = llm.generate(prompts, GenerationParams(
        max_new_tokens=cfg.instance_max_new_tokens, temperature=cfg.instance_temperature, top_p=cfg.top_p,
        stop=() if chat else instance_stops(cfg.instances_per_task), seed=int(rng.integers(2**31))),
        desc="instances")
    usage.add("instances", completions)

    rows, n_tasks = [], 0
    instance_drops: Counter = Counter()  # per instance; task-level drops go to `dropped` as they are
    for (pos, cand, kind), completion in zip(judged, completions):
        pairs, unreadable = parse_instances(completion.text, output_first=kind, chat=chat)
        if unreadable:
            instance_drops["unparsable"] += unreadable
        if completion.finish_reason == "length" and pairs:
            pairs = pairs[:-1]  # the last example may be cut off
            instance_drops["truncated"] += 1
        if len(pairs) > cfg.instances_per_task:
            instance_drops["over_limit"] += len(pairs) - cfg.instances_per_task
            pairs = pairs[:cfg.instances_per_task]
        pairs, filtered = filter_instances(pairs)
        instance_drops.update(filtered)
        if not pairs:
            dropped["task_without_instances"] += 1
            continue
        _, seed_pos = seed_index.most_similar(cand.instruction)
        task_id = f"si-{round_no:04d}-{start + pos:03d}"
        n_tasks += 1
        for k, (inp, out) in enumerate(pairs):
            rows.append({"id": f"{task_id}#{k}", "task_id": task_id, "instruction": cand.instruction, "input": inp,
                         "output": out, "category": seed_rows[seed_pos]["category"], "is_classification": kind,
                         "origin": "self_instruct", "rouge_l_max": cand.rouge_l_max,
                         "most_similar": cand.most_similar, "bootstrap_round": round_no})
    dropped.update({f"instance_{reason}": n for reason, n in instance_drops.items()})
    return rows, n_tasks
