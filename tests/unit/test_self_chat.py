"""Self-chat: rows extended to multi-turn conversations with a test double playing both sides. Prompts in
both modes, the filters, the seeded draw, retries with new seeds, and resume after kill -9."""

import re

import numpy as np
import pandas as pd
import pytest

from tasks.artifacts import PartWriter
from tasks.config import SelfChatConfig
from tasks.conversation import ConversationError, check
from tasks.self_chat import (STOPS, answer_prompt, clean_user_turn, completion_prompt, extend, user_turn_drop_reason,
                             user_turn_prompt)
from tests.conftest import ScriptedLLM
from tests.killing import kill_after_parts

CFG = SelfChatConfig(enabled=True, turns=3, max_rows=None, attempts=1, checkpoint_every=1)


def rows(n, generated=0):
    """n rows `Explain topic i.`; the last `generated` of them from Self-Instruct, the others seeds."""
    return pd.DataFrame({"id": [f"r{i}" for i in range(n)], "task_id": [f"t{i}" for i in range(n)],
                         "instruction": [f"Explain topic {i}." for i in range(n)], "input": [""] * n,
                         "output": [f"Topic {i} is a thing." for i in range(n)], "category": ["qa"] * n,
                         "origin": ["seed"] * (n - generated) + ["self_instruct"] * generated})


FOLLOW_UPS = {2: "Can you give an everyday example of topic {t}?", 3: "Why does topic {t} matter to most people?"}
ANSWERS = {2: "For example, topic {t} shows up when you cook dinner.",
           3: "It matters because topic {t} shapes daily life."}


def shown(prompt):
    """What a completion prompt asks for: (topic of its conversation, turn number, `user` or `answer`)."""
    body = prompt.rsplit("\n###\n\n", 1)[1]
    return int(re.search(r"topic (\d+)", body).group(1)), body.count("User:"), \
        "user" if body.endswith("User:") else "answer"


def chatter(special=None):
    """A base model writing transcripts: the user's follow-ups and the answers above, except `special`
    {(topic, turn, user|answer): text or (text, finish reason)}."""
    special = special or {}

    def respond(prompt, params):
        topic, turn, role = shown(prompt)
        if (topic, turn, role) in special:
            return special[(topic, turn, role)]
        return " " + (FOLLOW_UPS if role == "user" else ANSWERS)[turn].format(t=topic)
    return respond


def conversation_of(topic, turns):
    messages = [{"role": "user", "content": f"Explain topic {topic}."},
                {"role": "assistant", "content": f"Topic {topic} is a thing."}]
    for turn in range(2, turns + 1):
        messages += [{"role": "user", "content": FOLLOW_UPS[turn].format(t=topic)},
                     {"role": "assistant", "content": ANSWERS[turn].format(t=topic)}]
    return messages


# --- prompts and filters ------------------------------------------------------------------------------------

def test_completion_prompts_are_transcripts_that_end_at_the_next_label():
    messages = conversation_of(0, 1)
    user = user_turn_prompt(messages, chat=False)
    assert user.startswith("Below are conversations between a curious user and a helpful assistant.")
    assert user.endswith("\n\n###\n\nUser: Explain topic 0.\n\nAssistant: Topic 0 is a thing.\n\nUser:")
    assert user.count("User:") == 4  # two in the demonstration, the row's, and the one to write
    asked = messages + [{"role": "user", "content": "Why?"}]
    assert answer_prompt(asked, chat=False) == completion_prompt(asked, "assistant")
    assert answer_prompt(asked, chat=False).endswith("Assistant: Topic 0 is a thing.\n\nUser: Why?\n\nAssistant:")
    assert STOPS == ("\nUser:", "\nAssistant:", "\nSystem:", "\n###")
    system = [{"role": "system", "content": "Be brief."}] + messages
    assert "\n\n###\n\nSystem: Be brief.\n\nUser: Explain topic 0." in user_turn_prompt(system, chat=False)


