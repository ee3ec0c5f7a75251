"""Benchmark: N instruction rows through seeds -> quality -> mix with every export, as a user runs them.
Prints one JSON object.

    python benchmarks/data_scale.py [--rows 500000] [--seed 0] [--workdir DIR] [--reference HEAD]
                                    [--skip-training-data] [--keep]

1. Data (`data`): `--rows` synthetic instruction rows written as one Parquet file (row groups of 50K), with a
   fixed seed. Words come from a 20K-word vocabulary of made-up syllable words drawn Zipf-like (a few
   accented and CJK words among them, so the exports carry unicode); 12 task categories in Alpaca/FLAN
   proportions (open_qa ... coding); instruction 5-60 words (log-normal, median 12), input empty in 60% of
   rows, else 5-200 words (median 25), output 1-600 words (log-normal, median 50, long tail), a quarter of
   the output's words taken from its instruction (so `relevance` varies), one output in twenty without a
   final stop (so `format` varies), 2% starting with a leftover "### Response:" marker, 0.5% naming a
   weapon (`unsafe`), some outputs on several lines, quotes in some inputs. 5% of the rows are planted
   near-duplicates: a copy of another row with k% of its words replaced, k in 2, 5, 10, 20, 40 (a fifth
   each); at 3-word shingles their Jaccard similarity to the original is about 0.89, 0.75, 0.57, 0.34 and
   0.12, so the first lie above the 0.7 threshold, the second straddles it, the rest are below. There is no
   `source` column: the mix's sources are the categories (`mix.source_by`, the default).
2. Stages (`stages`): each stage run by `tasks.stages.execute(stage, cfg, inputs)`, exactly as the flow
   runs it, each in its own child process so its peak RSS (the child's VmHWM, imports included) is its
   own: seeds (format `table`) -> self_instruct and evol_instruct (both disabled: rows pass through) ->
   quality (heuristics and MinHash dedup; judge, DEITA and IFD off) -> mix (configs/default.yaml's
   temperature mix with `mix.total` null, so every kept row is drawn and exported, in all five formats).
   The config is configs/default.yaml with those overrides and `run.artifacts_dir` in the work directory.
   Per stage: `seconds` (the stage's own time from its stats.json), `wall_s` (the child process, imports and
   artifact hashing included), `peak_rss_mb`, `rows_in`, `rows_out`.
3. Targets (`targets`): seeds -> quality -> mix with all exports within 3 minutes in all (`met` judges the
   stages' wall time: their child processes, imports and artifact hashing included), peak RSS within 6 GB
   (the largest stage's).
4. Training data (`training_data`): the finetune stage's data path on the mix's train split, with
   configs/gpu.yaml's `max_length` (1024) and `row_tokens` (2048), in a child process: tokenize into token
   arrays (tasks/tokenized.py, the bundled Gemma tokenizer), then plan one epoch (`finetune.plan_steps`:
   shuffle, best-fit packing, micro-batches); `pack_s` is the packing alone. Then the same in a second
   process, as a second epoch's or a resumed run's would be: it finds the arrays (`reused`) and tokenizes
   nothing. Targets: tokenize + pack within 3 minutes, peak RSS within 4 GB, packing within 10 s. The
   reference (`--skip-training-reference` leaves it out): `datasets.Dataset.map(batched=True)` with the
   same tokenizer calls into its Arrow cache, then TRL's `pack_dataset(strategy="bfd")`, the way
   `SFTTrainer` prepares packed data (trl installed once, without dependencies, under
   ~/.cache/instructflow/bench-venvs/). `--skip-training-data` leaves the section out.
5. References (`reference`): `code`: with `--reference REV`, the same stages on the same file with the
   code of git revision REV (exported with `git archive` into the work directory; nothing in this checkout
   changes), and `same_output`: whether the quality and mix artifacts hold the same table (columns both
   have). `jsonl_export`: what a user would otherwise write for one export, pandas
   `DataFrame.to_json(orient="records", lines=True)` of the train split's Alpaca columns, beside our
   `messages` export of the same split. For MinHash against datasketch see benchmarks/quality.py.

Measured at 500K rows on 2 cores (AMD EPYC) shared with other jobs (1-minute load average about 2), so every
figure is inflated by a varying amount; `--reference HEAD` at 97cbe10 (quality, mix, exports and dedup as
before they went column-wise): quality 11.7 s and 2.2 GB peak (before: 19.6 s, 3.5 GB), mix with all
exports 17.0 s and 1.9 GB (before: 51.6 s, 4.1 GB; 2.3 GB of exports), the same quality and mix tables;
seeds -> mix 37 s of stage time, 64 s of child processes with their imports (target 180 s), peak 2.2 GB
(target 6 GB). 20K rows: quality 1.2 s, mix 0.8 s. One JSON-lines file of the 440K-row train split: ours
4.4 s, pandas' to_json 13.5 s. Generating the 500K rows takes 18 s (not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent

TARGETS = {"seconds": 180.0, "peak_rss_gb": 6.0}
STAGE_ORDER = ("seeds", "self_instruct", "evol_instruct", "quality", "mix")
INPUT_OF = {"self_instruct": "seeds", "evol_instruct": "self_instruct", "quality": "evol_instruct", "mix": "quality"}

# Alpaca/FLAN-like task types and their shares (Dolly's categories with a few FLAN ones added).
CATEGORIES = {"open_qa": 0.18, "brainstorming": 0.10, "classification": 0.11, "closed_qa": 0.09,
              "generation": 0.14, "information_extraction": 0.07, "summarization": 0.07, "rewriting": 0.06,
              "math": 0.05, "reasoning": 0.05, "coding": 0.05, "translation": 0.03}
LEADS = {"open_qa": "What", "brainstorming": "List", "classification": "Classify", "closed_qa": "Answer",
         "generation": "Write", "information_extraction": "Extract", "summarization": "Summarize",
         "rewriting": "Rewrite", "math": "Compute", "reasoning": "Explain", "coding": "Implement",
         "translation": "Translate"}
DUP_SHARE = 0.05
DUP_CHANGED = (0.02, 0.05, 0.10, 0.20, 0.40)  # share of a planted copy's words replaced
CHUNK = 50_000


# --- 1. data ------------------------------------------------------------------------------------------------

def vocabulary(size: int, rng: np.random.Generator) -> pa.Array:
    """Distinct made-up words of 1-4 syllables, with a few unicode words among them."""
    onsets = ["b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st", "tr", "ch", "sh"]
    syllables = np.array([c + v for c in onsets for v in ["a", "e", "i", "o", "u", "ai", "ou"]])
    special = ["café", "naïve", "über", "東京", "データ", "año", "smörgåsbord", "Zürich", "façade", "crème"]
    words: list[str] = []
    seen: set[str] = set(special)
    while len(words) < size - len(special):
        k = int(rng.integers(1, 5))
        w = "".join(rng.choice(syllables, k))
        if w not in seen:
            seen.add(w)
            words.append(w)
    words[50:50] = special  # fairly frequent, so many rows carry one
    return pa.array(words, pa.string())


def _lengths(rng: np.random.Generator, n: int, median: float, sigma: float, lo: int, hi: int) -> np.ndarray:
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(np.int64)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _gather(offsets: np.ndarray, words: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The word lists of `rows` (with repeats), as new offsets and words."""
    lengths = np.diff(offsets)[rows]
    new_offsets = _offsets(lengths)
    starts = np.repeat(offsets[rows] - new_offsets[:-1], lengths)
    return new_offsets, words[np.arange(new_offsets[-1]) + starts]


