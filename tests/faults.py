"""A fault-injecting proxy for HTTP/1.1 on loopback: it sits in front of a real server (the llama.cpp
server in the tests) and, request by request, by a seeded draw, drops the connection, answers 500 or 429
(with Retry-After), delays, or forwards the request and relays the answer."""

from __future__ import annotations

import asyncio
import collections
import random
import re
import threading

FAULTS = ("drop", "error_500", "error_429", "delay")


async def _read_message(reader: asyncio.StreamReader) -> bytes | None:
    """One HTTP message (head and a Content-Length body), or None at the end of the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    if re.search(rb"(?im)^transfer-encoding:\s*chunked", head):
        raise RuntimeError("the fault proxy relays Content-Length messages only")
    body = await reader.readexactly(int(length.group(1))) if length else b""
    return head + body


def _response(status: str, extra: str = "") -> bytes:
    body = b'{"error": {"message": "injected by the fault proxy"}}'
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}"
            f"connection: close\r\n\r\n").encode() + body


class FaultProxy:
    """`rates` maps each fault in FAULTS to its probability per request; `fail_all` (an Event) turns every
    request into a 500 while it is set. `counts` tallies what happened, per action."""

    def __init__(self, upstream_port: int, rates: dict[str, float] | None = None, seed: int = 0,
                 delay_s: float = 0.5, retry_after_s: int = 1):
        unknown = set(rates or {}) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults: {sorted(unknown)}")
        self.upstream_port = upstream_port
        self.rates = dict(rates or {})
        self.rng = random.Random(seed)
        self.delay_s = delay_s
        self.retry_after_s = retry_after_s
        self.fail_all = threading.Event()
        self.counts: collections.Counter[str] = collections.Counter()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _draw(self) -> str:
        if self.fail_all.is_set():
            return "error_500"
        r = self.rng.random()
        for fault in FAULTS:
            r -= self.rates.get(fault, 0.0)
            if r < 0:
                return fault
        return "forward"

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while (request := await _read_message(client_r)) is not None:
                # Faults hit generation requests; the model listing (GET /v1/models) that names the
                # endpoint's model in artifact keys while a stage is planned passes through.
                action = self._draw() if request.startswith(b"POST") else "listing"
                self.counts[action] += 1
                if action == "drop":  # the connection goes away without an answer
                    client_w.transport.abort()
                    return
                if action in ("error_500", "error_429"):
                    client_w.write(_response("500 Internal Server Error") if action == "error_500" else
                                   _response("429 Too Many Requests", f"retry-after: {self.retry_after_s}\r\n"))
                    await client_w.drain()
                    return
                if action == "delay":  # hold the request; if the client gives up meanwhile, so do we
                    try:
                        if await asyncio.wait_for(client_r.read(1), timeout=self.delay_s) == b"":
                            return
                    except asyncio.TimeoutError:
                        pass
                if upstream is None:
                    upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port)
                upstream[1].write(request)
                await upstream[1].drain()
                answer = await _read_message(upstream[0])
                if answer is None:
                    return
                client_w.write(answer)
                await client_w.drain()
        except ConnectionError:
            return
        finally:
            for writer in (client_w, upstream[1] if upstream else None):
                if writer is not None and not writer.is_closing():
                    writer.close()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        self._loop.run_until_complete(server.wait_closed())

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def faults(self) -> int:
        return sum(self.counts[f] for f in ("drop", "error_500", "error_429"))
