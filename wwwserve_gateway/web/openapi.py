"""The node's OpenAPI 3.1 document, served at GET /openapi.json.

The request bodies of the OpenAI routes are the JSON Schemas of the pydantic models the gateway
validates them with (`openai/protocol.py`), so the document cannot drift from what is checked. The
`model` field lists the models this node answers for at the moment it is asked (its own and those it
buys from peers). Every error is OpenAI's `{"error": {message, type, param, code}}`. The admin routes
appear only when the node has an admin key; the peer overlay (a websocket) is not an HTTP operation.
"""

from __future__ import annotations

from typing import Any, Protocol

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from wwwserve_gateway.config.schema import ModelEntry, NodeSettings
from wwwserve_gateway.openai.protocol import REQUEST_TYPES, ModelCard, ModelList
from wwwserve_gateway.plugin_api.backend import Endpoint

PATH = "/openapi.json"


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(BaseModel):
    """Every error the node answers, whatever the route: OpenAI's shape."""

    error: ErrorObject


class ModelCatalog(Protocol):
    def model_names(self) -> list[str]: ...


ERROR = {"$ref": "#/components/schemas/ErrorResponse"}
ANY_OBJECT = {"type": "object", "additionalProperties": True}
# One server-sent event: a JSON chunk in `data`, or `[DONE]` at the end.
SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
SUMMARIES = {
    Endpoint.CHAT: "Create a chat completion (OpenAI)",
    Endpoint.COMPLETION: "Create a text completion (OpenAI)",
    Endpoint.EMBEDDING: "Create embeddings (OpenAI)",
}
# What each failure means on the generation routes (README, "HTTP API").
GENERATION_ERRORS = {
    "400": "malformed JSON, or a missing or wrong-typed field (`param` names it)",
    "401": "a missing or wrong API key",
    "404": "a model this node does not answer for",
    "413": "a body over node.max_body_bytes",
    "429": "a deployment at its rpm/tpm limit, or the policy refuses for now",
    "502": "the backend is unreachable or answered with something that is not OpenAI's format",
    "503": "the backend is not ready, or no peer could take the request (with Retry-After)",
    "504": "the backend was silent past node.request_timeout",
}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(codes: dict[str, str]) -> dict[str, Any]:
    return {code: _json(ERROR, text) for code, text in codes.items()}


def openapi_document(models: list[str], *, authenticated: bool, admin: bool) -> dict[str, Any]:
    """The document for a node answering for `models`; with bearer security where the node has keys."""
    inputs: list[tuple[type[BaseModel], Any]] = [(t, "validation") for t in REQUEST_TYPES.values()]
    inputs += [(ModelEntry, "validation")] if admin else []
    outputs = [ModelList, ModelCard, ErrorResponse]
    _, defs = models_json_schema(
        [*inputs, *((t, "serialization") for t in outputs)], ref_template="#/components/schemas/{model}"
    )
    schemas = defs.get("$defs", {})
    for request_type in REQUEST_TYPES.values():
        field = schemas[request_type.__name__]["properties"]["model"]
        field["description"] = "a model this node answers for (GET /v1/models)"
        if models:
            field["enum"] = sorted(models)
    api_security = [{"bearer": []}] if authenticated else []
    key_errors = {"401": "a missing or wrong API key"} if authenticated else {}

    paths: dict[str, Any] = {}
    for endpoint, request_type in REQUEST_TYPES.items():
        responses = {
            "200": {
                "description": "the backend's answer; with `stream: true`, server-sent events ending with"
                " `data: [DONE]`",
                "content": {
                    "application/json": {"schema": ANY_OBJECT},
                    "text/event-stream": {"schema": SSE_EVENT},
                },
            },
            **_errors({k: v for k, v in GENERATION_ERRORS.items() if k != "401" or authenticated}),
        }
        paths[f"/v1/{endpoint.value}"] = {
            "post": {
                "operationId": endpoint.name.lower(),
                "summary": SUMMARIES[endpoint],
                "security": api_security,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": f"#/components/schemas/{request_type.__name__}"}
                        }
                    },
                },
                "responses": responses,
            }
        }
    paths["/v1/models"] = {
        "get": {
            "operationId": "list_models",
            "summary": "The models this node answers for (OpenAI)",
            "security": api_security,
            "responses": {"200": _json({"$ref": "#/components/schemas/ModelList"}), **_errors(key_errors)},
        }
    }
    paths["/v1/models/{model}"] = {
        "get": {
            "operationId": "get_model",
            "summary": "One model (OpenAI)",
            "security": api_security,
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {
                "200": _json({"$ref": "#/components/schemas/ModelCard"}),
                **_errors({**key_errors, "404": "a model this node does not answer for"}),
            },
        }
    }
    paths.update(_node_paths())
    paths.update(_dashboard_paths())
    if admin:
        paths.update(_admin_paths())
    components: dict[str, Any] = {"schemas": schemas}
    components["securitySchemes"] = {
        "operator": {
            "type": "http",
            "scheme": "bearer",
            "description": "an operator key (node.operator_keys) or the admin key",
        }
    }
    if authenticated or admin:
        components["securitySchemes"].update(
            {
                "bearer": {"type": "http", "scheme": "bearer", "description": "an API key (node.api_keys)"},
                "admin": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the admin key (node.admin_key)",
                },
            }
        )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "wwwserve node",
            "version": "1",
            "description": "An OpenAI-compatible gateway node of a WWW.Serve network. Errors always have "
            "OpenAI's shape.",
        },
        "paths": paths,
        "components": components,
    }