def _join(offsets: np.ndarray, words: np.ndarray, vocab: pa.Array) -> pa.Array:
    listed = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), vocab.take(pa.array(words)))
    return pc.binary_join(listed, " ")


def _chunk(start: int, m: int, rng: np.random.Generator, vocab: pa.Array, p_word: np.ndarray,
           categories: list[str], p_category: np.ndarray) -> tuple[pa.Table, dict[str, int]]:
    cat = rng.choice(len(categories), m, p=p_category)
    n_ins = _lengths(rng, m, 12, 0.6, 5, 60) - 1  # the leading verb is the first word
    n_inp = np.where(rng.random(m) < 0.6, 0, _lengths(rng, m, 25, 0.9, 5, 200))
    n_out = _lengths(rng, m, 50, 1.0, 1, 600)
    fields = {}
    for name, lengths in (("instruction", n_ins), ("input", n_inp), ("output", n_out)):
        offsets = _offsets(lengths)
        fields[name] = [offsets, rng.choice(len(vocab), offsets[-1], p=p_word)]
    # a quarter of the output's words come from the row's own instruction
    out_off, out_words = fields["output"]
    ins_off, ins_words = fields["instruction"]
    row = np.repeat(np.arange(m), n_out)
    take = rng.random(len(out_words)) < 0.25
    pick = ins_off[row[take]] + (rng.random(int(take.sum())) * n_ins[row[take]]).astype(np.int64)
    out_words[take] = ins_words[pick]

    # planted near-duplicates: copies of other rows of the chunk, k% of their words replaced
    n_dup = int(round(DUP_SHARE * m))
    dup_rows = rng.choice(m, n_dup, replace=False)
    originals = np.setdiff1d(np.arange(m), dup_rows)
    source = np.arange(m)
    source[dup_rows] = rng.choice(originals, n_dup)
    changed = np.zeros(m)
    changed[dup_rows] = np.array(DUP_CHANGED)[np.arange(n_dup) % len(DUP_CHANGED)]
    for name in fields:
        offsets, words = _gather(*fields[name], source)
        per_word = np.repeat(changed, np.diff(offsets))
        swap = rng.random(len(words)) < per_word
        words[swap] = rng.choice(len(vocab), int(swap.sum()), p=p_word)
        fields[name] = [offsets, words]
    cat = cat[source]

    lead = pa.array([LEADS[c] for c in categories]).take(pa.array(cat))
    ending = pa.array(np.where(cat == categories.index("open_qa"), "?", "."))
    instruction = pc.binary_join_element_wise(lead, _join(*fields["instruction"], vocab), " ")
    instruction = pc.binary_join_element_wise(instruction, ending, "")
    input_text = _join(*fields["input"], vocab)
    quoted = rng.random(m) < 0.1  # some inputs hold quotes, as pasted text does
    input_text = pc.if_else(pa.array(quoted & (n_inp[source] > 0)),
                            pc.binary_join_element_wise("\"", input_text, "\" she said.", ""), input_text)
    output = _join(*fields["output"], vocab)
    lines = rng.random(m) < 0.15  # list-like answers: a line break after every eighth word
    output = pc.if_else(pa.array(lines), pc.replace_substring_regex(output, r"((?:\S+ ){8})", "\\1\n"), output)
    stop = pc.if_else(pa.array(rng.random(m) < 0.95), pa.scalar("."), pa.scalar(""))
    output = pc.binary_join_element_wise(output, stop, "")
    # what quality must catch: a leftover template marker (2%), an unsafe word (0.5%)
    flaw = rng.random(m)
    output = pc.if_else(pa.array(flaw < 0.02), pc.binary_join_element_wise("### Response:", output, "\n"), output)
    output = pc.if_else(pa.array((flaw >= 0.02) & (flaw < 0.025)),
                        pc.binary_join_element_wise(output, "It needs a weapon.", " "), output)
    ids = pa.array([f"row_{start + i:07d}" for i in range(m)])
    table = pa.table({"id": ids, "instruction": instruction, "input": input_text, "output": output,
                      "category": pa.array(categories).take(pa.array(cat)),
                      "is_classification": pa.array(cat == categories.index("classification"))})
    planted = {f"{int(k * 100)}pct_words_changed": int((changed == k).sum()) for k in DUP_CHANGED}
    return table, planted


