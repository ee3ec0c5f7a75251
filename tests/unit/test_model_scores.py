import numpy as np
import pytest
import torch

from tasks.llm import losses
from tasks.llm.transformers_backend import TransformersLLM
from tasks.model_scores import deita_scores, expected_score, ifd_scores


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir):
    return TransformersLLM(tiny_model_dir, device="cpu", dtype="float32", batch_size=2)


def _full_logits_loss(llm, prompt: str, response: str) -> float:
    """Mean response-token loss from the full logits of one unpadded sequence."""
    tok = llm.tokenizer
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logits = llm.model(input_ids=ids).logits[0].float()
    targets = ids[0, len(p):]
    return float(torch.nn.functional.cross_entropy(logits[len(p) - 1:-1], targets))


def test_response_losses_match_full_logits_and_ignore_padding(tiny_llm, monkeypatch):
    prompts = ["Say something kind.", "", "A much longer prompt that makes the batch need padding on one side."]
    responses = ["You did well today.", "Plain text alone.", "Yes."]
    monkeypatch.setattr(losses, "LOGIT_CHUNK", 3)  # several output-layer chunks per batch
    got = tiny_llm.response_losses(prompts, responses, max_length=128)
    expected = [_full_logits_loss(tiny_llm, p, r) for p, r in zip(prompts, responses)]
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert np.isnan(tiny_llm.response_losses(["x"], ["   "], max_length=64)[0])


def test_ifd_is_conditioned_over_direct_loss(tiny_llm):
    ifd, cond, direct, cut = ifd_scores(["Name a color."], [""], ["Blue."], tiny_llm, max_length=128)
    from tasks.prompts import alpaca_prompt

    assert cond[0] == pytest.approx(_full_logits_loss(tiny_llm, alpaca_prompt("Name a color."), "Blue."), rel=1e-4)
    assert direct[0] == pytest.approx(_full_logits_loss(tiny_llm, "", "Blue."), rel=1e-4)
    assert ifd[0] == pytest.approx(cond[0] / direct[0]) and cut == [None]  # it fits: nothing cut


def test_deita_expected_scores_from_one_pass(tiny_llm, monkeypatch):
    real = tiny_llm.next_token_logprobs
    calls = []

    def spy(prompts, candidates):
        calls.append((list(prompts), list(candidates)))
        return real(prompts, candidates)

    monkeypatch.setattr(tiny_llm, "next_token_logprobs", spy)
    complexity, quality = deita_scores(["Explain recursion.", "Sort the numbers."], ["", "3, 1, 2"],
                                       ["It calls itself.", "1, 2, 3"], tiny_llm)
    # DEITA's prompts word for word, an input on the line after its instruction: all four in one pass.
    head_c = "You are a helpful assistant. Please identify the complexity score of the following user query. \n"
    head_q = ("You are a helpful assistant. Please identify the quality score of the Response corresponding to "
              "the Question. \n")
    prompts = [head_c + "##Query: Explain recursion.\n##Complexity: ",
               head_c + "##Query: Sort the numbers.\n3, 1, 2\n##Complexity: ",
               head_q + "#Question#:\nExplain recursion.\n#Response#:\nIt calls itself. \n##Quality: ",
               head_q + "#Question#:\nSort the numbers.\n3, 1, 2\n#Response#:\n1, 2, 3 \n##Quality: "]
    assert calls == [(prompts, ["1", "2", "3", "4", "5", "6"])]
    # The expectation by hand from the model's log-probabilities of the six score tokens, renormalised.
    p = np.exp(real(prompts, ["1", "2", "3", "4", "5", "6"]))
    by_hand = (p * np.arange(1, 7)).sum(axis=1) / p.sum(axis=1)
    assert np.diff(np.sort(by_hand)).min() > 1e-4  # the four prompts score apart: a swap would show
    np.testing.assert_allclose(complexity, by_hand[:2], rtol=1e-6)  # float32 log-probabilities
    np.testing.assert_allclose(quality, by_hand[2:], rtol=1e-6)
    # The expectation itself: all mass on "4" gives 4; even mass on "1" and "6" gives 3.5.
    lp = np.log(np.array([[1e-12, 1e-12, 1e-12, 1.0, 1e-12, 1e-12], [0.5, 1e-12, 1e-12, 1e-12, 1e-12, 0.5]]))
    assert expected_score(lp) == pytest.approx([4.0, 3.5], abs=1e-9)


def test_logprob_candidates_must_start_with_distinct_tokens(tiny_llm):
    with pytest.raises(ValueError, match="distinct tokens"):
        tiny_llm.next_token_logprobs(["Rating:"], ["10", "1"])
