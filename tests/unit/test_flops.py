"""tasks/flops.py: hand-computed counts on a tiny config, and the same count reconciled with torch's
FlopCounterMode over a real forward and backward of a tiny Gemma 3 through the stage's own loss."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tasks.finetune import batch_loss, micro_batch
from tasks.flops import attention_pairs, causal_pairs, mfu, model_flops_per_token, model_shape, training_flops
from tasks.llm.losses import IGNORE, Example

# d 8, 2 layers (sliding window 4, then full), 2 query heads and 1 key/value head of 4, MLP 16, vocabulary 32.
TINY = SimpleNamespace(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                       intermediate_size=16, vocab_size=32, sliding_window=4,
                       layer_types=["sliding_attention", "full_attention"])


def test_hand_computed_counts():
    # Per layer: q, k, v, o = 8 x 4 x (2 + 1 + 1 + 2) = 192; gate, up, down = 3 x 8 x 16 = 384.
    assert model_shape(TINY).matmul_params == 2 * 576
    # Examples of 3 and 6 tokens. Full layer: 6 + 21 pairs. Sliding layer: 6, and 1+2+3+4+4+4 = 18.
    assert causal_pairs([3, 6]) == 27
    assert causal_pairs([3, 6], window=4) == 24
    assert attention_pairs(TINY, [3, 6]) == 51
    # 6 N T + 12 H h P + 4 d V R, 4 response tokens; 2 d V R more when the head is trained.
    assert training_flops(TINY, 9, 4, 51) == 6 * 1152 * 9 + 12 * 2 * 4 * 51 + 4 * 8 * 32 * 4 == 71200
    assert training_flops(TINY, 9, 4, 51, head_trained=True) == 71200 + 2 * 8 * 32 * 4
    assert model_flops_per_token(TINY, 9, 4, 51) == pytest.approx(71200 / 9)
    assert mfu(71200, 2.0, 1e4) == pytest.approx(3.56)


def test_pairs_add_up_and_windows_cap_them():
    assert causal_pairs([]) == 0
    assert causal_pairs([1, 1, 1]) == 3
    assert causal_pairs([2, 5]) + causal_pairs([7]) == causal_pairs([2, 5, 7])
    assert causal_pairs([100], window=100) == causal_pairs([100])
    assert causal_pairs([101], window=100) == causal_pairs([100]) + 100
    no_window = SimpleNamespace(**{**vars(TINY), "sliding_window": None, "layer_types": None})
    assert attention_pairs(no_window, [3, 6]) == 2 * 27


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="response_tokens <= tokens"):
        training_flops(TINY, 3, 4, 0)
    with pytest.raises(ValueError, match="chunked_attention"):
        model_shape(SimpleNamespace(**{**vars(TINY), "layer_types": ["chunked_attention", "full_attention"]}))
    with pytest.raises(ValueError, match="intermediate_size"):
        model_shape(SimpleNamespace(**{k: v for k, v in vars(TINY).items() if k != "intermediate_size"}))
    with pytest.raises(ValueError, match="seconds"):
        mfu(1.0, 0.0, 1e12)


def test_gemma3_270m_counts_its_decoder_linears_and_not_its_embedding():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512)
    with torch.device("meta"):
        model = Gemma3ForCausalLM(config)
    linears = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert model_shape(config).matmul_params == linears == 100_270_080
    assert model.get_input_embeddings().weight.numel() == 262144 * 640  # 168M, tied: not in 6 N
    # 15 of 18 layers slide over 512 tokens: an example of 1024 tokens needs 3 x 524,800 + 15 x 393,472 pairs.
    assert attention_pairs(config, [1024]) == 3 * 1024 * 1025 // 2 + 15 * (512 * 513 // 2 + 512 * 512)


# A real forward and backward through the stage's loss (tasks.finetune.batch_loss), counted by torch.

def tiny_gemma(attn: str, head_trained: bool):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=8,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                              max_position_embeddings=256, pad_token_id=0)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM._from_config(config, attn_implementation=attn)
    model.get_input_embeddings().weight.requires_grad_(head_trained)  # tied: the output layer's weight too
    return model


def example(n: int, prompt: int, start: int) -> Example:
    ids = [(start + 7 * i) % 500 + 5 for i in range(n)]
    return Example(ids, [IGNORE] * prompt + ids[prompt:])


EXAMPLES = [example(10, 4, 1), example(20, 12, 2), example(7, 2, 3), example(16, 9, 4), example(5, 1, 5)]


def counted(model, batch, packing: bool) -> tuple[int, int, int]:
    """FlopCounterMode's matmul (aten.mm) and attention (aten.bmm) FLOPs of one training step, and its total."""
    model.zero_grad(set_to_none=True)
    counter = FlopCounterMode(display=False)
    with counter:
        total, _ = batch_loss(model, batch, packing, chunk=16)
        total.backward()
    ops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return ops.pop("aten.mm", 0), ops.pop("aten.bmm", 0), counter.get_total_flops()


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("head_trained", [False, True], ids=["frozen_head", "trained_head"])
def test_flop_counter_reconciles_with_the_count(packing, head_trained):
    """Eager attention shows its matmuls to the counter. It computes every query-key pair of a row (masked ones
    included) and every position (padding included); the count credits only the real tokens and the pairs the
    model needs. So counter = count + exactly that waste, and nothing else is missing on either side."""
    model = tiny_gemma("eager", head_trained)
    rows = [[0, 1], [2, 3, 4]] if packing else [[i] for i in range(len(EXAMPLES))]
    batch = micro_batch(EXAMPLES, rows, packing, pad_id=0)
    n_rows, width = batch["input_ids"].shape
    lengths = [len(ex.input_ids) for ex in EXAMPLES]
    response = sum(ex.trainable_tokens for ex in EXAMPLES)
    config, shape = model.config, model_shape(model.config)

    matmuls, attention, total = counted(model, batch, packing)
    flops = training_flops(config, sum(lengths), response, attention_pairs(config, lengths), head_trained)
    pad_tokens = n_rows * width - sum(lengths)
    masked_pairs = shape.layers * n_rows * width * width - attention_pairs(config, lengths)
    waste = 6 * shape.matmul_params * pad_tokens + 12 * shape.heads * shape.head_dim * masked_pairs
    assert pad_tokens > 0 and masked_pairs > 0  # the check covers both kinds of waste
    assert total == matmuls + attention
    assert total == flops + waste
    # Term by term: the output layer at response positions only, 4 or 6 d V each; 12 H h per computed pair.
    head = (6 if head_trained else 4) * shape.hidden_size * shape.vocab_size * response
    assert matmuls == 6 * shape.matmul_params * n_rows * width + head
    assert attention == 12 * shape.heads * shape.head_dim * shape.layers * n_rows * width * width


def test_flop_counter_agrees_on_unpadded_rows_with_sdpa():
    """The repo's CPU path (SDPA): torch counts no FLOPs for CPU SDPA, so the matmuls are compared; a packed
    row without a padded tail does exactly the count's non-attention work."""
    model = tiny_gemma("sdpa", head_trained=False)
    batch = micro_batch(EXAMPLES, [[0, 1, 2, 3, 4]], True, pad_id=0)
    lengths = [len(ex.input_ids) for ex in EXAMPLES]
    assert batch["input_ids"].shape == (1, sum(lengths))
    matmuls, attention, total = counted(model, batch, packing=True)
    flops = training_flops(model.config, sum(lengths), sum(ex.trainable_tokens for ex in EXAMPLES), 0)
    assert attention == 0 and total == matmuls == flops
