"""A simulated OpenAI-compatible endpoint on loopback, modelled on a loaded vLLM server.

It answers `/v1/completions` and `/v1/chat/completions` for every prompt the stages send (Self-Instruct's
task lists, classification, instances; Evol-Instruct's rewrites, equality and responses; the judge) with
random-word content that passes the stages' filters, after a latency of `ttft_s + completion_tokens /
tokens_per_s`. At most `slots` requests are served at once; the rest wait in a first-come queue, and with
`max_queue` set a request that finds the queue full is answered 429 at once. Answers are a function of the
request (prompt, seed, max_tokens, stop), so a request sent twice gets the same answer.

With `Profile(logprobs_model=<a Hugging Face causal LM directory>)` a completions request that asks for
`logprobs` or `echo` is answered by that model instead (torch, CPU, in one worker thread off the event
loop), in the legacy format vLLM uses: the prompt tokenized with BOS as the in-process backend does,
and `tokens`, `token_logprobs`, `top_logprobs`, `text_offset` for the prompt (with `echo`) and for at most
one greedy token (`max_tokens` 0: none). As in vLLM, each token's text is the token decoded alone (BOS:
"<bos>"), `text_offset` is the running sum of those texts from 0, the first prompt token has no
log-probability, a top list holds the token itself and the `logprobs` most likely, and -inf is -9999.

`GET /stats` reports requests, rejections, tokens, busy slot-seconds, the span from the first arrival to
the last answer, the time-average of requests in service and slot utilisation (busy slot-seconds /
(slots x span)); `POST /stats/reset` starts a new measurement. Run it as a process (`python -m
tests.simulated_endpoint --port P --slots 256`) so its CPU is not the client's, or in a thread with
`SimulatedEndpoint` for unit tests.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import functools
import hashlib
import json
import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Pronounceable made-up words: no English stop word, no blocklisted keyword, no "sorry".
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "pr", "st", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_BLOCKED = {"image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
            "plot", "sorry"}
WORDS = sorted({o1 + v1 + o2 + v2 for o1 in _ONSETS for v1 in _VOWELS for o2 in _ONSETS[:10] for v2 in _VOWELS[:5]}
               - _BLOCKED)


@dataclass
class Profile:
    """How the simulated server behaves."""

    slots: int = 64
    ttft_s: float = 0.2
    tokens_per_s: float = 60.0
    max_queue: int | None = None  # every slot busy and this many waiting: a new request is answered 429
    retry_after_s: int = 1
    yes_share: float = 0.2  # classification and equality questions answered Yes
    response_words: tuple[int, int] = (60, 180)
    model: str = "simulated"
    logprobs_model: str | Path | None = None  # a causal LM directory: real log-probabilities (see above)


@dataclass
class Meter:
    """Busy slot-seconds and the span they were spent in."""

    requests: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    busy_s: float = 0.0
    first_arrival: float | None = None
    last_answer: float | None = None
    in_service: int = 0
    waiting: int = 0
    max_waiting: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    served: list[tuple[float, float, float, str]] = field(default_factory=list)  # arrival, start, end, kind

    def phases(self, slots: int) -> dict[str, dict[str, float]]:
        """Per kind of prompt: the window from its first arrival to its last answer, and how busy the slots
        were over that window with every kind of request (busy slot-seconds inside it / (slots x window))."""
        out = {}
        for kind in sorted({k for *_, k in self.served}):
            mine = [(a, e) for a, _, e, k in self.served if k == kind]
            lo, hi = min(a for a, _ in mine), max(e for _, e in mine)
            busy = sum(max(0.0, min(e, hi) - max(s, lo)) for _, s, e, _ in self.served)
            out[kind] = {"window_s": round(hi - lo, 3), "requests": len(mine),
                         "utilisation": round(busy / (slots * (hi - lo)), 4) if hi > lo else 0.0}
        return out

    def report(self, slots: int) -> dict[str, Any]:
        span = (self.last_answer - self.first_arrival) if self.first_arrival and self.last_answer else 0.0
        return {"requests": self.requests, "rejected": self.rejected, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "slots": slots, "busy_slot_s": round(self.busy_s, 3),
                "span_s": round(span, 3), "mean_in_service": round(self.busy_s / span, 3) if span else 0.0,
                "utilisation": round(self.busy_s / (slots * span), 4) if span else 0.0,
                "ideal_s": round(self.busy_s / slots, 3), "max_waiting": self.max_waiting,
                "by_kind": dict(self.by_kind)}


# --- what the model "writes" ----------------------------------------------------------------------------------

def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    return " ".join(words).capitalize() + "."


def _last_user_text(body: dict[str, Any]) -> tuple[str, bool]:
    if "messages" in body:
        users = [m.get("content") or "" for m in body["messages"] if m.get("role") == "user"]
        return (users[-1] if users else ""), True
    prompt = body.get("prompt", "")
    return (prompt[0] if isinstance(prompt, list) else prompt), False


def kind_of(prompt: str) -> str:
    """Which of the stages' prompts this is, from its wording."""
    tail = prompt.rstrip()
    if prompt.startswith("Come up with a series of tasks"):
        return "instructions"
    if prompt.startswith("Can the following task be regarded as a classification task"):
        return "classification"
    if prompt.startswith("Given a classification task, write examples"):
        return "instances_label_first"
    if prompt.startswith("Come up with examples for each task"):
        return "instances_input_first"
    if "Equal?" in tail[-40:] or prompt.startswith("Two tasks are equal"):
        return "equality"
    if re.search(r"(Harder task|New task|#Rewritten Prompt#|#Created Prompt#):\s*$", tail) or (
            "Reply with the rewritten task only" in tail):  # ours, and WizardLM's templates (distilabel's)
        return "rewrite"
    if "Rating:" in tail[-20:] or "Rating: [[N]]" in tail:
        return "judge"
    return "response"


