"""Chat templates for `finetune.template: chat`: which template renders a conversation, and which of its
tokens a model is trained on.

The template is the `finetune.chat_template` file when set, else the tokenizer's own `chat_template`, else,
for a Gemma tokenizer (it has `<start_of_turn>` and `<end_of_turn>`), Gemma's turn format (`GEMMA`): the
bundled GGUF's tokenizer carries no template. The tuned model is saved with the template it was trained on,
so `tokenizer.apply_chat_template` renders its prompts as training rendered its examples.

Which tokens are trained (`turn_spans`), for any template that renders conversations prefix-stably: for the
assistant turn at message j, the conversation up to it rendered with the generation prompt (P) and the
conversation up to and including it rendered without (F) both tokenize to prefixes of the whole rendered
conversation, and the turn is the tokens between them, F minus P. Its trained span starts at P's end (the
template's role header is in P, so never trained) and ends with the last special token of the turn (the
end-of-turn token: Gemma's `<end_of_turn>`, ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`, an `</s>`), so
whatever the template writes after it before the next turn (Gemma's newline) is not trained; a template whose
turns end without a special token gets the whole turn trained. Every assistant turn has its span; user and
system text, headers and the `<bos>` never do. A template that renders an earlier turn differently once
later turns follow (one that drops earlier reasoning, say) gives no such masks and is refused.

Rendered text is tokenized without the tokenizer's own special tokens (as `apply_chat_template` does): the
template writes the `<bos>` itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# Gemma's turn format: `<bos>`, then per turn `<start_of_turn>{role}\n{content}<end_of_turn>\n`, the assistant's
# role named `model`. Gemma has no system role: a system prompt opens the first user turn, a blank line
# before the user's text. The generation prompt is the opening of a model turn.
GEMMA = (
    "{{- bos_token -}}\n"
    "{%- if messages and messages[0]['role'] == 'system' -%}\n"
    "    {%- set system_prompt = messages[0]['content'] | trim -%}\n"
    "    {%- set turns = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set system_prompt = '' -%}\n"
    "    {%- set turns = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in turns -%}\n"
    "    {%- if message['role'] not in ['user', 'assistant'] -%}\n"
    "        {{- raise_exception('Gemma turns are user and assistant (after an optional system prompt), not '"
    " ~ message['role']) -}}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 is even) -%}\n"
    "        {{- raise_exception('Gemma turns alternate user, assistant, user, ..., starting with user') -}}\n"
    "    {%- endif -%}\n"
    "    {{- '<start_of_turn>' ~ ('model' if message['role'] == 'assistant' else 'user') ~ '\\n' -}}\n"
    "    {%- if loop.first and system_prompt -%}\n"
    "        {{- system_prompt ~ '\\n\\n' -}}\n"
    "    {%- endif -%}\n"
    "    {{- message['content'] | trim -}}\n"
    "    {{- '<end_of_turn>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{- '<start_of_turn>model\\n' -}}\n"
    "{%- endif -%}\n"
)
GEMMA_TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")
# The conversation whose assistant turn shows where a template ends a turn (`end_of_turn_id`).
_PROBE = [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes."}]

Messages = Sequence[dict[str, str]]


class ChatTemplateError(ValueError):
    """A template that cannot be found, rendered, or masked; the message names what to change."""


def is_gemma(tokenizer) -> bool:
    """Whether the tokenizer has Gemma's turn tokens (as single tokens of their own)."""
    unk = tokenizer.unk_token_id
    ids = [tokenizer.convert_tokens_to_ids(t) for t in GEMMA_TURN_TOKENS]
    return all(i is not None and i != unk for i in ids)


def template_for(tokenizer, path: str | Path | None = None) -> str:
    """The chat template to train with: the file at `path` (`finetune.chat_template`), else the tokenizer's
    own, else Gemma's for a Gemma tokenizer; else ChatTemplateError naming `finetune.chat_template`."""
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ChatTemplateError(f"finetune.chat_template: no file {file} (a Jinja chat template)")
        text = file.read_text(encoding="utf-8")
        if not text.strip():
            raise ChatTemplateError(f"finetune.chat_template: {file} is empty")
        return text
    own = tokenizer.chat_template
    if isinstance(own, dict):  # named templates: the default one renders conversations
        own = own.get("default")
    if own:
        return own
    if is_gemma(tokenizer):
        return GEMMA
    raise ChatTemplateError(f"finetune.template is chat but the tokenizer ({type(tokenizer).__name__}, "
                            f"{getattr(tokenizer, 'name_or_path', '?')}) has no chat template and is not "
                            f"Gemma's; set finetune.chat_template to a Jinja chat-template file")