def generate_rows(n: int, path: Path, seed: int = 0) -> dict[str, Any]:
    """Write `n` rows to `path` (Parquet); returns what they are."""
    rng = np.random.default_rng(seed)
    vocab = vocabulary(20_000, rng)
    p_word = 1.0 / (np.arange(len(vocab)) + 2.7)
    p_word /= p_word.sum()
    categories = list(CATEGORIES)
    p_category = np.array([CATEGORIES[c] for c in categories])
    planted: dict[str, int] = {}
    words = {"instruction": [], "input": [], "output": []}
    t0 = time.perf_counter()
    with pq.ParquetWriter(path, pa.schema([("id", pa.string()), ("instruction", pa.string()),
                                           ("input", pa.string()), ("output", pa.string()),
                                           ("category", pa.string()), ("is_classification", pa.bool_())])) as writer:
        for start in range(0, n, CHUNK):
            table, counts = _chunk(start, min(CHUNK, n - start), rng, vocab, p_word, categories,
                                   p_category / p_category.sum())
            writer.write_table(table)
            for key, value in counts.items():
                planted[key] = planted.get(key, 0) + value
            for name in words:
                count = np.asarray(pc.list_value_length(pc.utf8_split_whitespace(table[name])))
                words[name].append(np.where(np.asarray(pc.utf8_length(table[name])) == 0, 0, count))
    stats = {name: np.concatenate(v) for name, v in words.items()}
    return {
        "rows": n, "seed": seed, "path": str(path), "bytes": path.stat().st_size,
        "seconds": round(time.perf_counter() - t0, 2),
        "what": "synthetic instruction rows: made-up Zipf-drawn words, Alpaca/FLAN-like categories and lengths",
        "categories": CATEGORIES,
        "words": {name: {"mean": round(float(v.mean()), 1), "p50": int(np.median(v)), "p99": int(np.quantile(v, 0.99)),
                         "max": int(v.max()), "empty_share": round(float((v == 0).mean()), 3)}
                  for name, v in stats.items()},
        "planted_near_duplicates": {"share": DUP_SHARE, "by_words_changed": planted},
    }


