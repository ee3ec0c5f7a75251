"""Stage 5, mix: turn the kept rows into the exact training set, reproducibly (FLAN-style mixing).

A row's source is its origin (`seed`, `self_instruct`, `evol_r1`, `evol_r2`, ...), its task category, or
both (`mix.source_by`). The eval split is drawn first, stratified by source, in whole lineage groups: every
row of one task (its instances, its evolutions, any row with the same instruction text) is on one side, so
eval loss is never measured on a task the model trained on. Then, optionally, each source is capped at `cap`
rows (a seeded subsample), and the training rows are allocated to sources by `mix.mode`:

- `weights`: shares proportional to explicit per-source weights (the seed document's create_instruction_mix);
- `proportional`: examples-proportional, each source in proportion to its (capped) size (FLAN);
- `temperature`: p_i proportional to n_i^(1/T) over the capped sizes (FLAN used T=3); T=1 is proportional,
  a large T approaches uniform.

Chain-of-thought rows (evolved with `increase_reasoning`, or in `cot_categories`) get their own share of the
total (`cot_share`, one row in ten by default), allocated by the same mode inside each group. Counts are
rounded by largest remainder, so they sum exactly. Without `replace` a source never gives more rows than
it has, and what it cannot give goes to the others by their shares. Within a source rows are drawn
uniformly, or with probability proportional to a quality score (`quality_weight`). Everything is
column-wise: sources factorized by hashing, one random order and one radix sort by source per draw, no
per-row Python loop.

A multi-turn conversation (a row with `messages`, tasks/conversation.py) is a row of its source like any
other: its origin, category or dataset place it, it is drawn as one row, and its `instruction` (its opening
request) links it to the lineage groups of the split, so conversations that open alike stay on one side.
`messages` travels with the row into the train and eval tables. Each source's manifest entry also counts
the assistant `turns` of its training rows (its rows, when none is a conversation) and its `multi_turn` rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from tasks import conversation
from tasks.config import MixConfig

log = logging.getLogger(__name__)


class MixError(ValueError):
    pass


# --- counts -------------------------------------------------------------------------------------------------

def largest_remainder(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Integer counts proportional to `weights` that sum to `total` exactly."""
    names = sorted(weights)
    w = np.array([weights[n] for n in names], dtype=float)
    if total == 0 or w.sum() == 0:
        return {n: 0 for n in names}
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(int)
    short = total - counts.sum()
    order = np.lexsort((np.arange(len(names)), -(exact - counts)))  # biggest remainder first, ties by name
    counts[order[:short]] += 1
    return dict(zip(names, counts.tolist()))


def fill_to_capacity(total: int, weights: dict[str, float], available: dict[str, int]) -> dict[str, int]:
    """Weighted counts without replacement: a source that runs out gives all it has, and what it could
    not give is shared among the others by their weights, until `total` is placed or all are exhausted."""
    counts = {name: 0 for name in weights}
    open_ = {n for n, w in weights.items() if w > 0 and available.get(n, 0) > 0}
    left = min(total, sum(available.get(n, 0) for n in open_))
    while left > 0 and open_:
        share = largest_remainder(left, {n: weights[n] for n in open_})
        for name, k in share.items():
            take = min(k, available[name] - counts[name])
            counts[name] += take
            left -= take
            if counts[name] == available[name]:
                open_.discard(name)
    return counts


def target_shares(sizes: dict[str, int], cfg: MixConfig) -> dict[str, float]:
    """Each source's share of the training rows under `cfg.mode`, before any source runs out."""
    if cfg.mode == "weights":
        raw = {s: float(cfg.weights.get(s, 0.0)) for s in sizes}
    elif cfg.mode == "proportional":
        raw = {s: float(n) for s, n in sizes.items()}
    else:
        raw = {s: float(n) ** (1.0 / cfg.temperature) if n else 0.0 for s, n in sizes.items()}
    total = sum(raw.values())
    return {s: (w / total if total else 0.0) for s, w in raw.items()}


def allocate(total: int, shares: dict[str, float], available: dict[str, int], replace: bool) -> dict[str, int]:
    if replace:
        return largest_remainder(total, shares)
    return fill_to_capacity(total, shares, available)


