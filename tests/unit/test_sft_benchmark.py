"""benchmarks/sft_throughput.py in its tiny CPU mode: the stage's packed loss, its padded loss and TRL's agree
per example, the padded baseline runs at the packed run's tokens per step, and every line says what it is."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--tiny", "--examples", "16", "--check-examples", "6", "--steps", "1", "--warmup", "0", "--rows", "2",
        "--row-tokens", "384"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("sft_throughput", ROOT / "benchmarks" / "sft_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(bench, gemma_tokenizer_dir):
    # A small run that still packs several examples per row and trains one step of each variant, with enough
    # examples per step (8) for a padded batch size to come within 10% of the packed real tokens.
    return bench.run(bench.parse_args(ARGS + ["--model", str(gemma_tokenizer_dir)]))


def test_same_examples_same_losses(report):
    check = report["loss_check"]
    assert check["trl_examples"] == check["trl_same_tokens"] == 16  # TRL tokenized and masked all as the stage does
    assert 6 <= check["examples"] == len(check["padded"]) == len(check["packed"]) == len(check["trl"]) < 16
    assert check["max_abs_diff_packed"] < 1e-4
    assert check["max_abs_diff_trl"] < 1e-4
    for padded, packed, trl in zip(check["padded"], check["packed"], check["trl"]):
        assert packed == pytest.approx(padded, abs=1e-4) and trl == pytest.approx(padded, abs=1e-4)
    assert 10 < check["mean_loss"] < 14  # a random model over 262K tokens: about ln(262144) = 12.5


def test_every_variant_counts_its_tokens_and_names_its_reference(bench, report):
    setup = report["setup"]
    assert setup["device"] == "cpu" and setup["examples"] == 16 and setup["matmul_params"] > 0
    lines = {line["variant"]: line for line in report["variants"]}
    assert list(lines) == bench.CPU_VARIANTS == ["padded_matched", "packed", "trl_packed"]
    for name, line in lines.items():
        assert "error" not in line, line
        assert line["reference"] == bench.REFERENCES[name] and line["reference"]
        assert line["steps"] == 1 and line["seconds"] > 0
        assert 0 < line["response_tokens_per_step"] < line["real_tokens_per_step"] <= line["computed_tokens_per_step"]
        assert line["real_tokens_per_s"] == pytest.approx(line["real_tokens_per_step"] / line["seconds"], rel=1e-2)
        assert line["flops_per_token"] > 0
        assert line["mfu"] is None and line["peak_mem_gb"] is None  # CPU: no peak to divide by
        assert 10 < line["mean_loss"] < 14
    packed, padded, trl = lines["packed"], lines["padded_matched"], lines["trl_packed"]
    assert packed["computed_tokens_per_step"] == 2 * 384  # fixed-width rows
    assert trl["computed_tokens_per_step"] == trl["real_tokens_per_step"]  # padding-free: one flattened row
    # The padded baseline runs at the packed run's real tokens per step, and pays for its padding.
    assert abs(padded["real_tokens_per_step"] - packed["real_tokens_per_step"]) <= 0.1 * packed["real_tokens_per_step"]
    assert padded["computed_tokens_per_step"] > padded["real_tokens_per_step"]


def test_flops_per_token_is_the_flops_module_count(bench, report, gemma_tokenizer_dir):
    """A packed step of the tiny model, counted by tasks/flops.py from its own figures, per real token."""
    from transformers import AutoTokenizer

    from tasks.flops import attention_pairs, training_flops

    args = bench.parse_args(ARGS)
    tokenizer = AutoTokenizer.from_pretrained(gemma_tokenizer_dir)
    exs = bench.examples(tokenizer, bench.seed_rows(args.examples), args.max_length)
    step = bench.packed_steps(exs, args.row_tokens, args.rows, tokenizer.pad_token_id)[0]
    config = bench.tiny_config(tokenizer)
    expected = training_flops(config, step.real, step.response, attention_pairs(config, step.lengths)) / step.real
    packed = next(line for line in report["variants"] if line["variant"] == "packed")
    assert packed["real_tokens_per_step"] == step.real
    assert packed["flops_per_token"] == round(expected)


def test_matched_batch_picks_the_closest_real_tokens_per_step(bench):
    from tasks.llm.losses import Example

    args = bench.parse_args(["--tiny", "--steps", "2", "--warmup", "0"])
    exs = [Example([1] * n, [-100] + [1] * (n - 1)) for n in (10, 30, 10, 30, 10, 30, 10, 30)]
    packed = [bench.Step({}, [40, 40], 0), bench.Step({}, [40, 40], 0)]  # 80 real tokens per step
    assert bench.matched_batch(exs, packed, args) == 4  # 10 + 30 + 10 + 30