# --- 2. stages ----------------------------------------------------------------------------------------------

def overrides(data: Path, workdir: Path) -> list[str]:
    return [f"run.artifacts_dir={workdir / 'artifacts'}", f"run.runs_dir={workdir / 'runs'}",
            f"seeds.path={data}", "seeds.format=table",
            "self_instruct.enabled=false", "evol_instruct.enabled=false",
            "quality.judge.enabled=false", "quality.deita.enabled=false", "quality.ifd.enabled=false",
            "mix.total=null"]


def child(stage: str, code: Path, overrides_json: str, inputs_json: str, result: Path) -> None:
    """One stage in this process (the child): run it as the flow does, write what it made to `result`."""
    sys.path.insert(0, str(code))
    os.chdir(code)
    from tasks.config import load_config
    from tasks.stages import execute

    cfg = load_config(code / "configs" / "default.yaml", json.loads(overrides_json))
    artifact = execute(stage, cfg, json.loads(inputs_json))
    result.write_text(json.dumps({"artifact": str(artifact.path), "peak_rss_kb": peak_rss_kb()}))


def peak_rss_kb() -> int:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries that over fork
    and exec, so a child would report at least its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_stage(stage: str, code: Path, over: list[str], inputs: dict[str, str], workdir: Path) -> dict[str, Any]:
    result = workdir / f".result-{stage}.json"
    result.unlink(missing_ok=True)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", stage, "--code", str(code),
                           "--overrides-json", json.dumps(over), "--inputs-json", json.dumps(inputs),
                           "--result", str(result)], cwd=code)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"stage {stage} failed (exit {done.returncode}); see its traceback above")
    made = json.loads(result.read_text())
    stats = json.loads((Path(made["artifact"]) / "stats.json").read_text())
    return {"artifact": made["artifact"], "seconds": stats["seconds"], "wall_s": round(wall, 2),
            "peak_rss_mb": round(made["peak_rss_kb"] / 1024), "rows_in": stats["rows_in"],
            "rows_out": stats["rows_out"], "dropped": stats.get("dropped", {})}


def run_stages(code: Path, data: Path, workdir: Path) -> dict[str, Any]:
    over = overrides(data, workdir)
    stages: dict[str, Any] = {}
    for stage in STAGE_ORDER:
        inputs = {INPUT_OF[stage]: stages[INPUT_OF[stage]]["artifact"]} if stage in INPUT_OF else {}
        stages[stage] = run_stage(stage, code, over, inputs, workdir)
        print(f"# {code.name} {stage}: {json.dumps(stages[stage])}", file=sys.stderr, flush=True)
    mix_dir = Path(stages["mix"]["artifact"])
    stages["mix"]["exports_mb"] = round(sum(p.stat().st_size for p in mix_dir.rglob("*") if p.is_file()
                                            and p.name not in ("data.parquet", "train.parquet", "eval.parquet"))
                                        / 2**20, 1)
    total_s = sum(s["seconds"] for s in stages.values())
    peak = max(s["peak_rss_mb"] for s in stages.values())
    return {"stages": stages, "total_seconds": round(total_s, 2),
            "total_wall_s": round(sum(s["wall_s"] for s in stages.values()), 2), "peak_rss_mb": peak,
            "mix_artifact": str(mix_dir)}


def targets(run: dict[str, Any]) -> dict[str, Any]:
    return {"seconds": {"target": TARGETS["seconds"], "measured": run["total_seconds"],
                        "measured_wall": run["total_wall_s"], "met": run["total_wall_s"] <= TARGETS["seconds"]},
            "peak_rss_gb": {"target": TARGETS["peak_rss_gb"], "measured": round(run["peak_rss_mb"] / 1024, 2),
                            "met": run["peak_rss_mb"] / 1024 <= TARGETS["peak_rss_gb"]}}


