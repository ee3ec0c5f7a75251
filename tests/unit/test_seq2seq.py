"""Encoder-decoder models (T5 family) in the transformers backend and the training helpers: a tiny random T5
over the bundled Gemma tokenizer, built here (no hub)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.llm import seq2seq
from tasks.llm.base import GenerationParams
from tasks.llm.losses import DROPPED_PROMPT, DROPPED_TOO_LONG, IGNORE, TRUNCATED
from tasks.llm.transformers_backend import TransformersLLM, load_lm
from tasks.model_scores import deita_scores, ifd_scores
from tasks.prompts import alpaca_prompt

PROMPTS = ["Write a poem about the sea.", "Hi", "Explain how tides form, step by step, for a child of ten.",
           "Name three fruits.", "Translate 'good morning' into French, then into German.", "Why?"]
SEEDS = [11, 22, 33, 44, 55, 66]


def build_tiny_t5(tokenizer_dir: Path, out: Path, scale: float = 3.0) -> Path:
    """A randomly initialised 2+2-layer T5 over the Gemma tokenizer's 262K-token vocabulary, saved with the
    tokenizer in `out`. T5's decoder starts from the pad token (id 0 here, as in T5's own vocabulary); `</s>`
    is Gemma's `<eos>`; dropout is T5's (0.1). Its weights are drawn at `scale` times T5's scale. These tests
    take three: at T5's own, a random model decodes nearly the same tokens whatever its prompt, which would
    hide an encoder bug (3 of these tests' 6 prompts got distinct greedy texts, all 6 at this scale)."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=2, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id, initializer_factor=scale)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_t5_dir(gemma_tokenizer_dir, tmp_path_factory):
    return build_tiny_t5(gemma_tokenizer_dir, tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(scope="module")
def t5(tiny_t5_dir):
    return TransformersLLM(tiny_t5_dir, device="cpu", dtype="float32", batch_size=6)


def with_batch(llm: TransformersLLM, size: int, prompts, params, seeds=None):
    llm.batch_size = size
    try:
        return llm.generate(prompts, params, seeds=seeds)
    finally:
        llm.batch_size = 6


def hand_loss(llm: TransformersLLM, encoder: list[int], response: list[int]) -> float:
    """The model's own mean loss of one unpadded example: `model(input_ids, labels)`."""
    with torch.no_grad():
        return float(llm.model(input_ids=torch.tensor([encoder]), labels=torch.tensor([response])).loss)


def tokens(llm: TransformersLLM, text: str) -> list[int]:
    return llm.tokenizer(text, add_special_tokens=False)["input_ids"]


# ---- loading ---------------------------------------------------------------------------------------------------


def test_an_encoder_decoder_directory_loads_as_seq2seq(t5, tiny_t5_dir, tiny_model_dir):
    from transformers import T5ForConditionalGeneration

    assert seq2seq.is_encoder_decoder(tiny_t5_dir) and seq2seq.is_encoder_decoder(t5.model)
    assert not seq2seq.is_encoder_decoder(tiny_model_dir)  # the tiny Gemma: causal, loaded as before
    assert isinstance(t5.model, T5ForConditionalGeneration) and t5.encoder_decoder
    assert t5.tokenizer.padding_side == "right"
    assert type(load_lm(tiny_model_dir, torch.device("cpu"), torch.float32)).__name__ == "Gemma3ForCausalLM"


def test_a_model_whose_logits_the_losses_would_not_reproduce_is_refused(tiny_t5_dir):
    model = load_lm(tiny_t5_dir, torch.device("cpu"), torch.float32)
    seq2seq.check_output_layer(model)  # T5's own: accepted, in float32 and in bfloat16
    load_lm(tiny_t5_dir, torch.device("cpu"), torch.bfloat16)
    original = model.forward

    def with_another_bias(*args, **kwargs):  # an output layer with a term the losses do not know
        out = original(*args, **kwargs)
        out.logits = out.logits + torch.linspace(0, 1, out.logits.shape[-1])
        return out

    model.forward = with_another_bias
    with pytest.raises(ValueError, match="output layer is not the scaled linear layer"):
        seq2seq.check_output_layer(model)


# ---- generation ------------------------------------------------------------------------------------------------


def test_batched_greedy_generation_equals_one_prompt_at_a_time(t5):
    params = GenerationParams(max_new_tokens=10, temperature=0.0)
    whole = with_batch(t5, 6, PROMPTS, params)
    assert len({c.text for c in whole}) == len(PROMPTS)  # each prompt leads somewhere else
    assert with_batch(t5, 1, PROMPTS, params) == whole
    assert with_batch(t5, 4, PROMPTS[::-1], params)[::-1] == whole
    # Prompt tokens are the encoder's (Gemma's tokenizer adds <bos>); the decoder ran to the limit.
    assert [c.prompt_tokens for c in whole] == [len(t5.tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert {(c.finish_reason, c.completion_tokens) for c in whole} == {("length", 10)}
    # The same text as transformers' own generate on the prompt alone, unpadded.
    ids = t5.tokenizer(PROMPTS[2], return_tensors="pt")["input_ids"]
    out = t5.model.generate(input_ids=ids, max_new_tokens=10, do_sample=False)
    assert whole[2].text == t5.tokenizer.decode(out[0, 1:], skip_special_tokens=True)


@pytest.mark.parametrize("top_p", [0.9, 1.0])
def test_a_row_samples_the_same_text_in_any_batch(t5, top_p):
    params = GenerationParams(max_new_tokens=8, temperature=1.0, top_p=top_p, repetition_penalty=1.3)
    whole = with_batch(t5, 6, PROMPTS, params, SEEDS)
    assert with_batch(t5, 2, PROMPTS, params, SEEDS) == whole
    assert with_batch(t5, 6, PROMPTS[::-1], params, SEEDS[::-1])[::-1] == whole
    assert with_batch(t5, 1, PROMPTS, params, SEEDS) == whole
    assert [c.text for c in with_batch(t5, 6, PROMPTS, params, [s + 1 for s in SEEDS])] != [c.text for c in whole]
    # Alone in its batch, the seeded row draws what `do_sample=True` draws after torch.manual_seed(seed).
    assert t5.generate([PROMPTS[0]], params, seeds=[SEEDS[0]]) == t5.generate(
        [PROMPTS[0]], dataclasses.replace(params, seed=SEEDS[0]))


def test_a_stop_string_ends_the_decoder_at_the_token_that_completes_it(t5):
    prompt = PROMPTS[0]
    ids = t5.tokenizer(prompt, return_tensors="pt")["input_ids"]
    new = t5.model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)[0, 1:].tolist()
    decode = lambda n: t5.tokenizer.decode(new[:n], skip_special_tokens=True)  # noqa: E731
    # The first token (past the first) whose text is new in the completion so far: stop there.
    k = next(k for k in range(1, len(new)) if (piece := decode(k + 1)[len(decode(k)):]).strip()
             and decode(k + 1).find(piece) == len(decode(k)))
    stop = decode(k + 1)[len(decode(k)):]
    got = t5.generate([prompt, PROMPTS[1]], GenerationParams(max_new_tokens=12, stop=(stop,)))[0]
    assert (got.text, got.finish_reason, got.completion_tokens) == (decode(k), "stop", k + 1)
    assert got.prompt_tokens == ids.shape[1]


# ---- log-probabilities for the scorers ---------------------------------------------------------------------------


def test_response_losses_equal_the_models_own_loss(t5):
    prompts = ["Say something kind.", "", "A much longer prompt that makes the encoder batch need padding."]
    responses = ["You did well today.", "Plain text alone.", "Yes."]
    got = t5.response_losses(prompts, responses, max_length=128)
    # No prompt: the encoder reads the tokenizer's encoding of "" (<bos> for Gemma's tokenizer).
    assert seq2seq.encoder_ids(t5.tokenizer, [""]) == [[t5.tokenizer.bos_token_id]]
    expected = [hand_loss(t5, t5.tokenizer(p)["input_ids"], tokens(t5, r)) for p, r in zip(prompts, responses)]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert np.isnan(t5.response_losses(["x"], ["   "], max_length=64)[0])


def test_each_side_holds_max_length_tokens(t5):
    response = "one two three four five six seven eight nine ten eleven twelve"
    long_prompt = "Please answer the following question with great care and in full detail."
    n_prompt, n_response = len(t5.tokenizer(long_prompt)["input_ids"]), len(tokens(t5, response))
    limit = 6
    assert n_response > limit and n_prompt > limit
    prompts, responses = ["Count.", long_prompt, ""], [response, "Yes.", response]
    assert t5.truncations(prompts, responses, limit) == [TRUNCATED, DROPPED_PROMPT, TRUNCATED]
    got = t5.response_losses(prompts, responses, limit)
    head = tokens(t5, response)[:limit]  # the same head with or without the prompt
    assert got[0] == pytest.approx(hand_loss(t5, t5.tokenizer("Count.")["input_ids"], head), rel=1e-5)
    assert np.isnan(got[1])
    assert got[2] == pytest.approx(hand_loss(t5, [t5.tokenizer.bos_token_id], head), rel=1e-5)
    # room_from changes nothing: the decoder's room does not depend on the encoder's prompt.
    np.testing.assert_array_equal(t5.response_losses(["", ""], [response] * 2, limit, room_from=prompts[:2]),
                                  [got[2], got[2]])


def test_next_token_logprobs_are_the_decoders_first_token(t5):
    prompts = ["Is it classification? ", "A longer prompt, so that the batch is padded. Rating: "]
    got = t5.next_token_logprobs(prompts, [" Yes", " No"])
    ids = [tokens(t5, " Yes")[0], tokens(t5, " No")[0]]
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            out = t5.model(input_ids=t5.tokenizer(prompt, return_tensors="pt")["input_ids"],
                           decoder_input_ids=torch.tensor([[t5.model.config.decoder_start_token_id]]))
        np.testing.assert_allclose(got[row], torch.log_softmax(out.logits[0, 0], -1)[ids].numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="distinct tokens"):
        t5.next_token_logprobs(["Rating:"], ["10", "1"])


def test_ifd_deita_and_the_classification_threshold_run_on_t5(t5):
    from tasks.self_instruct import classification_threshold

    instructions, inputs, outputs = ["Name a color.", "Sort the numbers."], ["", "3, 1, 2"], ["Blue.", "1, 2, 3"]
    ifd, cond, direct, cut = ifd_scores(instructions, inputs, outputs, t5, max_length=128)
    assert ifd.shape == cond.shape == direct.shape == (2,) and np.isfinite(ifd).all() and cut == [None, None]
    assert cond[0] == pytest.approx(hand_loss(t5, t5.tokenizer(alpaca_prompt("Name a color."))["input_ids"],
                                              tokens(t5, "Blue.")), rel=1e-5)
    assert direct[0] == pytest.approx(hand_loss(t5, [t5.tokenizer.bos_token_id], tokens(t5, "Blue.")), rel=1e-5)
    np.testing.assert_allclose(ifd, cond / direct)
    complexity, quality = deita_scores(instructions, inputs, outputs, t5)
    assert complexity.shape == quality.shape == (2,)
    assert ((complexity >= 1) & (complexity <= 6) & (quality >= 1) & (quality <= 6)).all()
    seed_rows = [{"instruction": f"Task {i}: is this {w}?", "is_classification": i % 2 == 0}
                 for i, w in enumerate(["spam", "long", "red", "odd", "true", "big"])]
    threshold = classification_threshold(t5, [("Is this spam?", True), ("Write a poem.", False)], seed_rows)
    assert isinstance(threshold, float) and np.isfinite(threshold)


# ---- training helpers ------------------------------------------------------------------------------------------


def test_examples_put_the_prompt_in_the_encoder_and_count_truncations(t5):
    tok = t5.tokenizer
    long_input = " ".join(["word"] * 40)
    rows = (["Name a color.", "Summarise the text.", "Count."], ["", long_input, ""],
            ["Blue.", "Short.", " ".join(str(i) for i in range(30))])
    # 48 tokens a side: the Alpaca prompts of 1 and 3 fit (33 and 31 tokens), that of 2 does not (88); the
    # response of 3 (79 tokens) does not.
    examples, kept, reasons = seq2seq.encode_rows(tok, *rows, max_length=48)
    assert kept.tolist() == [0, 2]
    assert reasons == {DROPPED_PROMPT: 1, TRUNCATED: 1}
    assert examples[0].encoder_ids == tok(alpaca_prompt("Name a color."))["input_ids"]
    assert examples[0].labels == tokens(t5, "Blue.") + [tok.eos_token_id]  # the response and <eos>, nothing else
    assert examples[1].encoder_ids == tok(alpaca_prompt("Count."))["input_ids"]  # the prompt whole
    assert examples[1].labels == tokens(t5, rows[2][2])[:48]  # the head; no <eos>
    _, kept, reasons = seq2seq.encode_rows(tok, *rows, max_length=48, truncation="drop")
    assert kept.tolist() == [0] and reasons == {DROPPED_PROMPT: 1, DROPPED_TOO_LONG: 1}
    lengths, trainable = seq2seq.token_counts(examples)
    assert trainable.tolist() == [len(ex.labels) for ex in examples]
    assert lengths.tolist() == [len(ex.encoder_ids) + len(ex.labels) for ex in examples]


def test_a_batch_has_labels_on_response_tokens_only_and_the_models_loss(t5):
    examples, _, _ = seq2seq.encode_rows(t5.tokenizer, ["Name a color.", "Write a haiku about autumn leaves."],
                                         ["", ""], ["Blue.", "Leaves fall softly down"], max_length=64)
    batch = seq2seq.collate(examples, t5.tokenizer.pad_token_id)
    short = len(examples[0].labels)
    assert batch["labels"][0, :short].tolist() == examples[0].labels
    assert (batch["labels"][0, short:] == IGNORE).all()
    n, width = len(examples[0].encoder_ids), len(examples[1].encoder_ids)  # the shorter prompt is padded at the end
    assert n < width and batch["attention_mask"][0].tolist() == [1] * n + [0] * (width - n)
    assert batch["input_ids"][0, :n].tolist() == examples[0].encoder_ids
    shifted = t5.model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    assert shifted[0, :short + 1].tolist() == [t5.model.config.decoder_start_token_id] + examples[0].labels
    with torch.no_grad():
        sums, counts = seq2seq.token_losses(t5.model, batch, chunk=3)  # several output-layer chunks
        mean = float(t5.model(**batch).loss)
    assert counts.tolist() == [len(ex.labels) for ex in examples]
    assert float(sums.sum() / counts.sum()) == pytest.approx(mean, rel=1e-5)
    for row, ex in enumerate(examples):
        assert float(sums[row] / counts[row]) == pytest.approx(hand_loss(t5, ex.encoder_ids, ex.labels), rel=1e-5)


def test_checkpointed_chunks_give_the_models_gradients_and_training_lowers_the_loss(tiny_t5_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_t5_dir)
    model = load_lm(tiny_t5_dir, torch.device("cpu"), torch.float32).eval()  # no dropout: exact comparison
    examples, _, _ = seq2seq.encode_rows(tok, ["Name a color.", "Add 2 and 2.", "Greet me.", "Say no."],
                                         ["", "", "", ""], ["Blue.", "4", "Hello there, friend.", "No."], 64)
    batch = seq2seq.collate(examples, tok.pad_token_id)
    total, count = seq2seq.batch_loss(model, batch, chunk=4)
    (total / count).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(**batch).loss.backward()
    for name, param in model.named_parameters():  # the same up to float32 rounding in sums of large terms
        assert float((ours[name] - param.grad).abs().max()) <= 1e-5 * float(param.grad.abs().max()), name
    model.zero_grad()

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        total, count = seq2seq.batch_loss(model, batch)
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(total.detach()) / count)
    assert losses[-1] < losses[0] - 0.1, losses


def test_chat_templates_are_refused_by_their_key():
    with pytest.raises(ValueError, match=r"finetune.template: `chat`.*set `finetune.template: alpaca`"):
        seq2seq.check_finetune_settings(template="chat")
    seq2seq.check_finetune_settings(template="alpaca")
