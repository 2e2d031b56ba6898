"""The LiteLLM SDK adapter: any provider LiteLLM knows (Anthropic, Bedrock, Vertex, Azure, ...).

Selected by a provider prefix no built-in backend claims (`anthropic/claude-3-5-sonnet`), or explicitly
with `litellm/<litellm model>` (`litellm/openai/gpt-4o`). Requests go through `litellm.acompletion`,
`atext_completion` and `aembedding`, and answers are re-serialized from LiteLLM's objects, so this path
costs far more CPU than the byte pass-through (about 9 ms a request, 1 ms a streamed chunk): use
it for providers that do not speak the OpenAI API.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from types import ModuleType
from typing import Any

import orjson
import structlog
from pydantic import ConfigDict

from wwwserve_gateway.http.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    BackendUnreachable,
    GatewayError,
    InvalidRequest,
    UpstreamError,
)
from wwwserve_gateway.http.sse import DONE
from wwwserve_gateway.plugin_api.backend import (
    Backend,
    BackendSettings,
    Endpoint,
    JSONReply,
    SSEStream,
    Usage,
)

log = structlog.get_logger(__name__)


# Keys of the request body this backend sets itself.
OWN_KEYS = frozenset({"model", "stream", "stream_options"})
# OpenAI fields LiteLLM takes as its own logging settings; OpenAI stores them with a completion, which
# no backend here does, so they are dropped rather than refused.
DROPPED_KEYS = frozenset({"metadata"})
# OpenAI fields that the control-key pattern below would otherwise catch.
OPENAI_KEYS = frozenset({"prompt_cache_key"})
# Body keys become LiteLLM keyword arguments, where some retarget the call or swap its credentials:
# `api_base` would send the deployment's key to the client's host (the hole LiteLLM's proxy closes with
# is_request_body_safe). Such settings come from litellm_params only; requests that carry them get a 400.
CONTROL_KEY = re.compile(
    r"base|url|endpoint|credential|secret|token$|key$|^api_|^aws_|^azure_|^vertex_|project|workspace"
    r"|profile|region|location|organization|retries|timeout|headers$"
)

CALLS = {
    Endpoint.CHAT: "acompletion",
    Endpoint.COMPLETION: "atext_completion",
    Endpoint.EMBEDDING: "aembedding",
}

_litellm: ModuleType | None = None
_owned_kwarg: Callable[[str], bool] | None = None


def load_litellm() -> ModuleType:
    """Import LiteLLM on first use: the import alone costs about 5 s of CPU."""
    global _litellm, _owned_kwarg
    if _litellm is None:
        # Without it the import fetches the model cost map from GitHub, with retries when offline.
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm
        from litellm.types.utils import is_litellm_owned_kwarg

        litellm.suppress_debug_info = True  # it would print a "Give Feedback" banner on every error
        for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
            logger = logging.getLogger(name)
            # LiteLLM's own handler redacts secrets; propagating as well would print each record twice.
            logger.propagate = False
            if "LITELLM_LOG" not in os.environ:
                logger.setLevel(logging.WARNING)  # it logs every call at INFO, at a CPU cost per request
        _owned_kwarg = is_litellm_owned_kwarg
        _litellm = litellm
    return _litellm


class LiteLLMSettings(BackendSettings):
    """Keys beyond the common ones (api_version, aws_region_name, num_retries, custom_llm_provider,
    default sampling settings, ...) are passed to LiteLLM as they are, as LiteLLM's proxy does."""

    model_config = ConfigDict(extra="allow", frozen=True)

    @property
    def upstream_model(self) -> str:
        """The model string LiteLLM gets: `litellm/openai/gpt-4o` -> `openai/gpt-4o`, else unchanged."""
        provider, rest = self.model.split("/", 1)
        return rest if provider == "litellm" else self.model