def _content(kind: str, prompt: str, chat: bool, rng: random.Random, profile: Profile) -> str:
    if kind == "instructions":
        numbers = [int(n) for n in re.findall(r"^(\d+)\.", prompt, flags=re.MULTILINE)] or [0]
        first = numbers[-1] if not chat else numbers[-1] + 1  # a completion prompt ends with the opener "N."
        items = [f"{first + k}. {_sentence(rng, 7, 16)}" for k in range(rng.randint(6, 10))]
        if not chat:  # the prompt ends with "N.": go on from there
            items[0] = items[0][len(f"{first}."):]
        return "\n".join(items) + ("" if chat else "\n\n")
    if kind in ("classification", "equality"):
        answer = "Yes" if rng.random() < profile.yes_share else "No"
        return answer if chat else f" {answer}\n\n"
    if kind == "instances_label_first":
        labels = [rng.choice(WORDS) for _ in range(rng.randint(2, 4))]
        blocks = [f"Class label: {label}\nInput: {_sentence(rng, 6, 14)}" for label in labels]
        text = "\n".join(blocks) + "\n\nTask:"
        return text if chat else text[len("Class label:"):]
    if kind == "instances_input_first":
        n = rng.randint(2, 4)
        blocks = [f"Example {k}\nInput: {_sentence(rng, 5, 14)}\nOutput: {_sentence(rng, 8, 30)}"
                  for k in range(1, n + 1)]
        text = "\n".join(blocks) + "\n\nTask:"
        return text if chat else text[len("Example 1\nInput:"):]
    if kind == "rewrite":
        text = _sentence(rng, 10, 24)
        return text if chat else f" {text}\n"
    if kind == "judge":
        score = rng.randint(3, 9)
        return f"Rating: [[{score}]]" if chat else f" {score}/10\n\n"
    lo, hi = profile.response_words
    paragraphs = [_sentence(rng, 8, 20) for _ in range(max(1, rng.randint(lo, hi) // 14))]
    return " ".join(paragraphs)


def _count_tokens(text: str) -> int:
    """About one token per word or newline, as a stand-in tokenizer."""
    return len(text.split()) + text.count("\n")


def answer(body: dict[str, Any], profile: Profile) -> tuple[str, str, int, int, str]:
    """(text, finish_reason, prompt_tokens, completion_tokens, kind) for one request body."""
    prompt, chat = _last_user_text(body)
    kind = kind_of(prompt)
    seed_material = json.dumps([body.get("prompt"), body.get("messages"), body.get("seed"), body.get("max_tokens"),
                                body.get("temperature")], sort_keys=True)
    rng = random.Random(hashlib.sha256(seed_material.encode()).digest())
    text = _content(kind, prompt, chat, rng, profile)
    stops = body.get("stop") or []
    stops = [stops] if isinstance(stops, str) else stops
    finish = "stop"
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    if cut >= 0:
        text = text[:cut]
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    pieces = re.findall(r"\S+|\n", text)
    if max_tokens is not None and len(pieces) > max_tokens:  # cut at the budget, as a server would
        kept, count = [], 0
        for piece in re.finditer(r"\s*(\S+|\n)", text):
            if count == max_tokens:
                break
            kept.append(piece.group(0))
            count += 1
        text, finish = "".join(kept), "length"
    full_prompt = prompt if not chat else " ".join(m.get("content") or "" for m in body["messages"])
    return text, finish, max(1, len(full_prompt) // 4), max(1, _count_tokens(text)), kind


# --- real log-probabilities (opt-in) -----------------------------------------------------------------------

class LogprobModel:
    """A causal LM that answers completions requests asking for `logprobs` or `echo`, as vLLM would."""

    def __init__(self, model_dir: str | Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        # Each token decoded alone, as vLLM shows it (the Rust tokenizer decodes the whole vocabulary at once).
        single = [[token_id] for token_id in range(len(self.tokenizer))]
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self.texts = (backend.decode_batch(single, skip_special_tokens=False) if backend is not None
                      else [self.tokenizer.decode(ids) for ids in single])
        # Several tokens can decode to one text (the byte token <0x31> reads "1" as the token "1" does). A top
        # list then shows the token the tokenizer makes of that text, where vLLM shows whichever it lists
        # last: this server's choice, so that a text means one token.
        by_text: dict[str, list[int]] = {}
        for token_id, text in enumerate(self.texts):
            by_text.setdefault(text, []).append(token_id)
        self.canonical: dict[str, int] = {}
        for text, ids in by_text.items():
            alone = self.tokenizer(text, add_special_tokens=False)["input_ids"] if len(ids) > 1 else []
            if len(alone) == 1 and alone[0] in ids:
                self.canonical[text] = alone[0]

    def _top(self, logprobs, chosen: int, k: int) -> dict[str, float]:
        """The chosen token and the `k` most likely, by text, most likely first."""
        top: dict[str, float] = {}
        for token_id in [chosen] + self.torch.topk(logprobs, min(k, len(logprobs))).indices.tolist():
            text = self.texts[token_id]
            if text not in top or self.canonical.get(text) == token_id:
                top[text] = max(float(logprobs[token_id]), -9999.0)
        return top

    def answer(self, body: dict[str, Any]) -> tuple[str, str, int, int, dict[str, Any]]:
        """(text, finish_reason, prompt_tokens, completion_tokens, logprobs object) for one request."""
        torch = self.torch
        prompt, _ = _last_user_text(body)
        k, echo = int(body.get("logprobs") or 0), bool(body.get("echo"))
        generate = min(1, 16 if body.get("max_tokens") is None else int(body["max_tokens"]))
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids])).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens, token_logprobs, tops = [], [], []
        if echo:
            tokens.append(self.texts[ids[0]])
            token_logprobs.append(None)
            tops.append(None)
            for pos in range(1, len(ids)):
                tokens.append(self.texts[ids[pos]])
                token_logprobs.append(max(float(logprobs[pos - 1, ids[pos]]), -9999.0))
                tops.append(self._top(logprobs[pos - 1], ids[pos], k))
        generated = ""
        if generate:
            chosen = int(logprobs[-1].argmax())
            generated = self.texts[chosen]
            tokens.append(generated)
            token_logprobs.append(max(float(logprobs[-1, chosen]), -9999.0))
            tops.append(self._top(logprobs[-1], chosen, k))
        offsets, at = [], 0 if echo else len(prompt)
        for token in tokens:
            offsets.append(at)
            at += len(token)
        lp = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
        text = (prompt if echo else "") + generated
        return text, "length", len(ids), generate, lp


@functools.lru_cache(maxsize=4)
def logprob_model(model_dir: str) -> LogprobModel:
    """One loaded model per directory for the process: servers in one test session share it."""
    return LogprobModel(model_dir)


# --- the server ---------------------------------------------------------------------------------------------

def _split_first_word(text: str) -> tuple[str, str]:
    match = re.match(r"\s*\S+", text)
    return (match.group(0), text[match.end():]) if match else (text, "")


def _chunk(chat: bool, piece: str, finish: str | None, profile: Profile) -> dict[str, Any]:
    if chat:
        choice = {"index": 0, "delta": {"content": piece}, "finish_reason": finish}
        return {"object": "chat.completion.chunk", "model": profile.model, "choices": [choice]}
    return {"object": "text_completion", "model": profile.model,
            "choices": [{"index": 0, "text": piece, "finish_reason": finish}]}


def _sse(event: dict[str, Any] | None) -> bytes:
    """One server-sent event (`data: [DONE]` for None) as one HTTP chunk."""
    data = b"data: " + (json.dumps(event).encode() if event is not None else b"[DONE]") + b"\n\n"
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _http(status: str, payload: dict[str, Any], extra: str = "") -> bytes:
    body = json.dumps(payload).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}"
            f"\r\n").encode() + body


