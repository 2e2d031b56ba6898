"""Admin API: list, add and remove backends on a running node, or reload them from the config file.

Enabled only when `node.admin_key` is set; callers send it as a Bearer token.
"""

from __future__ import annotations

from typing import Protocol

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from wwwserve_gateway.config.problems import ConfigError, problems_from_validation
from wwwserve_gateway.config.schema import ModelEntry
from wwwserve_gateway.http.auth import KeyCheck
from wwwserve_gateway.http.errors import Conflict, GatewayError, InvalidRequest, NotFound
from wwwserve_gateway.openai.api_router import parse_json_object
from wwwserve_gateway.plugin_api.backend import Backend


class BackendAdmin(Protocol):
    """What the admin API changes on a running node (the node implements it)."""

    def backends(self) -> list[Backend]: ...

    async def add_backend(self, entry: ModelEntry) -> Backend: ...

    async def remove_backend(self, deployment_id: str) -> None: ...

    async def reload(self) -> tuple[list[str], list[str]]:
        """Re-read model_list from the config file: (added, removed) deployment ids."""


class AdminDisabled(GatewayError):
    status = 403
    type = "permission_error"
    code = "admin_disabled"


def admin_routes(node: BackendAdmin, admin_key: str | None) -> list[Route]:
    keys = KeyCheck([admin_key] if admin_key else [])

    def authorize(request: Request) -> None:
        if not keys.enabled:
            raise AdminDisabled("The admin API is disabled; set node.admin_key in the config to enable it.")
        keys.check(request.scope)

    async def list_backends(request: Request) -> Response:
        authorize(request)
        return JSONResponse({"backends": [b.describe() for b in node.backends()]})

    async def add_backend(request: Request) -> Response:
        authorize(request)
        raw = parse_json_object(await request.body())
        try:
            entry = ModelEntry.model_validate(raw)
        except ValidationError as exc:
            problems = problems_from_validation(exc, ModelEntry)
            raise InvalidRequest("; ".join(map(str, problems)), param=problems[0].key) from None
        try:
            backend = await node.add_backend(entry)
        except ConfigError as exc:
            raise InvalidRequest("; ".join(map(str, exc.problems)), param=exc.problems[0].key) from None
        except ValueError as exc:
            raise Conflict(str(exc)) from None
        return JSONResponse(backend.describe(), status_code=201)

    async def remove_backend(request: Request) -> Response:
        authorize(request)
        deployment = request.path_params["id"]
        try:
            await node.remove_backend(deployment)
        except KeyError:
            raise NotFound(f"No backend with id '{deployment}'", param="id") from None
        return Response(status_code=204)

    async def reload(request: Request) -> Response:
        authorize(request)
        try:
            added, removed = await node.reload()
        except ConfigError as exc:
            raise InvalidRequest(exc.render(), code="invalid_config") from None
        return JSONResponse({"added": added, "removed": removed})

    return [
        Route("/wwwserve/admin/backends", list_backends, methods=["GET"]),
        Route("/wwwserve/admin/backends", add_backend, methods=["POST"]),
        Route("/wwwserve/admin/backends/{id:path}", remove_backend, methods=["DELETE"]),
        Route("/wwwserve/admin/reload", reload, methods=["POST"]),
    ]
