"""`finetune.template: chat`: conversations rendered with the chat template, loss on every assistant turn and
its end-of-turn token and nowhere else, exact token by token on 1-, 2- and 3-turn conversations (with and
without a system prompt), one per row or packed; truncation by whole turns; the tuned model saved with its
template; the mask report; Alpaca refusing conversations; the template in the tokenized cache key."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks import chat_template, conversation, tokenized
from tasks.config import EvaluateConfig, FinetuneConfig
from tasks.finetune import (MASK_REPORT, build_chat_example, build_examples, finetune, mask_report_markdown,
                            micro_batch)
from tasks.llm.losses import (DROPPED_PROMPT, DROPPED_TOO_LONG, IGNORE, TRUNCATED, TRUNCATED_TURNS, collate,
                              fit_turns, pack, packed_batch, packed_example_losses, packed_loss, stack_rows,
                              token_losses)

SYSTEM = {"role": "system", "content": "Answer in as few words as you can."}
TURNS = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."},
         {"role": "user", "content": "And a fruit, please?"}, {"role": "assistant", "content": "An apple, a pear."},
         {"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "2 + 3 = 5, so: five."}]
CONVERSATIONS = {f"{n}-turn{' +system' * s}": ([SYSTEM] if s else []) + TURNS[:2 * n]
                 for n in (1, 2, 3) for s in (False, True)}


@pytest.fixture(scope="module")
def tok(gemma_tokenizer_dir):
    return AutoTokenizer.from_pretrained(gemma_tokenizer_dir)


def expected(tok, messages):
    """Gemma's turn format built piece by piece, each piece tokenized on its own: the ids, and the labels
    (the assistant's content and its <end_of_turn> trained; <bos>, headers, user and system text and the
    newline after each <end_of_turn> not)."""
    def piece(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    start, end = tok.convert_tokens_to_ids("<start_of_turn>"), tok.convert_tokens_to_ids("<end_of_turn>")
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    ids, labels = [tok.bos_token_id], [IGNORE]
    for n, m in enumerate(messages[1:] if system else messages):
        header = [start] + piece(("model" if m["role"] == "assistant" else "user") + "\n")
        content = piece(f"{system}\n\n{m['content']}" if system and n == 0 else m["content"])
        newline = piece("\n")
        ids += header + content + [end] + newline
        trained = content + [end] if m["role"] == "assistant" else [IGNORE] * (len(content) + 1)
        labels += [IGNORE] * len(header) + trained + [IGNORE] * len(newline)
    return ids, labels


def runs(labels):
    """The trained runs of a label sequence, as lists of token ids."""
    out, current = [], []
    for label in labels + [IGNORE]:
        if label != IGNORE:
            current.append(label)
        elif current:
            out, current = out + [current], []
    return out


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_masks_are_exact_one_example_per_row(tok, name):
    messages = CONVERSATIONS[name]
    ids, labels = expected(tok, messages)
    example, why = build_chat_example(tok, chat_template.GEMMA, messages, 512)
    assert why is None
    assert example.input_ids == ids  # token by token
    assert example.labels == labels
    assert example.input_ids == tok.apply_chat_template(messages, chat_template=chat_template.GEMMA,
                                                        return_dict=True)["input_ids"]
    # The trained tokens are exactly each assistant turn, and its end-of-turn token.
    decoded = [tok.decode(run, skip_special_tokens=False) for run in runs(example.labels)]
    assert decoded == [f"{c}<end_of_turn>" for c in conversation.assistant_turns(messages)]
    assert example.labels[0] == IGNORE and example.input_ids[0] == tok.bos_token_id


def conversation_rows(conversations: dict, split: str | None = None) -> pa.Table:
    rows = []
    for name, messages in conversations.items():
        row = {"id": name, **conversation.from_messages(conversation.check(messages, name))}
        if split:
            row["split"] = split
        rows.append(row)
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "messages"} for r in rows])
    return table.append_column("messages", conversation.messages_array(r["messages"] for r in rows))


def test_masks_are_exact_from_the_arrays_and_packed(tok, gemma_tokenizer_dir, tmp_path):
    """Every conversation through the stored arrays (memory-mapped), then packed several to a row as
    training packs them: the ids, labels and positions are the pieces' own, back to back."""
    table = conversation_rows(CONVERSATIONS)
    examples, _ = tokenized.prepare(tok, table, 512, "response", tmp_path, gemma_tokenizer_dir,
                                    chat_template=chat_template.GEMMA)
    assert isinstance(examples.tokens, np.memmap) and examples.rows.tolist() == list(range(6))
    want = [expected(tok, m) for m in CONVERSATIONS.values()]
    for i, (ids, labels) in enumerate(want):
        assert (examples[i].input_ids, examples[i].labels) == (ids, labels)
        assert examples.trainable[i] == sum(label != IGNORE for label in labels)
    assert examples.meta["template"] == "chat" and examples.truncation == {}
    rows = [[0, 3, 5], [1, 2, 4]]
    batch = micro_batch(examples, rows, packing=True, pad_id=tok.pad_token_id)
    width = max(sum(len(want[i][0]) for i in row) for row in rows)
    for r, row in enumerate(rows):
        ids = [t for i in row for t in want[i][0]]
        labels = [t for i in row for t in want[i][1]]
        tail = width - len(ids)
        assert batch["input_ids"][r].tolist() == ids + [tok.pad_token_id] * tail
        assert batch["labels"][r].tolist() == labels + [IGNORE] * tail
        assert batch["position_ids"][r].tolist() == [p for i in row for p in range(len(want[i][0]))] + list(range(tail))


