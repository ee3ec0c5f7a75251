"""Packed training: the chunked linear cross-entropy, first-fit packing, and losses equal to unpacked ones."""

import pytest
import torch

from tasks.llm.losses import (IGNORE, collate, linear_cross_entropy, make_example, pack, packed_batch,
                              packed_example_losses, packed_loss, stack_rows, token_losses)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_linear_cross_entropy_matches_autograd(softcap, weight_grad):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=weight_grad)
    targets = torch.randint(0, 50, (37,))
    (linear_cross_entropy(hidden, weight, targets, chunk=8, softcap=softcap) * 0.5).backward()
    ours = hidden.grad.clone(), (weight.grad.clone() if weight_grad else None)
    hidden.grad = None
    weight.grad = None
    logits = hidden @ weight.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    reference = torch.nn.functional.cross_entropy(logits, targets, reduction="sum") * 0.5
    reference.backward()
    torch.testing.assert_close(ours[0], hidden.grad, rtol=1e-4, atol=1e-5)
    if weight_grad:
        torch.testing.assert_close(ours[1], weight.grad, rtol=1e-4, atol=1e-5)
    else:
        assert weight.grad is None


def test_pack_first_fit_decreasing():
    assert pack([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    with pytest.raises(ValueError, match="example 1 has 9 tokens"):
        pack([3, 9], 8)


def test_packed_batch_restarts_positions_and_masks_the_tail():
    a = make_example([2, 10, 11], [12, 1], 16)
    b = make_example([2, 20], [21, 1], 16)
    assert make_example([2, 10, 11], [12, 13, 14, 1], 5).input_ids == [2, 10, 11, 12, 13]  # prompt whole, no EOS
    assert make_example([2, 10, 11, 12, 13], [14, 1], 5) is None  # the prompt leaves no room
    batch = packed_batch([a, b], pad_id=0, width=12)
    assert batch["input_ids"].tolist() == [[2, 10, 11, 12, 1, 2, 20, 21, 1, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]]
    assert batch["labels"].tolist() == [[IGNORE] * 3 + [12, 1] + [IGNORE] * 2 + [21, 1] + [IGNORE] * 3]


def test_packed_losses_equal_unpacked_ones(tiny_model_dir):
    """The same examples, padded one per row or packed several per row (one of them longer than the tiny
    model's sliding window): the same per-example losses, and the same summed training loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    texts = [("Say hi.", "Hello there, friend."), ("Add 2 and 3.", "Five."), ("Q", "A"),
             ("List colors.", " ".join(["red, green and blue"] * 20))]  # 80+ tokens > sliding window 64
    examples = [make_example(tok(p)["input_ids"], tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                             256) for p, r in texts]
    with torch.no_grad():
        sums, counts = token_losses(model, collate(examples, tok.pad_token_id))
        unpacked = (sums / counts).tolist()
        packed = packed_example_losses(model, examples, tok.pad_token_id)
        width = max(len(e.input_ids) for e in examples) + 4  # the long one alone, the three others together
        rows = [packed_batch([examples[i] for i in r], tok.pad_token_id, width)
                for r in pack([len(e.input_ids) for e in examples], width)]
        total, tokens = packed_loss(model, stack_rows(rows), chunk=7)
    assert packed == pytest.approx(unpacked, abs=1e-4)
    assert float(total) == pytest.approx(float(sums.sum()), rel=1e-5) and int(tokens) == int(counts.sum())
    assert len(rows) == 2 and len(examples[3].input_ids) > 64  # really packed; past the sliding window


def test_pack_takes_the_row_with_least_room_that_fits():
    # In order (not decreasing): 6 -> row 0 (room 4), 7 -> row 1 (room 3), 3 goes where it fits best (row 1,
    # room 3; first fit would take row 0), then 4 fills row 0.
    assert pack([6, 7, 3, 4], 10, decreasing=False) == [[0, 3], [1, 2]]
    assert pack([], 10) == []


def test_pack_places_every_example_once_and_fills_rows_at_scale():
    import numpy as np

    lengths = np.clip(np.random.default_rng(0).lognormal(5.3, 0.8, 200_000).astype(int), 20, 2048)
    for decreasing in (True, False):
        rows = pack(lengths, 2048, decreasing=decreasing)
        flat = np.concatenate([np.asarray(r) for r in rows])
        assert np.array_equal(np.sort(flat), np.arange(len(lengths)))
        assert all(lengths[r].sum() <= 2048 for r in rows)
        assert lengths.sum() / (len(rows) * 2048) > 0.99  # fewer than 1% of a row's places left empty
