"""The quality stage's data report: one self-contained HTML page, and the same figures as Markdown.

The page needs no network and no JavaScript: inline CSS, SVG histograms (kept and dropped rows stacked),
the drops per reason, the score quantiles, near-duplicate clusters, and the best and worst kept examples.
The Markdown holds the same figures for the Prefect UI (text bars instead of SVG). Both say how many rows are
multi-turn conversations (and how many of them are kept); an example that is a conversation is shown with
all its turns, each cut to the same length as a one-exchange row's fields.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import pandas as pd

from tasks.conversation import COLUMN, ROLE_NAMES, as_messages, has_messages, turn_count

BINS = 20
_SNIPPET = 400  # characters shown of each text of an example: instruction, input, output, or a turn


def _histogram(values: np.ndarray, kept: np.ndarray, bins: int = BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ok = ~np.isnan(values)
    lo, hi = (float(values[ok].min()), float(values[ok].max())) if ok.any() else (0.0, 1.0)
    if lo >= 0.0 and hi <= 1.0:  # a score in [0, 1]: the same axis for every such score
        lo, hi = 0.0, 1.0
    elif hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    kept_counts, _ = np.histogram(values[ok & kept], edges)
    dropped_counts, _ = np.histogram(values[ok & ~kept], edges)
    return edges, kept_counts, dropped_counts


def _svg(edges: np.ndarray, kept: np.ndarray, dropped: np.ndarray, width: int = 360, height: int = 120) -> str:
    top = max(int((kept + dropped).max()), 1)
    bar = width / len(kept)
    parts = [f'<svg width="{width}" height="{height + 18}" role="img">']
    for i, (k, d) in enumerate(zip(kept, dropped)):
        x = i * bar
        hk, hd = k / top * height, d / top * height
        label = f"{edges[i]:.3g} to {edges[i + 1]:.3g}: {k} kept, {d} dropped"
        parts.append(f'<g><title>{label}</title>'
                     f'<rect x="{x:.1f}" y="{height - hk:.1f}" width="{bar - 1:.1f}" height="{hk:.1f}" class="k"/>'
                     f'<rect x="{x:.1f}" y="{height - hk - hd:.1f}" width="{bar - 1:.1f}" height="{hd:.1f}" '
                     f'class="d"/></g>')
    parts.append(f'<text x="0" y="{height + 14}">{edges[0]:.3g}</text>'
                 f'<text x="{width}" y="{height + 14}" text-anchor="end">{edges[-1]:.3g}</text></svg>')
    return "".join(parts)


def _text_bars(edges: np.ndarray, kept: np.ndarray, dropped: np.ndarray, width: int = 30) -> str:
    top = max(int((kept + dropped).max()), 1)
    lines = []
    for i, (k, d) in enumerate(zip(kept, dropped)):
        nk, nd = round(k / top * width), round(d / top * width)
        lines.append(f"{edges[i]:>8.3g} | {'█' * nk}{'░' * nd} {k}+{d}")
    return "\n".join(lines)


def _snippet(text: Any) -> str:
    text = "" if text is None or (isinstance(text, float) and np.isnan(text)) else str(text)
    return text if len(text) <= _SNIPPET else text[:_SNIPPET] + "…"


def conversation_of(row: pd.Series) -> list[dict[str, str]] | None:
    """A row's `messages` (None for a one-exchange row)."""
    return as_messages(row.get(COLUMN))


def _conversation_summary(df: pd.DataFrame, kept: np.ndarray) -> str:
    multi = has_messages(df)
    return f"{int(multi.sum())} multi-turn conversations ({int((multi & kept).sum())} kept)."


