"""The Responses API as some backends stream it. llama.cpp's events leave out fields OpenAI always
sends and the openai SDK's `responses.stream` relies on: the opening events' response object has no
`output`, item events have no `output_index`, part events no `content_index`, none has a
`sequence_number`. `ResponsesStreamFixer` fills in what is missing (an event that lacks nothing is
relayed as the bytes that arrived). Used on `/v1/responses` streams only."""

from __future__ import annotations

import time
from typing import Any

import orjson

RESPONSE_DEFAULTS: dict[str, Any] = {
    "object": "response",
    "output": [],
    "tools": [],
    "tool_choice": "auto",
    "parallel_tool_calls": True,
}


class ResponsesStreamFixer:
    def __init__(self, model: str) -> None:
        self.model = model
        self.sequence = 0
        self.items = 0  # output items opened so far

    def feed(self, piece: bytes) -> bytes:
        """`piece` (whole SSE events) with each event completed."""
        return b"\n\n".join(self._event(e) for e in piece.split(b"\n\n"))

    def _event(self, event: bytes) -> bytes:
        lines = event.split(b"\n")
        for i, line in enumerate(lines):
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            try:
                data = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                return event
            if isinstance(data, dict) and self._complete(data):
                lines[i] = b"data: " + orjson.dumps(data)
        return b"\n".join(lines)

    def _complete(self, data: dict[str, Any]) -> bool:
        """Fill in `data`'s missing fields; whether any was missing."""
        kind = str(data.get("type", ""))
        before = len(data)
        data.setdefault("sequence_number", self.sequence)
        self.sequence += 1
        changed = len(data) != before
        response = data.get("response")
        if isinstance(response, dict):
            size = len(response)
            for key, value in RESPONSE_DEFAULTS.items():
                response.setdefault(key, list(value) if isinstance(value, list) else value)
            response.setdefault("model", self.model)
            response.setdefault("created_at", int(time.time()))
            changed |= len(response) != size
        if kind == "response.output_item.added":
            self.items += 1
        if kind.startswith(("response.output_item.", "response.content_part.", "response.output_text.")):
            if "output_index" not in data:
                data["output_index"] = max(0, self.items - 1)
                changed = True
        if (
            kind.startswith(("response.content_part.", "response.output_text."))
            and "content_index" not in data
        ):
            data["content_index"] = 0
            changed = True
        return changed
