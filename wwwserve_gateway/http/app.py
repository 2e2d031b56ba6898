"""The node's HTTP application: OpenAI routes, health, metrics and the admin API."""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from wwwserve_gateway.http.admin import admin_routes
from wwwserve_gateway.http.errors import GatewayError, error_body
from wwwserve_gateway.openai.api_router import generation_endpoints, openai_routes

if TYPE_CHECKING:
    from wwwserve_gateway.node import Node

log = structlog.get_logger(__name__)

HTTP_ERROR_TYPES = {404: "not_found_error", 405: "invalid_request_error"}


def error_response(status: int, body: bytes, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status_code=status, media_type="application/json", headers=headers)


async def on_gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(exc.status, exc.body(), exc.headers)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = HTTP_ERROR_TYPES.get(exc.status_code, "invalid_request_error")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return error_response(exc.status_code, error_body(message, kind), exc.headers)


async def on_unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", path=request.url.path, exc_info=exc)
    return error_response(500, error_body("The gateway failed unexpectedly; see its log.", "internal_error"))


def create_app(node: Node) -> GatewayApp:
    settings = node.config.node

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        backends = [{"id": b.id, "model": b.model_name, "ready": b.ready} for b in node.registry]
        ok = all(b["ready"] for b in backends)
        return JSONResponse(
            {"status": "ready" if ok else "starting", "backends": backends}, 200 if ok else 503
        )

    async def metrics(request: Request) -> Response:
        for backend in node.registry:
            node.metrics.observe_backend(backend)
        return Response(node.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    fast = generation_endpoints(node.dispatcher, node.keys, node.metrics, settings.max_body_bytes)
    routes = openai_routes(fast, node.dispatcher, node.keys)
    routes += [
        Route("/health", health, methods=["GET"]),
        Route("/health/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    routes += admin_routes(node)
    routes += node.network.routes()
    app = Starlette(
        routes=routes,
        lifespan=node.lifespan,
        exception_handlers={
            GatewayError: on_gateway_error,
            HTTPException: on_http_error,
            Exception: on_unexpected_error,
        },
    )
    return GatewayApp(fast, app)


class GatewayApp:
    """Sends the OpenAI POST endpoints straight to their handlers, everything else to Starlette.

    The generation handlers answer every error themselves, so Starlette's middleware would only add
    two wrapper coroutines to each request and to each streamed chunk.
    """

    def __init__(self, fast: dict[str, ASGIApp], app: Starlette) -> None:
        self.fast = fast
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self.fast.get(scope["path"])
            if handler is not None:
                await handler(scope, receive, send)
                return
        await self.app(scope, receive, send)
