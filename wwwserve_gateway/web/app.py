"""The node's HTTP application: OpenAI routes, health, metrics and the admin API."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from wwwserve_gateway.config.schema import NodeSettings
from wwwserve_gateway.deployments import Deployments
from wwwserve_gateway.dispatch import Dispatcher
from wwwserve_gateway.http.auth import KeyCheck
from wwwserve_gateway.http.errors import GatewayError, error_body
from wwwserve_gateway.metrics import GatewayMetrics
from wwwserve_gateway.openai.api_router import generation_endpoints, openai_routes
from wwwserve_gateway.overlay.overlay import PATH as OVERLAY_PATH
from wwwserve_gateway.plugin_api.node import NodeAPI
from wwwserve_gateway.web.admin import BackendAdmin, admin_routes
from wwwserve_gateway.web.network_views import network_routes
from wwwserve_gateway.web.openapi import openapi_route
from wwwserve_gateway.web.ui.routes import dashboard_routes, docs_routes
from wwwserve_gateway.web.ui.sources import DashboardSources, RequestLog

Lifespan = Callable[[Any], AbstractAsyncContextManager[None]]

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


@dataclass(frozen=True)
class AppParts:
    """Everything the HTTP application serves, handed over by the node that owns it."""

    settings: NodeSettings
    dispatcher: Dispatcher
    deployments: Deployments
    metrics: GatewayMetrics
    admin: BackendAdmin
    node: NodeAPI
    lifespan: Lifespan
    requests: RequestLog | None = None  # the recent app requests, for the dashboard


def create_app(parts: AppParts) -> GatewayApp:
    settings = parts.settings
    deployments, metrics = parts.deployments, parts.metrics
    keys = KeyCheck(settings.api_keys)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        status, backends = deployments.readiness()  # deployments cooling down count as not ready
        ok = status in ("ready", "degraded")
        return JSONResponse({"status": status, "backends": backends}, 200 if ok else 503)

    async def render_metrics(request: Request) -> Response:
        for backend in deployments:
            metrics.observe_backend(backend)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    fast = generation_endpoints(parts.dispatcher, keys, metrics, settings.max_body_bytes)
    routes: list[BaseRoute] = [*openai_routes(fast, parts.dispatcher, keys)]
    routes += [
        Route("/health", health, methods=["GET"]),
        Route("/health/ready", ready, methods=["GET"]),
        Route("/metrics", render_metrics, methods=["GET"]),
        WebSocketRoute(OVERLAY_PATH, parts.node.overlay.websocket_endpoint),
    ]
    routes += admin_routes(parts.admin, settings.admin_key)
    operators = [*settings.operator_keys, *([settings.admin_key] if settings.admin_key else [])]
    routes += network_routes(parts.node, KeyCheck(operators))
    routes.append(openapi_route(parts.dispatcher, settings))
    sources = DashboardSources(parts.node, deployments, parts.requests, tuple(operators), time.time())
    routes += dashboard_routes(sources)
    routes += docs_routes()
    app = Starlette(
        routes=routes,
        lifespan=parts.lifespan,
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
