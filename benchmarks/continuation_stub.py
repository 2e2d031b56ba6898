"""An OpenAI-compatible streaming stub whose answers are a pure function of the prompt, and which
continues an answer from a prefix: what a mid-stream failover needs to be checked exactly.

    python benchmarks/continuation_stub.py --port P [--gap-ms 20] [--require-continue-flag]

The answer to a prompt is a deterministic sequence of tokens (`token(seed, i)`, one word with its
index, e.g. "kilo7 ") whose natural length (8..79 tokens) also comes from the prompt; `max_tokens`
cuts it (finish_reason "length", else "stop"). The seed is the prompt without the part being
continued (`chat_seed`, `completion_seed`), so a continuation request gets the rest of the same
answer. This is what wwwserve_gateway/delegation/continuation.py sends to the next executor when a
stream breaks after some text reached the app:

- chat: the original messages plus a final assistant message holding the text so far: a prefix to
  continue (the seed leaves that message out). With --require-continue-flag the stub continues only
  when the request also says `continue_final_message: true` (what vLLM and SGLang need, the backends'
  `continuation_params`); otherwise it answers afresh, as such a server would, and the join is wrong.
- completions: the text so far appended to the prompt. The seed is the prompt up to and including the
  last `MARK` ("\\n<<answer>>\\n"); what follows the mark is the prefix. A prompt without the mark has no
  prefix.
- `max_tokens` (or `max_completion_tokens`) is the budget of the continuation: the entry lowers it by
  the number of text events already relayed, and the stub emits exactly one token per event, so the
  continued answer ends where the uninterrupted one would.

The prefix is matched against the answer's first tokens: the stub continues after the longest whole-
token match, and counts a prefix that is not exactly some first k tokens (`prefix_mismatch` in
/stats). Either way the app-side check (`expected_text`) finds a bad join: the joined text must equal
the uninterrupted answer exactly.

Streams send one token every --gap-ms (a role chunk first, then one chunk per token, a finish chunk,
the usage chunk when `stream_options.include_usage` asks for it, and `data: [DONE]`); a non-streamed
answer waits as long as the stream would take, then answers whole. GET /health answers 200, GET /stats
the stub's counters (requests, continuations, prefix mismatches, streams in flight and how many tokens
the most advanced one has sent, aborted streams). Prints 'listening http://127.0.0.1:PORT' once bound
and exits when its stdin closes (tests/support.py's ListeningChild).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time
from collections import Counter
from typing import Any

from aiohttp import web

MARK = "\n<<answer>>\n"  # a completion prompt's end: what follows it is the answer so far
WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
    "quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
).split()
MIN_LEN, MAX_LEN = 8, 79


# -- the answer: a pure function of the prompt (the client imports these to check answers) ----------


def _h(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def token(seed: str, i: int) -> str:
    return f"{WORDS[_h(f'{seed}:{i}') % len(WORDS)]}{i} "


def natural_length(seed: str) -> int:
    return MIN_LEN + _h(seed + ":len") % (MAX_LEN - MIN_LEN + 1)


def answer_length(seed: str, max_tokens: int | None) -> int:
    n = natural_length(seed)
    return n if max_tokens is None else max(0, min(n, max_tokens))


def expected_text(seed: str, max_tokens: int | None) -> str:
    """The whole uninterrupted answer to a request with this seed and max_tokens."""
    return "".join(token(seed, i) for i in range(answer_length(seed, max_tokens)))


def expected_finish(seed: str, max_tokens: int | None) -> str:
    return "length" if max_tokens is not None and max_tokens < natural_length(seed) else "stop"


def chat_seed(messages: list[Any]) -> tuple[str, str | None]:
    """(seed, assistant prefix or None): the seed hashes the messages before a final assistant one."""
    prefix = None
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        content = messages[-1].get("content")
        prefix = content if isinstance(content, str) else ""
        messages = messages[:-1]
    canon = [[m.get("role"), m.get("content")] for m in messages if isinstance(m, dict)]
    return "chat:" + json.dumps(canon, sort_keys=True, separators=(",", ":")), prefix


def completion_seed(prompt: str) -> tuple[str, str | None]:
    """(seed, prefix or None): the seed is the prompt up to its last MARK; what follows is the prefix."""
    head, mark, tail = prompt.rpartition(MARK)
    if not mark:
        return "completion:" + prompt, None
    return "completion:" + head + mark, tail


def matched_tokens(seed: str, prefix: str) -> tuple[int, bool]:
    """How many whole first tokens of the answer the prefix holds, and whether it is exactly those."""
    k, at = 0, 0
    while at < len(prefix):
        piece = token(seed, k)
        if not prefix.startswith(piece, at):
            return k, False
        at += len(piece)
        k += 1
    return k, True


# -- the server --------------------------------------------------------------------------------------


class Stub:
    def __init__(self, gap_s: float, require_flag: bool) -> None:
        self.gap_s = gap_s
        self.require_flag = require_flag
        self.stats: Counter[str] = Counter()
        self.streams: dict[int, int] = {}  # stream serial -> tokens sent so far
        self.serial = 0
        self.started = time.time()

    def plan(self, endpoint: str, body: dict[str, Any]) -> tuple[str, int, int, str, int]:
        """(seed, first token index, tokens to send, finish reason, prompt tokens)."""
        if endpoint == "chat":
            messages = body.get("messages") if isinstance(body.get("messages"), list) else []
            seed, prefix = chat_seed(messages)
            if prefix is not None and self.require_flag and body.get("continue_final_message") is not True:
                # A server that is not told to continue answers the conversation afresh.
                self.stats["prefix_ignored"] += 1
                prefix = None
            prompt_text = json.dumps(messages)
        else:
            prompt = body.get("prompt")
            prompt = prompt if isinstance(prompt, str) else json.dumps(prompt)
            seed, prefix = completion_seed(prompt)
            prompt_text = prompt
        start = 0
        if prefix:
            start, exact = matched_tokens(seed, prefix)
            self.stats["continuations"] += 1
            if not exact:
                self.stats["prefix_mismatch"] += 1
        budget = body.get("max_tokens", body.get("max_completion_tokens"))
        budget = budget if isinstance(budget, int) and not isinstance(budget, bool) else None
        natural = natural_length(seed)
        left = max(0, natural - start)
        count = left if budget is None else max(0, min(left, budget))
        finish = "stop" if start + count >= natural else "length"
        return seed, start, count, finish, max(1, len(prompt_text) // 4)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        endpoint = "chat" if request.path.endswith("chat/completions") else "completion"
        try:
            body = await request.json()
            assert isinstance(body, dict)
        except (ValueError, AssertionError):
            return web.json_response(
                {"error": {"message": "the body is not a JSON object", "type": "invalid_request_error"}},
                status=400,
            )
        stream = body.get("stream") is True
        self.stats[f"requests.{endpoint}.{'stream' if stream else 'whole'}"] += 1
        seed, start, count, finish, prompt_tokens = self.plan(endpoint, body)
        model = str(body.get("model", "stub"))
        ident = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + hashlib.sha256(os.urandom(8)).hexdigest()[
            :24
        ]
        created = int(time.time())
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": count,
            "total_tokens": prompt_tokens + count,
        }
        tokens = [token(seed, start + i) for i in range(count)]
        if not stream:
            self.stats["in_flight_whole"] += 1
            try:
                await asyncio.sleep(self.gap_s * count)
            finally:
                self.stats["in_flight_whole"] -= 1
            text = "".join(tokens)
            if endpoint == "chat":
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                }
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
                obj = "text_completion"
            self.stats["completed"] += 1
            self.stats["tokens"] += count
            answer = {"id": ident, "object": obj, "created": created, "model": model, "choices": [choice]}
            return web.json_response({**answer, "usage": usage})
        options = body.get("stream_options")
        with_usage = isinstance(options, dict) and options.get("include_usage") is True
        obj = "chat.completion.chunk" if endpoint == "chat" else "text_completion"

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            chunk = {
                "id": ident,
                "object": obj,
                "created": created,
                "model": model,
                "choices": choices,
                **extra,
            }
            return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

        def piece(text: str | None, finish_reason: str | None = None) -> dict[str, Any]:
            if endpoint == "chat":
                delta = {} if text is None else {"content": text}
                return {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        self.serial += 1
        serial = self.serial
        self.streams[serial] = 0
        try:
            if endpoint == "chat":
                role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                await resp.write(event([role]))
            for i, tok in enumerate(tokens):
                await asyncio.sleep(self.gap_s)
                await resp.write(event([piece(tok)]))
                self.streams[serial] = i + 1
                self.stats["tokens"] += 1
            await resp.write(event([piece(None if endpoint == "chat" else "", finish)]))
            if with_usage:
                await resp.write(event([], usage=usage))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            self.stats["completed"] += 1
        except (ConnectionResetError, ConnectionError, asyncio.CancelledError):
            self.stats["aborted"] += 1  # the executor went away (killed) or cancelled the call
            raise
        finally:
            del self.streams[serial]
        return resp

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": "stub", "object": "model", "owned_by": "stub"}]}
        )

    async def stats_view(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                **self.stats,
                "streams_in_flight": len(self.streams),
                "most_tokens_in_flight": max(self.streams.values(), default=0),
                "uptime_s": round(time.time() - self.started, 3),
            }
        )

    def app(self) -> web.Application:
        app = web.Application(client_max_size=8 * 2**20)
        for path in ("/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions"):
            app.router.add_post(path, self.handle)
        for path in ("/health", "/v1/health"):
            app.router.add_get(path, self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/stats", self.stats_view)
        return app


async def serve(host: str, port: int, stub: Stub) -> None:
    runner = web.AppRunner(stub.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024)
    await site.start()
    bound = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
    print(f"listening http://{bound[0]}:{bound[1]}", flush=True)
    loop = asyncio.get_running_loop()
    if not sys.stdin.isatty():  # exit when the parent goes away
        await loop.run_in_executor(None, sys.stdin.read)
    else:
        await asyncio.Event().wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port (0: a free one)")
    parser.add_argument("--gap-ms", type=float, default=20.0, help="milliseconds between tokens")
    parser.add_argument(
        "--require-continue-flag",
        action="store_true",
        help="continue a final assistant message only with continue_final_message: true (as vLLM)",
    )
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        parser.error("the stub listens on loopback only")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        runner(serve(args.host, args.port, Stub(args.gap_ms / 1000, args.require_continue_flag)))
    except KeyboardInterrupt:
        pass
    os._exit(0)  # the stdin reader thread would otherwise block interpreter shutdown


if __name__ == "__main__":
    main()
