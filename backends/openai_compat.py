"""Byte pass-through to any OpenAI-compatible server: vLLM, SGLang, llama.cpp, Ollama /v1, remote APIs.

This is the gateway's hot path. The request body is forwarded with `model` rewritten; answers are
relayed as the bytes that arrived. Only the usage is parsed: from the JSON body, or, in a stream, from
the one event that carries it (found with a substring test, so other chunks are never decoded).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import aiohttp
import orjson
from pydantic import Field

from wwwserve_gateway.config.schema import ModelEntry
from wwwserve_gateway.http.errors import (
    BackendProtocolError,
    BackendTimeout,
    BackendUnreachable,
    UpstreamError,
)
from wwwserve_gateway.http.sse import MalformedEvent, SSECutter
from wwwserve_gateway.plugin_api.backend import (
    TEXT_ENDPOINTS,
    Backend,
    BackendContext,
    BackendLoad,
    BackendSettings,
    Endpoint,
    JSONReply,
    SSEStream,
    Usage,
)

JSON_HEADERS = {"Content-Type": "application/json"}


class OpenAICompatSettings(BackendSettings):
    api_base: str = Field("https://api.openai.com/v1", description="base URL ending in /v1")
    inject_stream_usage: bool = Field(
        True,
        description="ask streams for a usage chunk (stream_options.include_usage) and hide it if unasked",
    )
    extra_headers: dict[str, str] = Field(default_factory=dict, description="headers sent on every call")
    max_connections: int = Field(256, gt=0, description="pooled keep-alive connections to the backend")


class OpenAICompatBackend(Backend):
    Settings = OpenAICompatSettings
    settings: OpenAICompatSettings
    # False for servers that close the connection after a stream while offering keep-alive: aiohttp
    # would pool it as soon as the body ends, and the next request on it fails.
    reuse_stream_connections: ClassVar[bool] = True

    def __init__(self, entry: ModelEntry, settings: BackendSettings, ctx: BackendContext) -> None:
        super().__init__(entry, settings, ctx)
        self._session: aiohttp.ClientSession | None = None
        self._fresh_session: aiohttp.ClientSession | None = None
        self._urls = {e: self.url(e.value) for e in Endpoint}
        self._wildcard = "*" in self.entry.litellm_params["model"]
        stream_timeout = self.settings.stream_timeout
        self._stream_timeout = (
            aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=stream_timeout)
            if stream_timeout
            else None
        )

    def url(self, path: str) -> str:
        return f"{self.base_url.rstrip('/')}/{path}"

    @property
    def base_url(self) -> str:
        return self.settings.api_base or OpenAICompatSettings.model_fields["api_base"].default

    def session(self, *, fresh: bool = False) -> aiohttp.ClientSession:
        """The pooled session, or with `fresh` one that opens a new connection per request."""
        if fresh:
            if self._fresh_session is None or self._fresh_session.closed:
                self._fresh_session = self._new_session(force_close=True)
            return self._fresh_session
        if self._session is None or self._session.closed:
            self._session = self._new_session(force_close=False)
        return self._session

    def _new_session(self, *, force_close: bool) -> aiohttp.ClientSession:
        headers = dict(self.settings.extra_headers)
        if self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key}"
        if self.settings.organization:
            headers["OpenAI-Organization"] = self.settings.organization
        keepalive = {"force_close": True} if force_close else {"keepalive_timeout": 60}
        connector = aiohttp.TCPConnector(limit=self.settings.max_connections, **keepalive)
        return aiohttp.ClientSession(
            connector=connector,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.timeout),
            skip_auto_headers=("User-Agent",),
        )

    async def start(self) -> None:
        self.session()
        await super().start()

    async def aclose(self) -> None:
        await super().aclose()
        for session in (self._session, self._fresh_session):
            if session is not None:
                await session.close()

    async def _post(
        self, endpoint: Endpoint, body: dict[str, Any], *, stream: bool = False
    ) -> aiohttp.ClientResponse:
        body["model"] = self.upstream_for(body["model"]) if self._wildcard else self.upstream_model
        data = orjson.dumps(body)
        url = self._urls[endpoint]
        # Messages name the deployment, never its address (apps see them); the cause, kept as
        # __cause__, goes to the node's log.
        # A stream_timeout replaces the session's read timeout; passing timeout=None would remove it.
        options = {"timeout": self._stream_timeout} if stream and self._stream_timeout else {}
        try:
            try:
                session = self.session(fresh=stream and not self.reuse_stream_connections)
                resp = await session.post(url, data=data, headers=JSON_HEADERS, **options)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if isinstance(exc, aiohttp.ClientConnectorError):
                    raise
                # A pooled keep-alive connection that the server had closed (servers may close one at
                # any time): the request was never answered, so send it again on a new connection.
                resp = await self.session(fresh=True).post(url, data=data, headers=JSON_HEADERS, **options)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            waited = self.settings.stream_timeout if stream and self.settings.stream_timeout else self.timeout
            raise BackendTimeout(f"backend {self.id} did not answer within {waited:g} s") from exc
        except aiohttp.ClientConnectorError as exc:
            raise BackendUnreachable(f"backend {self.id} is unreachable ({_reason(exc)})") from exc
        except aiohttp.ClientError as exc:
            raise BackendUnreachable(f"backend {self.id} failed ({_reason(exc)})") from exc
        if resp.status != 200:
            try:
                raw = await resp.read()
            except (TimeoutError, aiohttp.ClientError):
                raw = b""
            finally:
                resp.release()
            raise UpstreamError.from_response(resp.status, raw, backend=self.id)
        return resp

    async def complete(self, endpoint: Endpoint, body: dict[str, Any]) -> JSONReply:
        resp = await self._post(endpoint, body)
        try:
            raw = await resp.read()
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise BackendTimeout(f"backend {self.id} stalled for {self.timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise BackendUnreachable(f"backend {self.id} broke off its answer ({_reason(exc)})") from exc
        finally:
            resp.release()
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise BackendProtocolError(f"backend {self.id} answered with invalid JSON") from None
        if not isinstance(data, dict):
            raise BackendProtocolError(f"backend {self.id} answered with JSON that is not an object")
        return JSONReply(raw, data, Usage.from_dict(data.get("usage")))

    async def stream(self, endpoint: Endpoint, body: dict[str, Any]) -> SSEStream:
        hide_usage = False
        if self.settings.inject_stream_usage and endpoint in TEXT_ENDPOINTS:
            options = body.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage")):
                body["stream_options"] = {**(options or {}), "include_usage": True}
                hide_usage = True
        resp = await self._post(endpoint, body, stream=True)
        if not resp.content_type.startswith("text/event-stream"):
            resp.close()
            raise BackendProtocolError(
                f"backend {self.id} answered a stream request with {resp.content_type or 'no content type'}"
            )
        timeout = self.settings.stream_timeout or self.timeout
        return PassThroughSSE(resp, hide_usage=hide_usage, backend_id=self.id, timeout=timeout)

    async def probe_load(self) -> BackendLoad | None:
        return None


def _reason(exc: aiohttp.ClientError) -> str:
    """What went wrong, without the address aiohttp puts in its messages."""
    os_error = getattr(exc, "os_error", None)
    if isinstance(os_error, OSError) and os_error.errno:
        return os.strerror(os_error.errno).lower()
    return type(exc).__name__


class PassThroughSSE(SSEStream):
    """Relays an upstream SSE body in the pieces it arrives in, cut at event boundaries."""

    def __init__(self, resp: aiohttp.ClientResponse, *, hide_usage: bool, backend_id: str, timeout: float):
        self._resp = resp
        self._cutter = SSECutter(Usage.from_dict, hide_usage=hide_usage)
        self._backend_id = backend_id
        self._timeout = timeout
        self._finished = False

    @property
    def usage(self) -> Usage | None:  # type: ignore[override]
        return self._cutter.usage

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._relay()

    async def _relay(self) -> AsyncIterator[bytes]:
        cutter = self._cutter
        try:
            async for data in self._resp.content.iter_any():
                out = cutter.feed(data)
                if out:
                    yield out
            self._finished = True
            out = cutter.flush()
            if out:
                yield out
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise BackendTimeout(f"backend {self._backend_id} stalled for {self._timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise BackendUnreachable(
                f"backend {self._backend_id} broke off its stream ({_reason(exc)})"
            ) from exc
        except MalformedEvent as exc:
            raise BackendProtocolError(f"backend {self._backend_id} sent a malformed event: {exc}") from None

    async def aclose(self) -> None:
        if self._finished:
            self._resp.release()  # read to its end: the connection goes back to the pool
        elif not self._resp.closed:
            self._resp.close()  # dropping the connection is how the backend learns to stop
