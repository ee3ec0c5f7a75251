"""Stage 4, quality: score every example, then decide what the model will learn from.

Scoring is separate from deciding. Each scorer adds `score_<name>` columns; one decision step then adds
`keep`, `drop_reason` and `duplicate_of`, from thresholds in the config, so every decision can be read
off the row's columns.

Heuristics, column-wise over the whole table (compiled scans, tasks/textscan.py), each in [0, 1]:
- `length`: 1 when the output's word count lies in [min_output_words, max_output_words], falling off
  linearly below the lower bound (0 for an empty output) and as max/words above the upper one;
- `format`: the share of four checks passed: no leftover template markers, no stripped line repeated three
  times or more (among 3+ lines), ends like a finished sentence or code block (last non-space character
  one of . ! ? " ' ) ] ` * or a digit), starts with a word character or one of " ' ( [ ` $ -;
- `relevance`: the share of the instruction's content words (runs of 4+ ASCII letters, lowercased) that
  occur among the content words of the input or output (1 when the instruction has none);
- `safety`: 0 if any configured unsafe term occurs as a whole word in the instruction, input or output;
- `total`: the weighted mean of the four.
A conversation (a row with `messages`, tasks/conversation.py) is scored on its exchanges, each assistant
turn with the user turn before it as its instruction (no input), by the same column-wise scans over all the
exchanges of the table at once: `length` and `format` are the minimum over its answers (a kept row trains
on every answer, so each must pass the bar a one-exchange row passes; a truncated or runaway answer is no
better for the good ones around it); `relevance` is the mean over its answers (a lexical signal that is
noisy on short follow-ups: "Why?" has no content word, "Thanks, shorter please" shares none with a good
answer; the mean says whether the answers stay on their requests overall); `safety` is 0 if an unsafe term
occurs in any turn (system, user or assistant), as a one-exchange row's instruction, input and output are
all checked. A one-exchange row is scored exactly as before, whatever else the table holds.
Model-based scores, each optional (tasks/judge.py, tasks/model_scores.py): `score_judge` (1-10, with
`judge_error` and the raw `judge_answer`), `score_deita_complexity`, `score_deita_quality` (1-6) and their
product `score_deita`, and `score_ifd` (with its two losses). The judge rates a conversation whole; DEITA
and IFD score each of its assistant turns (tasks/model_scores.py says how the turns combine: `score_deita`
is then the sum of the turns' products, as in DEITA, the other columns means over the turns). The
judge's rows stream through the work engine (each row one request, as many in flight as the endpoints
allow, parts under `parts/judge/` every `checkpoint_every` rows or `checkpoint_seconds`); DEITA and IFD,
from the local scoring model, run in chunks of `checkpoint_every` rows, each chunk a part. A restarted
stage scores only what is missing. Shards on a cluster read the same columns (`messages` included) from the
stage's input, so they score exactly what one process would.

The decision, first failing rule naming the reason: empty_output (for a conversation: any of its answers
blank), unsafe, judge_unparsed, low_judge, low_total, high_ifd, low_complexity, low_response_quality; then,
among the rows still kept, MinHash-LSH near-duplicates over `dedup.fields` (tasks/dedup.py; a conversation
is compared whole): in each cluster the row with the best `dedup.rank_by` stays, the others are dropped as
near_duplicate with `duplicate_of` naming its id.
Instances of one task (same `task_id` and instruction) are not linked to each other unless
`dedup.same_task_instances` is set. Last, with `ifd.keep_share`, Cherry LLM's selection: of the rows still
kept, that share with the highest IFD stays and the rest drop as low_ifd. The stats count the conversation
rows and how many are kept (`multi_turn`) when the table has a `messages` column.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from tasks import conversation, dedup, judge, model_scores
from tasks.artifacts import PartWriter, part_metadata
from tasks.config import QualityConfig
from tasks.engine import Engine, Finished, parallelism
from tasks.shards import StageShards, plan, run_items
from tasks.shards import summary as shard_summary
from tasks.llm.base import LLM, UsageTally
from tasks.textscan import heuristic_scan

HEURISTICS = ("length", "format", "relevance", "safety")
_TEMPLATE_MARKERS = r"###\s*(?:instruction|input|response)|below is an instruction"


def _byte_table(chars: str, ranges: tuple[tuple[str, str], ...] = ()) -> np.ndarray:
    table = np.zeros(256, dtype=bool)
    table[[ord(c) for c in chars]] = True
    for lo, hi in ranges:
        table[ord(lo):ord(hi) + 1] = True
    return table


_FINISHED = _byte_table(".!?\"')]`*", (("0", "9"),))
_START = _byte_table("_\"'([`$-", (("0", "9"), ("a", "z"), ("A", "Z")))
_START[0x80:] = True  # a character outside ASCII (UTF-8 lead byte): taken as a word character


def _column(data: pa.Table | pd.DataFrame, name: str) -> pa.Array | pa.ChunkedArray:
    if isinstance(data, pa.Table):
        column = data.column(name)
        if not pa.types.is_large_string(column.type):
            column = column.cast(pa.large_string())
    else:
        column = pa.array(data[name].to_numpy(dtype=object), type=pa.large_string(), from_pandas=True)
    return column.fill_null("")


@dataclasses.dataclass(frozen=True)
class Turns:
    """The turns of a table's conversation rows (those with `messages`), flattened in row order: Arrow
    columns and numpy arrays, no Python per turn."""

    rows: np.ndarray     # table positions of the conversation rows, ascending
    parent: np.ndarray   # per turn, its row's table position
    role: np.ndarray     # per turn, its role as an index into conversation.ROLES
    content: pa.Array    # per turn, its text (large_string; a null content reads as "")

    @property
    def answers(self) -> np.ndarray:
        """Positions of the assistant turns; the turn before each is its user turn."""
        return np.flatnonzero(self.role == _ASSISTANT)

    def starts(self, positions: np.ndarray) -> np.ndarray:
        """Where each conversation row's first entry lies among `positions` (turns in row order): the
        segment starts for `np.ufunc.reduceat`, given that every conversation row has an entry there (all its
        turns, or its answers: a checked conversation has at least one)."""
        return np.searchsorted(self.parent[positions], self.rows)


_SYSTEM, _USER, _ASSISTANT = (conversation.ROLES.index(r) for r in ("system", "user", "assistant"))


def messages_column(data: pa.Table | pd.DataFrame) -> pa.Array | None:
    """The `messages` column as one Arrow array, or None when the table has no conversation row."""
    name = conversation.COLUMN
    if isinstance(data, pa.Table):
        if name not in data.column_names:
            return None
        column = data.column(name)
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    else:
        if name not in data.columns:
            return None
        column = pa.array(data[name].to_numpy(dtype=object), type=conversation.MESSAGES, from_pandas=True)
    return None if column.null_count == len(column) else column


def conversation_turns(data: pa.Table | pd.DataFrame) -> Turns | None:
    """The turns of the conversation rows, checked: an optional system turn first, then user and assistant
    turns alternating, ending with the assistant's (tasks/conversation.py). A blank turn is accepted here
    (a blank answer is the decision's empty_output); a misplaced role stops the stage, naming the row."""
    messages = messages_column(data)
    if messages is None:
        return None
    counts = np.asarray(pc.list_value_length(messages).fill_null(0), dtype=np.int64)
    rows = np.flatnonzero(np.asarray(messages.is_valid()))
    flat = pc.list_flatten(messages)
    parent = np.repeat(np.arange(len(counts)), counts)  # list_flatten skips null rows, as counts does
    roles = pa.array(conversation.ROLES, flat.field("role").type)
    role = np.asarray(pc.index_in(flat.field("role"), value_set=roles).fill_null(-1), dtype=np.int64)
    first = np.cumsum(counts) - counts  # each row's first turn among the flattened turns
    position = np.arange(len(role)) - first[parent]
    opened = rows[counts[rows] > 0]  # conversation rows with any turn
    system = np.zeros(len(counts), dtype=bool)
    system[opened] = role[first[opened]] == _SYSTEM
    expected = np.where(position == 0, np.where(system[parent], _SYSTEM, _USER),
                        np.where((position - system[parent]) % 2 == 0, _USER, _ASSISTANT))
    last = np.full(len(counts), -1, dtype=np.int64)  # each row's last role (-1: no turn at all)
    last[opened] = role[first[opened] + counts[opened] - 1]
    bad_turn = np.flatnonzero(role != expected)
    bad_end = rows[last[rows] != _ASSISTANT]
    if len(bad_turn) or len(bad_end):
        row = min(int(parent[bad_turn[0]]) if len(bad_turn) else len(counts), int(bad_end[0]) if len(bad_end)
                  else len(counts))
        where = f"row {row}"
        if isinstance(data, pa.Table) and "id" in data.column_names:
            where += f" (id {data.column('id')[row].as_py()})"
        elif isinstance(data, pd.DataFrame) and "id" in data.columns:
            where += f" (id {data['id'].iloc[row]})"
        if len(bad_turn) and parent[bad_turn[0]] == row:
            t = int(bad_turn[0])
            belongs = conversation.ROLES[expected[t]]
            what = (f"turn {position[t]} has role {flat.field('role')[t].as_py()!r} where "
                    f"{'an' if belongs == 'assistant' else 'a'} {belongs} turn belongs")
        else:
            what = "it is empty" if counts[row] == 0 else "it ends with a turn that is not the assistant's"
        raise conversation.ConversationError(
            f"quality: {where}: `messages`: {what}; a conversation is an optional system turn, then user and "
            f"assistant turns alternating, ending with the assistant's (tasks/conversation.py; null `messages` "
            f"for a one-exchange row)")
    content = flat.field("content").cast(pa.large_string()).fill_null("")
    return Turns(rows=rows, parent=parent, role=role, content=content)


def _exchange_scores(instruction: pa.Array | pa.ChunkedArray, input: pa.Array | pa.ChunkedArray,
                     output: pa.Array | pa.ChunkedArray, cfg: QualityConfig) -> dict[str, np.ndarray]:
    """`length`, `format` and `relevance` of each (instruction, input, output) exchange."""
    scan = heuristic_scan(instruction, input, output)

    words = scan["output_words"].astype(float)
    low = max(cfg.min_output_words, 1)
    above = cfg.max_output_words / np.where(words > 0, words, 1.0)
    length = np.where(words > cfg.max_output_words, above, np.minimum(words / low, 1.0))

    markers = pc.match_substring_regex(output, _TEMPLATE_MARKERS, ignore_case=True)
    checks = np.stack([~np.asarray(markers), ~scan["repeated_line"], _FINISHED[scan["last_byte"]],
                       _START[scan["first_byte"]] & (scan["first_byte"] > 0)])
    return {"length": length, "format": checks.mean(axis=0), "relevance": scan["relevance"]}


def _unsafe(columns: tuple[pa.Array | pa.ChunkedArray, ...], n: int, cfg: QualityConfig) -> np.ndarray:
    """Whether any configured unsafe term occurs as a whole word in any of the columns, per row."""
    hit = np.zeros(n, dtype=bool)
    if cfg.unsafe_terms:
        pattern = "|".join(rf"\b{re.escape(term)}\b" for term in cfg.unsafe_terms)
        for column in columns:
            hit |= np.asarray(pc.match_substring_regex(column, pattern, ignore_case=True))
    return hit


# How a conversation's per-answer scores make its score (module docstring): the weakest answer, or the mean.
_COMBINE = {"length": np.minimum.reduceat, "format": np.minimum.reduceat,
            "relevance": lambda values, starts: np.add.reduceat(values, starts) / np.diff(starts, append=len(values))}


def heuristic_scores(data: pa.Table | pd.DataFrame, cfg: QualityConfig) -> dict[str, np.ndarray]:
    """The five heuristic score columns for a table with `instruction`, `input` and `output` (and, for its
    conversation rows, `messages`)."""
    instruction, input, output = (_column(data, c) for c in ("instruction", "input", "output"))
    scores = _exchange_scores(instruction, input, output, cfg)
    unsafe = _unsafe((instruction, input, output), len(scores["length"]), cfg)
    turns = conversation_turns(data)
    if turns is not None:  # each answer after its user turn, all the table's exchanges in one scan
        answers = turns.answers
        per_answer = _exchange_scores(turns.content.take(answers - 1), pa.nulls(len(answers), pa.large_string()),
                                      turns.content.take(answers), cfg)
        starts = turns.starts(answers)
        for name, combine in _COMBINE.items():
            scores[name][turns.rows] = combine(per_answer[name], starts)
        every_turn = np.arange(len(turns.parent))
        unsafe[turns.rows] |= np.logical_or.reduceat(_unsafe((turns.content,), len(every_turn), cfg),
                                                     turns.starts(every_turn))
    scores["safety"] = (~unsafe).astype(float)

    total_weight = sum(cfg.weights.values()) or 1.0
    total = sum(scores[name] * weight for name, weight in cfg.weights.items()) / total_weight
    return {**{f"score_{k}": scores[k] for k in HEURISTICS}, "score_total": np.asarray(total, dtype=float)}


def score(df: pd.DataFrame, cfg: QualityConfig) -> pd.DataFrame:
    """`df` with the heuristic score columns added."""
    return df.assign(**heuristic_scores(df, cfg))


def row_texts(df: pd.DataFrame) -> tuple[list[str], list[str], list[str], list[list[conversation.Message] | None]]:
    """Each row's instruction, input, output and conversation (`messages` as Python lists, None for a
    one-exchange row): what the judge, DEITA and IFD read, in one process or in a shard."""
    messages = ([conversation.as_messages(m) for m in df[conversation.COLUMN]] if conversation.COLUMN in df.columns
                else [None] * len(df))
    return (df["instruction"].tolist(), df["input"].fillna("").tolist(), df["output"].fillna("").tolist(),
            messages)


def _text_columns(names: list[str]) -> list[str]:
    """The columns `row_texts` reads, of a table with columns `names`."""
    return ["instruction", "input", "output"] + ([conversation.COLUMN] if conversation.COLUMN in names else [])


JUDGE_SCHEMA = pa.schema([("row", pa.int64()), ("score_judge", pa.float64()), ("judge_error", pa.string()),
                          ("judge_answer", pa.string())])


def judge_scores(df: pd.DataFrame, cfg: QualityConfig, llm: LLM, parts: PartWriter | None,
                 only: list[str] | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The judge's rating of every row (by position), each row an item of the work engine (key `row-<n>`;
    `only`: a shard's rows)."""
    batch_size = getattr(llm, "batch_size", 16)
    engine = Engine(llm, parts, JUDGE_SCHEMA, max_open=2 * parallelism(llm, batch_size),
                    checkpoint_every=cfg.checkpoint_every, checkpoint_s=cfg.checkpoint_seconds,
                    batch_size=batch_size, desc="quality judge", total=len(df), only=only)
    params = judge.judge_params(engine.model.mode, cfg.judge.max_new_tokens)
    texts = list(zip(*row_texts(df)))

    async def rate(row: int) -> Finished:
        instruction, input_text, output, messages = texts[row]
        prompt = (judge.judge_prompt(instruction, input_text, output, engine.model.mode) if messages is None
                  else judge.conversation_prompt(messages, engine.model.mode))  # a conversation, rated whole
        completion = await engine.model.generate(prompt, params, "judge")
        value, error = judge.parse_rating(completion.text)
        return Finished(f"row-{row}", rows=[{"row": row, "score_judge": math.nan if value is None else value,
                                             "judge_error": error, "judge_answer": completion.text}])

    async def stage(engine: Engine) -> None:
        for row in range(len(texts)):
            await engine.spawn(f"row-{row}", lambda row=row: rate(row))

    engine.run(stage)
    rows = engine.restored.rows + [r for item in engine.finished_items for r in item.rows]
    table = pd.DataFrame(rows, columns=JUDGE_SCHEMA.names).set_index("row").sort_index()
    return table, engine.summary()


def _score_chunk(chunk: pd.DataFrame, cfg: QualityConfig, scorer) -> pd.DataFrame:
    args = row_texts(chunk)
    out = pd.DataFrame({"row": chunk.index.to_numpy()})
    if cfg.deita.enabled:
        complexity, response_quality, deita = model_scores.deita_row_scores(*args, scorer)
        out["score_deita_complexity"], out["score_deita_quality"] = complexity, response_quality
        out["score_deita"] = deita
    if cfg.ifd.enabled:
        ifd, conditioned, direct, cut = model_scores.ifd_row_scores(*args, scorer, cfg.ifd.max_length)
        out["score_ifd"], out["ifd_loss_conditioned"], out["ifd_loss_direct"] = ifd, conditioned, direct
        out["ifd_truncation"] = pd.Series(cut, dtype=object)
    return out


def _score_chunks(df: pd.DataFrame, starts: list[int], cfg: QualityConfig, scorer, parts: PartWriter | None,
                  done: dict[int, pa.Table]) -> dict[int, pa.Table]:
    """DEITA and IFD for the chunks of `df` beginning at `starts` (rows `checkpoint_every` each), each chunk
    written as a part; chunks in `done` are taken as they are."""
    out = {}
    for start in starts:
        table = done.get(start)
        if table is None:
            table = pa.Table.from_pandas(_score_chunk(df.iloc[start:start + cfg.checkpoint_every], cfg, scorer),
                                         preserve_index=False)
            if parts:
                parts.write(table.replace_schema_metadata({"start": str(start)}))
        out[start] = table
    return out


def _chunks_done(parts: PartWriter | None) -> dict[int, pa.Table]:
    return {int(part_metadata(t)["start"]): t for t in (parts.read_all() if parts else [])}


def _shard_inputs(source: str, llm: dict[str, Any]) -> tuple[pd.DataFrame, LLM]:
    """Where a shard runs: the texts of the stage's input Parquet (`messages` too, where it has them: the
    columns `run_quality` hands its own model work), and its model (loaded once per worker)."""
    import pyarrow.parquet as pq

    from tasks.config import LLMConfig
    from tasks.llm import get_llm

    rows = pq.read_table(source, columns=_text_columns(pq.read_schema(source).names)).to_pandas()
    return rows, get_llm(LLMConfig.model_validate(llm))


def score_shard(source: str, starts: list[int], cfg: dict[str, Any], scorer: dict[str, Any],
                parts_dir: str) -> dict[str, Any]:
    """A shard of DEITA and IFD scoring on a Ray worker: the chunks beginning at `starts` of the rows in
    `source` (the stage's input Parquet), each a part in `parts_dir`. A chunk is scored in the same
    batches as in one process, so the scores are the same."""
    q = QualityConfig.model_validate(cfg)
    rows, llm = _shard_inputs(source, scorer)
    parts = PartWriter(Path(parts_dir))
    done = {s: t for s, t in _chunks_done(parts).items() if s in starts}  # an earlier attempt's, kept
    _score_chunks(rows, starts, q, llm, parts, done)
    return {"items": sum(min(q.checkpoint_every, len(rows) - s) for s in starts),
            "chunks_scored": len(starts) - len(done), "chunks_restored": len(done)}


def judge_shard(source: str, cfg: dict[str, Any], llm: dict[str, Any], only: list[str],
                parts_dir: str) -> dict[str, Any]:
    """A shard of the judge on an in-process model, on a Ray worker: the rows `only` (keys `row-<n>`)."""
    rows, model = _shard_inputs(source, llm)
    _, summary = judge_scores(rows, QualityConfig.model_validate(cfg), model, PartWriter(Path(parts_dir)), only=only)
    return {"items": len(only), "llm_calls": summary["llm_calls"]}


def model_based_scores(df: pd.DataFrame, cfg: QualityConfig, judge_llm: LLM | None, scorer,
                       parts: PartWriter | None, remote: StageShards | None = None
                       ) -> tuple[pd.DataFrame | None, dict[str, Any]]:
    """The judge, DEITA and IFD columns (those enabled) by row position: the judge through the work
    engine, DEITA and IFD in checkpointed chunks. With `remote`, the work of the models it names (`judge`,
    `scorer`) runs first in shards on the cluster; what is left then finds every item finished."""
    if not (cfg.judge.enabled or cfg.deita.enabled or cfg.ifd.enabled):
        return None, {}
    remote = remote if parts is not None else None
    columns, stats = [], {"usage": {field: 0 for field in UsageTally.FIELDS}, "checkpoints": 0}
    if cfg.judge.enabled:
        judge_parts = PartWriter(parts.parts_dir / "judge") if parts else None
        if remote is not None and "judge" in remote.models:
            results = run_items(remote.sharding, "quality", "tasks.quality:judge_shard",
                                [f"row-{row}" for row in range(len(df))], judge_parts,
                                {"source": remote.source, "cfg": cfg.model_dump(mode="json"),
                                 "llm": remote.models["judge"]})
            stats["judge_shards"] = shard_summary(results) if results else None
        judged, summary = judge_scores(df, cfg, judge_llm, judge_parts)
        columns.append(judged)
        stats["usage"] = {field: summary[field] for field in UsageTally.FIELDS}
        stats["judge_checkpoints"] = summary["checkpoints"]
    if cfg.deita.enabled or cfg.ifd.enabled:
        done = _chunks_done(parts)
        starts = list(range(0, len(df), cfg.checkpoint_every))
        if remote is not None and "scorer" in remote.models:
            todo = [s for s in starts if s not in done]
            shards = plan("quality", "tasks.quality:score_shard", len(todo), remote.sharding.count(),
                          lambda k, a, b: {"source": remote.source, "starts": todo[a:b],
                                           "cfg": cfg.model_dump(mode="json"), "scorer": remote.models["scorer"],
                                           "parts_dir": str(parts.shard(k).parts_dir)})
            shards = [dataclasses.replace(s, first=todo[s.first], last=min(todo[s.last - 1] + cfg.checkpoint_every,
                                                                           len(df))) for s in shards]
            if shards:
                stats["scorer_shards"] = shard_summary(remote.sharding.run(shards))
            resumed, done = len(done), _chunks_done(parts)
        else:
            resumed = len(done)
        scored = _score_chunks(df, starts, cfg, scorer, parts, done)
        columns.append(pd.concat([scored[s].to_pandas() for s in starts], ignore_index=True).set_index("row"))
        stats.update(checkpoints=len(starts), resumed_checkpoints=resumed)
    return pd.concat(columns, axis=1), stats


def _raw(data: pa.Table | pd.DataFrame, name: str) -> pa.Array | pa.ChunkedArray:
    """A string column as Arrow, missing values kept."""
    if isinstance(data, pa.Table):
        column = data.column(name)
    else:
        column = pa.array(data[name].to_numpy(dtype=object), from_pandas=True)
    return column.cast(pa.large_string())


def _task_groups(data: pa.Table | pd.DataFrame) -> np.ndarray:
    """A code per row for its task: `task_id` (else `id`) and the instruction; -1 without an instruction."""
    key = pc.binary_join_element_wise(pc.coalesce(_raw(data, "task_id"), _raw(data, "id")),
                                      _raw(data, "instruction"), pa.scalar("\x00", pa.large_string()))
    if isinstance(key, pa.ChunkedArray):
        key = key.combine_chunks()
    return np.asarray(pc.dictionary_encode(key).indices.fill_null(-1), dtype=np.int64)


def _decisions(data: pa.Table | pd.DataFrame, scores: dict[str, np.ndarray],
               cfg: QualityConfig) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Per row, the drop reason ("" when kept) and the id of the row it duplicates (None); the
    near-duplicate figures. `scores` holds the score columns by name; the text comes from `data`."""
    n = len(data)
    columns = data.column_names if isinstance(data, pa.Table) else data.columns

    def col(name: str) -> np.ndarray:
        return scores[name] if name in scores else np.full(n, np.nan)

    j, d, i = cfg.judge, cfg.deita, cfg.ifd
    empty = np.array(pc.equal(pc.utf8_trim_whitespace(_column(data, "output")), ""), dtype=bool)
    turns = conversation_turns(data)
    if turns is not None:  # a conversation with any blank answer
        answers = turns.answers
        blank = np.asarray(pc.equal(pc.utf8_trim_whitespace(turns.content.take(answers)), ""))
        empty[turns.parent[answers[blank]]] = True
    rules = [
        ("empty_output", empty),
        ("unsafe", col("score_safety") < 1.0),
        ("judge_unparsed", np.isnan(col("score_judge")) if j.enabled and j.drop_unparsed else None),
        ("low_judge", col("score_judge") < j.min_score if j.enabled and j.min_score is not None else None),
        ("low_total", col("score_total") < cfg.min_total),
        ("high_ifd", col("score_ifd") > i.max_ifd if i.enabled and i.max_ifd is not None else None),
        ("low_complexity", col("score_deita_complexity") < d.min_complexity
         if d.enabled and d.min_complexity is not None else None),
        ("low_response_quality", col("score_deita_quality") < d.min_quality
         if d.enabled and d.min_quality is not None else None),
    ]
    rules = [(name, mask) for name, mask in rules if mask is not None]
    reason = np.select([mask for _, mask in rules], [name for name, _ in rules], default="")
    reason = reason.astype(object)

    figures: dict[str, Any] = {}
    duplicate_of = np.full(n, None, dtype=object)
    if cfg.dedup.enabled and n:
        groups = None
        if not cfg.dedup.same_task_instances and "task_id" in columns:
            groups = _task_groups(data)
        # joined per row with a newline, chunk by chunk; a conversation's text is its turns (dedup.example_texts)
        text = dedup.example_texts([_column(data, f) for f in cfg.dedup.fields], cfg.dedup.fields,
                                   messages_column(data))
        found = dedup.near_duplicates(text, cfg.dedup.threshold,
                                      cfg.dedup.shingle_size, cfg.dedup.num_perm, groups=groups)
        target = dedup.pick_representatives(found.label, reason == "", col(cfg.dedup.rank_by))
        if groups is not None:  # an instance of the kept row's own task stays (clusters are transitive)
            linked = target >= 0
            target[linked & (groups == groups[np.where(linked, target, 0)])] = -1
        is_dup = target >= 0
        reason[is_dup] = "near_duplicate"
        ids = data.column("id").take(pa.array(target[is_dup])).to_pylist() if isinstance(data, pa.Table) \
            else data["id"].to_numpy()[target[is_dup]]
        duplicate_of[is_dup] = ids
        sizes = np.bincount(found.label)
        figures = {"clusters": int((sizes > 1).sum()), "rows_in_clusters": int(sizes[sizes > 1].sum()),
                   "largest_cluster": int(sizes.max()), "candidate_pairs": found.candidates,
                   "linked_pairs": len(found.pairs), "bands": found.bands, "rows_per_band": found.per_band}
    if i.enabled and i.keep_share is not None:  # Cherry-style: the highest-IFD share of what is left
        figures["ifd_selection"] = _select_by_ifd(reason, col("score_ifd"), i.keep_share)
    return np.where(reason == "", None, reason), duplicate_of, figures


def _score_columns(data: pa.Table | pd.DataFrame) -> dict[str, np.ndarray]:
    if isinstance(data, pa.Table):
        return {c: np.asarray(data.column(c).to_numpy(), dtype=float) for c in data.column_names
                if c.startswith("score_")}
    return {c: data[c].to_numpy(dtype=float) for c in data.columns if c.startswith("score_")}


def decide(scored: pd.DataFrame, cfg: QualityConfig) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Add `keep`, `drop_reason` and `duplicate_of`; return the near-duplicate figures too."""
    out = scored.copy()
    reason, duplicate_of, figures = _decisions(out, _score_columns(out), cfg)
    out["drop_reason"] = pd.Series(reason, index=out.index, dtype=object)
    out["keep"] = out["drop_reason"].isna()
    out["duplicate_of"] = pd.Series(duplicate_of, index=out.index, dtype=object)
    return out, figures


def _select_by_ifd(reason: np.ndarray, ifd: np.ndarray, share: float) -> dict[str, Any]:
    """Keep the `share` of the still-kept rows with the highest IFD (ties by position; a row without an IFD
    ranks last); mark the rest `low_ifd` in `reason`. Returns the selection's figures."""
    kept = np.flatnonzero(reason == "")
    n_keep = math.ceil(share * len(kept))
    order = np.lexsort((kept, -np.nan_to_num(ifd[kept], nan=-np.inf)))
    reason[kept[order[n_keep:]]] = "low_ifd"
    chosen = ifd[kept[order[:n_keep]]]
    return {"ranked": len(kept), "kept": n_keep, "keep_share": share,
            "lowest_kept_ifd": None if not len(chosen) or np.isnan(chosen).all()
            else round(float(np.nanmin(chosen)), 4)}


def score_summary(data: pa.Table | pd.DataFrame) -> dict[str, dict[str, float | int]]:
    """Per score column: rows with a value, and its mean and quantiles."""
    summary = {}
    for name, values in _score_columns(data).items():
        values = values[~np.isnan(values)]
        if not len(values):
            summary[name] = {"rows": 0}
            continue
        q = np.quantile(values, [0.0, 0.1, 0.5, 0.9, 1.0])
        summary[name] = {"rows": int(len(values)), "mean": round(float(values.mean()), 4),
                         **{k: round(float(v), 4) for k, v in zip(("min", "p10", "p50", "p90", "max"), q)}}
    return summary


def _set_column(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    """`table` with column `name` set to `values`: in place if it has one (as DataFrame.assign does), else last."""
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def _counts(values: pd.Series) -> dict[str, int]:
    return {k: int(v) for k, v in values.value_counts().items()}


def run_quality(data: pa.Table | pd.DataFrame, cfg: QualityConfig, judge_llm: LLM | None = None, scorer=None,
                parts: PartWriter | None = None, remote: StageShards | None = None
                ) -> tuple[pa.Table | pd.DataFrame, dict[str, Any]]:
    """Score and decide; `judge_llm` and `scorer` are needed when the judge or DEITA/IFD are enabled;
    `remote`: shard the model work on a cluster (tasks/shards.py), `data` being the rows of `remote.source`.

    An Arrow table gives an Arrow table: its columns with the score and decision columns appended (as
    `pa.Table.from_pandas` would type them), the text never copied or converted to Python strings. A
    DataFrame gives a DataFrame."""
    if cfg.judge.enabled and judge_llm is None:
        raise ValueError("quality.judge.enabled needs an LLM")
    if (cfg.deita.enabled or cfg.ifd.enabled) and scorer is None:
        raise ValueError("quality.deita / quality.ifd need a scoring model (local, or the endpoint: quality.scorer)")
    arrow = isinstance(data, pa.Table)
    if not arrow:
        data = data.reset_index(drop=True)
    heuristics = heuristic_scores(data, cfg)  # also checks the conversations, before any model is asked
    texts = data.select(_text_columns(data.column_names)).to_pandas() if arrow else data
    extra, model_stats = model_based_scores(texts, cfg, judge_llm, scorer, parts, remote)
    del texts
    if extra is not None:
        extra = extra.reindex(pd.RangeIndex(len(data)))  # as a left join on the row position
    if arrow:
        decided = data
        for name, values in heuristics.items():
            decided = _set_column(decided, name, pa.array(values, from_pandas=True))
        if extra is not None:
            for name, column in zip(extra.columns, pa.Table.from_pandas(extra, preserve_index=False).columns):
                decided = _set_column(decided, name, column)
        reason, duplicate_of, dedup_figures = _decisions(decided, _score_columns(decided), cfg)
        keep = pd.isna(reason)
        decided = _set_column(decided, "drop_reason", pa.array(reason, from_pandas=True))
        decided = _set_column(decided, "keep", pa.array(keep))
        decided = _set_column(decided, "duplicate_of", pa.array(duplicate_of, from_pandas=True))
        origin = decided.column("origin").filter(pa.array(keep)).to_pandas()
    else:
        df = data.assign(**heuristics)
        if extra is not None:
            df = df.join(extra)
        decided, dedup_figures = decide(df, cfg)
        reason, keep = decided["drop_reason"].to_numpy(dtype=object), decided["keep"].to_numpy(dtype=bool)
        origin = decided.loc[decided["keep"], "origin"]
    stats: dict[str, Any] = {
        "kept": int(keep.sum()),
        "dropped": _counts(pd.Series(reason, dtype=object)),
        "scores": score_summary(decided),
        "kept_by_origin": _counts(origin),
        **model_stats,
    }
    if conversation.COLUMN in (data.column_names if arrow else data.columns):  # how many conversations stay
        messages = messages_column(data)
        multi = np.zeros(len(keep), dtype=bool) if messages is None else np.asarray(messages.is_valid())
        stats["multi_turn"] = {"rows": int(multi.sum()), "kept": int((multi & np.asarray(keep, dtype=bool)).sum())}
    if cfg.judge.enabled:
        errors = extra["judge_error"].dropna()
        stats["judge_errors"] = _counts(errors.str.split(":").str[0])
    if cfg.ifd.enabled:  # over-long outputs: scored on the head that fits (truncated) or not at all (dropped)
        stats["ifd_truncation"] = _counts(extra["ifd_truncation"].dropna())
    if dedup_figures:
        stats["dedup"] = dedup_figures
    return decided, stats
