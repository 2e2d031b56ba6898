"""Server-sent events as bytes: cut a stream at event boundaries and take the usage from it.

Only a run of events that contains the bytes `"usage"` is split and decoded, so relaying costs one
substring search per network read, whatever the number of chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import orjson

U = TypeVar("U")

EVENT_END = b"\n\n"
USAGE_MARK = b'"usage"'
DONE = b"data: [DONE]\n\n"


class MalformedEvent(ValueError):
    pass


class SSECutter(Generic[U]):
    """Feed it network reads; it returns the whole events received so far (possibly none).

    `usage_of` reads an event's `usage` field (None when malformed); the last one read is `usage`.
    With `hide_usage`, the usage-only chunk (no choices) is dropped: the gateway asked for it,
    the app did not.
    """

    def __init__(self, usage_of: Callable[[Any], U | None], *, hide_usage: bool = False) -> None:
        self.usage_of = usage_of
        self.hide_usage = hide_usage
        self.usage: U | None = None
        self._pending = b""

    def feed(self, data: bytes) -> bytes:
        if self._pending:
            data = self._pending + data
        cut = data.rfind(EVENT_END)
        if cut < 0:
            self._pending = data
            return b""
        self._pending = data[cut + 2 :]
        out = data[: cut + 2]
        return self._take_usage(out) if USAGE_MARK in out else out

    def flush(self) -> bytes:
        """At the end of the stream: a last event that lacks its blank line is delivered whole."""
        pending, self._pending = self._pending, b""
        if not pending.strip():
            return b""
        return self._take_usage(pending.rstrip(b"\n") + EVENT_END)

    def _take_usage(self, events: bytes) -> bytes:
        kept = []
        for event in events.split(EVENT_END)[:-1]:
            if USAGE_MARK in event and event.startswith(b"data:"):
                try:
                    data = orjson.loads(event[5:])
                except orjson.JSONDecodeError:
                    raise MalformedEvent(event[:200].decode("utf-8", "replace")) from None
                usage = self.usage_of(_usage_field(data)) if isinstance(data, dict) else None
                if usage is not None:
                    self.usage = usage
                    if self.hide_usage and not data.get("choices"):
                        continue
            kept.append(event)
        return EVENT_END.join(kept) + EVENT_END if kept else b""


def _usage_field(data: dict[str, Any]) -> Any:
    """An event's usage: top-level (chat, completions), or in its response (the Responses API's
    response.completed)."""
    usage = data.get("usage")
    if usage is None and isinstance(data.get("response"), dict):
        usage = data["response"].get("usage")
    return usage
