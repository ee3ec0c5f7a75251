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

Output: the input rows unchanged, then the kept evolutions (origin `evol`) with `parent_id`, `root_id`,
`round` (the number of evolutions from the input row) and `evol_operation`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from tasks.artifacts import PartWriter, decode_counts, encode_counts, part_metadata
from tasks.calibration import best_threshold
from tasks.config import EVOL_OPERATIONS, EvolInstructConfig
from tasks.llm.base import LLM, GenerationParams, Prompt, Usage, UsageTally, chat_prompt
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
    """Runs one chunk of attempts against the model: rewrite, eliminate, judge equality, respond."""

    def __init__(self, cfg: EvolInstructConfig, llm: LLM, usage: Usage, calibration_texts: list[str]):
        self.cfg, self.llm, self.usage = cfg, llm, usage
        self.chat = getattr(llm, "mode", "completions") == "chat"
        self.templates = {**DEFAULT_TEMPLATES, **cfg.templates}
        self.labels = template_labels(self.templates)
        self.calibration_texts = calibration_texts
        self._threshold: float | None = None
        self._judge_accuracy = 0.0
        self._calibrated = False

    def equality_threshold(self) -> float | None:
        """Log-odds cut for " Yes" (equal), fitted once on pairs whose answer is known (see calibration.py):
        a task and itself, lightly reworded; the demonstrations' rewrites; two different tasks."""
        if not self._calibrated:
            self._calibrated = True
            if not self.chat and hasattr(self.llm, "next_token_logprobs"):
                texts = self.calibration_texts[:8]
                equal = [(t, t) for t in texts] + [(t, "Please " + t[0].lower() + t[1:]) for t in texts if t]
                unequal = [pair for _, _, demos in _DEMOS.values() for pair in demos]
                unequal += [(a, b) for a, b in zip(texts, texts[1:] + texts[:1]) if a != b]
                margins = self._margins(equal + unequal)
                fitted = best_threshold(margins, np.array([True] * len(equal) + [False] * len(unequal)))
                if fitted is not None:
                    self._threshold, self._judge_accuracy = fitted
        return self._threshold

    @property
    def judge_informative(self) -> bool:
        return self._judge_accuracy >= self.cfg.equality_min_accuracy

    @property
    def equality_method(self) -> str | None:
        """How rule 1 decided, once it has been used: None before."""
        cfg = self.cfg
        if not cfg.equality_check:
            return "off"
        if not self._calibrated:
            return None
        if self._threshold is None:
            return "generated yes/no"
        accuracy = f"balanced accuracy {self._judge_accuracy:.2f} on known pairs"
        if self.judge_informative:
            return f"log-odds > {self._threshold:.3f} ({accuracy})"
        return (f"ROUGE-L F1 > {cfg.equality_rouge_threshold} (the model's judgement scored {accuracy}, below "
                f"equality_min_accuracy {cfg.equality_min_accuracy})")

    def _margins(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        lp = self.llm.next_token_logprobs([equality_prompt(a, b) for a, b in pairs], [" Yes", " No"])
        return lp[:, 0] - lp[:, 1]

    def judge_equal(self, pairs: list[tuple[str, str]]) -> list[bool | None]:
        threshold = self.equality_threshold()
        if threshold is not None and self.judge_informative:
            return [bool(m > threshold) for m in self._margins(pairs)]
        if threshold is not None:  # the model cannot tell; measure the change instead
            return [rouge_l_f1(a, b) > self.cfg.equality_rouge_threshold for a, b in pairs]
        judged = self.llm.generate([equality_prompt(a, b, self.chat) for a, b in pairs],
                                   GenerationParams(max_new_tokens=4, temperature=0.0), desc="equality")
        self.usage.add("equality", judged)
        found = [re.match(r"\W*(yes|no)\b", c.text, flags=re.IGNORECASE) for c in judged]
        return [None if m is None else m.group(1).lower() == "yes" for m in found]

    def run(self, attempts: list[Attempt], seed: int) -> None:
        cfg = self.cfg
        prompts = [evol_prompt(self.templates[a.operation], a.parent_text, chat=self.chat) for a in attempts]
        rewrites = self.llm.generate(prompts, GenerationParams(
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
            stop=() if self.chat else ("\n",), seed=seed), desc="evolve")
        self.usage.add("evolve", rewrites)
        for a, completion in zip(attempts, rewrites):
            a.instruction = completion.text.strip()
            a.drop_reason = ("truncated" if completion.finish_reason == "length" else
                             evolution_drop_reason(a.parent_text, a.instruction, cfg.max_instruction_words,
                                                   self.labels))

        alive = [a for a in attempts if a.drop_reason is None]
        if cfg.equality_check and alive:  # rule 1: no information gain (not asked of `breadth`: a new task)
            judged = [a for a in alive if a.operation != "breadth"]
            verdicts = self.judge_equal([(a.parent_text, a.instruction) for a in judged])
            for a, equal in zip(judged, verdicts):
                a.drop_reason = ("equality_unparsed" if equal is None else "no_information_gain" if equal else None)
            alive = [a for a in alive if a.drop_reason is None]

        answers = self.llm.generate([response_prompt(a.instruction, self.chat) for a in alive], GenerationParams(
            max_new_tokens=cfg.response_max_new_tokens, temperature=0.0, stop=() if self.chat else ALPACA_STOPS,
            repetition_penalty=cfg.response_repetition_penalty),
            desc="evol responses")
        self.usage.add("respond", answers)
        for a, answer in zip(alive, answers):
            a.output = answer.text.strip()
            a.drop_reason = ("response_truncated" if answer.finish_reason == "length" else
                             response_drop_reason(answer.text))


def _draw_operations(pool: list[tuple[dict[str, Any], str | None]], cfg: EvolInstructConfig,
                     rng: np.random.Generator) -> list[str]:
    """One operation per pool entry, by the configured weights; a retried parent avoids the one that failed."""
    ops = [op for op in EVOL_OPERATIONS if cfg.operations.get(op, 0) > 0]
    weights = np.array([cfg.operations[op] for op in ops], dtype=float)
    drawn = []
    for _, failed_op in pool:
        w = weights.copy()
        if failed_op in ops and len(ops) > 1:
            w[ops.index(failed_op)] = 0.0
        drawn.append(ops[int(rng.choice(len(ops), p=w / w.sum()))])
    return drawn


def evolve(rows: pd.DataFrame, cfg: EvolInstructConfig, llm: LLM, seed: int,
           parts: PartWriter | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    usage = Usage()
    tally = UsageTally(usage)
    done: dict[tuple[int, int], pa.Table] = {}
    tokens: Counter = Counter()
    equality_method = "off" if not cfg.equality_check else "not needed"
    for part in parts.read_all() if parts else []:
        meta = part_metadata(part)
        done[(int(meta["iteration"]), int(meta["start"]))] = part
        tokens.update(decode_counts(meta.get("tokens", "")))
        equality_method = meta.get("equality", equality_method)
    records = rows.to_dict("records")
    evolver = Evolver(cfg, llm, usage, [r["instruction"] for r in records])

    inputs = [{**r, "root_id": r["id"], "round": 0} for r in records]
    pool: list[tuple[dict[str, Any], str | None]] = [(r, None) for r in inputs]  # (parent, operation that failed)
    attempts_all: list[dict[str, Any]] = []
    retried = 0
    for iteration in range(1, cfg.rounds + 1):
        rng = np.random.default_rng([seed, iteration])
        if not pool:
            break
        if cfg.max_per_round is not None and len(pool) > cfg.max_per_round:
            pool = [pool[i] for i in sorted(rng.choice(len(pool), cfg.max_per_round, replace=False))]
        operations = _draw_operations(pool, cfg, rng)
        retried += sum(failed_op is not None for _, failed_op in pool)
        chunk_seed = int(rng.integers(2**31))
        results: list[dict[str, Any]] = []
        for start in range(0, len(pool), cfg.checkpoint_every):
            if (iteration, start) in done:  # replay a finished chunk
                results += done[(iteration, start)].to_pylist()
                continue
            attempts = [Attempt(parent, op, iteration) for (parent, _), op in
                        zip(pool[start:start + cfg.checkpoint_every], operations[start:start + cfg.checkpoint_every])]
            evolver.run(attempts, chunk_seed + start)
            table = pa.Table.from_pylist([a.row() for a in attempts], schema=ATTEMPT_SCHEMA)
            delta = tally.take()
            tokens.update(delta)
            equality_method = evolver.equality_method or equality_method
            if parts:
                parts.write(table.replace_schema_metadata({
                    "iteration": str(iteration), "start": str(start), "tokens": encode_counts(delta),
                    "equality": equality_method}))
            done[(iteration, start)] = table
            results += table.to_pylist()
        attempts_all += results

        by_id = {parent["id"]: parent for parent, _ in pool}
        next_pool = []
        for r in results:
            if r["drop_reason"] is None:
                next_pool.append(({**r, "input": "", "is_classification": False, "origin": "evol"}, None))
            elif cfg.retry_failed:
                next_pool.append((by_id[r["parent_id"]], r["evol_operation"]))
        pool = next_pool

    kept = [r for r in attempts_all if r["drop_reason"] is None]
    evolved = pd.DataFrame([{**{k: r[k] for k in ("id", "task_id", "instruction", "output", "category",
                                                    *EVOL_COLUMNS)},
                             "input": "", "is_classification": False, "origin": "evol"} for r in kept])
    columns = list(rows.columns) + [c for c in EVOL_COLUMNS if c not in rows.columns]
    evolved = evolved.reindex(columns=columns)
    out = pd.concat([rows, evolved], ignore_index=True) if len(evolved) else rows.reindex(columns=columns)
    if len(out):
        out["round"] = out["round"].astype("Int64")
    stats = {"attempted": len(attempts_all), "kept": len(kept),
             "dropped": dict(Counter(r["drop_reason"] for r in attempts_all if r["drop_reason"])),
             "operations": _pass_rates(attempts_all, "evol_operation",
                                       [op for op in EVOL_OPERATIONS if cfg.operations.get(op, 0) > 0]),
             "rounds": _pass_rates(attempts_all, "evol_iteration", [str(i) for i in range(1, cfg.rounds + 1)]),
             "retried": retried, "equality_method": equality_method, "checkpoints": len(done),
             "llm_calls": tokens["llm_calls"], "prompt_tokens": tokens["prompt_tokens"],
             "completion_tokens": tokens["completion_tokens"], "usage_this_attempt": usage.as_dict()}
    return out, stats


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
