"""An instant OpenAI-compatible stub: a minimal HTTP/1.1 keep-alive server for overhead benchmarks.

    python benchmarks/stub_server.py --port P [--chunks 20] [--long-chunks 200] [--gap-ms 1]

POST /v1/chat/completions (or /chat/completions) answers a canned chat.completion JSON with usage, or,
when the body contains `"stream": true`, a canned SSE stream (chunked transfer-encoding, so the
connection stays open) of N content chunks, a finish chunk, a usage chunk and `data: [DONE]`.
When the request's model name contains "long", the stream has --long-chunks content chunks, written
one event per --gap-ms tick (as a real backend generating tokens would send them); other streams are
written at once. GET /health answers 200. Everything else is 404.

Responses are built once at start-up; a request costs a header scan, two substring tests and one
write. Prints 'listening http://127.0.0.1:PORT' once bound (use --port 0 for a free port).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

CRLF2 = b"\r\n\r\n"
CHAT_PATHS = (b"/v1/chat/completions", b"/chat/completions", b"/v1/completions", b"/completions")
STREAM_MARKS = (b'"stream":true', b'"stream": true')
LONG_MARK = b"long"


def _chat_json(model: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "created": 1700000000,
            "model": model,
            "system_fingerprint": "stub",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello! This is a canned stub answer."},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18},
        },
        separators=(",", ":"),
    ).encode()


def _sse_events(model: str, chunks: int) -> list[bytes]:
    base = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 1700000000, "model": model}

    def event(payload: dict) -> bytes:
        return b"data: " + json.dumps({**base, **payload}, separators=(",", ":")).encode() + b"\n\n"

    events = [event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})]
    for i in range(chunks):
        delta = {"content": f"tok{i} "}
        events.append(event({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}))
    events.append(event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    usage = {"prompt_tokens": 9, "completion_tokens": chunks, "total_tokens": 9 + chunks}
    events.append(event({"choices": [], "usage": usage}))
    events.append(b"data: [DONE]\n\n")
    return events


def _chunked(piece: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(piece), piece)


JSON_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
LAST_CHUNK = b"0\r\n\r\n"
HEALTH = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{"status":"ok"}'
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Canned:
    def __init__(self, chunks: int, long_chunks: int) -> None:
        body = _chat_json("stub")
        self.json = JSON_HEAD % len(body) + body
        self.stream = SSE_HEAD + b"".join(_chunked(e) for e in _sse_events("stub", chunks)) + LAST_CHUNK
        self.long_events = [_chunked(e) for e in _sse_events("stub-long", long_chunks)]


class Ticker:
    """Writes the next event of every spaced stream once per tick: one timer for all streams."""

    def __init__(self, loop: asyncio.AbstractEventLoop, gap: float) -> None:
        self.loop = loop
        self.gap = gap
        self.streams: dict[StubProtocol, int] = {}
        self.running = False

    def add(self, proto: StubProtocol) -> None:
        self.streams[proto] = 0
        if not self.running:
            self.running = True
            self.loop.call_later(self.gap, self.tick)

    def tick(self) -> None:
        events = CANNED.long_events
        last = len(events) - 1
        done = []
        for proto, i in self.streams.items():
            if proto.transport is None or proto.transport.is_closing():
                done.append(proto)
                continue
            if i == last:
                proto.transport.write(events[i] + LAST_CHUNK)
                done.append(proto)
            else:
                proto.transport.write(events[i])
                self.streams[proto] = i + 1
        for proto in done:
            del self.streams[proto]
            proto.stream_done()
        if self.streams:
            self.loop.call_later(self.gap, self.tick)
        else:
            self.running = False


CANNED: Canned
TICKER: Ticker


class StubProtocol(asyncio.Protocol):
    __slots__ = ("buf", "busy", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.busy = False  # a spaced stream is being written; later pipelined requests wait

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        if not self.busy:
            self.process()

    def stream_done(self) -> None:
        self.busy = False
        if self.buf and self.transport is not None:
            self.process()

    def process(self) -> None:
        transport = self.transport
        while self.buf and transport is not None and not self.busy:
            buf = self.buf
            end = buf.find(CRLF2)
            if end < 0:
                return
            head = buf[:end]
            length = 0
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = lower.find(b"\r\n", at + 2)
                length = int(lower[at + 17 : stop if stop >= 0 else len(lower)])
            elif b"\r\ntransfer-encoding:" in lower:
                transport.write(BAD)
                transport.close()
                return
            total = end + 4 + length
            if len(buf) < total:
                return
            body = buf[end + 4 : total]
            self.buf = buf[total:]
            line_end = head.find(b"\r\n")
            request_line = head[:line_end] if line_end >= 0 else head
            parts = request_line.split(b" ")
            if len(parts) < 2:
                transport.write(BAD)
                transport.close()
                return
            method, path = parts[0], parts[1]
            if method == b"POST" and path in CHAT_PATHS:
                if STREAM_MARKS[0] in body or STREAM_MARKS[1] in body:
                    if LONG_MARK in body:
                        transport.write(SSE_HEAD)
                        self.busy = True
                        TICKER.add(self)
                    else:
                        transport.write(CANNED.stream)
                else:
                    transport.write(CANNED.json)
            elif method == b"GET" and path in (b"/health", b"/v1/health"):
                transport.write(HEALTH)
            else:
                transport.write(NOT_FOUND)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(StubProtocol, host, port, backlog=1024, reuse_address=True)
    bound = server.sockets[0].getsockname()
    print(f"listening http://{bound[0]}:{bound[1]}", flush=True)
    # Exit when stdin closes (the parent went away) so the stub never outlives the benchmark.
    if not sys.stdin.isatty():
        await loop.run_in_executor(None, sys.stdin.read)
    else:
        await asyncio.Event().wait()
    server.close()


def main(argv: list[str] | None = None) -> None:
    global CANNED, TICKER
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per stream (written at once)")
    parser.add_argument(
        "--long-chunks", type=int, default=200, help="content chunks of a 'long' model stream"
    )
    parser.add_argument(
        "--gap-ms", type=float, default=1.0, help="milliseconds between a long stream's events"
    )
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        parser.error("the stub listens on loopback only")
    CANNED = Canned(args.chunks, args.long_chunks)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency of the gateway
        uvloop = None
    if uvloop is not None:
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    TICKER = Ticker(loop, args.gap_ms / 1000)
    try:
        loop.run_until_complete(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass
    finally:
        loop.close()
    os._exit(0)  # the stdin reader thread would otherwise block interpreter shutdown


if __name__ == "__main__":
    main()