def _node_paths() -> dict[str, Any]:
    status = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}
    ready = {**status, "properties": {**status["properties"], "backends": {"type": "array"}}}
    return {
        "/health": {
            "get": {"operationId": "health", "summary": "Liveness", "responses": {"200": _json(status)}}
        },
        "/health/ready": {
            "get": {
                "operationId": "ready",
                "summary": "Readiness: 503 until every backend can serve",
                "responses": {"200": _json(ready), "503": _json(ready, "starting")},
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}
                },
            }
        },
        "/wwwserve/peers": {
            "get": {
                "operationId": "peers",
                "summary": "The nodes this node knows, one object each",
                "responses": {"200": _json({"type": "array", "items": ANY_OBJECT})},
            }
        },
        "/wwwserve/ledger/balances": {
            "get": {
                "operationId": "balances",
                "summary": "Balances by node id",
                "responses": {"200": _json(ANY_OBJECT)},
            }
        },
        "/wwwserve/ledger/ops": {
            "get": {
                "operationId": "ledger_ops",
                "summary": "One author's chain of operations",
                "parameters": [
                    {"name": "author", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "from",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "description": "at most 1000 are returned, whatever the limit",
                        "schema": {"type": "integer", "minimum": 1},
                    },
                ],
                "responses": {
                    "200": _json({"type": "array", "items": ANY_OBJECT}),
                    **_errors({"400": "a parameter out of range"}),
                },
            }
        },
        PATH: {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {"200": _json(ANY_OBJECT)},
            }
        },
    }


def _html(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/html": {"schema": {"type": "string"}}}}


def _dashboard_paths() -> dict[str, Any]:
    """The operator's dashboard and these docs (wwwserve_gateway/web/ui)."""
    operator = [{"operator": []}]
    refused = _errors({"401": "a missing or wrong operator key"})
    return {
        "/docs": {
            "get": {
                "operationId": "docs",
                "summary": "This API, rendered by Swagger UI",
                "responses": {"200": _html("OK")},
            }
        },
        "/ui": {
            "get": {
                "operationId": "dashboard",
                "summary": "The operator's dashboard (a sign-in form without a session)",
                "responses": {
                    "200": _html("the dashboard, or its sign-in form"),
                    **_errors({"403": "disabled: the node has no operator key and no admin key"}),
                },
            }
        },
        "/ui/api/snapshot": {
            "get": {
                "operationId": "dashboard_snapshot",
                "summary": "What the dashboard shows: network, traffic, requests, credits, backends",
                "security": operator,
                "responses": {"200": _json(ANY_OBJECT), **refused},
            }
        },
        "/ui/api/events": {
            "get": {
                "operationId": "dashboard_events",
                "summary": "The dashboard's live feed: one snapshot a second (server-sent events)",
                "security": operator,
                "responses": {
                    "200": {
                        "description": "OK",
                        "content": {"text/event-stream": {"schema": {"type": "array", "items": SSE_EVENT}}},
                    },
                    **refused,
                },
            }
        },
    }


def _admin_paths() -> dict[str, Any]:
    admin = [{"admin": []}]
    errors = _errors({"401": "a missing or wrong admin key"})
    return {
        "/wwwserve/admin/backends": {
            "get": {
                "operationId": "list_backends",
                "security": admin,
                "responses": {"200": _json(ANY_OBJECT), **errors},
            },
            "post": {
                "operationId": "add_backend",
                "security": admin,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ModelEntry"}}},
                },
                "responses": {
                    "201": _json(ANY_OBJECT),
                    **errors,
                    **_errors({"400": "an invalid entry", "409": "the deployment id is taken"}),
                },
            },
        },
        "/wwwserve/admin/backends/{id}": {
            "delete": {
                "operationId": "remove_backend",
                "security": admin,
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {
                    "204": {"description": "removed"},
                    **errors,
                    **_errors({"404": "no such backend"}),
                },
            }
        },
        "/wwwserve/admin/reload": {
            "post": {
                "operationId": "reload",
                "security": admin,
                "responses": {
                    "200": _json(ANY_OBJECT),
                    **errors,
                    **_errors({"400": "an invalid config file"}),
                },
            }
        },
    }


def openapi_route(catalog: ModelCatalog, settings: NodeSettings) -> Route:
    async def document(request: Request) -> Response:
        return JSONResponse(
            openapi_document(
                catalog.model_names(), authenticated=bool(settings.api_keys), admin=bool(settings.admin_key)
            )
        )

    return Route(PATH, document, methods=["GET"])