# --- 4. training data ---------------------------------------------------------------------------------------

TRAINING_TARGETS = {"seconds": 180.0, "peak_rss_gb": 4.0, "pack_seconds": 10.0}
TRL_VERSION = "1.16.0"


def prepare_child(mix_artifact: Path, workdir: Path, result: Path) -> None:
    """In this (child) process: the finetune stage's data path for configs/gpu.yaml's settings. Tokenize the
    mix's train split into token arrays (tasks/tokenized.py), then plan one epoch of packed steps
    (finetune.plan_steps: a fresh order, best-fit packing into `row_tokens` rows, micro-batches). A second
    call finds the arrays and tokenizes nothing."""
    sys.path.insert(0, str(ROOT))
    from tasks.config import load_config
    from tasks.finetune import plan_steps
    from tasks.llm.losses import pack
    from tasks.llm.models import resolve_model
    from tasks.llm.transformers_backend import load_tokenizer
    from tasks.tokenized import prepare

    cfg = load_config(ROOT / "configs" / "gpu.yaml", []).finetune
    model_dir = resolve_model("bundled")
    tokenizer = load_tokenizer(model_dir, padding_side="right")
    train = pq.read_table(mix_artifact / "train.parquet", columns=["id", "instruction", "input", "output"])
    t0 = time.perf_counter()
    examples, info = prepare(tokenizer, train, cfg.max_length, cfg.truncation, workdir / "tokenized", model_dir)
    tokenize_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    steps = plan_steps(examples.lengths, cfg.model_copy(update={"epochs": 1, "max_steps": None}), seed=0)
    plan_s = time.perf_counter() - t0
    order = np.random.default_rng(0).permutation(len(examples))
    t0 = time.perf_counter()
    rows = pack(examples.lengths[order], cfg.row_tokens, decreasing=False)
    pack_s = time.perf_counter() - t0
    result.write_text(json.dumps({
        "reused": info["reused"], "tokenize_s": round(tokenize_s, 2), "plan_epoch_s": round(plan_s, 2),
        "pack_s": round(pack_s, 3), "examples": len(examples), "tokens": int(examples.lengths.sum()),
        "truncation": examples.truncation, "packed_rows": len(rows), "steps_per_epoch": len(steps),
        "fill": round(float(examples.lengths.sum()) / (len(rows) * cfg.row_tokens), 4),
        "max_length": cfg.max_length, "row_tokens": cfg.row_tokens, "arrays_mb": round(
            sum(p.stat().st_size for p in Path(info["path"]).iterdir()) / 2**20, 1), "peak_rss_kb": peak_rss_kb()}))


def reference_child(mix_artifact: Path, workdir: Path, result: Path, trl_dir: Path) -> None:
    """What a good engineer would use instead: `datasets.Dataset.map(batched=True)` over the same rows with the
    same tokenizer calls (tasks.tokenized.encode, so the examples are identical), written to its Arrow cache,
    then TRL's `pack_dataset(strategy="bfd")` (best-fit decreasing, as SFTTrainer packs) into `row_tokens`."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(1, str(trl_dir))
    import datasets
    from trl.data_utils import pack_dataset

    from tasks.config import load_config
    from tasks.llm.models import resolve_model
    from tasks.llm.transformers_backend import load_tokenizer
    from tasks.tokenized import encode

    cfg = load_config(ROOT / "configs" / "gpu.yaml", []).finetune
    tokenizer = load_tokenizer(resolve_model("bundled"), padding_side="right")
    train = datasets.Dataset(pq.read_table(mix_artifact / "train.parquet", columns=["instruction", "input", "output"]))

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        enc = encode(tokenizer, batch["instruction"], batch["input"], batch["output"], cfg.max_length, cfg.truncation)
        kept = np.zeros(len(batch["instruction"]), dtype=bool)
        kept[enc.kept] = True
        ids = np.split(enc.tokens, np.cumsum(enc.lengths)[:-1]) if len(enc.lengths) else []
        out, k = {"input_ids": [], "prompt_tokens": []}, 0
        for row in range(len(kept)):  # datasets.map keeps one output row per input row unless told otherwise
            if kept[row]:
                out["input_ids"].append(ids[k].tolist())
                out["prompt_tokens"].append(int(enc.prompt[k]))
                k += 1
        return out

    cache = workdir / "reference-cache"
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    tokenized = train.map(tokenize, batched=True, batch_size=4096, remove_columns=train.column_names,
                          cache_file_name=str(cache / "tokenized.arrow"))
    tokenize_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    packed = pack_dataset(tokenized.select_columns(["input_ids"]), cfg.row_tokens, strategy="bfd",
                          map_kwargs={"cache_file_name": str(cache / "packed.arrow")})
    pack_s = time.perf_counter() - t0
    result.write_text(json.dumps({"tokenize_s": round(tokenize_s, 2), "pack_s": round(pack_s, 2),
                                  "examples": len(tokenized), "packed_rows": len(packed),
                                  "peak_rss_kb": peak_rss_kb()}))


def trl_package(cache: Path) -> Path:
    """TRL, installed once without its dependencies (this venv has them) beside the benchmark's other peers."""
    target = cache / f"trl-{TRL_VERSION}"
    if not (target / "trl").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        f"trl=={TRL_VERSION}"], check=True)
    return target