# --- columns ------------------------------------------------------------------------------------------------

def _factorize(values: pd.Series | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes (hashing, not sorting: fast on 1M strings) and the distinct values."""
    codes, uniques = pd.factorize(values, use_na_sentinel=False)
    return codes.astype(np.int64), np.asarray(uniques, dtype=object)


def source_codes(df: pd.DataFrame, source_by: str) -> tuple[list[str], np.ndarray]:
    """Each row's source as a code into the sorted source names: `seed`, `self_instruct`, `evol_r<round>`
    (by origin), the category, `origin/category`, or the seed dataset (`dataset`). Column-wise: strings are
    built for distinct values only."""
    n = len(df)
    if source_by == "dataset":
        if "dataset" not in df:
            raise ValueError("mix.source_by is `dataset` but the rows have no `dataset` column (the seeds stage "
                             "writes it: run the stages again from seeds)")
        codes, names = _factorize(df["dataset"].fillna("unknown").astype(str))
        return _sorted_names(codes, names.astype(str))
    if source_by != "category":
        o_codes, o_names = _factorize(df["origin"].astype(str) if "origin" in df else np.full(n, "unknown"))
        o_labels = o_names.astype(str)
        if "round" in df and "evol" in set(o_labels):
            rounds = pd.to_numeric(df["round"], errors="coerce")
            evol = (o_codes == list(o_labels).index("evol")) & rounds.notna().to_numpy()
            r = np.where(evol, rounds.fillna(0).to_numpy().astype(np.int64), -1)
            o_codes, pairs = _factorize(o_codes * 1_000_003 + (r + 1))
            o_labels = np.array([f"evol_r{p % 1_000_003 - 1}" if p % 1_000_003 else o_labels[p // 1_000_003]
                                 for p in pairs.astype(np.int64)], dtype=object)
    if source_by != "origin":
        c_codes, c_names = _factorize(df["category"].fillna("uncategorized").astype(str) if "category" in df
                                      else np.full(n, "uncategorized"))
        c_labels = c_names.astype(str)
    if source_by == "origin":
        codes, labels = o_codes, o_labels
    elif source_by == "category":
        codes, labels = c_codes, c_labels
    else:
        codes, pairs = _factorize(o_codes * len(c_labels) + c_codes)
        labels = np.array([f"{o_labels[p // len(c_labels)]}/{c_labels[p % len(c_labels)]}"
                           for p in pairs.astype(np.int64)], dtype=object)
    return _sorted_names(codes, labels)


def _sorted_names(codes: np.ndarray, labels: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Codes renumbered so that the names are sorted: results do not depend on row order of first sight."""
    order = np.argsort(labels.astype(str))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return [str(x) for x in labels[order]], rank[codes]


def source_labels(df: pd.DataFrame, source_by: str) -> pd.Series:
    names, codes = source_codes(df, source_by)
    return pd.Series(np.asarray(names, dtype=object)[codes], index=df.index)


def cot_mask(df: pd.DataFrame, cot_categories: list[str]) -> np.ndarray:
    """Chain-of-thought rows: evolved to require explicit reasoning, or in a reasoning category."""
    mask = np.zeros(len(df), dtype=bool)
    if "evol_operation" in df:
        mask |= (df["evol_operation"] == "increase_reasoning").to_numpy()
    if "category" in df:
        mask |= df["category"].isin(cot_categories).to_numpy()
    return mask


def _group_order(codes: np.ndarray, weights: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """Row positions grouped by code, each group in random order: uniform, or, with `weights`, the order
    of Efraimidis and Spirakis keys u^(1/w), largest first (its first k rows are a weighted sample without
    replacement; a row of weight 0 comes last). The group sort is a stable radix sort on small integers."""
    if weights is None:
        shuffled = rng.permutation(len(codes))
    else:
        u = rng.random(len(codes))
        with np.errstate(divide="ignore", over="ignore", under="ignore"):
            keys = np.where(weights > 0, u ** (1.0 / np.where(weights > 0, weights, 1.0)), -1.0)
        shuffled = np.argsort(-keys)
    small = codes[shuffled].astype(np.int16 if codes.max(initial=0) < 2**15 else np.int64)
    return shuffled[np.argsort(small, kind="stable")]


def draw(codes: np.ndarray, counts: np.ndarray, rng: np.random.Generator, replace: bool,
         weights: np.ndarray | None = None) -> np.ndarray:
    """Row positions: `counts[c]` rows of each group code `c`. Without replacement, the first rows of each
    group in a random order (one pass for all groups); with replacement, a seeded draw per group."""
    if replace:
        picks = []
        for code in np.flatnonzero(counts):
            idx = np.flatnonzero(codes == code)
            p = None if weights is None or weights[idx].sum() <= 0 else weights[idx] / weights[idx].sum()
            picks.append(rng.choice(idx, int(counts[code]), replace=True, p=p))
        return np.concatenate(picks) if picks else np.array([], dtype=np.int64)
    order = _group_order(codes, weights, rng)
    sorted_codes = codes[order]
    starts = np.searchsorted(sorted_codes, np.arange(len(counts)))
    rank = np.arange(len(order)) - starts[sorted_codes]
    return order[rank < counts[sorted_codes]]


# --- the stage ----------------------------------------------------------------------------------------------

# What the decisions read of a row (besides the score columns): the text columns other than the
# instruction are never converted.
DECISION_COLUMNS = ("id", "keep", "task_id", "root_id", "instruction", "origin", "round", "category",
                    "evol_operation", "dataset")


@dataclass
class Mixed:
    train: pd.DataFrame | pa.Table  # Arrow when the input was (mix_table), else a DataFrame (mix_rows)
    eval: pd.DataFrame | pa.Table
    manifest: dict[str, Any]


def _fold(texts: pd.Series) -> pd.Series:
    """Whitespace runs to one space, ends trimmed, lowercase: Python's str.split() and str.lower()."""
    return texts.fillna("").astype(str).str.split().str.join(" ").str.lower()


def instruction_codes(instructions: pd.Series) -> np.ndarray:
    """A code per row for its instruction with whitespace and case folded (`_fold`). Column-wise for the
    rows of ASCII text without the separators \\x1c-\\x1f (which Python splits on and Arrow does not):
    Arrow's ASCII split, join and lowercase are Python's there; the other rows are folded by `_fold`."""
    text = pa.array(instructions.fillna("").astype(str), pa.large_string())  # pandas' strings are Arrow already
    if isinstance(text, pa.ChunkedArray):
        text = text.combine_chunks()
    fast = pc.and_(pc.string_is_ascii(text), pc.invert(pc.match_substring_regex(text, "[\\x1c-\\x1f]")))
    words = pc.ascii_split_whitespace(pc.ascii_trim_whitespace(text))
    folded = pc.ascii_lower(pc.binary_join(words, pa.scalar(" ", pa.large_string())))
    slow = np.flatnonzero(~np.asarray(fast))
    if len(slow):
        by_python = _fold(instructions.iloc[slow]).to_numpy(dtype=object)
        folded = pc.replace_with_mask(folded, pc.invert(fast), pa.array(by_python, pa.large_string()))
    return np.asarray(pc.dictionary_encode(folded).indices, dtype=np.int64)


def lineage_groups(df: pd.DataFrame) -> np.ndarray:
    """A group code per row: rows that share a task (`task_id`), a root (an evolution's `root_id`, which is
    the id of the row it grew from) or an instruction text (whitespace and case folded) are one group, and
    so, transitively, is everything linked to them. Label propagation over the three keys: each round every
    row takes the smallest label in its key groups, until nothing changes (a few rounds; column-wise)."""
    n = len(df)
    ids = df["id"].astype(str) if "id" in df else pd.Series(np.arange(n).astype(str), index=df.index)
    keys = [ids.where(df["task_id"].isna(), df["task_id"].astype(str)) if "task_id" in df else ids,
            ids.where(df["root_id"].isna(), df["root_id"].astype(str)) if "root_id" in df else ids]
    codes = [_factorize(k.to_numpy(dtype=object))[0] for k in keys] + [instruction_codes(df["instruction"])]
    label = np.arange(n, dtype=np.int64)
    while True:
        before = label
        for c in codes:
            smallest = np.full(c.max(initial=-1) + 1, n, dtype=np.int64)
            np.minimum.at(smallest, c, label)
            label = smallest[c]
        label = label[label]  # pointer jumping: a label is a row position, take that row's label
        if np.array_equal(label, before):
            return _factorize(label)[0]


def split_eval(codes: np.ndarray, names: list[str], groups: np.ndarray, cfg: MixConfig,
               rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of eval rows: whole lineage groups (`lineage_groups`), so no task, root or instruction
    is on both sides, stratified by source (a group counts toward the source of its first row; a source
    with a single group keeps it for training). Each source takes groups in a seeded random order until its
    share is reached: the last group may carry it a few rows past."""
    n = len(codes)
    n_eval = min(max(cfg.min_eval, round(cfg.eval_fraction * n)), n // 2)
    n_groups = int(groups.max(initial=-1)) + 1
    first = np.full(n_groups, n, dtype=np.int64)
    np.minimum.at(first, groups, np.arange(n))
    group_source = codes[first]
    group_size = np.bincount(groups, minlength=n_groups)
    rows_per_source = np.bincount(group_source, weights=group_size, minlength=len(names))
    groups_per_source = np.bincount(group_source, minlength=len(names))
    target = largest_remainder(n_eval, {name: float(r) if g > 1 else 0.0
                                        for name, r, g in zip(names, rows_per_source, groups_per_source)})
    order = np.lexsort((rng.random(n_groups), group_source))  # by source, random within a source
    sizes = group_size[order]
    before = np.cumsum(sizes) - sizes  # rows taken before each group ...
    starts = np.searchsorted(group_source[order], np.arange(len(names)))
    before -= before[starts[group_source[order]]]  # ... within its own source
    source = group_source[order]
    wanted = np.array([target[name] for name in names])[source]
    # never a whole source: a group that would take a source's last training rows stays in training
    fits = before + sizes < rows_per_source[source]
    chosen = np.zeros(n_groups, dtype=bool)
    chosen[order[(before < wanted) & fits]] = True
    return chosen[groups]


def _messages_of(df: pd.DataFrame) -> pa.Array | None:
    if conversation.COLUMN not in df:
        return None
    return pa.array(df[conversation.COLUMN].to_numpy(dtype=object), type=conversation.MESSAGES, from_pandas=True)


def _draw_rows(df: pd.DataFrame, cfg: MixConfig, messages: pa.Array | pa.ChunkedArray | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """The mix as row positions: (train rows in drawn order, eval rows, each row's source name, manifest).
    `df` needs the columns the decisions read (DECISION_COLUMNS and the `quality_weight` column), not the text;
    `messages`, the rows' conversations (or None), is read for the turn counts only."""
    if "keep" not in df:
        raise MixError("mix reads the quality stage's output: the input has no `keep` column")
    kept_pos = np.flatnonzero(df["keep"].fillna(False).astype(bool).to_numpy())
    if len(kept_pos) < 2:
        raise MixError(f"mix needs at least 2 kept rows, got {len(kept_pos)} (see the quality stage's drops)")
    weights_col = None
    if cfg.quality_weight is not None:
        if cfg.quality_weight not in df:
            raise MixError(f"mix.quality_weight: no column `{cfg.quality_weight}`; score columns: "
                           f"{', '.join(c for c in df.columns if c.startswith('score_')) or 'none'}")
        scores = pd.to_numeric(df[cfg.quality_weight], errors="coerce").to_numpy(dtype=float)[kept_pos]
        weights_col = np.clip(np.nan_to_num(scores, nan=0.0), 0.0, None)
    rng = np.random.default_rng(cfg.seed)
    names, all_codes = source_codes(df, cfg.source_by)
    kept_codes = all_codes[kept_pos]
    eval_mask = split_eval(kept_codes, names, lineage_groups(df.iloc[kept_pos]), cfg, rng)

    pool_pos = np.flatnonzero(~eval_mask)  # positions among kept rows
    codes = kept_codes[pool_pos]
    present = np.bincount(codes, minlength=len(names)) > 0
    warnings = _check_weights(cfg, [n for n, p in zip(names, present) if p])
    if cfg.cap is not None:  # FLAN's per-source cap: a seeded subsample of each large source
        sizes = np.bincount(codes, minlength=len(names))
        keep = np.sort(draw(codes, np.minimum(sizes, cfg.cap), rng, replace=False))
        pool_pos, codes = pool_pos[keep], codes[keep]
    sizes = np.bincount(codes, minlength=len(names))
    available = {s: int(k) for s, k, p in zip(names, sizes, present) if p}
    shares = target_shares(available, cfg)
    total = cfg.total if cfg.total is not None else int(sizes.sum())

    cot = cot_mask(df, cfg.cot_categories)[kept_pos[pool_pos]] if cfg.cot_share is not None else None
    groups = [(np.ones(len(codes), dtype=bool), total)] if cot is None else _cot_split(cot, total, cfg)
    picks, counts = [], np.zeros(len(names), dtype=int)
    for mask, k in groups:
        sub_sizes = np.bincount(codes[mask], minlength=len(names))
        sub_available = {s: int(sub_sizes[i]) for i, s in enumerate(names) if s in available}
        sub_shares = target_shares(sub_available, cfg) if cfg.mode != "weights" else \
            {s: shares[s] if sub_available[s] else 0.0 for s in sub_available}
        alloc = allocate(k, sub_shares, sub_available, cfg.replace)
        sub_counts = np.array([alloc.get(s, 0) for s in names])
        positions = np.flatnonzero(mask)
        chosen = draw(codes[mask], sub_counts, rng, cfg.replace,
                      None if weights_col is None else weights_col[pool_pos[mask]])
        picks.append(positions[chosen])
        counts += np.bincount(codes[mask][chosen], minlength=len(names))
    picked = np.concatenate(picks) if picks else np.array([], dtype=np.int64)
    rng.shuffle(picked)

    name_array = np.asarray(names, dtype=object)
    train_rows = kept_pos[pool_pos[picked]]
    turns = conversation.turn_counts(messages, len(df))[train_rows]
    multi = np.zeros(len(df), dtype=bool) if messages is None else np.asarray(messages.is_valid(), dtype=bool)
    source_turns = np.bincount(all_codes[train_rows], weights=turns, minlength=len(names)).astype(np.int64)
    source_multi = np.bincount(all_codes[train_rows], weights=multi[train_rows], minlength=len(names)).astype(np.int64)
    eval_rows = kept_pos[eval_mask]
    n_train = max(len(train_rows), 1)
    n_cot = int(cot[picked].sum()) if cot is not None else None
    ids = df["id"].astype(str) if "id" in df else pd.Series(np.arange(len(df)).astype(str))
    manifest = {
        "mode": cfg.mode, "source_by": cfg.source_by, "seed": cfg.seed, "kept": len(kept_pos),
        "total_requested": total,
        "train": len(train_rows), "eval": len(eval_rows), "replace": cfg.replace, "cap": cfg.cap,
        "temperature": cfg.temperature if cfg.mode == "temperature" else None,
        "sources": {s: {"requested_share": round(shares[s], 6), "achieved_share": round(int(counts[i]) / n_train, 6),
                        "rows": int(counts[i]), "available": available[s], "turns": int(source_turns[i]),
                        "multi_turn": int(source_multi[i])}
                    for i, s in enumerate(names) if s in available},
        "cot": {"requested_share": cfg.cot_share,
                "achieved_share": None if n_cot is None else round(n_cot / n_train, 6),
                "rows": n_cot, "available": None if cot is None else int(cot.sum())},
        "warnings": warnings,
        "train_ids": ids.iloc[train_rows].tolist(), "eval_ids": ids.iloc[eval_rows].tolist(),
    }
    return train_rows, eval_rows, name_array[all_codes], manifest


def mix_rows(df: pd.DataFrame, cfg: MixConfig) -> Mixed:
    """The mix of a DataFrame: the train rows in drawn order and the eval rows, each with `source` and `split`."""
    train_rows, eval_rows, source, manifest = _draw_rows(df, cfg, _messages_of(df))
    train = df.iloc[train_rows].assign(source=source[train_rows], split="train")
    evals = df.iloc[eval_rows].assign(source=source[eval_rows], split="eval")
    return Mixed(train, evals, manifest)


def _with_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    """`table` with column `name` set to `values`: in place if it has one (as DataFrame.assign does), else last."""
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def _as_pandas_types(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Strings as large_string, the type pandas' strings come back as (the stage's output kept its types
    through a DataFrame before it was column-wise)."""
    return column.cast(pa.large_string()) if pa.types.is_string(column.type) else column


def mix_table(table: pa.Table, cfg: MixConfig) -> tuple[pa.Table, Mixed]:
    """The mix of an Arrow table, column-wise: the decisions read only DECISION_COLUMNS (and score columns),
    each column is taken once in output order (train rows, then eval rows), and the splits are slices of
    the result, so the text is copied once and never converted to Python strings. The same rows, order,
    values and types as `mix_rows` on the table's DataFrame. Every column travels, `messages` included."""
    light = [c for c in table.column_names if c in DECISION_COLUMNS or c.startswith("score_")
             or c == cfg.quality_weight]
    messages = table.column(conversation.COLUMN) if conversation.COLUMN in table.column_names else None
    train_rows, eval_rows, source, manifest = _draw_rows(table.select(light).to_pandas(), cfg, messages)
    rows = pa.array(np.concatenate([train_rows, eval_rows]).astype(np.int64))
    out = pa.table({name: _as_pandas_types(table.column(name)).take(rows) for name in table.column_names},
                   metadata=table.schema.metadata)
    n_train = len(train_rows)
    # large_string: what pa.Table.from_pandas gives pandas' strings
    sources = np.concatenate([source[train_rows], source[eval_rows]])
    out = _with_column(out, "source", pa.array(sources, pa.large_string()))
    split = np.where(np.arange(len(rows)) < n_train, "train", "eval")
    out = _with_column(out, "split", pa.array(split, pa.large_string()))
    return out, Mixed(out.slice(0, n_train), out.slice(n_train), manifest)


def _cot_split(cot: np.ndarray, total: int, cfg: MixConfig) -> list[tuple[np.ndarray, int]]:
    """(mask, rows) for the chain-of-thought rows and the rest; without replacement a group that is short
    of its share gives what it has and the other group fills in."""
    k_cot = round(cfg.cot_share * total)
    if not cfg.replace:
        n_cot, n_rest = int(cot.sum()), int((~cot).sum())
        k_cot = min(k_cot, n_cot)
        k_rest = min(total - k_cot, n_rest)
        k_cot = min(total - k_rest, n_cot)
    elif not cot.any():
        k_cot = 0
    return [(cot, k_cot), (~cot, total - k_cot)]


def _check_weights(cfg: MixConfig, names: list[str]) -> list[str]:
    if cfg.mode != "weights":
        return []
    if not cfg.weights:
        raise MixError("mix.mode is `weights` but mix.weights is empty; name a weight per source: "
                       f"{', '.join(names)}")
    unknown = sorted(set(cfg.weights) - set(names))
    if not unknown:
        return []
    message = (f"mix.weights names sources with no rows: {', '.join(unknown)}; sources (by {cfg.source_by}): "
               f"{', '.join(names)}")
    if cfg.unknown_sources == "error":
        raise MixError(message)
    log.warning(message)
    return [message]


def mix(data: pd.DataFrame | pa.Table, cfg: MixConfig) -> tuple[pd.DataFrame | pa.Table, dict[str, Any], Mixed]:
    """The stage: train and eval rows in one table (column `split`), the stats, and the parts to export.
    An Arrow table stays Arrow (`mix_table`); a DataFrame stays a DataFrame (`mix_rows`)."""
    if isinstance(data, pa.Table):
        out, mixed = mix_table(data, cfg)
    else:
        mixed = mix_rows(data, cfg)
        out = pd.concat([mixed.train, mixed.eval], ignore_index=True)
    m = mixed.manifest
    kept = m["kept"]
    stats = {"rows_in_kept": kept, "train": m["train"], "eval": m["eval"], "mode": m["mode"], "seed": m["seed"],
             "sources": m["sources"], "cot": m["cot"], "warnings": m["warnings"],
             "dropped": {"not_kept": len(data) - kept, "not_sampled": kept - m["eval"] - len(set(m["train_ids"]))}}
    return out, stats, mixed
