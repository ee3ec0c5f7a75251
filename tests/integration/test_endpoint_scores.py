"""DEITA and IFD over an endpoint: OpenAILLM's `next_token_logprobs`, `truncations` and `response_losses`
against the simulated endpoint answering with the tiny model's real log-probabilities (vLLM's legacy
completions format) give what TransformersLLM gives on the same model; a server without log-probabilities
fails naming itself; every request is counted in the backend's usage."""

import numpy as np
import pytest

from tasks import model_scores
from tasks.llm.losses import DROPPED_PROMPT, TRUNCATED
from tasks.llm.openai_backend import LLMRequestError, OpenAILLM
from tasks.llm.transformers_backend import TransformersLLM
from tasks.prompts import alpaca_prompt
from tests.simulated_endpoint import Profile, SimulatedEndpoint

FAST = dict(ttft_s=0.0, tokens_per_s=1e6)
STORY = "Once upon a time a dragon lived in a cave above the village, and every spring it flew over the hills. " * 3
# (prompt, response): fits; over-long at 64 tokens; a prompt that fills 64 tokens alone; an empty response; an
# empty prompt (the direct loss: after BOS alone); a response with surrounding spaces (stripped, as in process).
ROWS = [(alpaca_prompt("Name a color."), "Blue."),
        (alpaca_prompt("Tell a story."), STORY),
        (alpaca_prompt("Repeat: " + "word " * 40), "Fine."),
        (alpaca_prompt("Say nothing."), "   "),
        ("", "Plain text alone."),
        ("Say something kind.", "  You did well today. \n")]


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    return TransformersLLM(tiny_model_dir, device="cpu", dtype="float32", batch_size=2)


@pytest.fixture(scope="module")
def endpoint(tiny_model_dir):
    with SimulatedEndpoint(Profile(logprobs_model=tiny_model_dir, **FAST)) as ep:
        yield ep


def backend(url: str, **kwargs) -> OpenAILLM:
    return OpenAILLM("simulated", base_url=url, max_concurrency=4, backoff_base_s=0.01, backoff_max_s=0.05, **kwargs)


def test_losses_and_truncations_equal_the_in_process_backend(local, endpoint):
    tok = local.tokenizer
    prompts, responses = [p for p, _ in ROWS], [r for _, r in ROWS]
    # Over an endpoint the text is prompt + response; in process they are tokenized apart. These joins
    # tokenize the same either way (Gemma starts a token after "\n"), so the scores must be equal.
    for p, r in ROWS:
        apart = tok(p)["input_ids"] + tok(r.strip(), add_special_tokens=False)["input_ids"]
        assert tok(p + r.strip())["input_ids"] == apart
    llm = backend(endpoint.base_url)
    for max_length in (64, 256):
        cut = llm.truncations(prompts, responses, max_length)
        assert cut == local.truncations(prompts, responses, max_length)
        conditioned = llm.response_losses(prompts, responses, max_length)
        np.testing.assert_allclose(conditioned, local.response_losses(prompts, responses, max_length), rtol=1e-4)
        direct = llm.response_losses([""] * len(ROWS), responses, max_length, room_from=prompts)
        np.testing.assert_allclose(direct, local.response_losses([""] * len(ROWS), responses, max_length,
                                                                 room_from=prompts), rtol=1e-4)
        if max_length == 64:  # every case is met: cut, dropped for the prompt, no tokens
            assert cut[1] == TRUNCATED and cut[2] == DROPPED_PROMPT
            assert np.isnan(conditioned[[2, 3]]).all() and np.isfinite(conditioned[[0, 1, 4, 5]]).all()
            assert np.isnan(direct[[2, 3]]).all()  # the same rows: no room after the instruction, no tokens
    llm.close()


def test_next_token_logprobs_equal_the_in_process_backend(local, endpoint):
    prompts = [model_scores.DEITA_COMPLEXITY.format(query="Explain recursion."), "Is it spam? Answer:"]
    # A random model puts the score tokens anywhere in its 262K-token vocabulary: ask for the whole list.
    llm = backend(endpoint.base_url, top_logprobs=len(local.tokenizer))
    for candidates in (model_scores.SCORE_TOKENS, (" Yes", " No")):
        np.testing.assert_allclose(llm.next_token_logprobs(prompts, candidates),
                                   local.next_token_logprobs(prompts, candidates), rtol=1e-4)
    assert (llm.logprob_rows, llm.logprob_misses) == (4, 0)
    llm.close()


