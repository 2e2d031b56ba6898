"""What an entry relays of a peer's answer, and how many tokens it will pay for.

Every SSE event and whole answer an executor sends is parsed before it reaches the app (garbage is
never relayed) and reduced to OpenAI's fields, with the entry's own id and the model name the app
asked for: an app must not learn which server, model file or software answered (`system_fingerprint`,
llama.cpp's `timings`, an executor's id format). On the way, the text is measured, and the first
choice's content kept (`text`: what receipts hash and duel judges compare).

Receipts state token counts, and the entry pays only what it can verify from the bytes it sent and
received. A byte-level tokenizer never makes more tokens than bytes, so:
- prompt tokens <= the bytes of the request as sent + what a chat template may add
  (`TEMPLATE_ALLOWANCE`) + `MEDIA_ALLOWANCE` per image or audio part;
- completion tokens <= the bytes of generated text (content, reasoning, refusals, tool calls) + one
  per event that carried a choice (a token may end without finishing a character) + `PER_CHOICE`
  per choice and per tool call (stop and markup tokens), and at most `n * (max_tokens + 1)`.
Counts beyond these bounds are paid at the bounds (and the executor is struck, see `strikes`).
"""

from __future__ import annotations

from typing import Any

import orjson

from wwwserve_gateway.plugin_api.backend import Endpoint

TEMPLATE_ALLOWANCE = 512
MEDIA_ALLOWANCE = 4096
PER_CHOICE = 16
MEDIA_PARTS = frozenset({"image_url", "input_audio", "audio_url", "video_url", "file"})

ANSWER_FIELDS = frozenset({"id", "object", "created", "model", "choices", "usage"})
EMBEDDING_FIELDS = frozenset({"object", "data", "model", "usage"})
CHOICE_FIELDS = frozenset({"index", "delta", "message", "text", "finish_reason", "logprobs"})
USAGE_FIELDS = frozenset({"prompt_tokens", "completion_tokens", "total_tokens"})
TEXT_FIELDS = ("content", "reasoning_content", "refusal")
DATA = "data: "


class MalformedAnswer(ValueError):
    """An executor's output that is not OpenAI-shaped JSON: it must not reach the app."""


def prompt_bound(body: dict[str, Any]) -> int:
    """The most prompt tokens a request as sent can hold (see the module's docstring)."""
    media = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                media += sum(
                    1 for part in content if isinstance(part, dict) and part.get("type") in MEDIA_PARTS
                )
    return len(orjson.dumps(body)) + TEMPLATE_ALLOWANCE + MEDIA_ALLOWANCE * media


def _utf8(value: Any) -> int:
    return len(value.encode()) if isinstance(value, str) else 0


def _first_choice_text(obj: Any) -> str:
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list):
        return ""
    out = []
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        index = choice.get("index")
        if isinstance(index, int) and index != 0:  # as AnswerReader reads it
            continue
        if isinstance(choice.get("text"), str):
            out.append(choice["text"])
        for key in ("delta", "message"):
            part = choice.get(key)
            if isinstance(part, dict) and isinstance(part.get("content"), str):
                out.append(part["content"])
    return "".join(out)


class AnswerText:
    """Only the first choice's content, as AnswerReader.text gathers it, without checking or
    rewriting anything: what an executor hashes into its receipt on the hot path (the entry, which
    reads the same answer with AnswerReader, refuses one that is malformed)."""

    def __init__(self) -> None:
        self._text: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self._text)

    def events(self, payload: str) -> None:
        for event in payload.split("\n\n"):
            if event.startswith(DATA):
                self.whole(event[len(DATA) :])

    def whole(self, text: str) -> None:
        try:
            self._text.append(_first_choice_text(orjson.loads(text)))
        except orjson.JSONDecodeError:
            pass