def test_packed_losses_equal_unpacked_ones_on_conversations(tiny_model_dir, tok):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    examples = [build_chat_example(tok, chat_template.GEMMA, m, 512)[0] for m in CONVERSATIONS.values()]
    with torch.no_grad():
        sums, counts = token_losses(model, collate(examples, tok.pad_token_id))
        packed = packed_example_losses(model, examples, tok.pad_token_id)
        width = 2 * max(len(e.input_ids) for e in examples)
        rows = [packed_batch([examples[i] for i in r], tok.pad_token_id, width)
                for r in pack([len(e.input_ids) for e in examples], width)]
        total, tokens = packed_loss(model, stack_rows(rows), chunk=7)
    assert counts.tolist() == [e.trainable_tokens for e in examples]
    assert packed == pytest.approx((sums / counts).tolist(), abs=1e-4)
    assert float(total) == pytest.approx(float(sums.sum()), rel=1e-5) and int(tokens) == int(counts.sum())
    assert len(rows) < len(examples)  # really packed


def test_a_packed_example_must_open_with_an_untrained_token():
    from tasks.llm.losses import Example

    with pytest.raises(ValueError, match="starts with a trained token"):
        packed_batch([Example([2, 5], [IGNORE, 5]), Example([7, 8], [7, 8])], pad_id=0)


def test_fit_turns_keeps_whole_leading_turns_and_cuts_only_the_last_kept_answer():
    spans = [(10, 15), (25, 30), (40, 45)]  # three assistant turns; 46 tokens with the trailing newline
    assert fit_turns(spans, 46, 64) == (46, None)
    assert fit_turns(spans, 46, 45) == (45, None)  # only the untrained newline after the last turn goes
    assert fit_turns(spans, 46, 44) == (44, TRUNCATED)  # the last answer's tail (and end-of-turn) goes
    assert fit_turns(spans, 46, 41) == (41, TRUNCATED)
    assert fit_turns(spans, 46, 40) == (30, TRUNCATED_TURNS)  # the third user turn has no answer token left
    assert fit_turns(spans, 46, 33) == (30, TRUNCATED_TURNS)
    assert fit_turns(spans, 46, 29) == (29, TRUNCATED)
    assert fit_turns(spans, 46, 25) == (15, TRUNCATED_TURNS)
    assert fit_turns(spans, 46, 11) == (11, TRUNCATED)
    assert fit_turns(spans, 46, 10) == (0, DROPPED_PROMPT)
    assert fit_turns(spans, 46, 45, "drop") == (45, None)
    assert fit_turns(spans, 46, 44, "drop") == (0, DROPPED_TOO_LONG)
    assert fit_turns(spans, 46, 10, "drop") == (0, DROPPED_PROMPT)
    # One turn: the rule of fit_response, the prompt ending where the answer starts.
    from tasks.llm.losses import fit_response

    for max_length in range(8, 20):
        for truncation in ("response", "drop"):
            keep, why = fit_turns([(10, 15)], 16, max_length, truncation)
            assert (max(min(keep, 15) - 10, 0), why) == fit_response(10, 5, max_length, truncation)