def examples(df: pd.DataFrame, rank_by: str, n: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The `n` best and `n` worst kept rows by `rank_by`."""
    kept = df[df["keep"]].sort_values(rank_by, ascending=False, kind="stable")
    return kept.head(n), kept.tail(n).iloc[::-1]


def duplicate_pairs(df: pd.DataFrame, n: int) -> list[tuple[pd.Series, pd.Series]]:
    dups = df[df["drop_reason"] == "near_duplicate"].head(n)
    by_id = df.set_index("id")
    return [(row, by_id.loc[row["duplicate_of"]]) for _, row in dups.iterrows()]


_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f3f3f3}.num{text-align:right}.k{fill:#3a7bd5}.d{fill:#e4a43a}
.grid{display:flex;flex-wrap:wrap;gap:1.5em}.grid div{min-width:360px}svg text{font-size:11px;fill:#555}
pre{white-space:pre-wrap;margin:0;max-width:420px}.legend span{display:inline-block;width:12px;height:12px;
margin:0 4px 0 12px}"""


def _score_cols(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("score_") and df[c].notna().any()]


def _html_conversation(messages: list[dict[str, str]]) -> str:
    return "".join(f"<b>{ROLE_NAMES[m['role']]}</b><pre>{html.escape(_snippet(m['content']))}</pre>"
                   for m in messages)


def _html_request(r: pd.Series) -> str:
    """A row's request as one cell: a conversation's turns, else its instruction."""
    messages = conversation_of(r)
    return _html_conversation(messages) if messages else f"<pre>{html.escape(_snippet(r['instruction']))}</pre>"


def _example_rows(frame: pd.DataFrame, score_cols: list[str]) -> str:
    rows = []
    for _, r in frame.iterrows():
        scores = "<br>".join(f"{c.removeprefix('score_')}: {r[c]:.3g}" for c in score_cols if pd.notna(r[c]))
        messages = conversation_of(r)
        if messages:  # every turn, in one cell across instruction, input and output
            text = f"<td colspan='3'>{turn_count(messages)} assistant turns{_html_conversation(messages)}</td>"
        else:
            text = (f"<td><pre>{html.escape(_snippet(r['instruction']))}</pre></td>"
                    f"<td><pre>{html.escape(_snippet(r['input']))}</pre></td>"
                    f"<td><pre>{html.escape(_snippet(r['output']))}</pre></td>")
        rows.append(f"<tr><td>{html.escape(str(r['id']))}<br>{html.escape(str(r.get('origin', '')))}</td>"
                    f"{text}<td>{scores}</td></tr>")
    head = "<tr><th>id</th><th>instruction</th><th>input</th><th>output</th><th>scores</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def html_report(df: pd.DataFrame, stats: dict[str, Any], rank_by: str, n_examples: int, title: str) -> str:
    kept = df["keep"].to_numpy(dtype=bool)
    score_cols = _score_cols(df)
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
           f"<p>{len(df)} rows scored, <b>{int(kept.sum())} kept</b>, {int((~kept).sum())} dropped. "
           f"{_conversation_summary(df, kept)}</p>"]

    out.append("<h2>Drops per reason</h2><table><tr><th>reason</th><th>rows</th></tr>")
    for reason, count in sorted(stats.get("dropped", {}).items(), key=lambda kv: -kv[1]):
        out.append(f"<tr><td>{html.escape(reason)}</td><td class='num'>{count}</td></tr>")
    out.append("</table>")

    out.append("<h2>Score distributions</h2><p class='legend'><span class='k' style='background:#3a7bd5'></span>"
               "kept<span style='background:#e4a43a'></span>dropped</p><div class='grid'>")
    for col in score_cols:
        out.append(f"<div><h3>{html.escape(col)}</h3>"
                   f"{_svg(*_histogram(df[col].to_numpy(dtype=float), kept))}</div>")
    out.append("</div><h2>Score summary</h2><table><tr><th>score</th><th>rows</th><th>mean</th><th>min</th>"
               "<th>p10</th><th>p50</th><th>p90</th><th>max</th></tr>")
    for col, s in stats.get("scores", {}).items():
        cells = "".join(f"<td class='num'>{s.get(k, '')}</td>" for k in ("rows", "mean", "min", "p10", "p50",
                                                                          "p90", "max"))
        out.append(f"<tr><td>{html.escape(col)}</td>{cells}</tr>")
    out.append("</table>")

    if "dedup" in stats:
        d = stats["dedup"]
        out.append(f"<h2>Near-duplicates</h2><p>{d['clusters']} clusters holding {d['rows_in_clusters']} rows "
                   f"(largest {d['largest_cluster']}); LSH with {d['bands']} bands of {d['rows_per_band']}, "
                   f"{d['candidate_pairs']} candidate pairs, {d['linked_pairs']} linked.</p>")
        pairs = duplicate_pairs(df, n_examples)
        if pairs:
            out.append("<table><tr><th>dropped</th><th>kept instead</th></tr>")
            for dup, rep in pairs:
                out.append(f"<tr><td>{html.escape(str(dup['id']))}{_html_request(dup)}</td>"
                           f"<td>{html.escape(str(dup['duplicate_of']))}{_html_request(rep)}</td></tr>")
            out.append("</table>")
    if stats.get("judge_errors"):
        out.append("<h2>Judge answers without a rating</h2><table><tr><th>kind</th><th>rows</th></tr>")
        for kind, count in sorted(stats["judge_errors"].items()):
            out.append(f"<tr><td>{html.escape(kind)}</td><td class='num'>{count}</td></tr>")
        out.append("</table>")

    best, worst = examples(df, rank_by, n_examples)
    out.append(f"<h2>Best kept examples by {html.escape(rank_by)}</h2>{_example_rows(best, score_cols)}")
    out.append(f"<h2>Worst kept examples by {html.escape(rank_by)}</h2>{_example_rows(worst, score_cols)}")
    out.append("</body></html>")
    return "\n".join(out)


