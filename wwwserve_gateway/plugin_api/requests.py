"""What policies, routers and judges see of a request: its shape, never its content."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def max_tokens(body: dict[str, Any]) -> int | None:
    """The request's output limit (`max_completion_tokens` first, as OpenAI reads it)."""
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    return value if type(value) is int else None


def prompt_chars(body: dict[str, Any]) -> int:
    """Characters of prompt text: messages' string contents, or a string prompt or input."""
    if isinstance(body.get("messages"), list):
        return sum(len(str(m.get("content") or "")) for m in body["messages"] if isinstance(m, dict))
    prompt = body.get("prompt", body.get("input"))
    return len(prompt) if isinstance(prompt, str) else 0


@dataclass(frozen=True, slots=True)
class RequestInfo:
    id: str  # 32 hex characters, the same on every hop
    model: str
    endpoint: str  # "chat/completions", "completions", "embeddings", ...
    stream: bool
    route: tuple[str, ...]  # node ids it went through, entry first; () for an app's request
    prompt_chars: int = 0
    max_tokens: int | None = None
    attempt: int = 0  # how many times the policy has been asked about it already (RETRY)
    avoid: tuple[str, ...] = ()  # nodes that already failed this request: routers skip them

    @classmethod
    def describe(
        cls, request_id: str, endpoint: str, body: dict[str, Any], stream: bool, route: tuple[str, ...] = ()
    ) -> RequestInfo:
        return cls(
            id=request_id,
            model=body["model"],
            endpoint=endpoint,
            stream=stream,
            route=route,
            prompt_chars=prompt_chars(body),
            max_tokens=max_tokens(body),
        )
