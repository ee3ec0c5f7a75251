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
then the generated ones (origin `self_instruct`) with their novelty columns. The seed examples' `messages`
carries a seed conversation of more than one exchange (tasks/conversation.py); generated rows are one
exchange each and have no `messages` (null once put together with the seed examples).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from tasks import conversation
from tasks.artifacts import PartWriter
from tasks.config import SelfInstructConfig
from tasks.engine import Engine, Finished, Model, parallelism
from tasks.llm.base import LLM, Completion, GenerationParams, Prompt, chat_prompt
from tasks.calibration import best_threshold
from tasks.text import RougeIndex, parse_numbered_list, word_count

EXAMPLE_COLUMNS = ["id", "task_id", "instruction", "input", "output", "category", "is_classification",
                   "origin", "dataset"]


def seed_examples(seeds: pa.Table) -> pd.DataFrame:
    """One row per seed instance, ids `<task id>#<n>`; column-wise (an existing 500K-row dataset passes
    through here). `dataset` is the seed file the task came from (`seeds` when the table does not say);
    `messages` the task's conversation when it is more than one exchange (see tasks/conversation.py), null
    otherwise and for a seeds table without the column."""
    instances = seeds.column("instances").combine_chunks()
    task = pc.list_parent_indices(instances).to_numpy()
    flat = pc.list_flatten(instances)
    starts = instances.offsets.to_numpy()[:-1] - instances.offsets[0].as_py()
    nth = np.arange(len(task)) - starts[task]
    dataset = (seeds.column("dataset") if "dataset" in seeds.column_names
               else pa.array(["seeds"] * seeds.num_rows, pa.string()))
    messages = (seeds.column(conversation.COLUMN) if conversation.COLUMN in seeds.column_names
                else pa.nulls(seeds.num_rows, conversation.MESSAGES))
    take = pa.array(task)
    task_id = seeds.column("id").take(take)
    return pa.table({
        "id": pc.binary_join_element_wise(task_id, pa.array(nth.astype(str)), "#"), "task_id": task_id,
        "instruction": seeds.column("instruction").take(take), "input": flat.field("input"),
        "output": flat.field("output"), "category": seeds.column("category").take(take),
        "is_classification": seeds.column("is_classification").take(take),
        "origin": pa.array(["seed"] * len(task), pa.string()), "dataset": dataset.take(take),
        conversation.COLUMN: messages.take(take),
    }).to_pandas()


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

def blocklisted(text: str, words: list[str]) -> bool:
    """Whether `text` holds one of `words` (or phrases) as a whole word, in any case."""
    lowered = text.lower()
    return any(re.search(rf"\b{re.escape(k.lower())}\b", lowered) for k in words)


def instruction_drop_reason(text: str, cfg: SelfInstructConfig) -> str | None:
    """The first filter `text` fails, or None. The novelty filter runs separately (it needs the pool)."""
    n = word_count(text)
    if n < cfg.min_words:
        return "too_short"
    if n > cfg.max_words:
        return "too_long"
    if blocklisted(text, cfg.blocklist):
        return "blocklisted_keyword"
    if text.lower().startswith("write a program"):
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


# --- the stream -----------------------------------------------------------------------------------------------
# Two kinds of item go through the work engine (tasks/engine.py). An instruction request (`req-<n>`) asks
# for a numbered list and checks each new instruction against the pool as it arrives: the pool and the
# in-context examples are what was kept at that moment, not at the start of a round. The Self-Instruct
# paper's loop is strictly sequential (a batch of requests, then filtering, then the next batch); here
# requests stay in flight while answers are filtered, so with `requests_per_batch` requests open at once
# an instruction is checked against everything accepted before its answer arrived, as in the paper with
# a batch of that size. Each accepted instruction becomes a task item (`si-<n>-<k>`: classify, then
# instances, then the instance filters), started as soon as its request is done.
#
# Checkpoints: a part holds the finished items' records: `candidate` rows (the instructions a request
# accepted, with their task ids) and `example` rows (a finished task's instances). A restarted stage
# rebuilds the pool from the candidates, starts the tasks whose candidates have no finished task, and
# goes on asking: nothing is generated twice, nothing is lost.