def _md_cell(text: Any, limit: int = 120) -> str:
    text = " ".join(_snippet(text).split())
    return (text[:limit] + "…" if len(text) > limit else text).replace("|", "\\|")


def _md_conversation(messages: list[dict[str, str]], limit: int = 120) -> str:
    """Every turn of a conversation in one table cell, each cut to `limit` characters."""
    return " ".join(f"**{ROLE_NAMES[m['role']]}:** {_md_cell(m['content'], limit)}" for m in messages)


def markdown_report(df: pd.DataFrame, stats: dict[str, Any], rank_by: str, n_examples: int, title: str) -> str:
    kept = df["keep"].to_numpy(dtype=bool)
    lines = [f"# {title}", "", f"{len(df)} rows scored, **{int(kept.sum())} kept**, {int((~kept).sum())} dropped.",
             _conversation_summary(df, kept), "", "## Drops per reason", "", "| reason | rows |", "|---|---|"]
    lines += [f"| {r} | {c} |" for r, c in sorted(stats.get("dropped", {}).items(), key=lambda kv: -kv[1])]
    lines += ["", "## Score summary", "", "| score | rows | mean | p10 | p50 | p90 |", "|---|---|---|---|---|---|"]
    for col, s in stats.get("scores", {}).items():
        lines.append(f"| {col} | {s.get('rows')} | {s.get('mean', '')} | {s.get('p10', '')} | {s.get('p50', '')} | "
                     f"{s.get('p90', '')} |")
    lines += ["", "## Histograms (█ kept, ░ dropped)", ""]
    for col in _score_cols(df):
        bars = _text_bars(*_histogram(df[col].to_numpy(dtype=float), kept, bins=10))
        lines += [f"**{col}**", "", "```", bars, "```", ""]
    if "dedup" in stats:
        d = stats["dedup"]
        lines += ["## Near-duplicates", "", f"{d['clusters']} clusters, {d['rows_in_clusters']} rows, largest "
                  f"{d['largest_cluster']}.", ""]
    best, worst = examples(df, rank_by, n_examples)
    for name, frame in (("Best", best), ("Worst", worst)):
        lines += [f"## {name} kept examples by {rank_by}", "", f"| id | {rank_by} | instruction | output |",
                  "|---|---|---|---|"]
        for _, r in frame.iterrows():
            messages = conversation_of(r)
            if messages:  # a conversation: all its turns under `instruction`, the count under `output`
                lines.append(f"| {r['id']} | {r[rank_by]:.3g} | {_md_conversation(messages)} | "
                             f"({turn_count(messages)} assistant turns) |")
            else:
                lines.append(f"| {r['id']} | {r[rank_by]:.3g} | {_md_cell(r['instruction'])} | "
                             f"{_md_cell(r['output'])} |")
        lines.append("")
    return "\n".join(lines)
