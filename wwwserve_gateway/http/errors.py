"""Errors that reach an HTTP client, always rendered in OpenAI's error shape.

`{"error": {"message", "type", "param", "code"}}` is what the official SDKs parse into
`openai.APIStatusError` subclasses, so every failure, ours or a backend's, ends up in it.
"""

from __future__ import annotations

import orjson


class GatewayError(Exception):
    """An error with the HTTP status and OpenAI error fields it is reported with."""

    status: int = 500
    type: str = "internal_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class BackendError(GatewayError):
    """The backend could not produce an answer; `status` says how (502, 503 or 504)."""

    status = 502
    type = "api_error"


class BackendUnreachable(BackendError):
    status = 502
    code = "backend_unreachable"


class BackendUnavailable(BackendError):
    status = 503
    code = "backend_unavailable"


class BackendTimeout(BackendError):
    status = 504
    type = "timeout"
    code = "backend_timeout"


class BackendProtocolError(BackendError):
    """The backend answered with something that is not a valid OpenAI-style response."""

    status = 502
    code = "bad_backend_response"


class UpstreamError(BackendError):
    """The backend answered with an HTTP error: relayed with its status and its error fields."""

    @classmethod
    def from_response(cls, status: int, raw: bytes, *, backend: str) -> UpstreamError:
        fields: dict = {}
        try:
            data = orjson.loads(raw)
            if isinstance(data, dict):
                fields = data.get("error") if isinstance(data.get("error"), dict) else data
        except orjson.JSONDecodeError:
            pass
        message = fields.get("message") or fields.get("detail") or raw[:500].decode("utf-8", "replace")
        if not isinstance(message, str):
            message = str(message)
        code = fields.get("code")
        error = cls(
            message or f"backend {backend} answered HTTP {status}",
            param=fields.get("param") if isinstance(fields.get("param"), str) else None,
            code=code if isinstance(code, str) else None,  # OpenAI codes are strings; llama.cpp sends ints
            status=status if 400 <= status <= 599 else 502,
        )
        kind = fields.get("type")
        error.type = (
            kind if isinstance(kind, str) else ("invalid_request_error" if status < 500 else "api_error")
        )
        return error
