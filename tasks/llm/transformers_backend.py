"""The in-process Hugging Face backend: batched generation on GPU when present, else CPU.

A causal model reads left-padded prompts and continues them. An encoder-decoder model (T5, FLAN-T5, BART; see
tasks/llm/seq2seq.py) reads the right-padded prompt in its encoder and generates the completion from its
decoder; its prompt tokens are the encoder's, and its log-probabilities are the decoder's given the prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList

from tasks import chat_template
from tasks.llm import seq2seq
from tasks.llm.base import Completion, GenerationParams, Mode, Prompt, truncate_at_stop
from tasks.llm.losses import collate, fit_response, make_example, token_losses

log = logging.getLogger(__name__)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device `cuda` was asked for, but torch sees no CUDA device; use `auto` or `cpu`")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_tokenizer(model_dir: Path, padding_side: str = "left"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.padding_side = padding_side
    tokenizer.truncation_side = "left"  # keep the end of an over-long prompt: that is where the task is
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(model_dir: Path, device: torch.device, dtype: torch.dtype, attn_implementation: str | None = None):
    from transformers import AutoModelForCausalLM

    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, **extra)
    return model.to(device)


def load_lm(model_dir: Path, device: torch.device, dtype: torch.dtype, attn_implementation: str | None = None):
    """The model of a local directory: an encoder-decoder one (its config says `is_encoder_decoder`) through
    AutoModelForSeq2SeqLM, any other through AutoModelForCausalLM."""
    if seq2seq.is_encoder_decoder(model_dir):
        return seq2seq.load_seq2seq_lm(model_dir, device, dtype, attn_implementation)
    return load_causal_lm(model_dir, device, dtype, attn_implementation)


class NucleusSampling:
    """Temperature, then top-p, as one logits processor that avoids sorting the whole vocabulary.

    Sorting Gemma's 262K logits for every row at every step costs more on a CPU than the transformer
    itself. The nucleus almost always lies inside the top few hundred tokens, so this takes the top
    `candidates` first and falls back to a full sort only for rows where those hold less than `top_p`
    of the probability mass. The result is the same nucleus as a full sort.
    """

    def __init__(self, temperature: float, top_p: float, candidates: int = 512):
        self.temperature = temperature
        self.top_p = top_p
        self.candidates = candidates

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores / self.temperature
        if self.top_p >= 1.0:
            return scores
        k = min(self.candidates, scores.shape[-1])
        log_z = torch.logsumexp(scores, dim=-1, keepdim=True)
        top_vals, top_idx = torch.topk(scores, k, dim=-1)
        probs = torch.exp(top_vals - log_z)
        cum = probs.cumsum(dim=-1)
        inside = cum[:, -1] >= self.top_p
        if not bool(inside.all()):  # rare: the nucleus is wider than the candidates, sort those rows fully
            rows = (~inside).nonzero().flatten()
            full_vals, full_idx = torch.sort(scores[rows], descending=True, dim=-1)
            full_cum = torch.exp(full_vals - log_z[rows]).cumsum(dim=-1)
            drop = (full_cum - torch.exp(full_vals - log_z[rows])) >= self.top_p
            scores[rows] = scores[rows].scatter(-1, full_idx, full_vals.masked_fill(drop, float("-inf")))
        # Keep a token if the mass before it is still below top_p (so the top token always stays).
        keep = (cum - probs) < self.top_p
        kept = torch.full_like(scores, float("-inf")).scatter(-1, top_idx, top_vals.masked_fill(~keep, float("-inf")))
        return torch.where(inside.unsqueeze(-1), kept, scores)


class RowSampling:
    """Draws each row's next token with that row's own generator, then leaves only that token standing.

    With `do_sample=True` transformers draws a whole batch's tokens from one generator, so a row's text
    would depend on which rows share its batch and where it sits. Here each row draws from a generator of
    its own: a row's text depends on its prompt, its seed and the model alone. Every other token gets
    -inf, so greedy decoding (`do_sample=False`) picks the drawn one. Put it after every other processor:
    transformers applies its own (the repetition penalty) before the caller's. A None generator draws
    from torch's global one (an unseeded request).
    """

    def __init__(self, generators: Sequence[torch.Generator | None]):
        self.generators = generators

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores, dim=-1)
        # argmax(p / q) with q ~ Exp(1) is a draw from p (the Gumbel-max trick), and the very draw
        # `torch.multinomial(p, 1, generator=g)` makes. Only the noise is drawn row by row: a multinomial
        # per row would also run its checks per row, with a device sync each, several times slower.
        noise = torch.empty_like(probs)
        for row, generator in zip(noise, self.generators):
            row.exponential_(generator=generator)
        drawn = probs.div_(noise).argmax(dim=-1, keepdim=True)
        return noise.fill_(float("-inf")).scatter_(-1, drawn, 0.0)  # reuses a (batch, vocabulary) buffer


def _tokens(example) -> int:
    """An example's tokens, for batching similar lengths together (0 for a dropped one)."""
    if example is None:
        return 0
    return example.tokens if isinstance(example, seq2seq.Seq2SeqExample) else len(example.input_ids)




