"""Request and response types of the OpenAI API, as far as the gateway needs to check them.

The gateway validates what it reads or what is commonly mistyped and forwards everything else
unchanged (tools, response_format, logprobs, ...): the backend is the judge of its own parameters.
Models are strict, so "5" is not silently taken for 5 while the original "5" is forwarded.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from wwwserve_gateway.http.errors import InvalidRequest
from wwwserve_gateway.plugin_api.backend import Endpoint


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(..., min_length=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool | None = None


class _Sampling(_Request):
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(_Request):
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1)


class ResponsesRequest(_Request):
    """The Responses API (`/v1/responses`): passed through to backends that serve it."""

    input: str | list[Any]
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)


class RerankRequest(_Request):
    query: str
    documents: list[Any] = Field(..., min_length=1)
    top_n: int | None = Field(None, ge=1)


class ModerationRequest(_Request):
    input: str | list[Any]


class ImageRequest(_Request):
    prompt: str = Field(..., min_length=1)
    n: int | None = Field(None, ge=1)


StreamOptions.model_rebuild()
_Request.model_rebuild()


# Parts of an error location that name a union member's type rather than a field.
_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|[a-z-]+\[.*\]|function-.*|constrained-.*)$")


def _param(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _TYPE_TAG.match(str(part)):
            out += f".{part}" if out else str(part)
    return out


def validate_request(model: type[_Request], body: dict[str, Any]) -> _Request:
    """Validate a parsed body; raise InvalidRequest naming the first offending field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = _param(err["loc"])
        if err["type"] == "missing":
            message = f"Missing required parameter: '{param}'."
        else:
            message = f"Invalid value for '{param}': {err['msg']}."
        raise InvalidRequest(
            message,
            param=param,
            code="missing_required_parameter" if err["type"] == "missing" else "invalid_value",
        ) from None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "wwwserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


REQUEST_TYPES: dict[Endpoint, type[_Request]] = {
    Endpoint.CHAT: ChatCompletionRequest,
    Endpoint.COMPLETION: CompletionRequest,
    Endpoint.EMBEDDING: EmbeddingRequest,
}
# Endpoints a node passes through to its own deployments (not delegated, not in the OpenAPI document).
PASS_THROUGH_TYPES: dict[Endpoint, type[_Request]] = {
    Endpoint.RESPONSES: ResponsesRequest,
    Endpoint.RERANK: RerankRequest,
    Endpoint.MODERATIONS: ModerationRequest,
    Endpoint.IMAGES: ImageRequest,
}
