"""Reading an endpoint's legacy `logprobs` object: where the response's tokens begin in an echo (vLLM's BOS,
no BOS, a token across the join, byte tokens decoded one by one), answers that are not an echo, and the
losses built from them (tests/integration/test_endpoint_scores.py checks them against a real model)."""

import numpy as np
import pytest

from tasks.llm.openai_backend import Measured, OpenAILLM, UnusableAnswer, _read_echo, _response_start


def echo(tokens, logprobs=None, prompt_tokens=None):
    logprobs = logprobs if logprobs is not None else [None] + [-1.0] * (len(tokens) - 1)
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]  # vLLM's: the texts' running sum
    lp = {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": [None] + [{}] * (len(tokens) - 1),
          "text_offset": offsets}
    usage = {"prompt_tokens": prompt_tokens or len(tokens), "completion_tokens": 0}
    return {"choices": [{"text": "".join(tokens), "logprobs": lp}], "usage": usage}


def test_the_response_starts_after_the_prompts_tokens_with_or_without_bos():
    assert _response_start(["<bos>", "Below", " is", ":\n", "Blue", "."], "Below is:\n", "Blue.") == 4
    assert _response_start(["Below", " is", ":\n", "Blue", "."], "Below is:\n", "Blue.") == 3  # no BOS
    assert _response_start(["<bos>", "Blue", "."], "", "Blue.") == 1  # an empty prompt: after BOS alone
    assert _response_start(["<bos>", "Say", " hi"], "Say hi", "") == 3  # no response: every token is the prompt's


def test_a_token_across_the_join_is_the_prompts():
    assert _response_start(["<bos>", "Say", " hi!", " ok"], "Say hi", "! ok") == 3
    # The same from the back, when the prompt's own tokens do not spell it (a byte token read alone as U+FFFD).
    assert _response_start(["<bos>", "\ufffd", "\ufffd", " hi!", " ok"], "\U00013000 hi", "! ok") == 4


def test_byte_tokens_on_one_side_are_read_from_the_other():
    hieroglyph = "\U00013000"  # four byte tokens in Gemma, each decoded alone as U+FFFD
    split = ["\ufffd"] * 4
    assert _response_start(["<bos>", "Say", " "] + split + [":", "Yes"], f"Say {hieroglyph}:", "Yes") == 8
    assert _response_start(["<bos>", "Say", ":", " "] + split, "Say:", f" {hieroglyph}") == 3
    with pytest.raises(UnusableAnswer, match="spell neither the prompt nor the response"):
        _response_start(["<bos>", "Say", " "] + split + [" "] + split, f"Say {hieroglyph}", f" {hieroglyph}")


def test_an_echo_is_read_into_prompt_tokens_and_response_log_probabilities():
    measured, text_start = _read_echo("Below is:\n", "Blue.", echo(["<bos>", "Below", " is", ":\n", "Blue", "."],
                                                                   [None, -1.0, -2.0, -3.0, -4.0, -5.0]))
    assert measured == Measured(4, (-4.0, -5.0)) and text_start == 1
    # A token generated after the echo (a server that read max_tokens 0 as unset) is left out by the usage count.
    measured, _ = _read_echo("Hi", " there", echo(["<bos>", "Hi", " there", "!"], prompt_tokens=3))
    assert measured == Measured(2, (-1.0,))
    # Without BOS the first token has no log-probability, as in process: nothing predicts it.
    measured, text_start = _read_echo("", "Blue.", echo(["Blue", "."]))
    assert measured == Measured(0, (None, -1.0)) and text_start == 0


@pytest.mark.parametrize("answer, problem", [
    ({"choices": [{"text": "x", "logprobs": None}]}, "no `logprobs` object"),
    ({"choices": [{"text": "x", "logprobs": {"tokens": [], "token_logprobs": []}}]}, "is `echo` supported"),
    (echo(["Blue", "."], [-0.5, -1.0]), "not the prompt echoed"),  # the generated tokens' log-probabilities
    (echo(["<bos>", "Blue", "."], [None, None, -1.0]), "a token after the first has no log-probability"),
])
def test_answers_that_are_not_an_echo_are_refused(answer, problem):
    with pytest.raises(UnusableAnswer, match=problem):
        _read_echo("", "Blue.", answer)


def test_losses_from_echoes_skip_what_nothing_predicts_and_keep_the_head(monkeypatch):
    """response_losses over canned echoes (no server): a text without BOS loses its first token's term; an
    over-long response is scored on its head; the direct loss keeps the head the prompt left room for."""
    llm = OpenAILLM("m", base_url="http://127.0.0.1:9/v1")
    answers = {"Q: A B C": echo(["Q:", " ", "A", " B", " C"], [None, -1.0, -1.0, -2.0, -4.0]),  # no BOS
               "A B C": echo(["A", " B", " C"], [None, -3.0, -5.0])}
    sent = []

    def ask_all(prompts, params, extra, reads, desc):
        sent.extend(prompts)
        return [read(answers[p]) for p, read in zip(prompts, reads)]

    monkeypatch.setattr(llm, "_ask_all", ask_all)
    # The prompt "Q: " is two tokens, the response (stripped) three: room for two in four.
    assert llm.truncations(["Q: "], [" A B C "], max_length=4) == ["truncated_response"]
    np.testing.assert_allclose(llm.response_losses(["Q: "], [" A B C "], max_length=4), [1.5])  # "A", " B"
    # Alone, the same two tokens: "A" (nothing predicts it, so no term) and " B".
    np.testing.assert_allclose(llm.response_losses([""], ["A B C"], max_length=4, room_from=["Q: "]), [3.0])
    assert sent == ["Q: A B C", "A B C"]  # the conditioned pair once for both calls, its prompt count reused
    assert np.isnan(llm.response_losses([""], [""], max_length=4)).all() and len(sent) == 2  # nothing to send


def test_a_call_larger_than_the_cache_still_returns_every_pair(monkeypatch):
    from tasks.llm import openai_backend

    monkeypatch.setattr(openai_backend, "MEASURED_CACHE", 1)
    llm = OpenAILLM("m", base_url="http://127.0.0.1:9/v1")
    texts = {f"Q{i}: A": echo(["<bos>", f"Q{i}:", " ", "A"], [None, -1.0, -1.0, -float(i + 1)]) for i in range(3)}
    texts.update({f"Q{i}: ": echo(["<bos>", f"Q{i}:", " "]) for i in range(3)})
    monkeypatch.setattr(llm, "_ask_all", lambda prompts, params, extra, reads, desc: [
        read(texts[p]) for p, read in zip(prompts, reads)])
    prompts = [f"Q{i}: " for i in range(3)]
    np.testing.assert_allclose(llm.response_losses(prompts, ["A"] * 3, max_length=8), [1.0, 2.0, 3.0])
    assert llm.truncations(prompts, [""] * 3, max_length=2) == ["dropped_prompt_too_long"] * 3  # 3 tokens each
