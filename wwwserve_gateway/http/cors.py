"""CORS for browser front-ends (`node.cors_*`): Starlette's middleware around the whole app, only
when origins are configured, so a node without them pays nothing per request."""

from __future__ import annotations

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp

from wwwserve_gateway.config.schema import NodeSettings

METHODS = ["GET", "POST", "DELETE", "OPTIONS"]


def with_cors(app: ASGIApp, settings: NodeSettings) -> ASGIApp:
    if not settings.cors_allow_origins:
        return app
    return CORSMiddleware(
        app,
        allow_origins=settings.cors_allow_origins,
        allow_methods=METHODS,
        allow_headers=settings.cors_allow_headers,
        allow_credentials=settings.cors_allow_credentials,
        expose_headers=["x-wwwserve-route", "retry-after"],
        max_age=settings.cors_max_age,
    )
