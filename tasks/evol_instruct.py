"""Stage 3, evol_instruct: rewrite instructions into harder or rarer ones (Xu et al., 2023, WizardLM).

Each round takes up to `max_per_round` instructions from the pool (round 1: the input rows; round r: the
evolutions kept in round r-1, plus the parents whose evolution failed, which get another operation), draws
an operation for each with a seeded generator and the configured weights, and asks the model for the
rewrite: five in-depth operations (`add_constraints`, `deepen`, `concretize`, `increase_reasoning`,
`complicate_input`) and one in-breadth (`breadth`: a new, rarer task in the same domain).

Elimination, each rule its own drop reason: the paper's four (no information gain, judged by the model;
a short response that says "sorry"; a response of only punctuation and stop words; an evolved instruction
that copies the prompt's scaffolding), plus empty, unchanged, truncated or over-long rewrites and truncated
responses. Every kept evolution gets a response, so the output is trainable.

Checkpoints: each round's attempts are processed in chunks of `checkpoint_every`, each written as a part
holding every attempt and its outcome. A restarted stage replays the parts (same pools, same draws) and
continues with the first missing chunk.

Conversations (rows with `messages`: more than one exchange, or a system prompt; tasks/conversation.py)
are not evolved: their instruction is the first user turn, and rewriting it would orphan the turns after
it. They pass through unchanged (counted as `not_evolved_multi_turn`) and are never drawn.

Output: the input rows unchanged, then the kept evolutions (origin `evol`) with `parent_id`, `root_id`,
`round` (the number of evolutions from the input row) and `evol_operation`. An input `messages` column is
carried through; an evolution is one exchange (null there).
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from tasks import conversation
from tasks.artifacts import PartWriter
from tasks.calibration import best_threshold
from tasks.config import EVOL_OPERATIONS, EvolInstructConfig
from tasks.engine import Engine, Finished, Model, parallelism
from tasks.llm.base import LLM, GenerationParams, Prompt, chat_prompt
from tasks.prompts import ALPACA_STOPS, alpaca_prompt
from tasks.text import rouge_l_f1, word_count

# --- prompts ------------------------------------------------------------------------------------------------
# One template per operation: what the rewrite does, one demonstration, then the task. Completion-style: the
# prompt ends where the model writes the rewritten task.

# (what the rewrite does, label of the rewritten line, two demonstrations)
_DEMOS: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    "add_constraints": (
        "Each task below is rewritten into a harder version by adding one more constraint or requirement.",
        "Harder task", [
            ("Describe the water cycle.",
             "Describe the water cycle in exactly four sentences, naming one place on Earth where each stage is "
             "easy to observe."),
            ("Write a short poem about the sea.",
             "Write a short poem about the sea in which every line starts with the letter S and the last line "
             "mentions a lighthouse.")]),
    "deepen": (
        "Each task below is rewritten into a harder version that asks about the topic in more depth and breadth.",
        "Harder task", [
            ("Why do leaves change color in autumn?",
             "Why do leaves change color in autumn, which pigments are involved, and how do temperature and "
             "daylight affect how bright the colors become?"),
            ("What causes earthquakes?",
             "What causes earthquakes, how do scientists measure their strength, and why do some regions have "
             "far more of them than others?")]),
    "concretize": (
        "Each task below is rewritten into a harder version by replacing general concepts with more specific "
        "ones.",
        "Harder task", [
            ("Give advice on saving money.",
             "Give a university student who spends too much on takeout food three concrete ways to save 100 "
             "dollars a month."),
            ("Describe a healthy breakfast.",
             "Describe a healthy breakfast for a marathon runner on race morning, with portion sizes and when to "
             "eat it.")]),
    "increase_reasoning": (
        "Each task below is rewritten into a harder version that requires explicit multi-step reasoning.",
        "Harder task", [
            ("How many minutes are there in a week?",
             "How many minutes are there in a week? Work it out step by step, first hours per week and then "
             "minutes, and check the result a second way."),
            ("Is a tomato a fruit?",
             "Is a tomato a fruit or a vegetable? Reason from the botanical definition of a fruit, then explain "
             "why cooks disagree, and conclude.")]),
    "complicate_input": (
        "Each task below is rewritten into a harder version that comes with a more complex input, written out "
        "in the task: a table, a piece of code, a formula or structured data.",
        "Harder task", [
            ("Find the average price.",
             "Find the average price in this CSV data and name the item closest to it: item,price; pen,1.20; "
             "notebook,3.80; backpack,24.00; calculator,12.50."),
            ("Translate the sentence into French.",
             "Translate each line of this shopping list into French, keeping the quantities: 2 apples; 1 loaf "
             "of bread; 500 g of cheese; 6 eggs.")]),
    "breadth": (
        "Each task below is followed by a new task from the same domain, on a rarer topic, of similar length "
        "and difficulty.",
        "New task", [
            ("Explain how a bicycle gear system works.",
             "Explain how a unicycle rider keeps balance when riding uphill."),
            ("Write a recipe for pancakes.",
             "Write a recipe for Ethiopian injera made with teff flour.")]),
}


def _template(header: str, label: str, demos: list[tuple[str, str]]) -> str:
    shots = "".join(f"Task: {before}\n{label}: {after}\n\n" for before, after in demos)
    return f"{header}\n\n{shots}Task: {{instruction}}\n{label}:"


DEFAULT_TEMPLATES: dict[str, str] = {op: _template(*spec) for op, spec in _DEMOS.items()}
CHAT_SUFFIX = "\n\nReply with the rewritten task only, without any label or comment."


def task_text(instruction: str, input: str = "") -> str:
    """An instruction and its input as one line of text: evolution rewrites both together."""
    text = instruction.strip() if not input.strip() else f"{instruction.strip()} {input.strip()}"
    return " ".join(text.split())


def evol_prompt(template: str, instruction: str, input: str = "", chat: bool = False) -> Prompt:
    text = template.replace("{instruction}", task_text(instruction, input))
    text = text.replace("{{", "{").replace("}}", "}")
    return chat_prompt(text.rstrip() + CHAT_SUFFIX) if chat else text


def response_prompt(instruction: str, chat: bool) -> Prompt:
    return chat_prompt(instruction) if chat else alpaca_prompt(instruction)


EQUALITY_HEADER = ("Two tasks are equal if they ask for the same thing, with the same requirements, depth and "
                   "scope.\n\n")


def equality_prompt(first: str, second: str, chat: bool = False) -> Prompt:
    """Few-shot: one equal pair, one unequal pair (a demonstration rewrite), then the pair to judge."""
    before, after = _DEMOS["add_constraints"][2][0]
    shots = (f"First task: Summarize the article in one paragraph.\nSecond task: Summarize this article in a "
             f"single paragraph.\nEqual? Yes\n\nFirst task: {before}\nSecond task: {after}\nEqual? No\n\n")
    text = f"{EQUALITY_HEADER}{shots}First task: {first}\nSecond task: {second}\nEqual?"
    return chat_prompt(text + "\n\nAnswer Yes or No.") if chat else text


# --- elimination --------------------------------------------------------------------------------------------

# The WizardLM paper's rule 4: the evolved instruction copies words from the evolving prompt. Its own
# markers, and this project's (labels at the start of a line, as the templates write them).
PAPER_LEAKS = re.compile(r"#\s*(rewritten|given|created)\s+(prompt|task)\s*#|\b(given|created) prompt\b|"
                         r"\brewritten (prompt|task|instruction)\b", re.IGNORECASE)
_LINE_LABEL = re.compile(r"^\s*([A-Za-z#*][A-Za-z #*]{0,40}?):", re.MULTILINE)


def template_labels(templates: dict[str, str]) -> list[str]:
    """Line labels the templates use (`Task`, `Rewritten task`, ...): seeing one in a rewrite is a leak."""
    labels = {m.group(1).strip(" *#").lower() for t in templates.values() for m in _LINE_LABEL.finditer(t)}
    return sorted(label for label in labels if label)


def is_scaffold_leak(text: str, labels: list[str]) -> bool:
    if PAPER_LEAKS.search(text):
        return True
    lowered = text.lower()
    for label in labels:
        # `Task:` at the start of a line, also in **bold** or #heading# form; "rewritten task" anywhere.
        if re.search(rf"(^|\n)[\s*#]*{re.escape(label)}[\s*#]*:", lowered) or (" " in label and label in lowered):
            return True
    return False


def evolution_drop_reason(parent: str, evolved: str, max_words: int, labels: list[str]) -> str | None:
    text = evolved.strip()
    if not text:
        return "empty"
    if " ".join(text.lower().split()) == " ".join(parent.lower().split()):
        return "unchanged"
    if word_count(text) > max_words:
        return "too_long"
    if is_scaffold_leak(text, labels):
        return "scaffold_leak"
    return None


# Common English function words; a response made of these and punctuation alone says nothing.
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
once only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves
""".split())


