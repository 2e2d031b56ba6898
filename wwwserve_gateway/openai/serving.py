"""Serving logic shared by the OpenAI endpoints: pick a deployment, call it, relay the answer."""

from __future__ import annotations

import time
from typing import Any

import orjson
import structlog

from wwwserve_gateway.backend_registry import BackendRegistry
from wwwserve_gateway.http.asgi import (
    SSE_HEADERS,
    ClientDisconnected,
    Receive,
    Send,
    cancel_on_disconnect,
    send_bytes,
)
from wwwserve_gateway.http.errors import BackendError, GatewayError, InvalidRequest
from wwwserve_gateway.http.sse import DONE
from wwwserve_gateway.metrics import GatewayMetrics
from wwwserve_gateway.plugin_api.backend import Backend, Endpoint, JSONReply, Usage

log = structlog.get_logger(__name__)

ESTIMATED_USAGE = [(b"x-wwwserve-usage", b"estimated")]


class OpenAIServing:
    def __init__(self, registry: BackendRegistry, metrics: GatewayMetrics) -> None:
        self.registry = registry
        self.metrics = metrics

    async def serve(
        self,
        endpoint: Endpoint,
        body: dict[str, Any],
        stream: bool,
        receive: Receive,
        send: Send,
        started: float,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Serve on a local deployment; `headers` are added to the answer's."""
        model = body["model"]
        backend = self.registry.pick(model)
        if endpoint not in backend.endpoints:
            raise InvalidRequest(
                f"The model '{model}' does not support /v1/{endpoint}",
                param="model",
                code="unsupported_endpoint",
            )
        m = self.metrics
        state = backend.state
        state.in_flight += 1
        m.in_flight.inc()
        self.registry.record_request(backend)
        status = 200
        try:
            if stream:
                work = self._stream(backend, endpoint, body, send, model, started, headers or [])
                usage = await cancel_on_disconnect(receive, work)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                reply = await cancel_on_disconnect(receive, backend.complete(endpoint, body))
                usage, extra = self._ensure_usage(endpoint, reply)
                await send_bytes(send, 200, reply.body, (headers or []) + (extra or []))
        except ClientDisconnected:
            status = 499
            m.client_disconnects.inc()
            raise
        except GatewayError as exc:
            status = exc.status
            raise
        finally:
            state.in_flight -= 1
            m.in_flight.dec()
            m.request_done(endpoint.value, model, status, time.perf_counter() - started)
        self._count_tokens(backend, model, usage)

    async def _stream(
        self,
        backend: Backend,
        endpoint: Endpoint,
        body: dict[str, Any],
        send: Send,
        model: str,
        started: float,
        headers: list[tuple[bytes, bytes]],
    ) -> Usage | None:
        """Relay a stream. Failures before the first byte raise (a JSON error follows); after the
        headers are out, a failure becomes an SSE error event."""
        sse = await backend.stream(endpoint, body)
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS + headers})
        done = False
        first = True
        try:
            async for piece in sse:
                if first:
                    self.metrics.first_token(model, time.perf_counter() - started)
                    first = False
                done = piece.endswith(DONE)
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            if not done:
                await send({"type": "http.response.body", "body": DONE, "more_body": True})
        except BackendError as exc:
            log.warning("stream broke off", model=model, error=exc.message)
            self.metrics.count_error("stream", exc.type)
            await send(
                {"type": "http.response.body", "body": b"data: " + exc.body() + b"\n\n", "more_body": True}
            )
        finally:
            await sse.aclose()
        return sse.usage

    @staticmethod
    def _ensure_usage(endpoint: Endpoint, reply: JSONReply) -> tuple[Usage | None, list | None]:
        """Usage is always reported; a backend that gives none gets an estimate, marked as such."""
        if reply.usage is not None or endpoint is Endpoint.EMBEDDING:
            return reply.usage, None
        data = reply.data
        text = "".join(
            str((c.get("message") or {}).get("content") or c.get("text") or "")
            for c in data.get("choices") or []
            if isinstance(c, dict)
        )
        completion = max(1, len(text) // 4) if text else 0
        usage = Usage(0, completion, completion)
        data["usage"] = {"prompt_tokens": 0, "completion_tokens": completion, "total_tokens": completion}
        reply.body = orjson.dumps(data)
        return usage, ESTIMATED_USAGE

    def _count_tokens(self, backend: Backend, model: str, usage: Usage | None) -> None:
        if usage is None:
            return
        self.metrics.count_tokens(model, usage.prompt_tokens, usage.completion_tokens)
        self.registry.record_tokens(backend, usage.total_tokens)
