"""Stage 5, mix: draw the training set from kept rows by per-category weights, and hold out an eval split.

The eval split is drawn first, stratified by category (each category gives the same share, at least one row
where it has two or more), so it never overlaps the training rows. The training mix then gives each
category a share of `total` proportional to its weight (create_instruction_mix); with no weights, every
category in proportion to its rows. Counts are rounded by largest remainder so they sum to `total` exactly.
Without `replace`, a category never gives more rows than it has. Deterministic for a given `mix.seed`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from tasks.config import MixConfig


class MixError(ValueError):
    pass


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
    """Weighted counts without replacement: a category that runs out gives all it has, and what it could
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


def split_eval(df: pd.DataFrame, cfg: MixConfig, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of eval rows, stratified by category."""
    n_eval = min(max(cfg.min_eval, round(cfg.eval_fraction * len(df))), len(df) // 2)
    sizes = df.groupby("category").size()
    per_cat = largest_remainder(n_eval, {c: float(n - 1) for c, n in sizes.items()})
    mask = np.zeros(len(df), dtype=bool)
    positions = np.arange(len(df))
    for cat, k in sorted(per_cat.items()):
        if k:
            idx = positions[(df["category"] == cat).to_numpy()]
            mask[rng.choice(idx, k, replace=False)] = True
    return mask


def mix(df: pd.DataFrame, cfg: MixConfig) -> tuple[pd.DataFrame, dict[str, Any]]:
    kept = df[df["keep"]].reset_index(drop=True)
    if len(kept) < 2:
        raise MixError(f"mix needs at least 2 kept rows, got {len(kept)} (see the quality stage's drops)")
    rng = np.random.default_rng(cfg.seed)
    eval_mask = split_eval(kept, cfg, rng)
    pool = kept[~eval_mask]
    available = pool.groupby("category").size().to_dict()
    unknown = sorted(set(cfg.weights) - set(available))
    if unknown:
        raise MixError(f"mix.weights names categories with no rows: {', '.join(unknown)}; "
                       f"available: {', '.join(sorted(available))}")
    weights = dict(cfg.weights) if cfg.weights else {c: float(n) for c, n in available.items()}
    total = cfg.total if cfg.total is not None else len(pool)
    requested = largest_remainder(total, weights) if cfg.replace else fill_to_capacity(total, weights, available)
    chosen = []
    achieved = {}
    positions = np.arange(len(pool))
    for cat, k in sorted(requested.items()):
        idx = positions[(pool["category"] == cat).to_numpy()]
        k_take = k if cfg.replace else min(k, len(idx))
        if k_take:
            chosen.append(rng.choice(idx, k_take, replace=cfg.replace and k_take > len(idx)))
        achieved[cat] = int(k_take)
    picks = np.concatenate(chosen) if chosen else np.array([], dtype=int)
    rng.shuffle(picks)
    train = pool.iloc[picks].assign(split="train")
    evals = kept[eval_mask].assign(split="eval")
    out = pd.concat([train, evals], ignore_index=True)
    weight_sum = sum(weights.values()) or 1.0
    stats = {
        "rows_in_kept": len(kept), "train": len(train), "eval": len(evals), "seed": cfg.seed,
        "categories": {c: {"requested_share": round(weights.get(c, 0) / weight_sum, 4),
                           "achieved_share": round(achieved.get(c, 0) / max(len(train), 1), 4),
                           "rows": achieved.get(c, 0), "available": int(available.get(c, 0))}
                       for c in sorted(set(weights) | set(available))},
        "dropped": {"not_kept": int((~df["keep"]).sum()), "not_sampled": int(len(pool) - len(set(picks.tolist())))},
    }
    return out, stats
