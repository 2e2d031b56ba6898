"""The emulator's HTTP face: enough of vLLM's OpenAI server for a gateway and its clients.

Routes: POST /v1/chat/completions and /v1/completions (whole answers, or SSE streams that honour
`stream_options.include_usage`), GET /v1/models, /health, and /metrics with vLLM's three load gauges
(`vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`).

Request sizes:
- prompt tokens: the `x-emulator-prompt-tokens` body field (or header) if given, else the text's
  characters / 4 (rounded up), plus 3 per chat message for the chat template;
- output tokens: the `x-emulator-output-tokens` body field (or header), capped by `max_tokens` /
  `max_completion_tokens` (finish_reason "length" when the cap binds, else "stop"); without it,
  `max_tokens` ("length"); without either, a seeded draw (log-normal, median 256 tokens; "stop").
Body fields survive a gateway's pass-through and a delegation, headers do not: runners should use
the body fields. Each output token is the 4-character text "tok ".
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import signal
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from wwwserve_gateway.emulator.engine import RequestTooLong
from wwwserve_gateway.emulator.profiles import EngineProfile
from wwwserve_gateway.emulator.runtime import EngineRuntime

PROMPT_FIELD = "x-emulator-prompt-tokens"
OUTPUT_FIELD = "x-emulator-output-tokens"
TOKEN_TEXT = "tok "
CHARS_PER_TOKEN = 4
CHAT_TOKENS_PER_MESSAGE = 3
DEFAULT_OUTPUT_MEDIAN = 256
# How often a stream reports new tokens, in wall seconds: one chunk per interval carries every
# token produced meanwhile (per-token chunks would cost the emulator more CPU than a GPU server).
STREAM_INTERVAL_S = 0.05
JSON = "application/json"


class BadRequest(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def response(self) -> web.Response:
        kind = "NotFoundError" if self.status == 404 else "BadRequestError"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}
        return web.Response(status=self.status, body=orjson.dumps(body), content_type=JSON)


class EmulatorServer:
    def __init__(self, profile: EngineProfile, model: str, time_scale: float, seed: int | None) -> None:
        self.profile = profile
        self.model_name = model
        self.time_scale = time_scale
        self.rng = random.Random(seed)
        self.runtime: EngineRuntime | None = None
        self.served = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _: web.Application) -> None:
        self.runtime = EngineRuntime(self.profile, self.time_scale)
        await self.runtime.start()

    async def _stop(self, _: web.Application) -> None:
        if self.runtime is not None:
            await self.runtime.stop()

    # -- routes ------------------------------------------------------------------------------------
    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(text="")

    async def _models(self, _: web.Request) -> web.Response:
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "wwwserve-emulator"}
        card["max_model_len"] = self.profile.max_model_len
        return web.Response(body=orjson.dumps({"object": "list", "data": [card]}), content_type=JSON)

    async def _metrics(self, _: web.Request) -> web.Response:
        assert self.runtime is not None
        load = self.runtime.load()
        labels = f'{{engine="0",model_name="{self.model_name}"}}'
        lines = []
        for name, help_, value in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", load.running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", load.waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", load.kv_usage),
        ):
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name}{labels} {float(value)!r}"]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    # -- generation --------------------------------------------------------------------------------
    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        assert self.runtime is not None
        try:
            body = orjson.loads(await request.read())
            if not isinstance(body, dict):
                raise BadRequest(400, "the body must be a JSON object")
            self._check_model(body)
            prompt = _explicit(body, request, PROMPT_FIELD) or prompt_tokens(body, chat)
            output, finish = self._output_tokens(body, request)
            try:
                seq = self.runtime.submit(prompt, output)
            except RequestTooLong as exc:
                raise BadRequest(400, str(exc), "max_tokens") from None
        except BadRequest as exc:
            return exc.response()
        except orjson.JSONDecodeError:
            return BadRequest(400, "the body is not valid JSON").response()
        reply = Reply(chat, self.model_name, prompt, output, finish)
        try:
            if body.get("stream"):
                options = body.get("stream_options")
                usage = isinstance(options, dict) and bool(options.get("include_usage"))
                return await self._stream(request, reply, seq, usage)
            await self.runtime.wait(seq)
            self.served += 1
            return web.Response(body=orjson.dumps(reply.whole()), content_type=JSON)
        finally:
            if not seq.done:  # the client left (handler cancelled) or the stream broke
                self.runtime.cancel(seq)

    async def _stream(self, request: web.Request, reply: Reply, seq: Any, usage: bool) -> web.StreamResponse:
        assert self.runtime is not None
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        sent = 0
        if reply.chat:
            await resp.write(sse(reply.chunk({"role": "assistant", "content": ""})))
        while True:
            finished = await self.runtime.wait(seq, STREAM_INTERVAL_S)
            made = seq.generated if finished else self.runtime.generated(seq)
            if made > sent:
                await resp.write(sse(reply.chunk(text=TOKEN_TEXT * (made - sent))))
                sent = made
            if finished:
                break
        await resp.write(sse(reply.chunk(finish=reply.finish)))
        if usage:
            await resp.write(sse(reply.usage_chunk()))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        self.served += 1
        return resp

    # -- request sizes -----------------------------------------------------------------------------
    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model != self.model_name:
            raise BadRequest(404, f"The model `{model}` does not exist.", "model")

    def _output_tokens(self, body: dict[str, Any], request: web.Request) -> tuple[int, str]:
        cap = body.get("max_completion_tokens") or body.get("max_tokens")
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
            raise BadRequest(400, "max_tokens must be a positive integer", "max_tokens")
        wanted = _explicit(body, request, OUTPUT_FIELD)
        if wanted is not None:
            if cap is not None and wanted >= cap:
                return cap, "length"
            return wanted, "stop"
        if cap is not None:
            return cap, "length"
        draw = self.rng.lognormvariate(math.log(DEFAULT_OUTPUT_MEDIAN), 0.8)
        return max(1, min(round(draw), self.profile.max_model_len // 2)), "stop"


class Reply:
    """The OpenAI-shaped pieces of one answer."""

    def __init__(self, chat: bool, model: str, prompt: int, output: int, finish: str) -> None:
        self.chat, self.model, self.prompt, self.output, self.finish = chat, model, prompt, output, finish
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.output,
            "total_tokens": self.prompt + self.output,
        }

    def whole(self) -> dict[str, Any]:
        text = TOKEN_TEXT * self.output
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return self._envelope(self.object, [choice]) | {"usage": self.usage()}

    def chunk(
        self, delta: dict[str, Any] | None = None, text: str = "", finish: str | None = None
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.chat:
            choice["delta"] = delta if delta is not None else ({"content": text} if text else {})
        else:
            choice["text"] = text
        return self._envelope(self.object + ".chunk" if self.chat else self.object, [choice])

    def usage_chunk(self) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else self.object
        return self._envelope(kind, []) | {"usage": self.usage()}

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _explicit(body: dict[str, Any], request: web.Request, name: str) -> int | None:
    """A positive integer from the body field `name`, or else the header of that name."""
    value: Any = body.get(name, request.headers.get(name))
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise BadRequest(400, f"{name} must be a positive integer", name) from None
    if number < 1 or isinstance(value, bool):
        raise BadRequest(400, f"{name} must be a positive integer", name)
    return number


def prompt_tokens(body: dict[str, Any], chat: bool) -> int:
    """Tokens of the prompt, estimated from its text (characters / 4, rounded up)."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest(400, "messages must be a non-empty list", "messages")
        chars = sum(_content_chars(m.get("content")) for m in messages if isinstance(m, dict))
        return max(1, math.ceil(chars / CHARS_PER_TOKEN) + CHAT_TOKENS_PER_MESSAGE * len(messages))
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return max(1, math.ceil(len(prompt) / CHARS_PER_TOKEN))
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return len(prompt)  # token ids
    if isinstance(prompt, list) and prompt and all(isinstance(t, str) for t in prompt):
        return max(1, math.ceil(sum(len(t) for t in prompt) / CHARS_PER_TOKEN))
    raise BadRequest(400, "prompt must be a string, a list of strings or a list of token ids", "prompt")


def _content_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):  # content parts
        return sum(len(p.get("text", "")) for p in content if isinstance(p, dict))
    return 0


def stdin_is_pipe() -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(sys.stdin.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):
        return False


async def serve(
    profile: EngineProfile,
    model: str,
    host: str,
    port: int,
    time_scale: float,
    seed: int | None,
    announce: Callable[[str], None] = print,
) -> None:
    """Run until SIGTERM or SIGINT, or until stdin closes when it is a pipe. Announces
    'listening http://HOST:PORT' once bound, so that a parent that asked for port 0 learns the port."""
    server = EmulatorServer(profile, model, time_scale, seed)
    # Handler cancellation: a client that disconnects cancels its request, which frees its KV.
    # Stopping does not wait for answers in progress (a killed GPU server does not finish them).
    runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = runner.addresses[0][1]
    announce(f"listening http://{host}:{bound}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    if stdin_is_pipe():
        # Started by a parent through a pipe: stop when it closes, so the emulator never outlives it.
        watcher = threading.Thread(
            target=lambda: (sys.stdin.buffer.read(), loop.call_soon_threadsafe(stop.set)), daemon=True
        )
        watcher.start()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