def _child_run(args: list[str], result: Path) -> tuple[dict[str, Any], float, float]:
    """Run this script with `args` in a child process; what it wrote, its wall seconds and peak RSS (GB)."""
    result.unlink(missing_ok=True)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args, "--result", str(result)], cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed (exit {done.returncode}); see its traceback above")
    made = json.loads(result.read_text())
    return made, time.perf_counter() - t0, made.pop("peak_rss_kb") / 2**20


def training_data(mix_artifact: Path, workdir: Path, reference: bool = True) -> dict[str, Any]:
    """Tokenize + pack one epoch of the mix's train split (a child process, its peak RSS its own), then the
    same again in a new process, as a second epoch's or a resumed run's process would: nothing is tokenized."""
    workdir.mkdir(parents=True, exist_ok=True)
    args = ["--prepare", str(mix_artifact), "--tokens-dir", str(workdir)]
    first, wall, rss = _child_run(args, workdir / ".prep.json")
    again, _, rss2 = _child_run(args, workdir / ".prep.json")
    ours = {**first, "wall_s": round(wall, 2), "peak_rss_gb": round(rss, 2),
            "second_process": {"reused": again["reused"], "prepare_s": again["tokenize_s"],
                               "plan_epoch_s": again["plan_epoch_s"], "peak_rss_gb": round(rss2, 2)}}
    prep_s = first["tokenize_s"] + first["plan_epoch_s"]
    out: dict[str, Any] = {
        "ours": ours,
        "targets": {"seconds": {"target": TRAINING_TARGETS["seconds"], "measured": round(prep_s, 2),
                                "met": prep_s <= TRAINING_TARGETS["seconds"]},
                    "peak_rss_gb": {"target": TRAINING_TARGETS["peak_rss_gb"], "measured": round(rss, 2),
                                    "met": rss <= TRAINING_TARGETS["peak_rss_gb"]},
                    "pack_seconds": {"target": TRAINING_TARGETS["pack_seconds"], "measured": first["pack_s"],
                                     "met": first["pack_s"] <= TRAINING_TARGETS["pack_seconds"]},
                    "second_epoch_or_resume_retokenizes_nothing": {"met": bool(again["reused"])}}}
    if reference:
        trl_dir = trl_package(Path.home() / ".cache" / "instructflow" / "bench-venvs")
        ref, ref_wall, ref_rss = _child_run(["--reference-prepare", str(mix_artifact), "--tokens-dir", str(workdir),
                                             "--trl", str(trl_dir)], workdir / ".ref.json")
        out["reference"] = {**ref, "wall_s": round(ref_wall, 2), "peak_rss_gb": round(ref_rss, 2),
                            "what": f"datasets.Dataset.map(batched=True, batch_size=4096) with the same tokenizer "
                                    f"calls into its Arrow cache, then trl {TRL_VERSION} pack_dataset(strategy='bfd') "
                                    f"(packs within each map batch of 1000 and writes the packed rows; ours plans "
                                    f"rows over the whole epoch and builds each row when its micro-batch is trained)"}
    return out


# --- 5. references ------------------------------------------------------------------------------------------