def response_drop_reason(response: str) -> str | None:
    text = response.strip()
    if not text:
        return "empty_response"
    if "sorry" in text.lower() and word_count(text) < 80:
        return "response_sorry"
    words = re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())
    if all(w in STOP_WORDS for w in words):
        return "response_only_stop_words"
    return None


# --- the loop -----------------------------------------------------------------------------------------------

EVOL_COLUMNS = ["parent_id", "root_id", "round", "evol_operation"]
ATTEMPT_SCHEMA = pa.schema([
    ("id", pa.string()), ("task_id", pa.string()), ("instruction", pa.string()), ("output", pa.string()),
    ("category", pa.string()), ("parent_id", pa.string()), ("root_id", pa.string()), ("round", pa.int64()),
    ("evol_operation", pa.string()), ("evol_iteration", pa.int64()), ("drop_reason", pa.string())])


@dataclass
class Attempt:
    """One evolution of one parent, kept or not; the unit that checkpoint parts store."""

    parent: dict[str, Any]
    operation: str
    iteration: int
    instruction: str = ""
    output: str = ""
    drop_reason: str | None = None

    @property
    def parent_text(self) -> str:
        return task_text(self.parent["instruction"], self.parent.get("input") or "")

    def row(self) -> dict[str, Any]:
        p = self.parent
        return {"id": f"{p['id']}>e{self.iteration}", "task_id": p.get("task_id"), "instruction": self.instruction,
                "output": self.output, "category": p.get("category"), "parent_id": p["id"],
                "root_id": p["root_id"], "round": int(p.get("round") or 0) + 1, "evol_operation": self.operation,
                "evol_iteration": self.iteration, "drop_reason": self.drop_reason}