class LiteLLMBackend(Backend):
    Settings = LiteLLMSettings
    settings: LiteLLMSettings
    endpoints = frozenset(CALLS)

    async def start(self) -> None:
        # In a thread, so the import does not stall the node's event loop (health checks, other backends).
        await asyncio.to_thread(load_litellm)
        await super().start()

    def _kwargs(self, body: dict[str, Any]) -> dict[str, Any]:
        # Extra litellm_params are defaults the request may override, as in LiteLLM's Router; the keys a
        # request may not set are refused below, so it can only change sampling and similar settings.
        kwargs: dict[str, Any] = dict(self.settings.model_extra or {})
        for key, value in body.items():
            if key in OWN_KEYS or key in DROPPED_KEYS:
                continue
            if key not in OPENAI_KEYS and (CONTROL_KEY.search(key) or (_owned_kwarg and _owned_kwarg(key))):
                raise InvalidRequest(
                    f"'{key}' cannot be set in a request: the deployment's configuration decides it",
                    param=key,
                    code="unsupported_parameter",
                )
            kwargs[key] = value
        kwargs.update(
            model=self.upstream_for(str(body.get("model", ""))),
            api_base=self.settings.api_base,
            api_key=self.settings.api_key,
            timeout=self.timeout,
        )
        return kwargs

    async def complete(self, endpoint: Endpoint, body: dict[str, Any]) -> JSONReply:
        litellm = _litellm or load_litellm()
        kwargs = self._kwargs(body)
        try:
            response = await getattr(litellm, CALLS[endpoint])(**kwargs)
        except Exception as exc:
            raise gateway_error(exc, self.id) from exc
        data = response.model_dump(mode="json", exclude_none=True)
        return JSONReply(orjson.dumps(data), data, Usage.from_dict(data.get("usage")))

    async def stream(self, endpoint: Endpoint, body: dict[str, Any]) -> SSEStream:
        if endpoint is Endpoint.EMBEDDING:
            return await super().stream(endpoint, body)
        litellm = _litellm or load_litellm()
        kwargs = self._kwargs(body)
        # Always ask for usage (the gateway accounts for it); relay the usage chunk only if the client asked.
        options = body.get("stream_options")
        asked = isinstance(options, dict) and bool(options.get("include_usage"))
        kwargs.update(stream=True, stream_options={**(options or {}), "include_usage": True})
        try:
            chunks = await getattr(litellm, CALLS[endpoint])(**kwargs)
        except Exception as exc:
            raise gateway_error(exc, self.id) from exc
        return LiteLLMStream(chunks, hide_usage=not asked, backend_id=self.id)


class LiteLLMStream(SSEStream):
    """Frames LiteLLM's stream objects as SSE events, one event per chunk."""

    def __init__(self, chunks: Any, *, hide_usage: bool, backend_id: str) -> None:
        self._chunks = chunks
        self._hide_usage = hide_usage
        self._backend_id = backend_id
        self._relay_gen: AsyncGenerator[bytes, None] | None = None
        self.usage: Usage | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        self._relay_gen = self._relay()
        return self._relay_gen

    async def _relay(self) -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in self._chunks:
                usage = getattr(chunk, "usage", None)
                if usage is not None:
                    # LiteLLM strips usage from content chunks and sends it in a last chunk of its own.
                    self.usage = to_usage(usage)
                    if self._hide_usage:
                        continue
                    chunk.choices = []  # OpenAI's usage chunk has no choices; LiteLLM's has an empty one
                yield b"data: " + chunk.model_dump_json(exclude_none=True).encode() + b"\n\n"
        except Exception as exc:
            raise gateway_error(exc, self._backend_id) from exc
        yield DONE

    async def aclose(self) -> None:
        if self._relay_gen is not None:
            await self._relay_gen.aclose()
        # Closing LiteLLM's stream closes the HTTP response, and the dropped connection tells the
        # backend to stop. A text-completion stream wraps a chat one and has no aclose of its own.
        closer = getattr(self._chunks, "aclose", None) or getattr(
            getattr(self._chunks, "completion_stream", None), "aclose", None
        )
        if closer is not None:
            await closer()


def to_usage(usage: Any) -> Usage | None:
    if isinstance(usage, dict):
        return Usage.from_dict(usage)
    prompt = getattr(usage, "prompt_tokens", 0) or 0
    completion = getattr(usage, "completion_tokens", 0) or 0
    return Usage(prompt, completion, getattr(usage, "total_tokens", 0) or prompt + completion)


def gateway_error(exc: Exception, backend_id: str) -> GatewayError:
    """The gateway error for a LiteLLM failure.

    LiteLLM reports a refused connection as InternalServerError (500) with the transport error as its
    cause, so connection failures and timeouts are found by walking the cause chain.
    """
    import httpx  # loaded with LiteLLM, which depends on it
    from litellm import exceptions as lx

    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, lx.Timeout) or caused_by(exc, (httpx.TimeoutException, TimeoutError)):
        return _with_cause(BackendTimeout(f"backend {backend_id} timed out"), exc)
    if isinstance(exc, lx.APIConnectionError) or caused_by(exc, (httpx.TransportError, ConnectionError)):
        # LiteLLM's message names the address: the log gets it (as the cause), the app does not.
        return _with_cause(BackendUnreachable(f"backend {backend_id} is unreachable"), exc)
    if isinstance(exc, lx.ServiceUnavailableError):
        return BackendUnavailable(f"backend {backend_id} is unavailable: {exc}")
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and 400 <= status <= 599:
        # The provider's own error object when LiteLLM kept it, else LiteLLM's message.
        detail = getattr(exc, "body", None)
        raw = orjson.dumps(detail if isinstance(detail, dict) and detail else {"message": str(exc)})
        return UpstreamError.from_response(status, raw, backend=backend_id)
    log.warning("unexpected LiteLLM failure", backend=backend_id, error=repr(exc))
    return BackendError(f"backend {backend_id} failed: {type(exc).__name__}: {exc}")


def _with_cause(error: GatewayError, cause: BaseException) -> GatewayError:
    error.__cause__ = cause
    return error


def caused_by(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    seen = 0
    cause: BaseException | None = exc
    while cause is not None and seen < 16:  # bounded: a cause chain can loop
        if isinstance(cause, kinds):
            return True
        cause = cause.__cause__ or cause.__context__
        seen += 1
    return False