def export_code(rev: str, target: Path) -> Path:
    """The repository's files at git revision `rev`, unpacked into `target` (the checkout is untouched)."""
    target.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def jsonl_reference(mix_artifact: Path) -> dict[str, Any]:
    """One JSON-lines file of the train split two ways: ours (tasks/exports.py, format `messages`) and pandas'
    writer, `DataFrame.to_json(orient="records", lines=True)` of the Alpaca columns, each from train.parquet."""
    import pandas as pd

    sys.path.insert(0, str(ROOT))
    from tasks.exports import export_all

    with tempfile.TemporaryDirectory(dir=mix_artifact.parent) as tmp:
        t0 = time.perf_counter()
        train = pq.read_table(mix_artifact / "train.parquet")
        export_all({"train": train}, Path(tmp), ["messages"])
        ours_s = time.perf_counter() - t0
        ours_mb = (Path(tmp) / "train.messages.jsonl").stat().st_size / 2**20
        del train
        t0 = time.perf_counter()
        df = pq.read_table(mix_artifact / "train.parquet", columns=["instruction", "input", "output"]).to_pandas()
        df.to_json(Path(tmp) / "pandas.jsonl", orient="records", lines=True, force_ascii=False)
        pandas_s = time.perf_counter() - t0
        pandas_mb = (Path(tmp) / "pandas.jsonl").stat().st_size / 2**20
    return {"what": "the train split as one JSON-lines file: ours = tasks/exports.py format `messages`; "
                    "pandas = DataFrame.to_json(orient='records', lines=True) of its Alpaca columns "
                    f"(pandas {pd.__version__}); both read train.parquet first",
            "rows": len(df), "ours_s": round(ours_s, 2), "ours_mb": round(ours_mb, 1),
            "pandas_s": round(pandas_s, 2), "pandas_mb": round(pandas_mb, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory, removed after")
    ap.add_argument("--reference", default=None, help="git revision to run the same stages with (e.g. HEAD)")
    ap.add_argument("--skip-training-data", action="store_true")
    ap.add_argument("--skip-training-reference", action="store_true", help="ours only (no datasets.map + TRL run)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--code", type=Path, default=ROOT, help=argparse.SUPPRESS)
    ap.add_argument("--overrides-json", help=argparse.SUPPRESS)
    ap.add_argument("--inputs-json", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--reference-prepare", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--tokens-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--trl", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.code, args.overrides_json, args.inputs_json, args.result)
        return
    if args.prepare:
        prepare_child(args.prepare, args.tokens_dir, args.result)
        return
    if args.reference_prepare:
        reference_child(args.reference_prepare, args.tokens_dir, args.result, args.trl)
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="data_scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        data = workdir / f"rows-{args.rows}-seed{args.seed}.parquet"
        described = generate_rows(args.rows, data, args.seed)
        ours = run_stages(ROOT, data, workdir / "ours")
        out: dict[str, Any] = {"benchmark": "data_scale", "rows": args.rows, "data": described,
                               "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_end": None},
                               "stages": ours["stages"], "total_seconds": ours["total_seconds"],
                               "total_wall_s": ours["total_wall_s"], "peak_rss_mb": ours["peak_rss_mb"],
                               "targets": targets(ours), "mix_artifact": ours["mix_artifact"]}
        out["training_data"] = None if args.skip_training_data else training_data(
            Path(ours["mix_artifact"]), workdir / "training", reference=not args.skip_training_reference)
        reference: dict[str, Any] = {"jsonl_export": jsonl_reference(Path(ours["mix_artifact"]))}
        if args.reference:
            code = export_code(args.reference, workdir / f"code-{args.reference}")
            theirs = run_stages(code, data, workdir / "reference")
            commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", args.reference], check=True,
                                    capture_output=True, text=True).stdout.strip()
            reference["code"] = {"revision": args.reference, "commit": commit, **{k: theirs[k] for k in (
                "stages", "total_seconds", "total_wall_s", "peak_rss_mb")}}
            same = {}
            for name in ("quality", "mix"):
                a = pq.read_table(Path(ours["stages"][name]["artifact"]) / "data.parquet")
                b = pq.read_table(Path(theirs["stages"][name]["artifact"]) / "data.parquet")
                same[name] = a.select(sorted(set(a.column_names) & set(b.column_names))).equals(
                    b.select(sorted(set(a.column_names) & set(b.column_names))))
            reference["code"]["same_output"] = same
        out["reference"] = reference
        out["machine"]["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
        print(json.dumps(out, indent=1))
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
