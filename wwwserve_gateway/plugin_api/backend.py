"""The interface every backend adapter implements, built-in or third-party.

A backend serves one deployment (one `model_list` entry). The gateway hands it an OpenAI request body
whose `model` it may rewrite, and gets back either a whole JSON answer or a stream of SSE bytes. Both
carry the token usage so the gateway can account for it without re-parsing what it relays.

Third-party backends register a `Backend` subclass under the `wwwserve.backends` entry-point group;
the entry-point name is the provider prefix of `litellm_params.model` that selects it.
"""

from __future__ import annotations

import asyncio
import re
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

from pydantic import ConfigDict, Field

from wwwserve_gateway.config.schema import ModelEntry
from wwwserve_gateway.http.errors import InvalidRequest
from wwwserve_gateway.plugin_api.base import PluginSettings


class Endpoint(StrEnum):
    CHAT = "chat/completions"
    COMPLETION = "completions"
    EMBEDDING = "embeddings"
    # Passed through to backends that serve them, never delegated (see DELEGATED_ENDPOINTS):
    RESPONSES = "responses"
    RERANK = "rerank"
    MODERATIONS = "moderations"
    IMAGES = "images/generations"


# What peers serve for each other over the overlay (answers checked, receipted, paid for); the
# other endpoints are answered by the node's own deployments only.
DELEGATED_ENDPOINTS = frozenset({Endpoint.CHAT, Endpoint.COMPLETION, Endpoint.EMBEDDING})
# Endpoints whose streams carry a usage chunk on request and end with `data: [DONE]`.
TEXT_ENDPOINTS = frozenset({Endpoint.CHAT, Endpoint.COMPLETION})


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def from_dict(cls, data: Any) -> Usage | None:
        if not isinstance(data, dict):
            return None
        # Chat and completions name them prompt/completion; the Responses API input/output.
        prompt = data.get("prompt_tokens") or data.get("input_tokens") or 0
        completion = data.get("completion_tokens") or data.get("output_tokens") or 0
        total = data.get("total_tokens") or prompt + completion
        if not all(isinstance(v, int) for v in (prompt, completion, total)):
            return None
        return cls(prompt, completion, total)


@dataclass(slots=True)
class BackendLoad:
    """What a backend reports about its own load; `usage` is the fraction of capacity in use."""

    running: int = 0
    waiting: int = 0
    usage: float = 0.0
    capacity: int | None = None  # requests the engine decodes at once, when it says (its slots)


@dataclass(slots=True)
class JSONReply:
    """A whole (non-streamed) answer: the bytes to relay and what was parsed from them."""

    body: bytes
    data: dict[str, Any]
    usage: Usage | None


class SSEStream(ABC):
    """A streamed answer. Iterating yields bytes holding whole SSE events, ready to relay.

    `usage` is set once the backend has reported it (for chat and completions, by the end).
    """

    usage: Usage | None = None

    @abstractmethod
    def __aiter__(self) -> AsyncIterator[bytes]: ...

    @abstractmethod
    async def aclose(self) -> None:
        """Release the backend connection; called whether or not the stream was read to its end."""


class BackendSettings(PluginSettings):
    """The `litellm_params` keys every backend understands; subclasses add their own."""

    # Lax, unlike other plugins' settings: `os.environ/VAR` references resolve to strings, and
    # LiteLLM configs rely on "600" reading as 600.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    model: str = Field(..., description="'provider/name'; the name part is sent to the backend")
    api_base: str | None = Field(None, description="base URL of the backend's API, e.g. http://host:8000/v1")
    api_key: str | None = Field(None, description="key sent to the backend as a Bearer token")
    rpm: int | None = Field(None, gt=0, description="requests per minute this deployment may receive")
    tpm: int | None = Field(None, gt=0, description="tokens per minute this deployment may receive")
    timeout: float | None = Field(
        None, gt=0, description="seconds to wait for the backend's next byte (default: node.request_timeout)"
    )
    max_parallel_requests: int | None = Field(
        None, gt=0, description="requests sent to this deployment at once; more are refused with 429"
    )
    # LiteLLM's per-deployment routing and client keys (docs/litellm-config.md):
    weight: float | None = Field(
        None, gt=0, description="share of requests under routing_strategy simple-shuffle (default 1)"
    )
    stream_timeout: float | None = Field(
        None, gt=0, description="seconds to wait for a streamed answer's next byte (default: timeout)"
    )
    max_retries: int | None = Field(
        None, ge=0, description="extra tries on this deployment after a failure, before the next one"
    )
    organization: str | None = Field(None, description="sent as the OpenAI-Organization header")

    @property
    def upstream_model(self) -> str:
        return self.model.split("/", 1)[1]


