"""llama.cpp backend: an external llama-server (with `api_base`), or one the node runs itself.

Without `api_base` the node starts llama.cpp's server from the prebuilt `xllamacpp` wheel in a child
process on a loopback port, waits for /health, restarts it with backoff if it dies, and stops it
with the node. Load comes from the server's Prometheus /metrics (requests_processing,
requests_deferred) against its slot count.
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import aiohttp
import structlog
from pydantic import Field

from wwwserve_gateway.backends.openai_compat import OpenAICompatBackend, OpenAICompatSettings
from wwwserve_gateway.config.schema import ModelEntry
from wwwserve_gateway.model_store import ModelStoreError, find_model, models_dir, pull
from wwwserve_gateway.plugin_api.backend import BackendContext, BackendLoad, BackendSettings, Endpoint
from wwwserve_gateway.prom_text import gauge_values

log = structlog.get_logger(__name__)

RESTART_BACKOFF_S = (0.5, 1, 2, 5, 10, 30)
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=5)
RUNNING, WAITING = "llamacpp:requests_processing", "llamacpp:requests_deferred"


class LlamaCppSettings(OpenAICompatSettings):
    api_base: str | None = Field(  # type: ignore[assignment]
        None, description="URL of a running llama-server's /v1; unset runs an embedded server"
    )
    model_path: str | None = Field(
        None, description="GGUF file for the embedded server (default: the model named after 'llamacpp/')"
    )
    n_ctx: int = Field(2048, gt=0, description="context length of the embedded server")
    n_parallel: int = Field(1, gt=0, description="slots (requests decoded at once) of the embedded server")
    n_threads: int = Field(1, gt=0, description="CPU threads of the embedded server (1 is best on 2 cores)")
    embedding: bool = Field(False, description="run the embedded server in embedding mode (/v1/embeddings)")
    auto_pull: bool = Field(True, description="pull a known model (e.g. smollm2) when it is not on disk")
    startup_timeout: float = Field(180.0, gt=0, description="seconds to wait for the model to load")
    # llama.cpp serves each connection on one of a fixed set of HTTP threads and holds an idle
    # keep-alive connection's thread for 5 s: a pool larger than that set stalls new connections.
    max_connections: int = Field(
        16, gt=0, description="connections to the server; an external server needs as many --threads-http"
    )


class LlamaCppBackend(OpenAICompatBackend):
    Settings = LlamaCppSettings
    settings: LlamaCppSettings
    # llama.cpp closes the connection after each stream although its headers offer keep-alive.
    reuse_stream_connections = False

    def __init__(self, entry: ModelEntry, settings: BackendSettings, ctx: BackendContext) -> None:
        self._server: EmbeddedServer | None = None
        super().__init__(entry, settings, ctx)
        chat = frozenset({Endpoint.CHAT, Endpoint.COMPLETION, Endpoint.RESPONSES})
        self.endpoints = frozenset({Endpoint.EMBEDDING}) if self.settings.embedding else chat
        self._slots = self.settings.n_parallel
        self._slots_known = False

    @property
    def base_url(self) -> str:
        if self.settings.api_base:
            return self.settings.api_base
        return f"{self._server.url}/v1" if self._server and self._server.url else "http://127.0.0.1:0/v1"

    @property
    def upstream_model(self) -> str:
        return self.model_name if self._server else self.settings.upstream_model

    def _root(self) -> str:
        return re.sub(r"/v1/?$", "", self.base_url)

    async def start(self) -> None:
        if self.settings.api_base:
            await super().start()
            return
        model = await asyncio.to_thread(self._model_file)
        self._server = EmbeddedServer(self, model)
        await self._server.start()

    def _model_file(self) -> Path:
        name = self.settings.model_path or self.settings.upstream_model
        found = find_model(name, self.ctx.data_dir)
        if found is not None:
            return found
        if self.settings.model_path is None and self.settings.auto_pull:
            try:
                log.info("pulling model", model=name)
                return pull(name, models_dir())  # shared by every node of this user
            except ModelStoreError as exc:
                raise ModelStoreError(f"backend {self.id}: {exc}") from None
        raise ModelStoreError(
            f"backend {self.id}: no GGUF file for {name!r}; run 'wwwserve models pull {name}' or set model_path"
        )

    def on_server_ready(self) -> None:
        self._urls = {e: self.url(e.value) for e in Endpoint}  # base_url now points at the server
        self._ready.set()

    def on_server_lost(self) -> None:
        self._ready.clear()

    async def aclose(self) -> None:
        if self._server is not None:
            await self._server.stop()
        await super().aclose()

    async def probe_load(self) -> BackendLoad | None:
        try:
            if self.settings.api_base and self._slots_known is False:
                # An external server's slot count is its own setting, not ours: ask it once.
                async with self.session().get(f"{self._root()}/props", timeout=PROBE_TIMEOUT) as resp:
                    props = await resp.json() if resp.status == 200 else {}
                self._slots = int(props.get("total_slots") or self._slots)
                self._slots_known = True
            async with self.session().get(f"{self._root()}/metrics", timeout=PROBE_TIMEOUT) as resp:
                if resp.status != 200:  # an external server started without --metrics
                    return None
                gauges = gauge_values(await resp.text(), {RUNNING, WAITING})
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        running = round(sum(gauges.get(RUNNING, [])))
        waiting = round(sum(gauges.get(WAITING, [])))
        return BackendLoad(running, waiting, min(1.0, running / self._slots), self._slots)

    def describe(self) -> dict:
        info = super().describe()
        info["embedded"] = self._server is not None
        if self._server is not None:
            info["api_base"] = f"{self._server.url}/v1"
            info["model_file"] = str(self._server.model)
            info["restarts"] = self._server.restarts
        return info


class EmbeddedServer:
    """Supervises the child process that runs llama-server."""

    def __init__(self, backend: LlamaCppBackend, model: Path) -> None:
        self.backend = backend
        self.model = model
        self.url: str | None = None
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    def _command(self) -> list[str]:
        p = self.backend.settings
        cmd = [
            sys.executable,
            # -P: the working directory stays off sys.path, so a source checkout there cannot
            # shadow the installed package (whose backends/ lives inside wwwserve_gateway).
            "-P",
            "-m",
            "wwwserve_gateway.backends.llamacpp_server",
            "--model",
            str(self.model),
            "--alias",
            self.backend.model_name,
            "--ctx",
            str(p.n_ctx),
            "--parallel",
            str(p.n_parallel),
            "--threads",
            str(p.n_threads),
            "--http-threads",
            str(p.max_connections + 2),
        ]
        return [*cmd, "--embedding"] if p.embedding else cmd

    def _log_path(self) -> Path:
        logs = self.backend.ctx.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        return logs / (re.sub(r"[^A-Za-z0-9_.-]", "_", self.backend.id) + ".llamacpp.log")

    async def start(self) -> None:
        await self._launch()
        self._supervisor = asyncio.create_task(self._supervise())

    async def _launch(self) -> None:
        with self._log_path().open("ab") as log_file:
            # stdin stays open: the child exits when it closes, i.e. when this node dies.
            self._proc = await asyncio.create_subprocess_exec(
                *self._command(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
            )
        assert self._proc.stdout is not None
        timeout = self.backend.settings.startup_timeout
        try:
            line = await asyncio.wait_for(self._proc.stdout.readline(), timeout)
        except TimeoutError:
            line = b""
        if not line.startswith(b"listening "):
            await self._kill()
            raise RuntimeError(f"llama.cpp server did not start; see {self._log_path()}")
        self.url = line.split()[1].decode().rstrip("/")
        await self._wait_healthy(timeout)
        self.backend.on_server_ready()
        log.info("llama.cpp server ready", backend=self.backend.id, url=self.url, pid=self._proc.pid)

    async def _wait_healthy(self, limit_s: float) -> None:
        deadline = asyncio.get_running_loop().time() + limit_s
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(f"{self.url}/health") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if self._proc is None or self._proc.returncode is not None:
                    raise RuntimeError(f"llama.cpp server exited while loading; see {self._log_path()}")
                if asyncio.get_running_loop().time() > deadline:
                    await self._kill()
                    raise RuntimeError(f"llama.cpp server not healthy after {limit_s:g} s")
                await asyncio.sleep(0.1)

    async def _supervise(self) -> None:
        failures = 0
        while not self._stopping:
            assert self._proc is not None
            code = await self._proc.wait()
            if self._stopping:
                return
            self.backend.on_server_lost()
            delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
            log.warning(
                "llama.cpp server exited; restarting", backend=self.backend.id, code=code, delay_s=delay
            )
            await asyncio.sleep(delay)
            try:
                await self._launch()
                self.restarts += 1
                failures = 0
            except (RuntimeError, OSError) as exc:
                failures += 1
                log.error("llama.cpp restart failed", backend=self.backend.id, error=str(exc))

    async def _kill(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        await self._kill()