GENERATED_COLUMNS = EXAMPLE_COLUMNS + ["rouge_l_max", "most_similar", "bootstrap_round"]
PART_SCHEMA = pa.schema([
    ("record", pa.string()), ("id", pa.string()), ("task_id", pa.string()), ("instruction", pa.string()),
    ("input", pa.string()), ("output", pa.string()), ("category", pa.string()), ("is_classification", pa.bool_()),
    ("origin", pa.string()), ("dataset", pa.string()), ("rouge_l_max", pa.float64()), ("most_similar", pa.string()),
    ("bootstrap_round", pa.int64())])


@dataclass
class Candidate:
    task_id: str
    instruction: str
    rouge_l_max: float
    most_similar: str
    request: int


@dataclass
class Stream:
    """The stage's state between items (one event loop: no locks)."""

    pool: RougeIndex
    kept_instructions: list[str]  # of finished tasks with instances: in-context examples
    pending: list[Candidate] = field(default_factory=list)  # accepted, task not started
    kept: int = 0
    tasks_done: int = 0
    requests: int = 0  # instruction requests started (finished ones restored, plus this attempt's)
    requests_done: int = 0
    open_requests: int = 0
    open_tasks: int = 0


def _restore(restored_rows: list[dict[str, Any]], done: set[str], seed_instructions: list[str]) -> Stream:
    candidates = [r for r in restored_rows if r["record"] == "candidate"]
    examples = [r for r in restored_rows if r["record"] == "example"]
    stream = Stream(pool=RougeIndex(seed_instructions + [c["instruction"] for c in candidates]),
                    kept_instructions=[r["instruction"] for r in examples if r["id"].endswith("#0")])
    stream.kept = len(stream.kept_instructions)
    stream.tasks_done = sum(1 for c in candidates if c["task_id"] in done)
    stream.requests = stream.requests_done = sum(1 for key in done if key.startswith("req-"))
    stream.pending = [Candidate(c["task_id"], c["instruction"], c["rouge_l_max"], c["most_similar"],
                                c["bootstrap_round"]) for c in candidates if c["task_id"] not in done]
    return stream