def test_truncated_conversations_keep_exact_masks(tok):
    messages = CONVERSATIONS["3-turn +system"]
    ids, labels = expected(tok, messages)
    starts = [i for i in range(1, len(labels)) if labels[i] != IGNORE and labels[i - 1] == IGNORE]
    ends = [i + 1 for i in range(len(labels) - 1) if labels[i] != IGNORE and labels[i + 1] == IGNORE]
    cases = {starts[1] + 2: (starts[1] + 2, TRUNCATED),  # inside the second answer
             starts[2] - 1: (ends[1], TRUNCATED_TURNS),   # inside the third turn's header
             ends[0] + 3: (ends[0], TRUNCATED_TURNS),     # inside the second user turn
             starts[0]: (0, DROPPED_PROMPT)}
    for max_length, (keep, reason) in cases.items():
        example, why = build_chat_example(tok, chat_template.GEMMA, messages, max_length)
        assert why == reason
        if keep:
            assert example.input_ids == ids[:keep] and example.labels == labels[:keep]
            assert example.labels[-1] != IGNORE  # never a user turn without an answer token trained after it
        else:
            assert example is None
    example, why = build_chat_example(tok, chat_template.GEMMA, messages, starts[2] + 1, "drop")
    assert (example, why) == (None, DROPPED_TOO_LONG)
    # All six at that length: those with a system prompt are cut inside their second answer (the prompt
    # shifts it right); the 3-turn one without has its second answer whole and its third user turn left out.
    max_length = starts[1] + 2
    reasons = {"1-turn": None, "1-turn +system": None, "2-turn": None, "2-turn +system": TRUNCATED,
               "3-turn": TRUNCATED_TURNS, "3-turn +system": TRUNCATED}
    for name, reason in reasons.items():
        ids, labels = expected(tok, CONVERSATIONS[name])
        second_end = [i + 1 for i in range(len(labels) - 1) if labels[i] != IGNORE and labels[i + 1] == IGNORE][1:2]
        keep = {None: len(ids), TRUNCATED: max_length, TRUNCATED_TURNS: (second_end or [0])[0]}[reason]
        example, why = build_chat_example(tok, chat_template.GEMMA, CONVERSATIONS[name], max_length)
        assert why == reason and (example.input_ids, example.labels) == (ids[:keep], labels[:keep])
    _, kept, counts = build_examples(tok, conversation_rows(CONVERSATIONS), max_length,
                                     chat_template=chat_template.GEMMA)
    assert kept.tolist() == [0, 1, 2, 3, 4, 5] and counts == {TRUNCATED: 2, TRUNCATED_TURNS: 1}