def test_chat_prompts_role_play_the_user_then_answer_the_messages():
    messages = [{"role": "system", "content": "Be brief."}] + conversation_of(0, 1)
    user = user_turn_prompt(messages, chat=True)
    assert len(user) == 1 and user[0]["role"] == "user"
    assert user[0]["content"].startswith("Here is a conversation between a user and an AI assistant:\n\nSystem: "
                                         "Be brief.\n\nUser: Explain topic 0.\n\nAssistant: Topic 0 is a thing.\n\n"
                                         "You are the user.")
    asked = messages + [{"role": "user", "content": "Why?"}]
    assert answer_prompt(asked, chat=True) == asked and answer_prompt(asked, chat=True) is not asked


@pytest.mark.parametrize("text,reason", [
    ("", "user_empty"),
    ("Why?", "user_too_short"),
    (" ".join(["word"] * 21), "user_too_long"),
    ("What is it made of? Assistant: It is made of wood.", "user_wrote_other_turn"),
    ("Thanks.\n**User:** And then?", "user_wrote_other_turn"),
    ("Can you draw it for me, please?", "user_blocklisted_keyword"),
    ("Explain topic 0 again.", "user_repeats_earlier_turn"),  # ROUGE-L F1 6/7 against the first turn
    ("Can you give an example of topic 0?", None),
    ("How does an AI model choose its next word?", None),  # `AI` without a colon is no label
])
def test_user_turn_filters(text, reason):
    cfg = SelfChatConfig(max_words=20)
    assert user_turn_drop_reason(text, ["Explain topic 0.", "Give two facts about it."], cfg) == reason


@pytest.mark.parametrize("raw,clean", [
    (" Why is that?", "Why is that?"),
    ('User: "Why is that?"', "Why is that?"),
    ("**User:** Why is that?\n", "Why is that?"),
    ("\u201cWhy is that?\u201d", "Why is that?"),
    ("Human: Why is that?", "Why is that?"),
])
def test_clean_user_turn(raw, clean):
    assert clean_user_turn(raw) == clean


# --- the stage ----------------------------------------------------------------------------------------------

def test_each_conversation_is_extended_until_done_or_a_drop_stops_it():
    special = {(1, 2, "user"): " Why?",                                         # too short: nothing gained
               (2, 3, "user"): " Explain topic 2 again.",                       # a repeat: two turns kept
               (3, 2, "answer"): (" Topic 3 is a long story that", "length"),   # cut off: nothing gained
               (4, 3, "user"): " And why? Assistant: Because.",                # writes the answer too
               (5, 3, "answer"): " "}                                           # empty
    inp = rows(7, generated=2)
    llm = ScriptedLLM(chatter(special))
    out, stats = extend(inp, CFG, llm, seed=0)
    assert list(out.columns) == list(inp.columns) + ["messages"]
    assert out.drop(columns="messages").equals(inp)  # every row, in order, its columns as they were
    assert out["messages"].tolist() == [conversation_of(0, 3), None, conversation_of(2, 2), None,
                                        conversation_of(4, 2), conversation_of(5, 2), conversation_of(6, 3)]
    reasons = {"user_too_short": 1, "user_repeats_earlier_turn": 1, "answer_truncated": 1,
               "user_wrote_other_turn": 1, "answer_empty": 1}
    assert {k: stats[k] for k in ("eligible", "drawn", "extended", "complete", "turns", "dropped", "stopped",
                                  "prompt_style", "checkpoints", "llm_calls")} == {
        "eligible": 7, "drawn": 7, "extended": 5, "complete": 2, "turns": {"1": 2, "2": 3, "3": 2},
        "dropped": reasons, "stopped": reasons, "prompt_style": "completion", "checkpoints": 7,
        # user turns: 7 at turn 2, 5 at turn 3 (r1 and r3 stopped); answers: 6 at turn 2, 3 at turn 3
        "llm_calls": 7 + 5 + 6 + 3}
    assert stats["usage_this_attempt"]["by_purpose"]["user_turn"]["requests"] == 12
    params = {role: p for prompts, p in llm.calls for role in {shown(prompts[0])[2]}}
    assert params["user"].max_new_tokens == CFG.user_max_new_tokens and params["user"].stop == STOPS
    assert params["answer"].max_new_tokens == CFG.max_new_tokens and params["answer"].temperature == CFG.temperature
    for messages in out["messages"].dropna():
        assert check(messages, "test") == messages