class TransformersLLM:
    def __init__(self, model_dir: Path, device: str = "auto", dtype: str = "auto", batch_size: int = 16,
                 max_prompt_tokens: int = 1024, mode: Mode = "completions"):
        self.mode = mode
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.name = f"transformers:{model_dir.name}"
        self.batch_size = batch_size
        self.max_prompt_tokens = max_prompt_tokens
        # An encoder reads padding at the end (seq2seq.pad_rows); a causal model continues from the last token.
        self.encoder_decoder = seq2seq.is_encoder_decoder(model_dir)
        self.tokenizer = load_tokenizer(model_dir, padding_side="right" if self.encoder_decoder else "left")
        self.model = load_lm(model_dir, self.device, self.dtype).eval()
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {int(e) for e in eos if e is not None} | {int(self.tokenizer.eos_token_id)}
        vocab = self.tokenizer.get_vocab()
        self.gemma_turns = all(marker in vocab for marker in chat_template.GEMMA_TURN_TOKENS)
        if mode == "chat":
            if not self.tokenizer.chat_template and not self.gemma_turns:
                raise ValueError(f"llm.mode is `chat` but {model_dir} has no chat template; use "
                                 f"`llm.mode: completions` or a model whose tokenizer has one")
            if self.gemma_turns:  # a chat reply ends with <end_of_turn>
                self.eos_ids.add(int(vocab["<end_of_turn>"]))
        log.info("loaded %s on %s (%s)", model_dir, self.device, self.dtype)

    def render(self, prompt: Prompt) -> str:
        """The text the model sees: a completion prompt as is, chat messages through the chat template."""
        if isinstance(prompt, str):
            if self.mode == "chat":
                prompt = [{"role": "user", "content": prompt}]
            else:
                return prompt
        if self.mode != "chat":
            raise TypeError("llm.mode is `completions` but a stage built chat messages; this is a bug")
        # The tokenizer's own template (a model tuned with finetune.template: chat is saved with it), else
        # Gemma's turn format, the one training uses for Gemma tokenizers without a template.
        text = chat_template.render(self.tokenizer, self.tokenizer.chat_template or chat_template.GEMMA, prompt,
                                    add_generation_prompt=True)
        bos = self.tokenizer.bos_token
        return text[len(bos):] if bos and text.startswith(bos) else text  # the tokenizer adds <bos> itself

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams, desc: str = "generate",
                 seeds: Sequence[int | None] | None = None) -> list[Completion]:
        """One completion per prompt, in prompt order.

        Sampling with `seeds` (one per prompt), prompt i samples from a generator of its own seeded with
        `seeds[i]`: its text is the same in any batch, at any position (`params.seed` is not used). Without
        them, each batch samples from torch's global generator, seeded with `params.seed` plus the batch's
        offset. Greedy decoding (temperature 0) uses no seed.
        """
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        prompts = [self.render(p) for p in prompts]
        # Similar lengths in one batch waste less padding; results go back in prompt order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
        results: list[Completion | None] = [None] * len(prompts)
        with tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False) as bar:
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                batch_seeds = None if seeds is None else [seeds[i] for i in batch]
                for i, completion in zip(batch, self._generate_batch([prompts[i] for i in batch], params,
                                                                     start, batch_seeds)):
                    results[i] = completion
                bar.update(len(batch))
        return [r for r in results if r is not None]

    @torch.inference_mode()
    def next_token_logprobs(self, prompts: Sequence[Prompt], candidates: Sequence[str]) -> np.ndarray:
        """Log-probability of each candidate's first token right after each prompt: shape (prompts, candidates).

        One forward pass per batch, no sampling; the output layer runs on the last position only. For an
        encoder-decoder model, the decoder's first token with the prompt in the encoder.
        """
        tok = self.tokenizer
        prompts = [self.render(p) for p in prompts]
        ids = [tok(c, add_special_tokens=False)["input_ids"][0] for c in candidates]
        if len(set(ids)) != len(ids):
            raise ValueError(f"candidates {list(candidates)} do not start with distinct tokens")
        rows = []
        for start in range(0, len(prompts), self.batch_size):
            if self.encoder_decoder:
                enc_ids, enc_mask = self._encoder_batch(prompts[start:start + self.batch_size])
                rows.append(seq2seq.first_token_logprobs(self.model, enc_ids, enc_mask, ids))
                continue
            enc = tok(list(prompts[start:start + self.batch_size]), return_tensors="pt", padding=True,
                      truncation=True, max_length=self.max_prompt_tokens).to(self.device)
            hidden = self.model.get_decoder()(**enc).last_hidden_state[:, -1]  # left padding: last is real
            logits = self.model.get_output_embeddings()(hidden).float()
            rows.append(torch.log_softmax(logits, dim=-1)[:, ids].cpu().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, len(candidates)))

    def _encoder_batch(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded encoder inputs of prompts, each cut to its last `max_prompt_tokens` tokens."""
        rows = seq2seq.encoder_ids(self.tokenizer, prompts, self.max_prompt_tokens)
        ids, mask = seq2seq.pad_rows(rows, self.tokenizer.pad_token_id)
        return ids.to(self.device), mask.to(self.device)

    def _token_pairs(self, prompts: Sequence[str], responses: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        tok = self.tokenizer
        if self.encoder_decoder:  # the empty prompt is not empty for an encoder (see seq2seq)
            return list(zip(seq2seq.encoder_ids(tok, prompts),
                            (tok(r.strip(), add_special_tokens=False)["input_ids"] for r in responses)))
        return [(tok(p, add_special_tokens=True)["input_ids"], tok(r.strip(), add_special_tokens=False)["input_ids"])
                for p, r in zip(prompts, responses)]

    def truncations(self, prompts: Sequence[str], responses: Sequence[str], max_length: int) -> list[str | None]:
        """What `response_losses` does to each pair that does not fit in `max_length` (see fit_response; for an
        encoder-decoder model seq2seq.fit, `max_length` per side)."""
        fits = seq2seq.fit if self.encoder_decoder else fit_response
        return [fits(len(p), len(r), max_length)[1] for p, r in self._token_pairs(prompts, responses)]

    @torch.inference_mode()
    def response_losses(self, prompts: Sequence[str], responses: Sequence[str], max_length: int,
                        desc: str = "response loss", room_from: Sequence[str] | None = None) -> np.ndarray:
        """Mean loss per token of each response after its prompt (an empty prompt: after BOS alone).

        Plain text in, no chat template: this scores how predictable a text is, not a conversation. The
        prompt is kept whole and an over-long response is scored on its head (fit_response); with
        `room_from`, the head that fits after those prompts instead, so that a response scored alone and
        after its instruction is scored on the same tokens. NaN for a response with no tokens, or when
        the prompt leaves no room.

        An encoder-decoder model scores the response as its decoder's output with the prompt as its
        encoder's input (an empty prompt: see seq2seq), each side within `max_length`; a response's room
        does not depend on its prompt there, so `room_from` changes nothing.
        """
        pairs = self._token_pairs(prompts, responses)
        if self.encoder_decoder:
            examples = [seq2seq.make_example(p, r, max_length) for p, r in pairs]
            batch_of, losses_of = seq2seq.collate, seq2seq.token_losses
        else:
            rooms = ([None] * len(pairs) if room_from is None
                     else [len(p) for p, _ in self._token_pairs(room_from, [""] * len(room_from))])
            examples = [make_example(p, r, max_length, room_tokens=room) for (p, r), room in zip(pairs, rooms)]
            batch_of, losses_of = collate, token_losses
        losses = np.full(len(examples), np.nan)
        order = [i for i in sorted(range(len(examples)), key=lambda i: _tokens(examples[i]), reverse=True)
                 if examples[i] is not None and examples[i].trainable_tokens]
        for start in tqdm(range(0, len(order), self.batch_size), desc=desc, unit="batch", leave=False):
            rows = order[start:start + self.batch_size]
            batch = {k: v.to(self.device) for k, v in batch_of([examples[i] for i in rows],
                                                                self.tokenizer.pad_token_id).items()}
            sums, counts = losses_of(self.model, batch)
            losses[rows] = (sums / counts).cpu().numpy()
        return losses

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[str], params: GenerationParams, offset: int,
                        seeds: Sequence[int | None] | None = None) -> list[Completion]:
        tok = self.tokenizer
        if self.encoder_decoder:
            enc_ids, enc_mask = self._encoder_batch(prompts)
            enc = {"input_ids": enc_ids, "attention_mask": enc_mask}
        else:
            enc = tok(prompts, return_tensors="pt", padding=True, truncation=True,
                      max_length=self.max_prompt_tokens).to(self.device)
        kwargs: dict = {"max_new_tokens": params.max_new_tokens, "pad_token_id": tok.pad_token_id,
                        "repetition_penalty": params.repetition_penalty if params.repetition_penalty != 1.0 else None}
        if params.temperature > 0:
            processors = LogitsProcessorList([NucleusSampling(params.temperature, params.top_p)])
            if seeds is not None:  # a generator per row; greedy decoding takes the token RowSampling drew
                processors.append(RowSampling([None if s is None else torch.Generator(self.device).manual_seed(s)
                                               for s in seeds]))
            kwargs.update(do_sample=seeds is None, temperature=None, top_p=None, top_k=None,
                          logits_processor=processors)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=tok)
        if seeds is None and params.seed is not None:
            torch.manual_seed(params.seed + offset)
        out = self.model.generate(**enc, **kwargs)
        # A causal model's output repeats its prompt; a decoder's starts with its start token.
        new_tokens = out[:, 1 if self.encoder_decoder else enc["input_ids"].shape[1]:].tolist()
        prompt_lengths = enc["attention_mask"].sum(dim=1).tolist()
        completions = []
        for ids, n_prompt in zip(new_tokens, prompt_lengths):
            hit_eos = False
            for pos, token in enumerate(ids):
                if token in self.eos_ids:
                    ids, hit_eos = ids[:pos], True
                    break
            while ids and ids[-1] == tok.pad_token_id:
                ids = ids[:-1]
            text = tok.decode(ids, skip_special_tokens=True)
            text, hit_stop = truncate_at_stop(text, params.stop)
            finish = "stop" if hit_eos or hit_stop else "length"
            completions.append(Completion(text=text, finish_reason=finish, prompt_tokens=int(n_prompt),
                                          completion_tokens=len(ids) + int(hit_eos)))
        return completions