def test_alpaca_refuses_a_conversation_and_keeps_single_turn_rows(tok, gemma_tokenizer_dir, tmp_path):
    table = conversation_rows(CONVERSATIONS)
    assert table.column("messages").null_count == 1  # the 1-turn conversation without a system prompt
    with pytest.raises(ValueError, match=r"finetune\.template is alpaca but row '1-turn \+system' is a conversation"):
        tokenized.prepare(tok, table, 512, "response", tmp_path, gemma_tokenizer_dir)
    with pytest.raises(ValueError, match=r"finetune\.template is alpaca but row '2-turn'"):
        build_examples(tok, table.slice(2).to_pandas(), 512)
    plain = table.slice(0, 1)
    without = plain.drop(["messages"])
    a, info_a = tokenized.prepare(tok, plain, 512, "response", tmp_path, gemma_tokenizer_dir)
    b, info_b = tokenized.prepare(tok, without, 512, "response", tmp_path, gemma_tokenizer_dir)
    assert info_b["reused"] and info_a["path"] == info_b["path"]  # a null `messages` changes nothing
    from tasks.prompts import alpaca_prompt

    prompt = tok(alpaca_prompt("Name a color."))["input_ids"]
    assert a[0].input_ids == prompt + tok("Blue.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_the_cache_key_covers_the_template_and_the_turns(tok, gemma_tokenizer_dir, tmp_path):
    table = conversation_rows({k: v for k, v in CONVERSATIONS.items() if k == "1-turn"})
    other = chat_template.GEMMA.replace("'model'", "'assistant'").replace("turn>model", "turn>assistant")
    paths = {}
    for name, template in {"alpaca": None, "gemma": chat_template.GEMMA, "other": other}.items():
        examples, info = tokenized.prepare(tok, table, 512, "response", tmp_path, gemma_tokenizer_dir,
                                           chat_template=template)
        assert not info["reused"]
        paths[name] = info["path"]
    assert len(set(paths.values())) == 3
    _, again = tokenized.prepare(tok, table, 512, "response", tmp_path, gemma_tokenizer_dir,
                                 chat_template=chat_template.GEMMA)
    assert again["reused"] and again["path"] == paths["gemma"]
    # A conversation's later turns are part of the rows' fingerprint (its first exchange is the same).
    two = conversation_rows({"x": CONVERSATIONS["2-turn"]})
    changed = conversation_rows({"x": CONVERSATIONS["2-turn"][:3] + [{"role": "assistant", "content": "A plum."}]})
    assert tokenized.rows_fingerprint(two) != tokenized.rows_fingerprint(changed)
    assert tokenized.rows_fingerprint(two) == tokenized.rows_fingerprint(two.to_pandas())


def test_which_template(tok, tmp_path):
    assert chat_template.template_for(tok) == chat_template.GEMMA  # the bundled GGUF's tokenizer has none
    custom = tmp_path / "custom.jinja"
    custom.write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] }}<end_of_turn>{% endfor %}")
    assert chat_template.template_for(tok, custom) == custom.read_text()
    with pytest.raises(chat_template.ChatTemplateError, match=r"finetune\.chat_template: no file"):
        chat_template.template_for(tok, tmp_path / "missing.jinja")
    other = SimpleNamespace(chat_template=None, unk_token_id=0, convert_tokens_to_ids=lambda t: 0,
                            name_or_path="some-model")
    with pytest.raises(chat_template.ChatTemplateError, match=r"some-model\) has no chat template.*finetune\.chat"):
        chat_template.template_for(other)
    other.chat_template = "{{ messages }}"
    assert chat_template.template_for(other) == "{{ messages }}"
    assert chat_template.end_of_turn_id(tok, chat_template.GEMMA) == tok.convert_tokens_to_ids("<end_of_turn>")


def test_a_template_that_is_not_prefix_stable_is_refused(tok):
    unstable = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
                "{% if loop.last %} (last){% endif %}<end_of_turn>\n{% endfor %}"
                "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    with pytest.raises(chat_template.ChatTemplateError, match=r"row 'x': the chat template is not prefix-stable"):
        tokenized.encode_chat(tok, unstable, [TURNS[:2]], ["row 'x'"], 512)


def test_mask_report_marks_the_trained_text(tok):
    examples, _, _ = build_examples(tok, conversation_rows({"a": CONVERSATIONS["2-turn"]}), 512,
                                    chat_template=chat_template.GEMMA)
    report = mask_report_markdown(tok, examples, ["a"], "chat, Gemma's turn format", sample=8, seed=0)
    body = ("<bos><start_of_turn>user\nName a color.<end_of_turn>\n<start_of_turn>model\n⟦Blue.<end_of_turn>⟧\n"
            "<start_of_turn>user\nAnd a fruit, please?<end_of_turn>\n<start_of_turn>model\n"
            "⟦An apple, a pear.<end_of_turn>⟧\n")
    assert f"```text\n{body}\n```" in report
    assert "# What finetune trains: 1 of 1 training examples" in report
    assert f"{examples.lengths[0]} tokens, {examples.trainable[0]} trained, in 2 spans." in report