class AnswerReader:
    """Reads one executor's answer: checks, measures and rewrites it for the app."""

    def __init__(self, endpoint: Endpoint, answer_id: str, model: str) -> None:
        self.endpoint = endpoint
        self.id = answer_id
        self.model = model
        self.text_bytes = 0
        self.choice_events = 0
        self.tool_calls = 0
        self.choices: set[int] = set()
        self._text: list[str] = []  # the first choice's content: what a duel's judges compare
        # What a continuation needs of the events relayed so far (the relayed text itself is not kept).
        self.created: int | None = None
        self.text_events = 0  # first-choice deltas that carried text: about one token each
        self.finished = False

    @property
    def text(self) -> str:
        return "".join(self._text)

    def events(self, payload: str) -> str:
        """Whole SSE events, as the app will see them (comments dropped). A payload with a malformed
        event is refused whole: nothing of it counts as relayed."""
        out = []
        kept = (len(self._text), self.text_events, self.finished, self.created)
        try:
            for event in payload.split("\n\n"):
                if not event or event.startswith(":"):
                    continue
                if not event.startswith(DATA):
                    raise MalformedAnswer("an SSE event without a data field")
                obj = self._parse(event[len(DATA) :])
                if self.created is None and isinstance(obj.get("created"), int):
                    self.created = obj["created"]
                out.append(DATA + orjson.dumps(self._reduce(obj)).decode() + "\n\n")
        except MalformedAnswer:
            del self._text[kept[0] :]
            self.text_events, self.finished, self.created = kept[1:]
            raise
        return "".join(out)

    def whole(self, text: str) -> bytes:
        """A whole (non-streamed) answer, as the app will see it."""
        obj = self._parse(text)
        if self.endpoint is not Endpoint.EMBEDDING and not obj.get("choices"):
            raise MalformedAnswer("an answer without choices")
        return orjson.dumps(self._reduce(obj))

    def completion_bound(self, max_tokens: int | None) -> int:
        bound = (
            self.text_bytes + self.choice_events + PER_CHOICE * (max(len(self.choices), 1) + self.tool_calls)
        )
        if max_tokens is not None:
            bound = min(bound, max(len(self.choices), 1) * (max_tokens + 1))
        return bound

    @staticmethod
    def _parse(text: str) -> dict[str, Any]:
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise MalformedAnswer("not JSON") from None
        if not isinstance(obj, dict):
            raise MalformedAnswer("not a JSON object")
        return obj

    def _reduce(self, obj: dict[str, Any]) -> dict[str, Any]:
        if self.endpoint is Endpoint.EMBEDDING:
            out = {k: v for k, v in obj.items() if k in EMBEDDING_FIELDS}
        else:
            out = {k: v for k, v in obj.items() if k in ANSWER_FIELDS}
            out["id"] = self.id
            choices = out.get("choices")
            if choices is not None:
                # A stream's last (usage) chunk has an empty list; anything but a list of objects
                # is refused, never relayed to the app and paid for.
                if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
                    raise MalformedAnswer("choices must be a list of objects")
                out["choices"] = [self._choice(c) for c in choices]
        if "model" in out:
            out["model"] = self.model
        usage = out.get("usage")
        if isinstance(usage, dict):
            out["usage"] = {k: v for k, v in usage.items() if k in USAGE_FIELDS}
        return out

    def _choice(self, choice: dict[str, Any]) -> dict[str, Any]:
        index = choice.get("index")
        index = index if isinstance(index, int) else 0
        self.choices.add(index)
        self.finished = self.finished or bool(choice.get("finish_reason"))
        self.choice_events += 1
        self.text_bytes += _utf8(choice.get("text"))
        carried = False  # text for the first choice (what a continuation resumes)
        if index == 0 and isinstance(choice.get("text"), str) and choice["text"]:
            self._text.append(choice["text"])
            carried = True
        for key in ("delta", "message"):
            part = choice.get(key)
            if part is not None and not isinstance(part, dict):
                raise MalformedAnswer(f"a choice's {key} must be an object")
            if isinstance(part, dict):
                if index == 0 and isinstance(part.get("content"), str) and part["content"]:
                    self._text.append(part["content"])
                    carried = True
                self.text_bytes += sum(_utf8(part.get(f)) for f in TEXT_FIELDS)
                calls = part.get("tool_calls")
                if isinstance(calls, list):
                    for call in calls:
                        function = call.get("function") if isinstance(call, dict) else None
                        if isinstance(function, dict):
                            self.tool_calls += 1 if function.get("name") else 0
                            self.text_bytes += _utf8(function.get("name")) + _utf8(function.get("arguments"))
        self.text_events += carried
        return {k: v for k, v in choice.items() if k in CHOICE_FIELDS}
