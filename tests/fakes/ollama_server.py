"""A fake Ollama server on loopback that replays Ollama's recorded response shapes.

It exists only because Ollama's server cannot be installed here (no binary on PyPI, Debian or npm). It
serves the files in tests/fixtures/ollama/ (see the README there for where each shape comes from):
GET /api/ps and /api/tags, POST /v1/chat/completions (whole and streamed) and POST /v1/embeddings. As
Ollama does, it echoes the requested model name, sends the usage chunk of a stream only when
`stream_options.include_usage` asks for it, and answers an unknown model with its 404.

It runs its own event loop in a thread, so sync tests (the OpenAI SDK's sync client) and async tests can
both use it:

    with FakeOllama() as ollama:
        ollama.url  # http://127.0.0.1:PORT
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from pathlib import Path
from typing import Any

from aiohttp import web

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ollama"


def _full_name(name: str) -> str:
    # Ollama's tag defaults to 'latest'; kept separate from the backend's helper so a bug there shows.
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _compact(data: Any) -> str:
    # Go's encoding/json output: no spaces, non-ASCII left as is.
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def _load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def _sse_payloads(name: str) -> list[str]:
    text = (FIXTURES / name).read_text()
    return [event.removeprefix("data: ") for event in text.split("\n\n") if event.startswith("data: ")]


class FakeOllama:
    def __init__(self, *, chunk_delay: float = 0.0) -> None:
        self.chunk_delay = chunk_delay
        self.tags = _load("api_tags.json")
        self.ps = _load("api_ps.json")
        self.chat = _load("chat_completion.json")
        self.chat_events = _sse_payloads("chat_completion_stream.txt")
        self.embeddings = _load("embeddings.json")
        # Names /api/ps lists (None: as recorded); tests set it to model an unloaded or swapped model.
        self.loaded: list[str] | None = None
        self.ps_status = 200
        # (path, JSON body) of every POST received, for assertions on what the gateway sent.
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def known(self) -> set[str]:
        return {_full_name(m["name"]) for m in self.tags["models"]}

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> FakeOllama:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="fake-ollama", daemon=True)
        self._thread.start()
        if not ready.wait(10) or not self.port:
            raise RuntimeError("fake Ollama server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> FakeOllama:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, ready: threading.Event) -> None:
        loop = self._loop = asyncio.new_event_loop()
        runner = web.AppRunner(self._app(), access_log=None)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        self.port = runner.addresses[0][1]
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/ps", self._ps)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        return app

    # -- handlers ----------------------------------------------------------------------------------

    async def _ps(self, request: web.Request) -> web.Response:
        if self.ps_status != 200:
            return web.json_response({"error": "fake failure"}, status=self.ps_status)
        if self.loaded is None:
            return web.json_response(self.ps)
        recorded = self.ps["models"][0]
        models = [{**copy.deepcopy(recorded), "name": n, "model": n} for n in self.loaded]
        return web.json_response({"models": models})

    async def _tags(self, request: web.Request) -> web.Response:
        return web.json_response(self.tags)

    async def _read(self, request: web.Request) -> tuple[dict[str, Any], web.Response | None]:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            return {}, self._error(400, "invalid_request_error", "invalid request")
        self.requests.append((request.path, body))
        model = body.get("model")
        if not isinstance(model, str) or _full_name(model) not in self.known:
            message = f'model "{model}" not found, try pulling it first'
            return body, self._error(404, "not_found_error", message)
        return body, None

    @staticmethod
    def _error(status: int, kind: str, message: str) -> web.Response:
        body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        return web.Response(status=status, text=_compact(body) + "\n", content_type="application/json")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body, error = await self._read(request)
        if error is not None:
            return error
        model = body["model"]
        if not body.get("stream"):
            answer = {**self.chat, "model": model}
            return web.Response(text=_compact(answer) + "\n", content_type="application/json")
        options = body.get("stream_options")
        with_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for payload in self.chat_events:
            if payload != "[DONE]":
                chunk = json.loads(payload)
                if "usage" in chunk and not with_usage:
                    continue
                payload = _compact({**chunk, "model": model})
            await resp.write(f"data: {payload}\n\n".encode())
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        await resp.write_eof()
        return resp

    async def _embeddings(self, request: web.Request) -> web.Response:
        body, error = await self._read(request)
        if error is not None:
            return error
        inputs = body.get("input")
        count = len(inputs) if isinstance(inputs, list) else 1
        vector = self.embeddings["data"][0]["embedding"]
        usage = {k: v * count for k, v in self.embeddings["usage"].items()}
        answer = {
            **self.embeddings,
            "data": [{"object": "embedding", "embedding": vector, "index": i} for i in range(count)],
            "model": body["model"],
            "usage": usage,
        }
        return web.Response(text=_compact(answer) + "\n", content_type="application/json")
