"""tasks/conversation.py: what a conversation is (check), ShareGPT's names for its turns, and a row's two
ways of holding one (its first exchange in the text columns, the whole in `messages`)."""

import pyarrow as pa
import pytest

from tasks import conversation
from tasks.conversation import (ConversationError, check, from_messages, from_sharegpt, is_multi_turn,
                                messages_of, transcript, turn_count)


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


@pytest.mark.parametrize("messages,message", [
    ([u("Hi"), u("Again")], r"^row 3: turn 1 is a user turn after a user turn; expected assistant "
                            r"\(a system turn comes first, then user and assistant alternate\)$"),
    ([a("Hello")], r"^row 3: turn 0 is an assistant turn to open the conversation; expected user "),
    ([u("Hi"), a("Hello"), a("Again")], r"^row 3: turn 2 is an assistant turn after an assistant turn; "
                                        r"expected user "),
    ([u("Hi"), a("  \n")], r"^row 3: turn 1 \(assistant\) is empty$"),
    ([u(""), a("x")], r"^row 3: turn 0 \(user\) is empty$"),
    ([u("Hi"), {"role": "assistant", "content": None}], r"^row 3: turn 1 \(assistant\) is empty$"),
    ([u("Hi"), {"role": "bot", "content": "x"}],
     r"^row 3: turn 1 has unknown role 'bot'; one of system, user, assistant$"),
    ([u("Hi"), a("Hello"), u("And?")],
     r"^row 3: the conversation ends with a user turn; it must end with the assistant's answer$"),
    ([u("Hi"), a("Hello"), s("Be brief."), a("x")],
     r"^row 3: turn 2 is a system turn after an assistant turn; expected user "),
    ([s("Be brief.")], r"^row 3: a system prompt and no turns$"),
    ([s("Be brief."), s("Again."), u("Hi"), a("x")], r"^row 3: turn 1 is a system turn after a system turn; "
                                                     r"expected user "),
    ([], r"^row 3: a conversation is a non-empty list of turns$"),
    ("Hi", r"^row 3: a conversation is a non-empty list of turns$"),
    ([u("Hi"), "Hello"], r"^row 3: turn 1 must be an object with `role` and `content`$"),
])
def test_check_says_what_is_wrong_and_where(messages, message):
    with pytest.raises(ConversationError, match=message):
        check(messages, "row 3")


def test_check_strips_and_keeps_extra_keys_out():
    checked = check([s(" Be brief. "), {"role": "user", "content": "Hi\n", "name": "x"}, a(" Hello ")], "here")
    assert checked == [s("Be brief."), u("Hi"), a("Hello")]


def test_from_sharegpt_maps_speakers():
    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
             {"from": "gpt", "value": "Hello"}, {"from": "User", "value": "More?"},
             {"from": "ChatGPT", "value": "Sure."}, {"from": "human", "value": "Bing?"},
             {"from": "bing", "value": "Yes."}, {"from": "human", "value": "Bard?"}, {"from": "bard", "value": "Yes."},
             {"from": "human", "value": "Model?"}, {"from": "model", "value": "Yes."},
             {"from": "user", "value": "Assistant?"}, {"from": "assistant", "value": "Yes."}]
    assert [m["role"] for m in from_sharegpt(turns, "f:1")] == ["system"] + ["user", "assistant"] * 6


@pytest.mark.parametrize("turns,message", [
    ([{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Hello"}],
     r"^f.jsonl:4: conversations\[1\] has unknown speaker 'robot'; one of human, user, gpt, assistant, chatgpt, "
     r"bing, bard, model, system$"),
    ([{"from": "human", "value": "Hi"}, {"from": None, "value": "Hello"}], r"^f.jsonl:4: conversations\[1\] has "
                                                                          r"unknown speaker None"),
    ([{"from": "human", "value": "Hi"}, {"value": "Hello"}],
     r"^f.jsonl:4: conversations\[1\] must be an object with `from` and `value`$"),
    ([{"from": "gpt", "value": "Hello"}], r"^f.jsonl:4: turn 0 is an assistant turn to open the conversation"),
    ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}], r"^f.jsonl:4: turn 1 \(assistant\) is empty$"),
    ([], r"^f.jsonl:4: `conversations` must be a non-empty list of turns$"),
    (None, r"^f.jsonl:4: `conversations` must be a non-empty list of turns$"),
])
def test_from_sharegpt_refuses(turns, message):
    with pytest.raises(ConversationError, match=message):
        from_sharegpt(turns, "f.jsonl:4")


def test_one_exchange_is_a_plain_row_and_more_is_kept_whole():
    one = [u("Name a prime."), a("7.")]
    assert not is_multi_turn(one) and not is_multi_turn(None)
    assert from_messages(one) == {"instruction": "Name a prime.", "input": "", "output": "7.", "messages": None}
    two = [u("Name a prime."), a("7."), u("Bigger?"), a("101.")]
    assert from_messages(two) == {"instruction": "Name a prime.", "input": "", "output": "7.", "messages": two}
    system = [s("Be brief."), u("Hi"), a("Hello")]
    assert is_multi_turn(system)
    assert from_messages(system) == {"instruction": "Hi", "input": "", "output": "Hello", "messages": system}
    assert [turn_count(m) for m in (None, one, two, system)] == [1, 1, 2, 1]


def test_messages_of_round_trips_from_messages():
    """A row's conversation is what it was loaded from, whichever way the row holds it."""
    for messages in ([u("Name a prime."), a("7.")], [u("Name a prime."), a("7."), u("Bigger?"), a("101.")],
                     [s("Be brief."), u("Hi"), a("Hello")]):
        row = from_messages(messages)
        assert messages_of(row["instruction"], row["input"], row["output"], row["messages"]) == messages
    # A row without `messages`: the instruction, its input below a blank line, and the answer (stripped).
    assert messages_of(" Translate. ", "Good night ", " Bonne nuit. ") == [u("Translate.\n\nGood night"),
                                                                          a("Bonne nuit.")]
    assert messages_of("Say hi.", "  ", "Hi.") == [u("Say hi."), a("Hi.")]
    assert messages_of("Say hi.", None, None) == [u("Say hi."), a("")]


def test_table_helpers():
    two = [u("Q1"), a("A1"), u("Q2"), a("A2")]
    table = pa.table({"instruction": ["Say hi.", "Q1"], "input": [None, ""], "output": ["Hi.", "A1"],
                      "messages": conversation.messages_array([None, two])})
    assert table.schema.field("messages").type == conversation.MESSAGES
    assert conversation.rows_messages(table) == [None, two]
    assert conversation.conversations(table) == [[u("Say hi."), a("Hi.")], two]
    assert conversation.rows_messages(table.drop_columns("messages")) == [None, None]
    assert conversation.assistant_turns(two) == ["A1", "A2"]
    assert transcript([s("Be brief."), *two]) == ("System: Be brief.\n\nUser: Q1\n\nAssistant: A1\n\n"
                                                  "User: Q2\n\nAssistant: A2")