class Evolver:
    """One attempt against the model: rewrite, eliminate, judge equality, respond (an item's phases)."""

    def __init__(self, cfg: EvolInstructConfig, model: Model, calibration_texts: list[str]):
        self.cfg, self.model = cfg, model
        self.chat = model.mode == "chat"
        self.templates = {**DEFAULT_TEMPLATES, **cfg.templates}
        self.labels = template_labels(self.templates)
        self.calibration_texts = calibration_texts
        self._threshold: float | None = None
        self._judge_accuracy = 0.0
        self._calibrated = False

    async def calibrate(self) -> None:
        """Fit the log-odds cut for " Yes" (equal) once, on pairs whose answer is known (see calibration.py):
        a task and itself, lightly reworded; the demonstrations' rewrites; two different tasks. Only with
        log-probabilities (in-process models); an endpoint's judge generates its answer."""
        if self._calibrated:
            return
        self._calibrated = True
        if self.chat or not self.model.has_logprobs or not self.cfg.equality_check:
            return
        texts = self.calibration_texts[:8]
        equal = [(t, t) for t in texts] + [(t, "Please " + t[0].lower() + t[1:]) for t in texts if t]
        unequal = [pair for _, _, demos in _DEMOS.values() for pair in demos]
        unequal += [(a, b) for a, b in zip(texts, texts[1:] + texts[:1]) if a != b]
        margins = np.array(await asyncio.gather(*(self._margin(a, b) for a, b in equal + unequal)))
        fitted = best_threshold(margins, np.array([True] * len(equal) + [False] * len(unequal)))
        if fitted is not None:
            self._threshold, self._judge_accuracy = fitted

    @property
    def judge_informative(self) -> bool:
        return self._judge_accuracy >= self.cfg.equality_min_accuracy

    @property
    def equality_method(self) -> str:
        """How rule 1 decides."""
        cfg = self.cfg
        if not cfg.equality_check:
            return "off"
        if self._threshold is None:
            return "generated yes/no"
        accuracy = f"balanced accuracy {self._judge_accuracy:.2f} on known pairs"
        if self.judge_informative:
            return f"log-odds > {self._threshold:.3f} ({accuracy})"
        return (f"ROUGE-L F1 > {cfg.equality_rouge_threshold} (the model's judgement scored {accuracy}, below "
                f"equality_min_accuracy {cfg.equality_min_accuracy})")

    async def _margin(self, first: str, second: str) -> float:
        lp = await self.model.logprobs(equality_prompt(first, second), (" Yes", " No"))
        return float(lp[0] - lp[1])

    async def judge_equal(self, first: str, second: str) -> bool | None:
        if self._threshold is not None and self.judge_informative:
            return await self._margin(first, second) > self._threshold
        if self._threshold is not None:  # the model cannot tell; measure the change instead
            return rouge_l_f1(first, second) > self.cfg.equality_rouge_threshold
        judged = await self.model.generate(equality_prompt(first, second, self.chat),
                                           GenerationParams(max_new_tokens=4, temperature=0.0), "equality")
        found = re.match(r"\W*(yes|no)\b", judged.text, flags=re.IGNORECASE)
        return None if found is None else found.group(1).lower() == "yes"

    async def attempt(self, a: Attempt, seed: int) -> None:
        """Fill in `a`: its rewrite, its response, or the first rule it failed (`drop_reason`)."""
        cfg = self.cfg
        rewrite = await self.model.generate(
            evol_prompt(self.templates[a.operation], a.parent_text, chat=self.chat),
            GenerationParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                             stop=() if self.chat else ("\n",), seed=seed), "evolve")
        a.instruction = rewrite.text.strip()
        a.drop_reason = ("truncated" if rewrite.finish_reason == "length" else
                         evolution_drop_reason(a.parent_text, a.instruction, cfg.max_instruction_words, self.labels))
        if a.drop_reason:
            return
        if cfg.equality_check and a.operation != "breadth":  # rule 1 (`breadth` writes a new task on purpose)
            equal = await self.judge_equal(a.parent_text, a.instruction)
            a.drop_reason = "equality_unparsed" if equal is None else "no_information_gain" if equal else None
            if a.drop_reason:
                return
        answer = await self.model.generate(
            response_prompt(a.instruction, self.chat),
            GenerationParams(max_new_tokens=cfg.response_max_new_tokens, temperature=0.0,
                             stop=() if self.chat else ALPACA_STOPS,
                             repetition_penalty=cfg.response_repetition_penalty), "respond")
        a.output = answer.text.strip()
        a.drop_reason = "response_truncated" if answer.finish_reason == "length" else response_drop_reason(answer.text)