class Server:
    """The asyncio server; `serve()` runs it on the current loop."""

    def __init__(self, profile: Profile):
        self.profile = profile
        self.meter = Meter()
        self._slots: asyncio.Semaphore | None = None
        self.scorer = logprob_model(str(profile.logprobs_model)) if profile.logprobs_model else None
        # One forward pass at a time, off the event loop: the server keeps answering meanwhile.
        self._model_thread = concurrent.futures.ThreadPoolExecutor(1, "simulated-logprobs") if self.scorer else None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
                raw = await reader.readexactly(int(length.group(1))) if length else b""
                method, path = head.split(b" ", 2)[:2]
                writer.write(await self._route(method.decode(), path.decode(), raw, writer))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            if not writer.is_closing():
                writer.close()

    async def _route(self, method: str, path: str, raw: bytes, writer: asyncio.StreamWriter) -> bytes:
        path = path.split("?", 1)[0].rstrip("/")
        if method == "GET" and path == "/v1/models":
            return _http("200 OK", {"object": "list", "data": [
                {"id": self.profile.model, "object": "model", "owned_by": "simulated", "max_model_len": 8192}]})
        if method == "GET" and path == "/stats":
            return _http("200 OK", self.meter.report(self.profile.slots))
        if method == "GET" and path == "/stats/phases":
            return _http("200 OK", self.meter.phases(self.profile.slots))
        if method == "POST" and path == "/stats/reset":
            self.meter = Meter()
            return _http("200 OK", {"reset": True})
        if method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                return _http("400 Bad Request", {"error": {"message": "body is not JSON"}})
            return await self._generate(body, chat=path.endswith("chat/completions"), writer=writer)
        return _http("404 Not Found", {"error": {"message": f"no route {method} {path}"}})

    async def _generate(self, body: dict[str, Any], chat: bool, writer: asyncio.StreamWriter) -> bytes:
        """The answer after the modelled latency; with `stream`, server-sent events written to `writer` as
        they come (the first at the time to first token, which includes the wait for a slot)."""
        meter, profile = self.meter, self.profile
        now = time.monotonic()
        meter.first_arrival = meter.first_arrival or now
        if profile.max_queue is not None and self._slots.locked() and meter.waiting >= profile.max_queue:
            meter.rejected += 1
            return _http("429 Too Many Requests", {"error": {"message": "queue full", "type": "rate_limit"}},
                         f"retry-after: {profile.retry_after_s}\r\n")
        logprobs = None
        if self.scorer is not None and not chat and (body.get("logprobs") is not None or body.get("echo")):
            text, finish, prompt_tokens, completion_tokens, logprobs = await asyncio.get_running_loop(
            ).run_in_executor(self._model_thread, self.scorer.answer, body)
            kind = "logprobs"
        else:
            text, finish, prompt_tokens, completion_tokens, kind = answer(body, profile)
        meter.waiting += 1
        meter.max_waiting = max(meter.max_waiting, meter.waiting)
        try:
            await self._slots.acquire()
        finally:
            meter.waiting -= 1
        stream = bool(body.get("stream"))
        try:
            meter.in_service += 1
            start = time.monotonic()
            if stream:
                await asyncio.sleep(profile.ttft_s)
                first, rest = _split_first_word(text)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n" + _sse(_chunk(chat, first, None, profile)))
                await writer.drain()
                await asyncio.sleep(completion_tokens / profile.tokens_per_s)
            else:
                await asyncio.sleep(profile.ttft_s + completion_tokens / profile.tokens_per_s)
            end = time.monotonic()
        finally:
            meter.in_service -= 1
            self._slots.release()
        meter.busy_s += end - start
        meter.last_answer = end
        meter.requests += 1
        meter.prompt_tokens += prompt_tokens
        meter.completion_tokens += completion_tokens
        meter.by_kind[kind] = meter.by_kind.get(kind, 0) + 1
        meter.served.append((now, start, end, kind))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        created = int(time.time())
        if stream:
            last = {**_chunk(chat, rest, finish, profile), "usage": usage}
            return _sse(last) + _sse(None) + b"0\r\n\r\n"
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            return _http("200 OK", {"id": f"chatcmpl-{meter.requests}", "object": "chat.completion",
                                    "created": created, "model": profile.model, "choices": [choice], "usage": usage})
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}
        return _http("200 OK", {"id": f"cmpl-{meter.requests}", "object": "text_completion", "created": created,
                                "model": profile.model, "choices": [choice], "usage": usage})

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> asyncio.base_events.Server:
        self._slots = asyncio.Semaphore(self.profile.slots)
        return await asyncio.start_server(self._handle, host, port, backlog=4096, limit=2**22)


class SimulatedEndpoint:
    """The server in a thread of this process (for unit tests); `base_url` once entered."""

    def __init__(self, profile: Profile | None = None, **kwargs: Any):
        self.server = Server(profile or Profile(**kwargs))
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(self.server.start())
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        self._loop.run_until_complete(server.wait_closed())

    def __enter__(self) -> SimulatedEndpoint:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the simulated endpoint did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict[str, Any]:
        return self.server.meter.report(self.server.profile.slots)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--ttft-s", type=float, default=0.2)
    parser.add_argument("--tokens-per-s", type=float, default=60.0)
    parser.add_argument("--max-queue", type=int, default=None)
    parser.add_argument("--logprobs-model", default=None, help="a causal LM directory: real log-probabilities")
    args = parser.parse_args(argv)
    profile = Profile(slots=args.slots, ttft_s=args.ttft_s, tokens_per_s=args.tokens_per_s, max_queue=args.max_queue,
                      logprobs_model=args.logprobs_model)

    async def run() -> None:
        server = await Server(profile).start(port=args.port)
        async with server:
            await server.serve_forever()

    asyncio.run(run())


if __name__ == "__main__":
    main()
