"""Resuming a broken stream at another executor, so the app sees one uninterrupted answer.

The entry keeps the SSE events it relayed. When an executor dies mid-stream, the text streamed so
far becomes an assistant prefix (chat) or is appended to the prompt (completions) and the request is
sent again; the new executor's events are rewritten to carry the first stream's id and `created`,
and its opening role-only chunk is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from wwwserve_gateway.plugin_api.backend import Endpoint

DATA = "data: "


def events(pieces: list[str]) -> list[dict[str, Any]]:
    """The JSON objects of relayed SSE text (comments and [DONE] skipped)."""
    out = []
    for piece in pieces:
        for event in piece.split("\n\n"):
            if event.startswith(DATA) and event != DATA + "[DONE]":
                try:
                    obj = orjson.loads(event[len(DATA) :])
                except orjson.JSONDecodeError:
                    continue
                if isinstance(obj, dict):
                    out.append(obj)
    return out


@dataclass
class Progress:
    text: str  # the answer so far
    chunks: int  # events that carried text: about one token each
    finished: bool  # a finish_reason was sent: nothing is missing
    id: str | None
    created: int | None


def progress(pieces: list[str]) -> Progress:
    parts: list[str] = []
    chunks = 0
    finished = False
    first: dict[str, Any] | None = None
    for obj in events(pieces):
        first = first or obj
        for choice in obj.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if isinstance(piece, str) and piece:
                parts.append(piece)
                chunks += 1
            finished = finished or bool(choice.get("finish_reason"))
    first = first or {}
    return Progress("".join(parts), chunks, finished, first.get("id"), first.get("created"))


def continuation_body(endpoint: Endpoint, body: dict[str, Any], done: Progress) -> dict[str, Any] | None:
    """The request that asks another executor for the rest of the answer, or None if there is
    no way to (several choices, a prompt that is not one string, or no tokens left)."""
    if body.get("n", 1) != 1:
        return None
    resumed = dict(body)
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int):
            left = body[key] - done.chunks
            if left <= 0:
                return None
            resumed[key] = left
    if endpoint is Endpoint.CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        resumed["messages"] = [*messages, {"role": "assistant", "content": done.text}]
    elif endpoint is Endpoint.COMPLETION and isinstance(body.get("prompt"), str):
        resumed["prompt"] = body["prompt"] + done.text
        resumed.pop("echo", None)
    else:
        return None
    return resumed


class Stitcher:
    """Rewrites a continuation's events so they read as the rest of the first stream."""

    def __init__(self, done: Progress) -> None:
        self.id = done.id
        self.created = done.created

    def __call__(self, payload: str) -> str:
        out: list[str] = []
        for event in payload.split("\n\n"):
            if not event.startswith(DATA):
                continue
            obj = orjson.loads(event[len(DATA) :])
            if self._role_only(obj):
                continue
            if self.id is not None:
                obj["id"] = self.id
            if self.created is not None:
                obj["created"] = self.created
            out.append(DATA + orjson.dumps(obj).decode() + "\n\n")
        return "".join(out)

    @staticmethod
    def _role_only(obj: dict[str, Any]) -> bool:
        choices = obj.get("choices")
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
            return False
        delta = choices[0].get("delta")
        return (
            isinstance(delta, dict)
            and not delta.get("content")
            and not delta.get("tool_calls")
            and not choices[0].get("finish_reason")
            and "usage" not in obj
        )
