"""Ollama backend: Ollama's OpenAI-compatible /v1 surface, passed through byte for byte.

Chat, completions and embeddings go to `{root}/v1/...` through `OpenAICompatBackend`: the fastest and
most faithful path, since Ollama's own /v1 layer does the OpenAI translation, including the
`stream_options.include_usage` chunk the gateway counts streamed tokens from. `api_base` is Ollama's root
URL (default http://127.0.0.1:11434); one ending in /v1 is accepted too. `ollama/` and `ollama_chat/`
both select this backend (LiteLLM maps them to /api/generate and /api/chat; /v1 serves both needs).

Load: Ollama reports neither running nor queued requests. Its /api/ps lists the models held in memory,
so the probe reports running = this deployment's in-flight count as the gateway sees it, waiting = 0 and
usage = 0.0, and records whether the upstream model is loaded (shown by `describe()`). A model that is
not loaded is idle, not busy: Ollama loads it on the next request, which only delays that first token.

Like the pass-through, the backend is ready at start without contacting Ollama: a local server may be
down briefly (or still starting); requests then get 502 and the probe reports nothing.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
from pydantic import Field

from wwwserve_gateway.backends.openai_compat import OpenAICompatBackend, OpenAICompatSettings
from wwwserve_gateway.plugin_api.backend import BackendLoad

DEFAULT_ROOT = "http://127.0.0.1:11434"
# The registry also bounds each probe by its poll interval; this guards direct callers.
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=5)


class OllamaSettings(OpenAICompatSettings):
    api_base: str = Field(
        DEFAULT_ROOT,
        description="Ollama's root URL, e.g. http://127.0.0.1:11434 (a trailing /v1 is accepted)",
    )


def ollama_root(api_base: str) -> str:
    """Ollama's root URL from `api_base`, with or without a trailing /v1."""
    return api_base.rstrip("/").removesuffix("/v1").rstrip("/")


def full_name(name: str) -> str:
    """Ollama's canonical model name: the tag defaults to 'latest' (a registry host's port is no tag)."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def loaded_models(data: Any) -> set[str] | None:
    """Canonical names of the models in an /api/ps answer, or None when it is not one."""
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        return None
    names: set[str] = set()
    for entry in models:
        if isinstance(entry, dict):
            names.update(full_name(v) for k in ("name", "model") if isinstance(v := entry.get(k), str))
    return names


class OllamaBackend(OpenAICompatBackend):
    Settings = OllamaSettings
    settings: OllamaSettings

    loaded: bool | None = None  # whether /api/ps lists the upstream model; None until a probe succeeds

    @property
    def root(self) -> str:
        return ollama_root(self.settings.api_base)

    @property
    def base_url(self) -> str:
        return f"{self.root}/v1"

    async def probe_load(self) -> BackendLoad | None:
        try:
            async with self.session().get(f"{self.root}/api/ps", timeout=PROBE_TIMEOUT) as resp:
                raw = await resp.read() if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError):
            raw = None
        try:
            names = loaded_models(orjson.loads(raw)) if raw is not None else None
        except orjson.JSONDecodeError:
            names = None
        if names is None:
            self.loaded = None
            return None
        self.loaded = full_name(self.upstream_model) in names
        return BackendLoad(running=self.state.in_flight, waiting=0, usage=0.0)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["api_base"] = self.base_url
        info["loaded"] = self.loaded
        return info
