"""HTTP routes of the OpenAI API. Each generation endpoint is a plain ASGI app: the hot path."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Protocol

import orjson
import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from wwwserve_gateway.http.asgi import ClientDisconnected, Receive, Scope, Send, read_body, send_error
from wwwserve_gateway.http.auth import KeyCheck
from wwwserve_gateway.http.errors import GatewayError, InvalidRequest, ModelNotFound
from wwwserve_gateway.metrics import GatewayMetrics
from wwwserve_gateway.openai.protocol import (
    PASS_THROUGH_TYPES,
    REQUEST_TYPES,
    ModelCard,
    ModelList,
    validate_request,
)
from wwwserve_gateway.openai.request import AppRequest
from wwwserve_gateway.plugin_api.backend import Endpoint

log = structlog.get_logger(__name__)


class Serving(Protocol):
    """What answers a generation request: the node's dispatcher (local or delegated)."""

    async def serve(self, request: AppRequest) -> None: ...


def parse_json_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return body


class GenerationEndpoint:
    """POST /v1/chat/completions, /v1/completions, /v1/embeddings."""

    def __init__(
        self, endpoint: Endpoint, serving: Serving, keys: KeyCheck, metrics: GatewayMetrics, limit: int
    ) -> None:
        self.endpoint = endpoint
        self.request_type = REQUEST_TYPES.get(endpoint) or PASS_THROUGH_TYPES[endpoint]
        self.serving = serving
        self.keys = keys
        self.metrics = metrics
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        try:
            self.keys.check(scope)
            body = parse_json_object(await read_body(scope, receive, self.limit))
            parsed = validate_request(self.request_type, body)
            stream = bool(parsed.stream) and self.endpoint is not Endpoint.EMBEDDING
            await self.serving.serve(AppRequest(self.endpoint, body, stream, started, receive, send))
        except GatewayError as exc:
            self.metrics.count_error(self.endpoint.value, exc.type)
            await send_error(send, exc)
        except ClientDisconnected:
            pass
        except Exception:
            log.exception("unhandled error", endpoint=self.endpoint.value)
            self.metrics.count_error(self.endpoint.value, "internal_error")
            with contextlib.suppress(RuntimeError):  # the response may have started already
                await send_error(send, GatewayError("The gateway failed unexpectedly; see its log."))


class ModelCatalog(Protocol):
    """The models an app may ask this node for: its own and those it buys from peers."""

    def model_names(self) -> list[str]: ...

    def serves(self, model: str) -> bool: ...


def model_routes(catalog: ModelCatalog, keys: KeyCheck, started_at: int) -> list[Route]:
    def card(name: str) -> ModelCard:
        return ModelCard(id=name, created=started_at)

    async def list_models(request: Request) -> Response:
        keys.check(request.scope)
        body = ModelList(data=[card(n) for n in catalog.model_names()])
        return Response(body.model_dump_json(), media_type="application/json")

    async def get_model(request: Request) -> Response:
        keys.check(request.scope)
        name = request.path_params["model"]
        if not catalog.serves(name):
            raise ModelNotFound(f"The model '{name}' does not exist on this node", param="model")
        return Response(card(name).model_dump_json(), media_type="application/json")

    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    ]


def generation_endpoints(
    serving: Serving, keys: KeyCheck, metrics: GatewayMetrics, limit: int
) -> dict[str, GenerationEndpoint]:
    """Path -> handler, with and without /v1 (the OpenAI SDK drops it when base_url lacks it)."""
    handlers = {e: GenerationEndpoint(e, serving, keys, metrics, limit) for e in Endpoint}
    return {f"{prefix}/{e.value}": h for e, h in handlers.items() for prefix in ("/v1", "")}


def openai_routes(
    endpoints: dict[str, GenerationEndpoint], catalog: ModelCatalog, keys: KeyCheck
) -> list[Route]:
    routes = [Route(path, handler, methods=["POST"]) for path, handler in endpoints.items()]
    return routes + model_routes(catalog, keys, int(time.time()))