def test_input_is_part_of_the_first_user_turn_and_stays_in_its_column():
    inp = rows(1)
    inp.loc[0, "input"] = "in the kitchen"
    out, _ = extend(inp, CFG, ScriptedLLM(chatter()), seed=0)
    assert out.loc[0, "messages"][0] == {"role": "user", "content": "Explain topic 0.\n\nin the kitchen"}
    assert (out.loc[0, "instruction"], out.loc[0, "input"]) == ("Explain topic 0.", "in the kitchen")


def test_the_draw_is_seeded_and_takes_only_the_rows_asked_for():
    inp = rows(10, generated=4)
    cfg = CFG.model_copy(update={"max_rows": 3})
    out, stats = extend(inp, cfg, ScriptedLLM(chatter()), seed=0)
    extended = out.loc[out["messages"].notna(), "id"].tolist()
    assert extended == ["r4", "r8", "r9"] and stats["eligible"] == 10 and stats["drawn"] == 3
    again, _ = extend(inp, cfg, ScriptedLLM(chatter()), seed=0)
    assert again["messages"].tolist() == out["messages"].tolist()
    other, _ = extend(inp, cfg, ScriptedLLM(chatter()), seed=1)
    assert other.loc[other["messages"].notna(), "id"].tolist() == ["r0", "r3", "r8"]
    seeds, s = extend(inp, cfg.model_copy(update={"rows": "seeds", "max_rows": None}), ScriptedLLM(chatter()), 0)
    assert seeds.loc[seeds["messages"].notna(), "id"].tolist() == [f"r{i}" for i in range(6)] and s["drawn"] == 6
    generated, g = extend(inp, cfg.model_copy(update={"rows": "generated"}), ScriptedLLM(chatter()), 0)
    assert generated.loc[generated["messages"].notna(), "id"].tolist() == ["r7", "r8", "r9"] and g["eligible"] == 4


def test_conversations_continue_where_they_are_and_long_ones_are_left_alone():
    """A seed conversation (system prompt, two exchanges) gets its third; one with three already is not
    drawn; their first exchange is what the row's columns say."""
    inp = rows(3)
    system = [{"role": "system", "content": "Be brief."}] + conversation_of(0, 2)
    inp["messages"] = [np.array(system, dtype=object), conversation_of(1, 3), None]  # as read from Parquet
    llm = ScriptedLLM(chatter())
    out, stats = extend(inp, CFG, llm, seed=0)
    assert out["messages"].tolist() == [system + conversation_of(0, 3)[4:], conversation_of(1, 3),
                                        conversation_of(2, 3)]
    assert stats["eligible"] == 2 and stats["turns"] == {"3": 2} and stats["complete"] == 2
    first = [prompts[0] for prompts, _ in llm.calls if "topic 0" in prompts[0].rsplit("###", 1)[1]][0]
    assert first.endswith("###\n\nSystem: Be brief.\n\nUser: Explain topic 0.\n\nAssistant: Topic 0 is a thing."
                          "\n\nUser: Can you give an everyday example of topic 0?\n\nAssistant: For example, topic 0 "
                          "shows up when you cook dinner.\n\nUser:")


