import pytest

from tasks.judge import judge, judge_prompt, parse_rating
from tasks.llm.base import Usage

# Answers as models actually write them: bare numbers, fractions, MT-Bench markup, labels in Markdown,
# sentences, words, other scales, a base model running on into the next block, and garbage.
READABLE = [
    ("7", 7.0),
    ("7/10", 7.0),
    ("Rating: [[7]]", 7.0),
    ("7.5", 7.5),
    (" 8/10\n\n### Task:\nName a fruit.", 8.0),
    ("**Rating:** 9/10", 9.0),
    ("Score: 6 out of 10. The response misses 2 of the 3 steps.", 6.0),
    ("I would rate this response an 8.", 8.0),
    ("[[10]]", 10.0),
    ("Rating: 4/5", 8.0),
    ("Overall rating: seven", 7.0),
    ("The response is accurate and concise.\nRating: 8", 8.0),
    ("3. The response ignores the input.", 3.0),
    ("Rating: 85/100", 8.5),
    ("Good answer, 8.", 8.0),
    ("Score = 5", 5.0),
    ("I give it a 9 out of 10", 9.0),
    ("8 - accurate and complete", 8.0),
    ("Rating: [[3]] because it answers a different question", 3.0),
    ("Rating: 7/10 (7 out of 10)", 7.0),
    ("ten out of ten", 10.0),
]
UNREADABLE = [
    ("", "empty"),
    ("   \n ", "empty"),
    ("The response is helpful.", "no_rating"),
    ("There are 3 steps in the answer and it covers them well", "no_rating"),
    ("Rating: N/A", "no_rating"),
    ("asdf ### $$ %%", "no_rating"),
    ("Rating: 11/10", "out_of_range"),
    ("0/10", "out_of_range"),
    ("-3", "out_of_range"),
    ("Rating: 7-8", "range"),
    ("Rating: 7 or 8", "range"),
    ("Rating: 6\nRating: 9", "ambiguous"),
    ("rating: 6/7", "scale"),
]


@pytest.mark.parametrize("answer,expected", READABLE)
def test_parse_rating_reads(answer, expected):
    assert parse_rating(answer) == (expected, None)


@pytest.mark.parametrize("answer,kind", UNREADABLE)
def test_parse_rating_refuses_with_a_reason(answer, kind):
    value, error = parse_rating(answer)
    assert value is None and error.split(":")[0] == kind


def test_prompts_state_the_rubric_and_end_where_the_rating_goes():
    text = judge_prompt("Add the numbers.", "2, 3", "5", "completions")
    assert "helpfulness" in text and "correctness" in text and "instruction following" in text
    assert text.endswith("### Task:\nAdd the numbers.\n\n### Input:\n2, 3\n\n### Response:\n5\n\nRating:")
    chat = judge_prompt("Add the numbers.", "", "5", "chat")
    assert chat[0]["role"] == "system" and "Rating: [[N]]" in chat[1]["content"]
    assert "### Input" not in chat[1]["content"]


def test_judge_reads_every_answer_greedily_and_counts_usage():
    from tests.conftest import ScriptedLLM

    answers = iter([" 9/10", "what?"])
    llm = ScriptedLLM(lambda prompt, params: next(answers))
    usage = Usage()
    scores, errors, raw = judge(["a", "b"], ["", ""], ["x", "y"], llm, 16, usage)
    assert scores[0] == 9.0 and scores[1] != scores[1]  # NaN, never a default number
    assert errors[0] is None and errors[1].startswith("no_rating") and raw == [" 9/10", "what?"]
    params = llm.calls[0][1]
    assert params.temperature == 0.0 and params.max_new_tokens == 16 and params.stop == ("\n",)
    assert usage.by_purpose["judge"]["requests"] == 2


def test_a_conversation_is_judged_whole_every_turn_shown():
    from tasks.judge import CONVERSATION_RUBRIC, conversation_prompt

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."},
                {"role": "assistant", "content": "5"}, {"role": "user", "content": "And times 4?"},
                {"role": "assistant", "content": "20"}]
    text = conversation_prompt(messages, "completions")
    assert text.startswith(CONVERSATION_RUBRIC) and "every assistant turn" in CONVERSATION_RUBRIC
    # The demonstrations in the same form, one exchange each, then the whole conversation.
    assert ("### Conversation:\nUser: Name the three primary colors of paint.\n\nAssistant: Red, yellow and "
            "blue.\n\nRating: 9/10\n\n") in text
    assert text.endswith("### Conversation:\nSystem: Be brief.\n\nUser: Add 2 and 3.\n\nAssistant: 5\n\n"
                         "User: And times 4?\n\nAssistant: 20\n\nRating:")
    chat = conversation_prompt(messages, "chat")
    assert chat[0] == {"role": "system", "content": CONVERSATION_RUBRIC}
    assert chat[1]["content"] == ("### Conversation:\nSystem: Be brief.\n\nUser: Add 2 and 3.\n\nAssistant: 5\n\n"
                                  "User: And times 4?\n\nAssistant: 20\n\nAnswer with the rating only, as "
                                  "`Rating: [[N]]`.")
