"""The routes of the dashboard (`/ui`, behind an operator key) and of the API docs (`/docs`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from wwwserve_gateway.http.errors import error_body
from wwwserve_gateway.web.ui.assets import Assets
from wwwserve_gateway.web.ui.auth import COOKIE, OperatorAuth
from wwwserve_gateway.web.ui.dashboard import Dashboard
from wwwserve_gateway.web.ui.sources import DashboardSources

# An open page's feed ends after this long and its EventSource reconnects at once: a node that is
# stopping (which stops accepting connections) then waits at most this long for dashboards.
STREAM_S = 10.0
MAX_FORM_BYTES = 4096
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
DISABLED = (
    "The dashboard is disabled: it needs an operator key. Set node.operator_keys (read-only keys) "
    "or node.admin_key in the node's config."
)


def _unauthorized() -> Response:
    body = error_body(
        "Sign in at /ui, or send an operator key as 'Authorization: Bearer KEY'.", "authentication_error"
    )
    return Response(body, 401, media_type="application/json")


def dashboard_routes(sources: DashboardSources) -> list[Route]:
    auth = OperatorAuth(sources.operator_keys)
    dashboard = Dashboard(sources)
    assets = Assets()

    def page(name: str, status: int = 200, message: str = "") -> Response:
        asset = assets.get(name)
        assert asset is not None, f"static/{name} is missing from the package"
        body = asset.body.replace(b"{{message}}", message.encode())
        return Response(body, status, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    async def index(request: Request) -> Response:
        if not auth.enabled:
            body = error_body(DISABLED, "permission_error", code="dashboard_disabled")
            return Response(body, 403, media_type="application/json")
        if not auth.authorized(request):
            return page("login.html")
        return page("index.html")

    async def login(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            return page("login.html", 413, "That form is too large.")
        key = parse_qs(body.decode(errors="replace")).get("key", [""])[0]
        token = auth.login(key)
        if token is None:
            return page("login.html", 401, "That key is not an operator key of this node.")
        response = RedirectResponse("/ui", 303)
        response.set_cookie(
            COOKIE, token, max_age=int(auth.session_s), path="/ui", httponly=True, samesite="strict"
        )
        return response

    async def logout(request: Request) -> Response:
        auth.logout(request.cookies.get(COOKIE))
        response = RedirectResponse("/ui", 303)
        response.delete_cookie(COOKIE, path="/ui")
        return response

    async def static(request: Request) -> Response:
        path = request.path_params["path"]
        asset = assets.get(path)
        if asset is None:
            return Response(
                error_body(f"No file /ui/static/{path}", "not_found_error"),
                404,
                media_type="application/json",
            )
        headers = {"ETag": asset.etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        if request.headers.get("if-none-match") == asset.etag:
            return Response(status_code=304, headers=headers)
        return Response(asset.body, media_type=asset.media_type, headers=headers)

    async def snapshot(request: Request) -> Response:
        if not auth.authorized(request):
            return _unauthorized()
        return JSONResponse(dashboard.snapshot(), headers={"Cache-Control": "no-store"})

    async def events(request: Request) -> Response:
        if not auth.authorized(request):
            return _unauthorized()

        async def stream() -> AsyncIterator[bytes]:
            queue = dashboard.subscribe()
            loop = asyncio.get_running_loop()
            end = loop.time() + STREAM_S
            try:
                yield b"retry: 500\n\n"
                while (left := end - loop.time()) > 0:
                    with contextlib.suppress(TimeoutError):
                        payload = await asyncio.wait_for(queue.get(), left)
                        yield b"data: " + payload + b"\n\n"
            finally:
                dashboard.unsubscribe(queue)

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    return [
        Route("/ui", index, methods=["GET"]),
        Route("/ui/login", login, methods=["POST"]),
        Route("/ui/logout", logout, methods=["POST"]),
        Route("/ui/static/{path:path}", static, methods=["GET"]),
        Route("/ui/api/snapshot", snapshot, methods=["GET"]),
        Route("/ui/api/events", events, methods=["GET"]),
    ]


def docs_routes() -> list[Route]:
    """Swagger UI over /openapi.json, from the vendored files (public, like the document)."""
    assets = Assets()

    async def docs(request: Request) -> Response:
        asset = assets.get("docs.html")
        assert asset is not None, "static/docs.html is missing from the package"
        return Response(
            asset.body, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"}
        )

    return [Route("/docs", docs, methods=["GET"])]
