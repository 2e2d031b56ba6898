"""Serving an app's request on a local deployment: pick one, lease it, call it, relay the answer."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import structlog

from wwwserve_gateway.deployments import Deployments, worth_another_deployment
from wwwserve_gateway.http.asgi import SSE_HEADERS, Headers, cancel_on_disconnect, send_bytes
from wwwserve_gateway.http.errors import BackendError, GatewayError, InvalidRequest, UpstreamError
from wwwserve_gateway.http.sse import DONE
from wwwserve_gateway.metrics import GatewayMetrics
from wwwserve_gateway.openai.request import AppRequest
from wwwserve_gateway.openai.responses import ResponsesStreamFixer
from wwwserve_gateway.openai.responses_chat import ResponsesFromChat, chat_body, response_from_chat
from wwwserve_gateway.plugin_api.backend import TEXT_ENDPOINTS, Backend, Endpoint, JSONReply, Usage

log = structlog.get_logger(__name__)

ESTIMATED_USAGE = [(b"x-wwwserve-usage", b"estimated")]


class LocalServing:
    def __init__(self, deployments: Deployments, metrics: GatewayMetrics) -> None:
        self.deployments = deployments
        self.metrics = metrics

    async def serve(self, request: AppRequest, headers: Headers, model: str | None = None) -> Usage | None:
        """Answer `request` from a deployment of `model` (default: the one asked for), with `headers`
        added to the answer's; return the usage. Errors before the answer starts are raised (the
        route sends them as JSON).

        A deployment that fails before its first byte (unreachable, timed out, 5xx, 429) is
        counted (`Deployments.failed`: cooldowns) and the request goes to the next deployment of
        the group, up to `router_settings.num_retries` times (default: each deployment once).
        """
        model = model or request.model
        deployments = self.deployments
        router = deployments.router
        tried: list[str] = []
        last: BackendError | None = None
        while True:
            try:
                backend = deployments.pick(model, tried)
            except GatewayError:
                if last is not None:
                    raise last from None  # the app hears why the group failed, not "none left"
                raise
            if request.endpoint not in backend.endpoints and not via_chat(request.endpoint, backend):
                raise InvalidRequest(
                    f"The model '{request.model}' does not support /v1/{request.endpoint}",
                    param="model",
                    code="unsupported_endpoint",
                )
            request.deployment = backend.id
            for _ in range(1 + (backend.settings.max_retries or 0)):
                if last is not None and router.retry_after:
                    await cancel_on_disconnect(request.receive, asyncio.sleep(router.retry_after))
                try:
                    return await self._once(backend, request, headers)
                except BackendError as exc:
                    if not worth_another_deployment(exc):
                        raise
                    deployments.failed(backend, exc)
                    last = exc
                if not deployments.available(backend):
                    break  # cooling down: no more tries here
            tried.append(backend.id)
            if router.num_retries is not None and len(tried) > router.num_retries:
                raise last from None

    async def _once(self, backend: Backend, request: AppRequest, headers: Headers) -> Usage | None:
        body = dict(request.body)  # each deployment rewrites `model` (and stream options) in its copy
        with self.deployments.lease(backend) as lease:
            if request.endpoint is Endpoint.RESPONSES:
                usage = await self._responses(backend, request, body, headers)
            elif request.stream:
                work = self._stream(backend, request, body, headers)
                usage = await cancel_on_disconnect(request.receive, work)
                await request.send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                reply = await cancel_on_disconnect(request.receive, backend.complete(request.endpoint, body))
                usage, extra = self._ensure_usage(request.endpoint, reply)
                await send_bytes(request.send, 200, reply.body, headers + extra)
            lease.used(usage)
        self.deployments.answered(backend, time.perf_counter() - request.started)
        return usage

    async def _responses(
        self, backend: Backend, request: AppRequest, body: dict[str, Any], headers: Headers
    ) -> Usage | None:
        """/v1/responses: passed through where the backend serves it; otherwise (it does not list
        it, or answers 404/405/501) translated to and from chat completions."""
        if not via_chat(request.endpoint, backend) or Endpoint.RESPONSES in backend.endpoints:
            try:
                if request.stream:
                    work = self._stream(backend, request, body, headers)
                    usage = await cancel_on_disconnect(request.receive, work)
                    await request.send({"type": "http.response.body", "body": b"", "more_body": False})
                    return usage
                reply = await cancel_on_disconnect(request.receive, backend.complete(request.endpoint, body))
                await send_bytes(request.send, 200, reply.body, headers)
                return reply.usage
            except UpstreamError as exc:
                if exc.status not in (404, 405, 501) or Endpoint.CHAT not in backend.endpoints:
                    raise
        chat = chat_body(request.body, request.stream)
        if request.stream:
            usage = await cancel_on_disconnect(
                request.receive, self._stream_via_chat(backend, request, chat, headers)
            )
            await request.send({"type": "http.response.body", "body": b"", "more_body": False})
            return usage
        reply = await cancel_on_disconnect(request.receive, backend.complete(Endpoint.CHAT, chat))
        await send_bytes(
            request.send, 200, response_from_chat(reply.data, reply.usage, request.model), headers
        )
        return reply.usage

    async def _stream_via_chat(
        self, backend: Backend, request: AppRequest, chat: dict[str, Any], headers: Headers
    ) -> Usage | None:
        send = request.send
        sse = await backend.stream(Endpoint.CHAT, chat)
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS + headers})
        events = ResponsesFromChat(request.model)
        try:
            async for piece in sse:
                out = events.feed(piece)
                if request.ttft is None:
                    request.ttft = time.perf_counter() - request.started
                    self.metrics.first_token(request.model, request.ttft)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
            await send({"type": "http.response.body", "body": events.close(), "more_body": True})
        except BackendError as exc:
            self.deployments.failed(backend, exc)
            self.metrics.count_error("stream", exc.type)
            await send(
                {"type": "http.response.body", "body": b"data: " + exc.body() + b"\n\n", "more_body": True}
            )
        finally:
            await sse.aclose()
        return events.usage or sse.usage

    async def _stream(
        self, backend: Backend, request: AppRequest, body: dict[str, Any], headers: Headers
    ) -> Usage | None:
        """Relay a stream. Failures before the first byte raise (a JSON error follows); after the
        headers are out, a failure becomes an SSE error event."""
        send = request.send
        sse = await backend.stream(request.endpoint, body)
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS + headers})
        done = False
        first = True
        fixer = ResponsesStreamFixer(request.model) if request.endpoint is Endpoint.RESPONSES else None
        try:
            async for piece in sse:
                if first:
                    request.ttft = time.perf_counter() - request.started
                    self.metrics.first_token(request.model, request.ttft)
                    first = False
                if fixer is not None:
                    piece = fixer.feed(piece)
                done = piece.endswith(DONE)
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            if not done and request.endpoint in TEXT_ENDPOINTS:
                await send({"type": "http.response.body", "body": DONE, "more_body": True})
        except BackendError as exc:
            self.deployments.failed(backend, exc)  # logged there, with the deployment's id
            self.metrics.count_error("stream", exc.type)
            await send(
                {"type": "http.response.body", "body": b"data: " + exc.body() + b"\n\n", "more_body": True}
            )
        finally:
            await sse.aclose()
        return sse.usage

    @staticmethod
    def _ensure_usage(endpoint: Endpoint, reply: JSONReply) -> tuple[Usage | None, Headers]:
        """Usage is always reported; a backend that gives none gets an estimate, marked as such."""
        if reply.usage is not None or endpoint not in TEXT_ENDPOINTS:
            return reply.usage, []
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


def via_chat(endpoint: Endpoint, backend: Backend) -> bool:
    """Whether `endpoint` can be served by `backend` through chat completions (the Responses API)."""
    return endpoint is Endpoint.RESPONSES and Endpoint.CHAT in backend.endpoints
