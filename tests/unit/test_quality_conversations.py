"""The quality stage on tables that mix one-exchange rows and multi-turn conversations (`messages`):
heuristics over the assistant turns, drops for a bad later answer, whole-conversation dedup and judging,
DEITA and IFD turn by turn, and sharded scoring that reads the conversations as one process does."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import conversation
from tasks.artifacts import PartWriter
from tasks.config import QualityConfig
from tasks.quality import heuristic_scores, run_quality
from tests.conftest import ScriptedLLM
from tests.unit.test_quality import CFG, reference_scores


def turns(*texts: str, system: str | None = None) -> list[dict[str, str]]:
    """A conversation from alternating user and assistant texts."""
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(texts)]


def table(rows: list[tuple[str, str, str] | list[dict[str, str]]], **columns) -> pa.Table:
    """Rows r0, r1, ...: (instruction, input, output) for a one-exchange row, a conversation (its first
    exchange in the text columns) for the others, as the seeds stage writes them."""
    records = [{"instruction": row[0], "input": row[1], "output": row[2], "messages": None} if isinstance(row, tuple)
               else conversation.from_messages(row) for row in rows]
    return pa.table({"id": [f"r{i}" for i in range(len(rows))],
                     "instruction": [r["instruction"] for r in records], "input": [r["input"] for r in records],
                     "output": [r["output"] for r in records],
                     "messages": conversation.messages_array(r["messages"] for r in records),
                     "origin": ["seed"] * len(rows), **columns})


PHOTO = turns("Explain photosynthesis briefly.", "Photosynthesis turns light into sugar in plants.",
              "And what about respiration?", "Respiration burns sugar",
              "Compare both processes in plants now.", "Both happen in plant cells, in opposite directions.")
ONE = [("Name colors.", "", "Red"),
       ("Give words.", "", "one two three four five six seven eight nine ten eleven twelve")]


def test_a_conversation_is_scored_over_its_answers_and_one_exchange_rows_as_before():
    data = table([ONE[0], PHOTO, ONE[1]])
    got = heuristic_scores(data, CFG)
    # By hand, per answer (min_output_words 4, max 10), each after the user turn before it:
    # answer 1: 7 words -> length 1; finished sentence -> format 1; photosynthesis of
    #           {explain, photosynthesis, briefly} -> relevance 1/3
    # answer 2: 3 words -> length 3/4; no final punctuation -> format 3/4; {what, about, respiration} ->
    #           respiration only -> 1/3
    # answer 3: 8 words -> 1; finished -> 1; {compare, both, processes, plants} -> both (not "plant") -> 1/4
    # length and format: the weakest answer; relevance: the mean; safety: every turn is safe.
    assert got["score_length"][1] == 0.75 and got["score_format"][1] == 0.75
    assert got["score_relevance"][1] == pytest.approx((1 / 3 + 1 / 3 + 1 / 4) / 3)
    assert got["score_safety"][1] == 1.0
    w = CFG.weights
    total = (w["length"] * 0.75 + w["format"] * 0.75 + w["relevance"] * (11 / 36) + w["safety"]) / sum(w.values())
    assert got["score_total"][1] == pytest.approx(total)
    # The one-exchange rows score exactly as they do alone, without a `messages` column at all.
    alone = heuristic_scores(table([ONE[0], ONE[1]]).drop_columns(["messages"]), CFG)
    for name, values in got.items():
        assert values[[0, 2]].tolist() == alone[name].tolist(), name
        expected = [reference_scores(*row, CFG).get(name) for row in ONE]
        if name != "score_total":
            assert values[[0, 2]].tolist() == pytest.approx(expected)
    # A DataFrame with the conversations as Python lists scores the same.
    frame = data.to_pandas()
    frame["messages"] = [None, PHOTO, None]
    for name, values in heuristic_scores(frame, CFG).items():
        assert values.tolist() == got[name].tolist()


def test_a_conversation_with_a_system_prompt_is_checked_for_safety_in_every_turn():
    ok = turns("Tell me about fireworks.", "Fireworks are rockets that burst into colours.",
               "How are they made safely?", "Licensed makers mix the powders in small batches.", system="Be brief.")
    user_unsafe = turns("Tell me about fireworks.", "Fireworks are rockets that burst into colours.",
                        "Could I make a bomb from them?", "No; please ask a licensed professional instead.")
    system_unsafe = turns("Tell me about fireworks.", "Fireworks are rockets that burst into colours.",
                          system="You explain every weapon in detail.")
    scores = heuristic_scores(table([ok, user_unsafe, system_unsafe]), CFG)
    assert scores["score_safety"].tolist() == [1.0, 0.0, 0.0]


def test_a_conversation_whose_later_answer_fails_is_dropped_for_it():
    good = turns("Explain photosynthesis in plants.", "Plants make sugar from light, water and carbon dioxide.",
                 "Where does it happen?", "It happens in the chloroplasts of leaf cells.")
    empty_last = turns("Explain osmosis in plant roots.", "Water moves into roots across their membranes.",
                       "Why does it move?", "   ")
    unsafe_last = turns("Explain erosion along the coast.", "Waves wear rock away over many years.",
                        "Can people speed it up?", "Some use a bomb to blast the cliffs, which is illegal.")
    short_last = turns("Explain condensation on cold windows.", "Warm moist air cools on the glass and forms drops.",
                       "Give one more example of condensation.", "dew")
    data = table([good, empty_last, unsafe_last, short_last, ("Say it.", "", "   ")])
    cfg = QualityConfig(min_total=0.7, min_output_words=4)
    out, stats = run_quality(data, cfg)
    assert out.column("drop_reason").to_pylist() == [None, "empty_output", "unsafe", "low_total", "empty_output"]
    # The first exchanges of the dropped conversations are fine on their own: the later answer decided.
    assert out.column("score_length").to_pylist()[3] == 0.25  # "dew": 1 word of 4
    assert stats["multi_turn"] == {"rows": 4, "kept": 1} and stats["dropped"] == {
        "empty_output": 2, "unsafe": 1, "low_total": 1}
    # The DataFrame path decides the same.
    frame_out, frame_stats = run_quality(data.to_pandas(), cfg)
    assert frame_out["drop_reason"].tolist() == out.column("drop_reason").to_pylist() and frame_stats == stats


def test_a_misplaced_turn_stops_the_stage_naming_the_row():
    bad = [{"role": "user", "content": "Hi."}, {"role": "user", "content": "Hello?"},
           {"role": "assistant", "content": "Hello."}]
    data = table([ONE[0], ONE[1]]).set_column(4, "messages", conversation.messages_array([None, bad]))
    with pytest.raises(conversation.ConversationError,
                       match=r"row 1 \(id r1\): `messages`: turn 1 has role 'user' where an assistant turn belongs"):
        run_quality(data, QualityConfig())
    open_end = conversation.messages_array([None, turns("Hi.", "Hello.", "And?")])
    with pytest.raises(conversation.ConversationError, match="row 1 .*ends with a turn that is not the assistant's"):
        run_quality(data.set_column(4, "messages", open_end), QualityConfig())
    with pytest.raises(conversation.ConversationError, match=r"row 0 \(id r0\): `messages`: it is empty"):
        run_quality(data.set_column(4, "messages", conversation.messages_array([[], None])), QualityConfig())


def test_dedup_compares_whole_conversations():
    opening = ("Plan a three day trip to Lisbon for a family with two children",
               "Day one: the castle and the old town trams. Day two: the aquarium and the riverside. "
               "Day three: a beach at Cascais with a picnic.")
    museums = turns(*opening, "Swap the beach for museums and keep the rest the same please",
                    "Day three: the tile museum in the morning, then the coach museum in Belem after lunch, "
                    "with pastries at the famous bakery nearby before the train back.")
    food = turns(*opening, "What should we eat on each of those days with picky eaters",
                 "Grilled chicken with fries near the castle, soup and bread by the aquarium, and simple "
                 "sandwiches on the beach, with custard tarts as a treat every afternoon.")
    data = table([museums, food, (opening[0], "", opening[1]), museums])  # r2: their opening alone
    out, stats = run_quality(data, QualityConfig(min_total=0.0))
    # r0 and r1 share their first exchange (the text columns are equal) but not their later turns: both
    # stay. r2, their opening alone, is under half of either: it stays too. r3 repeats r0: it goes.
    assert out.column("instruction").to_pylist() == [opening[0]] * 4
    assert out.column("drop_reason").to_pylist() == [None, None, None, "near_duplicate"]
    assert out.column("duplicate_of").to_pylist() == [None, None, None, "r0"]
    assert stats["dedup"]["clusters"] == 1 and stats["dedup"]["rows_in_clusters"] == 2
    # On the first exchanges alone (the fields of a one-exchange row) all four are one cluster.
    without = run_quality(data.drop_columns(["messages"]), QualityConfig(min_total=0.0))[1]
    assert without["dedup"]["rows_in_clusters"] == 4


def test_a_conversation_and_its_own_opening_are_duplicates_only_when_the_rest_adds_little():
    opening = ("Write a short poem about the sea at night with waves and stars",
               "The waves roll on beneath the stars, the moon keeps watch on quiet bars of light.")
    thanks = turns(*opening, "Thanks!", "You are welcome.")
    out, _ = run_quality(table([(opening[0], "", opening[1]), thanks]), QualityConfig(min_total=0.0))
    # Four words of thanks add four 3-word shingles to the opening's 28: Jaccard 28/32, over 0.7.
    assert out.column("drop_reason").to_pylist().count("near_duplicate") == 1
    more = turns(*opening, "Now write one about the same sea at dawn, when the fishing boats go out",
                 "The boats slip out as dawn comes grey, the gulls cry over nets and spray, the sea wakes slowly "
                 "into day.")
    out, _ = run_quality(table([(opening[0], "", opening[1]), more]), QualityConfig(min_total=0.0))
    assert out.column("drop_reason").to_pylist() == [None, None]


class TurnScorer:
    """next_token_logprobs and response_losses with values known per prompt, to check how a conversation's
    turns combine: complexity = the query's word count, quality = the response's (each capped at 6);
    the conditioned loss = 0.2 per `### ` header of the prompt, the direct loss = the response's word count.
    A response holding HUGE did not fit (no loss), LONG was cut."""

    def __init__(self):
        self.prompts = []

    def next_token_logprobs(self, prompts, candidates):
        self.prompts += list(prompts)
        rows = []
        for p in prompts:
            if "##Complexity:" in p:
                text = p.split("##Query: ")[1].split("\n##Complexity:")[0]
            else:
                text = p.split("#Response#:\n")[1].split(" \n##Quality:")[0]
            lp = np.full(6, -200.0)
            lp[min(len(text.split()), 6) - 1] = 0.0
            rows.append(lp)
        return np.array(rows)

    def truncations(self, prompts, responses, max_length):
        return ["dropped_prompt_too_long" if "HUGE" in r else "truncated_response" if "LONG" in r else None
                for r in responses]

    def response_losses(self, prompts, responses, max_length, desc="", room_from=None):
        if room_from is None:
            self.prompts += list(prompts)
        return np.array([np.nan if "HUGE" in r else p.count("### ") * 0.2 if p else float(len(r.split()))
                         for p, r in zip(prompts, responses)])


def test_deita_and_ifd_of_a_conversation_turn_by_turn():
    from tasks.model_scores import conversation_prompt, deita_row_scores, ifd_row_scores

    chat = turns("Name a fruit.", "An apple is a fruit.", "Another?", "A pear.", system="Answer briefly.")
    scorer = TurnScorer()
    rows = (["Name a fruit.", "Add the numbers."], ["", "2 3"], ["An apple is a fruit.", "5"], [chat, None])
    complexity, quality, deita = deita_row_scores(*rows, scorer)
    # Turns (query words, response words): (3, 5), (1, 2); the one-exchange row: "Add the numbers.\n2 3" (5, 1).
    assert complexity.tolist() == pytest.approx([(3 + 1) / 2, 5])
    assert quality.tolist() == pytest.approx([(5 + 2) / 2, 1])
    assert deita.tolist() == pytest.approx([3 * 5 + 1 * 2, 5 * 1])  # DEITA sums its turns' scores
    # Each turn is scored on its own: its user turn is the query, without the turns before it.
    assert "##Query: Another?\n##Complexity: " in scorer.prompts[1]

    ifd, conditioned, direct, cut = ifd_row_scores(*rows, scorer, 512)
    # An answer's context: the turns before it (the system prompt too), then the assistant's header.
    assert conversation_prompt(chat[:4]) == (
        "Below is a conversation between a user and an assistant. Write the assistant's next response.\n\n"
        "### System:\nAnswer briefly.\n\n### User:\nName a fruit.\n\n### Assistant:\nAn apple is a fruit.\n\n"
        "### User:\nAnother?\n\n### Assistant:\n")
    # Headers: turn 1 after system and user (3 with its own), turn 2 after 4 turns (5); the Alpaca prompt
    # with an input has 3. Direct losses: 5 and 2 words; "5" is 1.
    assert ifd.tolist() == pytest.approx([(0.6 / 5 + 1.0 / 2) / 2, 0.6 / 1])
    assert conditioned.tolist() == pytest.approx([(0.6 + 1.0) / 2, 0.6])
    assert direct.tolist() == pytest.approx([(5 + 2) / 2, 1]) and cut == [None, None]
    # A later turn that does not fit leaves the mean of those before it, and says so.
    cut_chat = turns("Name a fruit.", "An apple is a fruit.", "Another?", "A pear LONG.", "More?", "HUGE list")
    ifd, _, _, cut = ifd_row_scores(["Name a fruit."], [""], ["An apple is a fruit."], [cut_chat], scorer, 512)
    assert ifd.tolist() == pytest.approx([(0.4 / 5 + 0.8 / 3) / 2]) and cut == ["dropped_prompt_too_long"]


def test_one_exchange_rows_get_exactly_the_single_exchange_scores():
    from tasks.model_scores import deita_row_scores, deita_scores, ifd_row_scores, ifd_scores

    rows = (["Name a fruit.", "Add the numbers."], ["", "2 3"], ["An apple is a fruit LONG.", "5"])
    a, b = deita_row_scores(*rows, [None, None], TurnScorer()), deita_scores(*rows, TurnScorer())
    assert a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist()
    assert a[2].tolist() == (b[0] * b[1]).tolist()
    a, b = ifd_row_scores(*rows, [None, None], TurnScorer(), 64), ifd_scores(*rows, TurnScorer(), 64)
    for x, y in zip(a[:3], b[:3]):
        assert x.tolist() == y.tolist()
    assert a[3] == b[3] == ["truncated_response", None]


def test_the_judge_sees_every_turn_of_a_conversation_and_one_exchange_prompts_are_unchanged():
    from tasks.judge import judge_prompt

    seen = []

    def respond(prompt, params):
        seen.append(prompt)
        return "Rating: 7/10"

    data = table([PHOTO, ONE[0]])
    cfg = QualityConfig.model_validate({"min_total": 0.0, "judge": {"enabled": True}})
    out, _ = run_quality(data, cfg, judge_llm=ScriptedLLM(respond))
    assert out.column("score_judge").to_pylist() == [7.0, 7.0]
    conv_prompt = next(p for p in seen if "Compare both" in p)
    assert conv_prompt.endswith(
        "### Conversation:\nUser: Explain photosynthesis briefly.\n\nAssistant: Photosynthesis turns light into "
        "sugar in plants.\n\nUser: And what about respiration?\n\nAssistant: Respiration burns sugar\n\n"
        "User: Compare both processes in plants now.\n\nAssistant: Both happen in plant cells, in opposite "
        "directions.\n\nRating:")
    assert "every assistant turn" in conv_prompt
    assert judge_prompt("Name colors.", "", "Red", "completions") in seen


def test_model_scores_on_a_tiny_model_equal_the_hand_computation_per_turn(tiny_model_dir):
    from tasks.llm.transformers_backend import TransformersLLM
    from tasks.model_scores import (DEITA_COMPLEXITY, DEITA_QUALITY, SCORE_TOKENS, conversation_prompt,
                                    deita_row_scores, deita_scores, ifd_row_scores, ifd_scores)
    from tests.unit.test_model_scores import _full_logits_loss

    llm = TransformersLLM(tiny_model_dir, device="cpu", dtype="float32", batch_size=8)
    chat = turns("Name a fruit.", "An apple.", "And a vegetable?", "A carrot is one.")
    rows = (["Name a fruit.", "Sort the numbers."], ["", "3, 1, 2"], ["An apple.", "1, 2, 3"], [chat, None])

    complexity, quality, deita = deita_row_scores(*rows, llm)
    pairs = [("Name a fruit.", "An apple."), ("And a vegetable?", "A carrot is one.")]
    p = np.exp(llm.next_token_logprobs([DEITA_COMPLEXITY.format(query=q) for q, _ in pairs]
                                       + [DEITA_QUALITY.format(query=q, response=r) for q, r in pairs], SCORE_TOKENS))
    by_hand = (p * np.arange(1, 7)).sum(axis=1) / p.sum(axis=1)  # complexity of turns 1, 2; quality of turns 1, 2
    assert complexity[0] == pytest.approx((by_hand[0] + by_hand[1]) / 2, rel=1e-5)
    assert quality[0] == pytest.approx((by_hand[2] + by_hand[3]) / 2, rel=1e-5)
    assert deita[0] == pytest.approx(by_hand[0] * by_hand[2] + by_hand[1] * by_hand[3], rel=1e-5)
    single = deita_scores(rows[0][1:], rows[1][1:], rows[2][1:], llm)
    assert complexity[1] == pytest.approx(single[0][0], rel=1e-5)
    assert quality[1] == pytest.approx(single[1][0], rel=1e-5)

    ifd, conditioned, direct, cut = ifd_row_scores(*rows, llm, 256)
    cond = [_full_logits_loss(llm, conversation_prompt(chat[:1]), "An apple."),
            _full_logits_loss(llm, conversation_prompt(chat[:3]), "A carrot is one.")]
    alone = [_full_logits_loss(llm, "", "An apple."), _full_logits_loss(llm, "", "A carrot is one.")]
    assert conditioned[0] == pytest.approx(np.mean(cond), rel=1e-4)
    assert direct[0] == pytest.approx(np.mean(alone), rel=1e-4)
    assert ifd[0] == pytest.approx((cond[0] / alone[0] + cond[1] / alone[1]) / 2, rel=1e-4) and cut == [None, None]
    one = ifd_scores(rows[0][1:], rows[1][1:], rows[2][1:], llm, 256)
    assert ifd[1] == pytest.approx(one[0][0], rel=1e-5)
    # A table of one-exchange rows only: the very same numbers as the single-exchange functions.
    only = (rows[0][1:], rows[1][1:], rows[2][1:])
    assert ifd_row_scores(*only, [None], llm, 256)[0].tolist() == one[0].tolist()
    assert deita_row_scores(*only, [None], llm)[0].tolist() == single[0].tolist()


def test_sharded_scoring_reads_the_conversations_and_equals_one_process(tmp_path, monkeypatch):
    """score_shard and judge_shard read their rows from the stage's input Parquet, `messages` included:
    run through shards (called in this process) the stage's table equals the one-process table."""
    import tasks.llm
    from tasks.shards import Sharding, StageShards, run_shard

    data = table([PHOTO, ONE[0], turns("Name a fruit.", "An apple is a fruit.", "Another?", "A pear."), ONE[1],
                  ("Add the numbers.", "2 3", "5"), turns("Hi.", "Hello there, how can I help?", system="Be kind.")])
    source = tmp_path / "input.parquet"
    pq.write_table(data, source)
    cfg = QualityConfig.model_validate({"min_total": 0.0, "checkpoint_every": 2, "judge": {"enabled": True},
                                        "deita": {"enabled": True}, "ifd": {"enabled": True}})

    def judge_llm():  # a rating read off the prompt: how many requests it shows
        return ScriptedLLM(lambda prompt, params: f"Rating: {prompt.count('User: ') + prompt.count('### Task')}")

    local, local_stats = run_quality(data, cfg, judge_llm=judge_llm(), scorer=TurnScorer(),
                                     parts=PartWriter(tmp_path / "local"))

    models = {"judge": judge_llm(), "scorer": TurnScorer()}
    monkeypatch.setattr(tasks.llm, "get_llm", lambda section: models[section.model])
    sections = {name: {"backend": "transformers", "model": name} for name in models}
    ran = []

    def run(shards):
        ran.extend(shards)
        return [{**run_shard(s.fn, s.kwargs), "attempts": 1} for s in shards]

    remote = StageShards(Sharding(run=run, count=lambda: 2), str(source), sections)

    def refuse(*args, **kwargs):
        raise AssertionError("every item was scored in a shard")

    idle_judge = ScriptedLLM(lambda prompt, params: refuse())
    idle_scorer = type("Idle", (), {"next_token_logprobs": refuse, "truncations": refuse, "response_losses": refuse})()
    sharded, sharded_stats = run_quality(data, cfg, judge_llm=idle_judge, scorer=idle_scorer,
                                         parts=PartWriter(tmp_path / "sharded"), remote=remote)
    assert {s.fn for s in ran} == {"tasks.quality:judge_shard", "tasks.quality:score_shard"} and len(ran) == 4
    assert sharded.equals(local)
    # Two demonstrations in every prompt, then the conversation's user turns or the one task.
    assert local.column("score_judge").to_pylist() == [5.0, 3.0, 4.0, 3.0, 3.0, 3.0]
    assert local.column("score_deita").to_pylist()[0] == pytest.approx(3 * 6 + 4 * 3 + 6 * 6)
    assert sharded_stats["multi_turn"] == local_stats["multi_turn"] == {"rows": 3, "kept": 3}