def chat_mix() -> pa.Table:
    """Train and eval conversations of one skill: one, two and three turns, some with a system prompt."""
    words = ["seven", "twelve", "forty", "nine", "three", "eighty", "six", "ten", "fifteen", "two", "thirty", "one"]
    rows = {}
    for i, word in enumerate(words):
        turns = [{"role": "user", "content": f"Repeat the number {word}."},
                 {"role": "assistant", "content": f"The number is {word}."}]
        for k in range(i % 3):
            turns += [{"role": "user", "content": "Again." if k else "Once more."},
                      {"role": "assistant", "content": f"Again: {word}."}]
        rows[f"r{i}"] = ([SYSTEM] if i % 2 else []) + turns
    table = conversation_rows(rows)
    return table.append_column("split", pa.array(["train"] * 8 + ["eval"] * 4))


def test_finetune_with_chat_saves_the_template_and_a_mask_report(tiny_model_dir, tmp_path):
    mixed = chat_mix()
    cfg = FinetuneConfig(template="chat", max_steps=2, batch_size=2, row_tokens=192, max_length=96, device="cpu")
    _, stats = finetune(mixed, cfg, EvaluateConfig(batch_size=4), tiny_model_dir, tmp_path / "out", seed=0,
                        tokens_root=tmp_path / "tokens")
    assert stats["template"] == "chat" and stats["mask"]["template"] == "chat" and stats["train_examples"] == 8
    saved = AutoTokenizer.from_pretrained(tmp_path / "out" / "model")
    assert saved.chat_template == chat_template.GEMMA
    examples = tokenized.Tokenized.open(Path(stats["tokenized"]["train"]["path"]))
    chats = conversation.conversations(mixed)
    for i in range(len(examples)):
        messages = chats[int(examples.rows[i])]
        ids = saved.apply_chat_template(messages, return_dict=True)["input_ids"]
        assert ids == examples[i].input_ids  # the tuned model's template gives the ids training used
        start = examples.trained_spans(i)[-1][0]  # a prompt for the last answer is the ids before it
        assert chat_template.prompt_ids(saved, messages[:-1]) == examples[i].input_ids[:start]
    generation = json.loads((tmp_path / "out" / "model" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [saved.eos_token_id, saved.convert_tokens_to_ids("<end_of_turn>")]
    report = (tmp_path / "out" / MASK_REPORT).read_text()
    assert "of 8 training examples" in report and report.count("```text") == 8 and "⟦The number is" in report
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert "apply_chat_template" in card


def test_the_launch_file_carries_the_template_settings(tmp_path, monkeypatch):
    from tasks import multigpu

    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.jinja").write_text(chat_template.GEMMA)
    cfg = FinetuneConfig(template="chat", chat_template="t.jinja")
    launch = multigpu.write_launch(tmp_path / "mix.parquet", cfg, EvaluateConfig(), tmp_path / "m", tmp_path / "o",
                                   0, {})
    sent = FinetuneConfig.model_validate(json.loads(launch.read_text())["finetune"])
    assert sent.template == "chat" and sent.chat_template == str(tmp_path / "t.jinja")


def test_the_backend_asks_in_chat_mode_with_the_ids_training_used(tiny_model_dir):
    from tasks.llm.transformers_backend import TransformersLLM

    llm = TransformersLLM(tiny_model_dir, mode="chat")
    asked = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."},
             {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}]
    sent = llm.tokenizer(llm.render(asked))["input_ids"]  # as the backend tokenizes (it adds <bos>)
    assert sent == chat_template.prompt_ids(llm.tokenizer, asked, chat_template.GEMMA)
    assert llm.tokenizer.convert_tokens_to_ids("<end_of_turn>") in llm.eos_ids