def test_a_dropped_exchange_is_drawn_again_with_a_new_seed():
    seen: list[tuple[str, int]] = []

    class SeededLLM(ScriptedLLM):
        def generate(self, prompts, params, desc="", seeds=None):
            seen.extend(zip((shown(p)[2] for p in prompts), seeds))
            return super().generate(prompts, params, desc, seeds)

    tries: dict[tuple[int, int], int] = {}

    def respond(prompt, params):  # every conversation's first try at an exchange writes a one-word turn
        topic, turn, role = shown(prompt)
        if role == "user":
            tries[(topic, turn)] = tries.get((topic, turn), 0) + 1
            if tries[(topic, turn)] == 1:
                return " Why?"
        return chatter()(prompt, params)

    cfg = CFG.model_copy(update={"attempts": 2})
    out, stats = extend(rows(2), cfg, SeededLLM(respond), seed=0)
    assert out["messages"].tolist() == [conversation_of(0, 3), conversation_of(1, 3)]
    assert stats["dropped"] == {"user_too_short": 4} and stats["stopped"] == {} and stats["complete"] == 2
    user_seeds = [s for role, s in seen if role == "user"]
    assert len(user_seeds) == 8 and len(set(user_seeds)) == 8  # every attempt its own seed
    tries.clear()
    greedy, g = extend(rows(2), cfg.model_copy(update={"temperature": 0.0}), SeededLLM(respond), seed=0)
    assert greedy["messages"].isna().all() and g["dropped"] == g["stopped"] == {"user_too_short": 2}


def test_a_conversation_does_not_depend_on_its_batch():
    """The in-process backend gets each request's seed; a double whose text depends on it gives the same
    conversations whatever the batch size."""
    class SeededLLM(ScriptedLLM):
        def generate(self, prompts, params, desc="", seeds=None):
            out = super().generate(prompts, params, desc, seeds)
            return [c.__class__(f"{c.text.rstrip('?.')} number {s % 97}{'?' if c.text.endswith('?') else '.'}",
                                c.finish_reason, c.prompt_tokens, c.completion_tokens) for c, s in zip(out, seeds)]

    one, _ = extend(rows(5), CFG, SeededLLM(chatter()), seed=3, batch_size=1)
    many_llm = SeededLLM(chatter())
    many, _ = extend(rows(5), CFG, many_llm, seed=3, batch_size=8)
    assert one["messages"].tolist() == many["messages"].tolist() and one["messages"].notna().all()
    assert max(len(prompts) for prompts, _ in many_llm.calls) == 5  # the rows' like requests in one batch


def test_chat_mode_end_to_end():
    class ChatLLM(ScriptedLLM):
        mode = "chat"

    def respond(messages, params):
        assert isinstance(messages, list) and params.stop == ()
        last = messages[-1]["content"]
        if last.startswith("Here is a conversation"):
            topic = int(re.search(r"topic (\d+)", last).group(1))
            return 'User: "' + FOLLOW_UPS[last.count("\n\nUser: ") + 1].format(t=topic) + '"'
        topic = int(re.search(r"topic (\d+)", messages[0]["content"]).group(1))
        return ANSWERS[sum(m["role"] == "user" for m in messages)].format(t=topic)

    llm = ChatLLM(respond)
    out, stats = extend(rows(2), CFG, llm, seed=0)
    assert out["messages"].tolist() == [conversation_of(0, 3), conversation_of(1, 3)]
    assert stats["prompt_style"] == "chat" and stats["dropped"] == {}
    answers = [prompts[0] for prompts, _ in llm.calls if not prompts[0][-1]["content"].startswith("Here is")]
    assert conversation_of(0, 2) + [{"role": "user", "content": FOLLOW_UPS[3].format(t=0)}] in answers


def test_a_drawn_row_without_an_answer_is_refused():
    inp = rows(2)
    inp.loc[1, "output"] = "  "
    with pytest.raises(ConversationError, match=r"self_chat row r1: turn 1 \(assistant\) is empty"):
        extend(inp, CFG, ScriptedLLM(chatter()), seed=0)