@dataclass(frozen=True)
class BackendContext:
    """What the node gives a backend: where to keep files and the node-wide defaults."""

    data_dir: Path
    request_timeout: float


@dataclass
class BackendState:
    """Mutable per-deployment counters the gateway keeps; backends only read them."""

    in_flight: int = 0
    load: BackendLoad | None = None
    recent_requests: deque[float] = field(default_factory=deque)
    recent_tokens: deque[tuple[float, int]] = field(default_factory=deque)
    failures: deque[float] = field(default_factory=deque)  # monotonic times, the last minute's
    cooldown_until: float = 0.0  # monotonic time; not picked before it
    latency_s: float | None = None  # moving average of answered requests' latency


class Backend(ABC):
    """One deployment of a model. Subclasses set `Settings` (their `litellm_params`) and implement
    the calls they support."""

    Settings: ClassVar[type[BackendSettings]] = BackendSettings
    endpoints: ClassVar[frozenset[Endpoint]] = frozenset(Endpoint)
    # Added to a chat request whose last message is an assistant prefix to be continued (failover
    # mid-stream). llama.cpp continues such a message by itself; vLLM and SGLang need to be told.
    continuation_params: ClassVar[dict[str, Any]] = {}

    def __init__(self, entry: ModelEntry, settings: BackendSettings, ctx: BackendContext) -> None:
        self.entry = entry
        self.settings = settings
        self.ctx = ctx
        self.id = entry.deployment_id
        self.model_name = entry.model_name
        self.timeout = settings.timeout or ctx.request_timeout
        self.state = BackendState()
        self._ready = asyncio.Event()

    @property
    def upstream_model(self) -> str:
        return self.settings.upstream_model

    def upstream_for(self, requested: str) -> str:
        """The model name to send upstream for a request that asked for `requested`: the
        deployment's, or in a wildcard group (`model_name: "openai/*"`, `model: openai/*`) the
        part of `requested` that the group's `*` stands for."""
        upstream = self.upstream_model
        if "*" not in upstream:
            return upstream
        pattern = "^" + re.escape(self.model_name).replace(r"\*", "(.*)") + "$"
        match = re.match(pattern, requested)
        return upstream.replace("*", match.group(1) if match and match.groups() else requested, 1)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def start(self) -> None:
        """Open connections (and start servers the backend owns). Set ready when it can serve."""
        self._ready.set()

    async def aclose(self) -> None:
        self._ready.clear()

    @abstractmethod
    async def complete(self, endpoint: Endpoint, body: dict[str, Any]) -> JSONReply:
        """Send a non-streamed request; raise a GatewayError subclass on failure."""

    async def stream(self, endpoint: Endpoint, body: dict[str, Any]) -> SSEStream:
        """Send a streamed request; errors before the first byte are raised here."""
        raise InvalidRequest(f"streaming is not supported for {endpoint}", param="stream")

    async def probe_load(self) -> BackendLoad | None:
        """The backend's own load report, or None when it gives none (the gateway then counts)."""
        return None

    def describe(self) -> dict[str, Any]:
        """What admin views show about this deployment; never includes secrets."""
        return {
            "id": self.id,
            "model_name": self.model_name,
            "provider": self.entry.provider,
            "upstream_model": self.upstream_model,
            "api_base": self.settings.api_base,
            "ready": self.ready,
            "in_flight": self.state.in_flight,
        }