def draw_operation(cfg: EvolInstructConfig, failed_op: str | None, rng: np.random.Generator) -> str:
    """An operation by the configured weights; a retried parent avoids the one that failed."""
    ops = [op for op in EVOL_OPERATIONS if cfg.operations.get(op, 0) > 0]
    weights = np.array([cfg.operations[op] for op in ops], dtype=float)
    if failed_op in ops and len(ops) > 1:
        weights[ops.index(failed_op)] = 0.0
    return ops[int(rng.choice(len(ops), p=weights / weights.sum()))]


async def _chain(evolver: Evolver, root: dict[str, Any], index: int, cfg: EvolInstructConfig,
                 seed: int) -> Finished:
    """One input row through `cfg.rounds` rounds: each round evolves the last kept evolution, or, after a
    failure, retries its parent with another operation (`retry_failed`) or stops. Its draws depend only
    on (seed, row, round), so the result does not depend on what else is in flight."""
    parent, failed_op, rows = root, None, []
    for iteration in range(1, cfg.rounds + 1):
        rng = np.random.default_rng([seed, index, iteration])
        attempt = Attempt(parent, draw_operation(cfg, failed_op, rng), iteration)
        await evolver.attempt(attempt, seed=int(rng.integers(2**31)))
        row = attempt.row()
        rows.append(row)
        if attempt.drop_reason is None:
            parent, failed_op = {**row, "input": "", "is_classification": False, "origin": "evol"}, None
        elif cfg.retry_failed:
            failed_op = attempt.operation
        else:
            break
    return Finished(key=root["id"], rows=rows)


def chosen_rows(rows: pd.DataFrame, cfg: EvolInstructConfig, seed: int) -> list[int]:
    """The positions of the rows to evolve: every one-exchange row, or `max_per_round` of them drawn with
    `seed`."""
    chosen = np.flatnonzero(~conversation.has_messages(rows)).tolist()
    if cfg.max_per_round is not None and len(chosen) > cfg.max_per_round:
        picked = np.random.default_rng([seed, 0]).choice(len(chosen), cfg.max_per_round, replace=False)
        chosen = [chosen[i] for i in sorted(picked)]
    return chosen if cfg.rounds else []