def render(tokenizer, template: str, messages: Messages, add_generation_prompt: bool = False) -> str:
    """The conversation as the template writes it (text, `<bos>` included when the template writes it)."""
    return tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def prompt_ids(tokenizer, messages: Messages, template: str | None = None) -> list[int]:
    """The token ids of a prompt for a chat-tuned model: the conversation so far and the generation prompt,
    tokenized as training tokenized its examples (the template's `<bos>`, no second one). `template`
    defaults to the tokenizer's own, which a model tuned with `finetune.template: chat` is saved with."""
    from tasks.tokenized import token_ids

    template = template or tokenizer.chat_template
    if not template:
        raise ChatTemplateError(f"{getattr(tokenizer, 'name_or_path', 'this tokenizer')} has no chat template: "
                                f"its model was not tuned with finetune.template: chat")
    return token_ids(tokenizer, [render(tokenizer, template, messages, add_generation_prompt=True)], False)[0]


def special_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens: its named ones and every added token marked special."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    return ids


def turn_spans(tokenizer, template: str, conversations: Sequence[Messages],
               where: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Each conversation's token ids (the whole conversation rendered) and the trained [start, end) span of
    each assistant turn, in order (see the module's docstring). All the texts of the batch are tokenized
    in one call of the tokenizer. ChatTemplateError, naming `where[i]`, for a template that does not render
    the conversation prefix-stably or gives an assistant turn no token."""
    from tasks.tokenized import token_ids

    texts: list[str] = []
    plans: list[tuple[int, list[tuple[int, int]]]] = []  # per conversation: its text, and each turn's P and F
    for messages, at in zip(conversations, where):
        whole_at = len(texts)
        turns: list[tuple[int, int]] = []
        try:
            whole = render(tokenizer, template, messages)
            texts.append(whole)
            for j, m in enumerate(messages):
                if m["role"] != "assistant":
                    continue
                before, upto = len(texts), whole_at  # up to the last turn is the whole conversation
                texts.append(render(tokenizer, template, messages[:j], add_generation_prompt=True))
                if j + 1 < len(messages):
                    upto = len(texts)
                    texts.append(render(tokenizer, template, messages[:j + 1]))
                turns.append((before, upto))
        except Exception as exc:  # jinja's own errors and the template's raise_exception
            raise ChatTemplateError(f"{at}: the chat template cannot render this conversation: "
                                    f"{type(exc).__name__}: {exc}") from exc
        for k, (p, f) in enumerate(turns):
            if not (whole.startswith(texts[p]) and whole.startswith(texts[f])):
                raise _unstable(at, k, "text")
        plans.append((whole_at, turns))
    ids = token_ids(tokenizer, texts, False)
    special = special_ids(tokenizer)
    out: list[tuple[list[int], list[tuple[int, int]]]] = []
    for (whole_at, turns), at in zip(plans, where):
        whole = ids[whole_at]
        spans: list[tuple[int, int]] = []
        for k, (p, f) in enumerate(turns):
            before, upto = ids[p], ids[f]
            if whole[:len(before)] != before or whole[:len(upto)] != upto:
                raise _unstable(at, k, "tokens")
            start = len(before)
            turn = upto[start:]
            if not turn:
                raise ChatTemplateError(f"{at}: the chat template renders assistant turn {k} as no token at all")
            if spans and start < spans[-1][1]:
                raise _unstable(at, k, "tokens")
            last_special = max((n for n, t in enumerate(turn) if t in special), default=len(turn) - 1)
            spans.append((start, start + last_special + 1))
        if spans and spans[0][0] == 0:  # packed rows need an untrained first token (tasks/llm/losses.py)
            raise ChatTemplateError(f"{at}: the chat template renders nothing before the first assistant turn")
        out.append((whole, spans))
    return out


def _unstable(at: str, k: int, what: str) -> ChatTemplateError:
    return ChatTemplateError(
        f"{at}: the chat template is not prefix-stable: the conversation up to assistant turn {k} does not "
        f"render to {what} that begin the whole conversation's, so the turn's loss mask cannot be found (a "
        f"template that rewrites earlier turns once later ones follow); set finetune.chat_template to a "
        f"template that renders each turn the same whatever comes after it")


def end_of_turn_id(tokenizer, template: str) -> int | None:
    """The token that ends an assistant turn under `template` (the last token of a trained span), when it is
    a special token: a tuned model's generation stops there as well as at end-of-sequence."""
    ids, spans = turn_spans(tokenizer, template, [_PROBE], ["the chat template's probe conversation"])[0]
    last = ids[spans[0][1] - 1]
    return last if last in special_ids(tokenizer) else None