def test_a_candidate_outside_the_top_list_is_minus_inf_and_counted(local, endpoint):
    import torch

    tok, prompt = local.tokenizer, "Is it spam? Answer:"
    with torch.no_grad():
        ranked = local.model(**tok(prompt, return_tensors="pt")).logits[0, -1].argsort(descending=True).tolist()
    # Tokens whose text is theirs alone (the tokenizer gives them back for it): the likeliest and the least likely.
    own = [i for i in ranked[:20] + ranked[-20:] if tok(tok.decode([i]), add_special_tokens=False)["input_ids"] == [i]]
    first, far = tok.decode([own[0]]), tok.decode([own[-1]])
    assert ranked.index(own[0]) < 20 <= ranked.index(own[-1])
    llm = backend(endpoint.base_url, top_logprobs=20)
    got = llm.next_token_logprobs([prompt, prompt], [first, far])
    expected = local.next_token_logprobs([prompt], [first])[0, 0]
    assert got[:, 0] == pytest.approx([expected] * 2, rel=1e-4) and np.isneginf(got[:, 1]).all()
    assert (llm.logprob_rows, llm.logprob_misses) == (2, 2)
    # A candidate is one token's exact text: "1" is a Gemma token, " 1" is not (it is "▁" then "1"), so " 1"
    # is never found, even in the whole list; the in-process backend scores its first token, "▁".
    whole = backend(endpoint.base_url, top_logprobs=len(local.tokenizer))
    got = whole.next_token_logprobs([prompt], ["1", " 1"])
    assert np.isfinite(got[0, 0]) and np.isneginf(got[0, 1]) and whole.logprob_misses == 1
    with pytest.raises(ValueError, match="not distinct"):
        llm.next_token_logprobs([prompt], ["1", "1"])
    llm.close()
    whole.close()


def test_ifd_and_deita_are_the_same_through_either_backend_and_every_request_is_counted(local, endpoint):
    instructions = ["Name a color.", "Tell a story.", "Add the numbers.", "Say nothing."]
    inputs = ["", "", "2, 3", ""]
    outputs = ["Blue.", STORY, "5", ""]
    llm = backend(endpoint.base_url, top_logprobs=len(local.tokenizer))
    before = endpoint.stats()
    over_endpoint = model_scores.ifd_scores(instructions, inputs, outputs, llm, max_length=64)
    served = {k: endpoint.stats()[k] - before[k] for k in ("requests", "prompt_tokens")}
    in_process = model_scores.ifd_scores(instructions, inputs, outputs, local, max_length=64)
    for got, expected in zip(over_endpoint[:3], in_process[:3]):  # IFD, conditioned and direct losses
        np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert over_endpoint[3] == in_process[3] == [None, TRUNCATED, None, None]
    assert np.isnan(over_endpoint[0][3]) and np.isfinite(over_endpoint[0][:3]).all()
    # One request per text: prompt + output (for its truncation and its conditioned loss), the prompt alone
    # for the empty output (its token count), and each non-empty output alone (the direct loss).
    assert served["requests"] == 4 + 3 == llm.spend.requests
    assert served["prompt_tokens"] == llm.spend.prompt_tokens > 0 and llm.spend.completion_tokens == 0

    complexity, quality = model_scores.deita_scores(instructions, inputs, outputs, llm)
    expected = model_scores.deita_scores(instructions, inputs, outputs, local)
    np.testing.assert_allclose(complexity, expected[0], rtol=1e-4)
    np.testing.assert_allclose(quality, expected[1], rtol=1e-4)
    assert llm.spend.requests == 7 + 2 * len(instructions) and llm.spend.completion_tokens == 2 * len(instructions)
    llm.close()


def test_a_server_without_log_probabilities_fails_naming_it():
    with SimulatedEndpoint(**FAST) as plain:  # answers every completion with canned text and `logprobs: null`
        llm = backend(plain.base_url)
        with pytest.raises(LLMRequestError, match=rf"{plain.base_url}/completions answered \(echo: true, logprobs: 1\) "
                                                  r"without usable log-probabilities: its choice has no `logprobs`"):
            llm.response_losses(["Say something kind."], ["Thanks."], max_length=64)
        with pytest.raises(LLMRequestError, match=r"\(logprobs: 20\) without usable log-probabilities"):
            llm.next_token_logprobs(["Rate it: "], ["1", "2"])
        assert plain.stats()["requests"] == 2  # not retried: the server would answer the same again
        llm.close()


def test_chat_mode_cannot_score():
    llm = OpenAILLM("m", base_url="http://127.0.0.1:9/v1", mode="chat")
    for call in (lambda: llm.next_token_logprobs(["x"], ["1"]), lambda: llm.truncations(["x"], ["y"], 64),
                 lambda: llm.response_losses(["x"], ["y"], 64)):
        with pytest.raises(ValueError, match="llm.mode is `chat`"):
            call()