def evolve(rows: pd.DataFrame, cfg: EvolInstructConfig, llm: LLM, seed: int,
           parts: PartWriter | None = None, batch_size: int = 16,
           only: list[str] | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Evolve the rows (or `max_per_round` of them, drawn with `seed`) through `cfg.rounds` rounds, each
    row a chain of its own (its key: the row's id), streamed through the work engine. `only`: a shard's
    chains; the others are left to other shards (see evolve_shard)."""
    records = rows.to_dict("records")
    chosen = chosen_rows(rows, cfg, seed)
    parallel = parallelism(llm, batch_size)
    engine = Engine(llm, parts, ATTEMPT_SCHEMA, max_open=2 * parallel, checkpoint_every=cfg.checkpoint_every,
                    checkpoint_s=cfg.checkpoint_seconds, batch_size=batch_size, desc="evol_instruct",
                    total=len(chosen) if cfg.rounds else 0, only=only)
    evolver = Evolver(cfg, engine.model, [r["instruction"] for r in records])

    async def stage(engine: Engine) -> None:
        # Nothing left to run here (a sharded stage's own pass): no model call at all, not even calibration.
        if not engine.has_work([records[i]["id"] for i in chosen]):
            return
        await evolver.calibrate()
        engine.part_meta["equality"] = evolver.equality_method
        for index in chosen:
            root = {**records[index], "root_id": records[index]["id"], "round": 0}
            await engine.spawn(root["id"], lambda root=root, index=index: _chain(evolver, root, index, cfg, seed))

    engine.run(stage)
    position = {records[i]["id"]: n for n, i in enumerate(chosen)}
    attempts = sorted(engine.restored.rows + [row for item in engine.finished_items for row in item.rows],
                      key=lambda r: (r["evol_iteration"], position[r["root_id"]]))
    kept = [r for r in attempts if r["drop_reason"] is None]
    evolved = pd.DataFrame([{**{k: r[k] for k in ("id", "task_id", "instruction", "output", "category",
                                                    *EVOL_COLUMNS)},
                             "input": "", "is_classification": False, "origin": "evol"} for r in kept])
    if len(evolved) and conversation.COLUMN in rows.columns:
        evolved[conversation.COLUMN] = None
    if len(evolved):
        columns = list(rows.columns) + [c for c in EVOL_COLUMNS if c not in rows.columns]
        out = pd.concat([rows, evolved.reindex(columns=columns)], ignore_index=True)
        out["round"] = out["round"].astype("Int64")
    else:
        out = unevolved(rows)
    failed = {(r["root_id"], r["evol_iteration"]) for r in attempts if r["drop_reason"]}
    retried = sum((r["root_id"], r["evol_iteration"] - 1) in failed for r in attempts)
    stats = {"attempted": len(attempts), "kept": len(kept),
             "not_evolved_multi_turn": int(conversation.has_messages(rows).sum()),
             "dropped": dict(Counter(r["drop_reason"] for r in attempts if r["drop_reason"])),
             "operations": _pass_rates(attempts, "evol_operation",
                                       [op for op in EVOL_OPERATIONS if cfg.operations.get(op, 0) > 0]),
             "rounds": _pass_rates(attempts, "evol_iteration", [str(i) for i in range(1, cfg.rounds + 1)]),
             "retried": retried,
             "equality_method": engine.part_meta.get("equality") or engine.restored.meta.get("equality")
             or ("off" if not cfg.equality_check else "not needed"),
             **engine.summary()}
    return out, stats


def evolve_shard(source: str, cfg: dict[str, Any], llm: dict[str, Any], seed: int, batch_size: int,
                 only: list[str], parts_dir: str) -> dict[str, Any]:
    """A shard of the stage on a Ray worker: the chains `only` of the rows in `source` (the input artifact's
    Parquet), checkpointed into `parts_dir`. Each chain draws its seeds from (seed, row, round) and the
    in-process model samples each request with its own seed, so a chain comes out the same in any shard."""
    import pyarrow.parquet as pq

    from tasks.config import LLMConfig
    from tasks.llm import get_llm

    rows = pq.read_table(source).to_pandas()
    _, stats = evolve(rows, EvolInstructConfig.model_validate(cfg), get_llm(LLMConfig.model_validate(llm)), seed,
                      PartWriter(Path(parts_dir)), batch_size, only=only)
    return {"items": len(only), "llm_calls": stats["llm_calls"]}


def unevolved(rows: pd.DataFrame) -> pd.DataFrame:
    """`rows` as the stage gives them when nothing is evolved: unchanged, with the evolution columns."""
    out = rows.reindex(columns=list(rows.columns) + [c for c in EVOL_COLUMNS if c not in rows.columns])
    if len(out):
        out["round"] = out["round"].astype("Int64")
    return out


def _pass_rates(attempts: list[dict[str, Any]], key: str, names: list[str]) -> dict[str, dict[str, Any]]:
    """Attempts, kept and pass rate per value of `key` (operation or round), for each of `names`."""
    table = {name: {"attempts": 0, "kept": 0} for name in names}
    for r in attempts:
        entry = table[str(r[key])]
        entry["attempts"] += 1
        entry["kept"] += r["drop_reason"] is None
    for entry in table.values():
        entry["pass_rate"] = round(entry["kept"] / entry["attempts"], 4) if entry["attempts"] else None
    return table
