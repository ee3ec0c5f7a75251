"""Stage 4, quality: score every example with column-wise heuristics, then decide what to keep.

Scoring is separate from deciding. Each scorer adds a `score_<name>` column in [0, 1]:
- `length`: 1 when the output's word count lies in [min_output_words, max_output_words], falling off
  linearly below the lower bound (0 for an empty output) and as max/words above the upper one;
- `format`: the share of four checks passed: no leftover template markers, no line repeated three times or
  more, ends like a finished sentence or code block, does not start with punctuation;
- `relevance`: the share of the instruction's content words (4+ letters) that appear in the input or output;
- `safety`: 0 if any configured unsafe term occurs in the instruction, input or output, else 1;
- `total`: the weighted mean of the four.
The decision step then adds `keep` and `drop_reason` (`empty_output`, `unsafe`, `low_total`).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

from tasks.config import QualityConfig

_TEMPLATE_MARKERS = r"###\s*(?:Instruction|Input|Response)|Below is an instruction"
_FINISHED = r"(?:[.!?\"')\]`*]|\d)\s*$"


def _repeated_line_share(outputs: pd.Series) -> pd.Series:
    def repeated(text: str) -> bool:
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        return len(lines) >= 3 and max(lines.count(line) for line in set(lines)) >= 3
    return outputs.map(repeated)


def score_length(words: pd.Series, cfg: QualityConfig) -> pd.Series:
    low = max(cfg.min_output_words, 1)
    w = words.astype(float)
    below = (w / low).clip(upper=1.0)
    above = cfg.max_output_words / w.where(w > 0, 1.0)
    return pd.Series(np.where(w > cfg.max_output_words, above, below), index=words.index)


def score_format(outputs: pd.Series) -> pd.Series:
    checks = pd.concat([
        ~outputs.str.contains(_TEMPLATE_MARKERS, case=False, regex=True),
        ~_repeated_line_share(outputs),
        outputs.str.contains(_FINISHED, regex=True),
        outputs.str.match(r"\s*[\w\"'(\[`$-]"),
    ], axis=1)
    return checks.mean(axis=1)


def _content_words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]{4,}", text.lower()))


def score_relevance(instructions: pd.Series, contexts: pd.Series) -> pd.Series:
    def overlap(pair: tuple[str, str]) -> float:
        wanted = _content_words(pair[0])
        if not wanted:
            return 1.0
        return len(wanted & _content_words(pair[1])) / len(wanted)
    return pd.Series([overlap(p) for p in zip(instructions, contexts)], index=instructions.index, dtype=float)


def score_safety(texts: pd.Series, cfg: QualityConfig) -> pd.Series:
    if not cfg.unsafe_terms:
        return pd.Series(1.0, index=texts.index)
    pattern = "|".join(rf"\b{re.escape(t.lower())}\b" for t in cfg.unsafe_terms)
    return (~texts.str.lower().str.contains(pattern, regex=True)).astype(float)


def score(df: pd.DataFrame, cfg: QualityConfig) -> pd.DataFrame:
    out = df.copy()
    inputs = out["input"].fillna("")
    outputs = out["output"].fillna("")
    words = outputs.str.split().str.len().fillna(0)
    out["score_length"] = score_length(words, cfg)
    out["score_format"] = score_format(outputs)
    out["score_relevance"] = score_relevance(out["instruction"], inputs + " " + outputs)
    out["score_safety"] = score_safety(out["instruction"] + "\n" + inputs + "\n" + outputs, cfg)
    total_weight = sum(cfg.weights.values()) or 1.0
    out["score_total"] = sum(out[f"score_{name}"] * w for name, w in cfg.weights.items()) / total_weight
    return out


def decide(scored: pd.DataFrame, cfg: QualityConfig) -> pd.DataFrame:
    out = scored.copy()
    empty = (out["output"].fillna("").str.strip() == "").to_numpy()
    unsafe = (out["score_safety"] < 1.0).to_numpy()
    low = (out["score_total"] < cfg.min_total).to_numpy()
    # The first failing rule names the reason, in this order.
    reason = pd.Series(np.select([empty, unsafe, low], ["empty_output", "unsafe", "low_total"], default=None),
                       index=out.index, dtype=object)
    out["drop_reason"] = reason
    out["keep"] = reason.isna()
    return out


def run_quality(df: pd.DataFrame, cfg: QualityConfig) -> tuple[pd.DataFrame, dict[str, Any]]:
    decided = decide(score(df, cfg), cfg)
    score_cols = [c for c in decided.columns if c.startswith("score_")]
    stats = {
        "kept": int(decided["keep"].sum()),
        "dropped": {k: int(v) for k, v in decided["drop_reason"].value_counts().items()},
        "score_means": {c: round(float(decided[c].mean()), 4) for c in score_cols} if len(decided) else {},
        "kept_by_origin": {k: int(v) for k, v in decided.loc[decided["keep"], "origin"].value_counts().items()},
    }
    return decided, stats
