"""The Responses API served through chat completions, for backends without `/v1/responses`.

`chat_body` turns a Responses request into a chat request; `response_from_chat` a chat answer into
a Response object; `ResponsesFromChat` a chat stream into the Responses stream events the openai
SDK's `responses.stream` reads (created, in_progress, output_item.added, content_part.added,
output_text.delta..., the matching .done events, completed). Text in and out; a request with tools
or other input items than messages and text is refused with a 400 naming the parameter.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from wwwserve_gateway.http.errors import InvalidRequest
from wwwserve_gateway.plugin_api.backend import Usage

SAMPLING = ("temperature", "top_p", "user", "seed", "stop")


def chat_body(body: dict[str, Any], stream: bool) -> dict[str, Any]:
    if body.get("tools"):
        raise InvalidRequest(
            "tools are not supported by this model's /v1/responses (its backend serves chat only)",
            param="tools",
        )
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body["input"]
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    else:
        for i, item in enumerate(items):
            if not isinstance(item, dict) or item.get("type", "message") != "message" or "role" not in item:
                raise InvalidRequest(
                    "only message items are supported by this model's /v1/responses", param=f"input[{i}]"
                )
            messages.append({"role": item["role"], "content": _text(item.get("content"), f"input[{i}]")})
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    chat.update({k: body[k] for k in SAMPLING if k in body})
    if body.get("max_output_tokens"):
        chat["max_tokens"] = body["max_output_tokens"]
    if stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def _text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("input_text", "output_text", "text"):
                parts.append(str(part.get("text", "")))
            else:
                raise InvalidRequest("only text content is supported here", param=param)
        return "".join(parts)
    raise InvalidRequest("a message needs text content", param=param)


def _response(rid: str, model: str, status: str, output: list[Any], usage: Usage | None) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "model": model,
        "status": status,
        "output": output,
        "tools": [],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "usage": None
        if usage is None
        else {
            "input_tokens": usage.prompt_tokens,
            "output_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        },
    }


def _message(mid: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": []}]
    return {"type": "message", "id": mid, "role": "assistant", "status": status, "content": content}


def response_from_chat(data: dict[str, Any], usage: Usage | None, model: str) -> bytes:
    choices = data.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    text = str((choice.get("message") or {}).get("content") or "")
    status = "incomplete" if choice.get("finish_reason") == "length" else "completed"
    rid = "resp_" + uuid.uuid4().hex
    return orjson.dumps(_response(rid, model, status, [_message("msg_" + uuid.uuid4().hex, text)], usage))


class ResponsesFromChat:
    """Chat-completion SSE pieces in, Responses API SSE events out."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.rid = "resp_" + uuid.uuid4().hex
        self.mid = "msg_" + uuid.uuid4().hex
        self.sequence = 0
        self.text: list[str] = []
        self.started = False
        self.finish: str | None = None
        self.usage: Usage | None = None

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    def _opening(self) -> bytes:
        self.started = True
        response = _response(self.rid, self.model, "in_progress", [], None)
        place = {"item_id": self.mid, "output_index": 0, "content_index": 0}
        return b"".join(
            (
                self._event("response.created", response=response),
                self._event("response.in_progress", response=response),
                self._event(
                    "response.output_item.added", output_index=0, item=_message(self.mid, "", "in_progress")
                ),
                self._event(
                    "response.content_part.added",
                    **place,
                    part={"type": "output_text", "text": "", "annotations": []},
                ),
            )
        )

    def feed(self, piece: bytes) -> bytes:
        out = [] if self.started else [self._opening()]
        for line in piece.split(b"\n"):
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            try:
                chunk = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                continue
            if not isinstance(chunk, dict):
                continue
            if isinstance(chunk.get("usage"), dict):
                self.usage = Usage.from_dict(chunk["usage"]) or self.usage
            for choice in chunk.get("choices") or []:
                if not isinstance(choice, dict):
                    continue
                delta = str((choice.get("delta") or {}).get("content") or "")
                if delta:
                    self.text.append(delta)
                    out.append(
                        self._event(
                            "response.output_text.delta",
                            item_id=self.mid,
                            output_index=0,
                            content_index=0,
                            delta=delta,
                            logprobs=[],
                        )
                    )
                self.finish = choice.get("finish_reason") or self.finish
        return b"".join(out)

    def close(self) -> bytes:
        out = [] if self.started else [self._opening()]
        text = "".join(self.text)
        place = {"item_id": self.mid, "output_index": 0, "content_index": 0}
        part = {"type": "output_text", "text": text, "annotations": []}
        status = "incomplete" if self.finish == "length" else "completed"
        item = _message(self.mid, text)
        out += [
            self._event("response.output_text.done", **place, text=text, logprobs=[]),
            self._event("response.content_part.done", **place, part=part),
            self._event("response.output_item.done", output_index=0, item=item),
            self._event(
                "response.completed" if status == "completed" else "response.incomplete",
                response=_response(self.rid, self.model, status, [item], self.usage),
            ),
        ]
        return b"".join(out)
