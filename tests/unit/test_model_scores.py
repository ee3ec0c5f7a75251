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
    ifd, cond, direct = ifd_scores(["Name a color."], [""], ["Blue."], tiny_llm, max_length=128)
    from tasks.prompts import alpaca_prompt

    assert cond[0] == pytest.approx(_full_logits_loss(tiny_llm, alpaca_prompt("Name a color."), "Blue."), rel=1e-4)
    assert direct[0] == pytest.approx(_full_logits_loss(tiny_llm, "", "Blue."), rel=1e-4)
    assert ifd[0] == pytest.approx(cond[0] / direct[0])


def test_deita_expected_scores_from_one_pass(tiny_llm):
    complexity, quality = deita_scores(["Explain recursion."], [""], ["It calls itself."], tiny_llm)
    assert 1.0 <= complexity[0] <= 6.0 and 1.0 <= quality[0] <= 6.0
    # The expectation itself: all mass on "4" gives 4; even mass on "1" and "6" gives 3.5.
    lp = np.log(np.array([[1e-12, 1e-12, 1e-12, 1.0, 1e-12, 1e-12], [0.5, 1e-12, 1e-12, 1e-12, 1e-12, 0.5]]))
    assert expected_score(lp) == pytest.approx([4.0, 3.5], abs=1e-9)


def test_logprob_candidates_must_start_with_distinct_tokens(tiny_llm):
    with pytest.raises(ValueError, match="distinct tokens"):
        tiny_llm.next_token_logprobs(["Rating:"], ["10", "1"])