def test_nothing_drawn_asks_nothing():
    llm = ScriptedLLM(chatter())
    out, stats = extend(rows(3), CFG.model_copy(update={"rows": "generated"}), llm, seed=0)
    assert llm.calls == [] and out["messages"].isna().all() and stats["drawn"] == 0 and stats["turns"] == {}


# --- checkpoints --------------------------------------------------------------------------------------------

def test_resume_from_parts_extends_only_the_unfinished_rows(tmp_path):
    respond = chatter({(2, 3, "user"): " Explain topic 2 again."})
    full_parts = PartWriter(tmp_path / "full")
    cfg = CFG.model_copy(update={"checkpoint_every": 2})
    full, full_stats = extend(rows(5), cfg, ScriptedLLM(respond), seed=0, parts=full_parts)
    written = full_parts.read_all()
    assert [t.num_rows for t in written] == [2, 2, 1] and full_stats["checkpoints"] == 3
    crashed = PartWriter(tmp_path / "crashed")
    for table in written[:1]:
        crashed.write(table)
    llm = ScriptedLLM(respond)
    resumed, stats = extend(rows(5), cfg, llm, seed=0, parts=crashed)
    assert resumed.to_dict("records") == full.to_dict("records")
    same = ("eligible", "drawn", "extended", "complete", "turns", "dropped", "stopped", "checkpoints")
    assert {k: stats[k] for k in same} == {k: full_stats[k] for k in same}
    finished = set(written[0].column("id").to_pylist())
    asked = {shown(p)[0] for prompts, _ in llm.calls for p in prompts}
    # r2 stopped at its third user turn, before r1's third answer: the first part closed r0 and r2.
    assert finished == {"r0", "r2"} and asked == {1, 3, 4}


SCRIPT = """
    import pathlib, time
    from tasks.artifacts import PartWriter
    from tasks.self_chat import extend
    from tests.conftest import ScriptedLLM
    from tests.unit.test_self_chat import CFG, RESPOND, rows

    def slow(prompt, params):
        time.sleep(0.02)
        return RESPOND(prompt, params)

    # Two conversations open at a time (batch_size 1), so they finish one after another.
    extend(rows(6), CFG, ScriptedLLM(slow), 1, PartWriter(pathlib.Path({parts!r})), batch_size=1)
"""
RESPOND = chatter({(1, 2, "user"): " Why?", (3, 3, "answer"): ("Because", "length")})


@pytest.mark.parametrize("n_parts", [1, 3, 5])
def test_kill_9_then_resume_matches_uninterrupted(tmp_path, n_parts):
    expected, full_stats = extend(rows(6), CFG, ScriptedLLM(RESPOND), 1)
    assert full_stats["checkpoints"] == 6 and full_stats["extended"] == 5

    parts_dir = tmp_path / "parts"
    written = kill_after_parts(SCRIPT.format(parts=str(parts_dir)), parts_dir, n_parts, tmp_path)
    assert n_parts <= written < full_stats["checkpoints"]

    llm = ScriptedLLM(RESPOND)
    resumed, stats = extend(rows(6), CFG, llm, 1, PartWriter(parts_dir))
    assert resumed.to_dict("records") == expected.to_dict("records")
    same = ("eligible", "drawn", "extended", "complete", "turns", "dropped", "stopped", "checkpoints")
    assert {k: stats[k] for k in same} == {k: full_stats[k] for k in same}
    # Nothing finished is asked again; tokens count what was spent, at least the uninterrupted run's.
    finished = {r for t in PartWriter(parts_dir).read_all()[:written] for r in t.column("id").to_pylist()}
    assert not {f"r{shown(p)[0]}" for prompts, _ in llm.calls for p in prompts} & finished
    assert stats["prompt_tokens"] >= full_stats["prompt_tokens"]