def generate_tasks(seeds: pa.Table, cfg: SelfInstructConfig, llm: LLM, seed: int,
                   parts: PartWriter | None = None, batch_size: int = 16) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Bootstrap `cfg.num_instructions` new tasks with instances, or stop when a budget is spent."""
    chat = getattr(llm, "mode", "completions") == "chat"
    seed_rows = seeds.to_pylist()
    seed_instructions = [t["instruction"] for t in seed_rows]
    seed_index = RougeIndex(seed_instructions)  # nearest seed gives a generated task its category
    cls_shots = _classification_shots(seed_rows)
    parallel = parallelism(llm, batch_size)
    engine = Engine(llm, parts, PART_SCHEMA, max_open=2 * parallel + cfg.requests_per_batch,
                    checkpoint_every=cfg.checkpoint_every, checkpoint_s=cfg.checkpoint_seconds,
                    batch_size=batch_size, desc="self_instruct tasks kept", total=cfg.num_instructions,
                    count=lambda: stream.kept)
    stream = _restore(engine.restored.rows, engine.restored.keys, seed_instructions)
    cls_threshold: float | None = None
    if stream.kept < cfg.num_instructions and not chat:
        cls_threshold = classification_threshold(llm, cls_shots, seed_rows)
    model = engine.model
    by_kind = {kind: [t for t in seed_rows if t["is_classification"] == kind] for kind in (True, False)}
    instruction_params = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              stop=() if chat else ("\n\n",))

    def tokens_spent() -> bool:
        return cfg.max_tokens is not None and engine.tokens_spent() >= cfg.max_tokens

    async def ask(n: int) -> Finished:
        """Instruction request n: a numbered list, each new instruction filtered against the pool now."""
        try:
            rng = np.random.default_rng([seed, 1, n])
            context = _in_context(seed_instructions, stream.kept_instructions, cfg, rng)
            completion = await model.generate(instruction_prompt(context, chat, cfg.new_per_request),
                                              GenerationParams(**instruction_params, seed=int(rng.integers(2**31))),
                                              "instructions")
            dropped: Counter = Counter()
            items, ended = parse_numbered_list(completion.text, len(context) + 1, opened=not chat)
            if completion.finish_reason == "length" and not ended and items:
                items = items[:-1]
                dropped["truncated"] += 1
            dropped["generated"] += len(items) + dropped["truncated"]
            rows = []
            for item in items:
                reason = instruction_drop_reason(item, cfg)
                if reason is None:
                    score, nearest = stream.pool.most_similar(item)
                    if score > cfg.rouge_threshold:
                        reason = "too_similar"
                    else:
                        cand = Candidate(f"si-{n:05d}-{len(rows):02d}", item, score,
                                         stream.pool.texts[nearest] if nearest >= 0 else "", n)
                        stream.pool.add(item)
                        stream.pending.append(cand)
                        rows.append({"record": "candidate", "id": cand.task_id, "task_id": cand.task_id,
                                     "instruction": item, "rouge_l_max": score, "most_similar": cand.most_similar,
                                     "bootstrap_round": n, "origin": "self_instruct"})
                if reason:
                    dropped[reason] += 1
            stream.requests_done += 1
            return Finished(f"req-{n:05d}", rows, dropped)
        finally:
            stream.open_requests -= 1

    async def complete(cand: Candidate) -> Finished:
        """A task: classification, up to N instances, the instance filters."""
        try:
            finished = await _complete(cand)
        finally:
            stream.open_tasks -= 1
        stream.tasks_done += 1  # not when cancelled: a cancelled task is counted with the unfinished ones
        return finished

    async def _complete(cand: Candidate) -> Finished:
        number = [int(x) for x in cand.task_id.split("-")[1:]]
        rng = np.random.default_rng([seed, 2, *number])  # a resumed task draws what it would have
        dropped: Counter = Counter()
        kind = await classify(model, cand.instruction, cls_shots, cls_threshold, chat)
        if kind is None:
            dropped["classification_unparsed"] += 1
            return Finished(cand.task_id, [], dropped)
        shot_pool = by_kind[kind] or seed_rows
        shots = [shot_pool[i] for i in rng.choice(len(shot_pool), min(3, len(shot_pool)), replace=False)]
        completion = await model.generate(
            instance_prompt(cand.instruction, shots, output_first=kind, n=cfg.instances_per_task, chat=chat),
            GenerationParams(max_new_tokens=cfg.instance_max_new_tokens, temperature=cfg.instance_temperature,
                             top_p=cfg.top_p, stop=() if chat else instance_stops(cfg.instances_per_task),
                             seed=int(rng.integers(2**31))), "instances")
        pairs = _instances(completion, kind, chat, cfg, dropped)
        if not pairs:
            dropped["task_without_instances"] += 1
            return Finished(cand.task_id, [], dropped)
        if stream.kept >= cfg.num_instructions:  # finished after the target was reached
            dropped["over_target"] += 1
            return Finished(cand.task_id, [], dropped)
        stream.kept += 1
        stream.kept_instructions.append(cand.instruction)
        _, seed_pos = seed_index.most_similar(cand.instruction)
        rows = [{"record": "example", "id": f"{cand.task_id}#{k}", "task_id": cand.task_id,
                 "instruction": cand.instruction, "input": inp, "output": out,
                 "category": seed_rows[seed_pos]["category"], "is_classification": kind,
                 "origin": "self_instruct", "dataset": "self_instruct", "rouge_l_max": cand.rouge_l_max, "most_similar": cand.most_similar,
                 "bootstrap_round": cand.request} for k, (inp, out) in enumerate(pairs)]
        return Finished(cand.task_id, rows, dropped)

    def task_yield() -> float:
        return stream.kept / stream.tasks_done if stream.tasks_done else 1.0

    def tasks_wanted() -> bool:
        """Whether another accepted instruction should be completed: the open tasks, at the share of tasks
        that has made it so far, fall short of what is missing."""
        return stream.kept + task_yield() * stream.open_tasks < cfg.num_instructions

    def wanted_requests() -> bool:
        """Whether another instruction request is worth sending: what is kept, plus what the open tasks,
        the waiting candidates and the open requests should still give at the yields seen so far, falls
        short of the target."""
        request_yield = (stream.tasks_done + stream.open_tasks + len(stream.pending)) / stream.requests_done \
            if stream.requests_done else cfg.new_per_request
        expected = stream.kept + task_yield() * (stream.open_tasks + len(stream.pending)
                                               + request_yield * stream.open_requests)
        return expected < cfg.num_instructions

    stop = {"reason": None}

    async def run(engine: Engine) -> None:
        n = 0
        while True:
            engine.check()
            if stream.kept >= cfg.num_instructions:
                stop["reason"] = "target_reached"
                break
            if stream.pending and tasks_wanted():  # finish what was accepted before asking for more
                cand = stream.pending.pop(0)
                stream.open_tasks += 1
                if not await engine.spawn(cand.task_id, lambda cand=cand: complete(cand)):
                    stream.open_tasks -= 1
                continue
            blocked = ("max_requests" if stream.requests >= cfg.max_requests else
                       "max_tokens" if tokens_spent() else None)
            if blocked is None and stream.open_requests < cfg.requests_per_batch and wanted_requests():
                while engine.is_done(f"req-{n:05d}"):
                    n += 1
                stream.requests += 1
                stream.open_requests += 1
                if not await engine.spawn(f"req-{n:05d}", lambda n=n: ask(n)):
                    stream.open_requests -= 1
                n += 1
                continue
            if not engine.open_items:
                stop["reason"] = blocked or "exhausted"
                break
            await engine.next_change()
        engine.cancel_open()

    engine.run(run)
    records = engine.restored.rows + [row for item in engine.finished_items for row in item.rows]
    candidates = [r for r in records if r["record"] == "candidate"]
    examples = sorted((r for r in records if r["record"] == "example"), key=lambda r: r["id"])
    generated = pd.DataFrame(examples, columns=GENERATED_COLUMNS)
    dropped = Counter(engine.counts)
    n_generated = dropped.pop("generated", 0)
    if (unfinished := len(candidates) - stream.tasks_done) > 0:
        dropped["over_target" if stop["reason"] == "target_reached" else "unfinished"] += unfinished
    stats = {"stop_reason": stop["reason"], "requests": stream.requests, "generated": n_generated,
             "candidates": len(candidates), "kept": stream.kept, "kept_instances": len(generated),
             "prompt_style": "chat" if chat else "completion",
             "classification_method": "generated yes/no" if cls_threshold is None else
             f"log-odds > {cls_threshold:.3f} (fitted on seeds)",
             "dropped": dict(+dropped), **engine.summary()}
    return generated, stats


def _instances(completion: Completion, kind: bool, chat: bool, cfg: SelfInstructConfig,
               dropped: Counter) -> list[tuple[str, str]]:
    """A task's instances from the model's answer, after the paper's filters (drops counted per reason)."""
    pairs, unreadable = parse_instances(completion.text, output_first=kind, chat=chat)
    drops: Counter = Counter()
    if unreadable:
        drops["unparsable"] += unreadable
    if completion.finish_reason == "length" and pairs:
        pairs = pairs[:-1]  # the last example may be cut off
        drops["truncated"] += 1
    if len(pairs) > cfg.instances_per_task:
        drops["over_limit"] += len(pairs) - cfg.instances_per_task
        pairs = pairs[:cfg.instances_per_task]
    pairs, filtered = filter_instances(pairs)
    drops.update(filtered)
    dropped.update({f"instance_{reason}": n for reason, n in drops.items()})
    return pairs


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
    if hasattr(llm, "agenerate") or not hasattr(llm, "next_token_logprobs"):  # in-process models only
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


async def classify(model: Model, text: str, shots: list[tuple[str, bool]], threshold: float | None = None,
                   chat: bool = False) -> bool | None:
    """Few-shot yes/no: is the task a classification task with a finite set of labels?

    With a fitted `threshold` (see `classification_threshold`), the answer is whether the log-odds of
    " Yes" over " No" exceed it. Otherwise the backend generates the answer greedily.
    """
    if threshold is not None:
        lp = await model.logprobs(classification_prompt(text, shots), (" Yes", " No"))
        return bool(lp[0] - lp[1] > threshold)
    judged = await model.generate(classification_prompt(text, shots, chat),
                                  GenerationParams(max_new_tokens=4, temperature=0.0), "classification")
    return parse_yes_no(judged.text)
