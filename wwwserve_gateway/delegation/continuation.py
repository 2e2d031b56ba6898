"""Resuming a broken stream at another executor, so the app sees one uninterrupted answer.

The entry measures the SSE events it relays (`AnswerReader`). When an executor dies mid-stream,
the text streamed so far becomes an assistant prefix (chat) or is appended to the prompt
(completions) and the request is sent again; the new executor's events are rewritten to carry the
first stream's id and `created`, and its opening role-only chunk is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from wwwserve_gateway.delegation.answers import AnswerReader
from wwwserve_gateway.plugin_api.backend import Endpoint

DATA = "data: "


@dataclass(frozen=True)
class Progress:
    text: str  # the answer so far
    chunks: int  # events that carried text: about one token each
    finished: bool  # a finish_reason was sent: nothing is missing
    id: str | None
    created: int | None


NOTHING = Progress("", 0, False, None, None)


def progress(before: Progress, reader: AnswerReader) -> Progress:
    """What the app has seen: `before` (earlier executors' part) and then what `reader` relayed. The
    reader measures the events as it rewrites them, so the entry keeps no copy of a stream it relays
    (a slow app would otherwise make it hold every byte handed to the socket)."""
    return Progress(
        before.text + reader.text,
        before.chunks + reader.text_events,
        before.finished or reader.finished,
        before.id or reader.id,
        before.created if before.created is not None else reader.created,
    )


def continuation_body(endpoint: Endpoint, body: dict[str, Any], done: Progress) -> dict[str, Any] | None:
    """The request that asks another executor for the rest of the answer, or None if there is
    no way to (several choices, a prompt that is not one string, or no tokens left)."""
    if body.get("n", 1) != 1:
        return None
    resumed = dict(body)
    if not done.text and not done.chunks:  # only the head and empty events reached the app
        return resumed
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
