"""The plaintext inside a sealed frame: one JSON object {t, s, k, b} with a strict schema.

    t  frame type (below)
    s  stream id: odd for streams the initiator opened, even for the responder's; 0 for `msg`/`ready`
    k  kind (which handler) for `req`, `open`, `msg`; "" otherwise
    b  body, a JSON object

    req    s, k, b    a one-shot request                        -> one `res` or `err`
    res    s, b       its response
    err    s, b       {message, type}: a failed request or stream
    open   s, k, b    open a server-streamed response           -> `item`... then `end` or `err`
    item   s, b       one item of a stream (only within the consumer's windows, below)
    end    s          the stream is complete
    more   s, b       {n}: the consumer lets the producer send n more bytes of items on stream s, or,
                      with s = 0, on the whole connection (flow control)
    cancel s          the caller gave up: stop the handler
    msg    k, b       fire-and-forget
    ready  -          the responder's first frame: the connection is admitted

Flow control counts bytes: an item's size is the length of its frame's plaintext (this JSON). A
producer sends an item only while it fits both the stream's window and the connection's; the
consumer grants both again as it takes items. An item beyond either window is malformed.

Anything else raises FrameError("malformed"); the connection that sent it is closed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from wwwserve_gateway.overlay.errors import FrameError

DEFAULT_MAX_FRAME_BYTES = 1 << 20
MAX_STREAM_ID = (1 << 53) - 1
# The most one `more` grants, and the most a window may add up to (a peer's grants are untrusted).
MAX_CREDIT = 1 << 32
MAX_WINDOW = 1 << 40
KIND_RE = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")

_KEYS = frozenset({"t", "s", "k", "b"})
WITH_KIND = frozenset({"req", "open", "msg"})
NO_STREAM = frozenset({"msg", "ready"})
EMPTY_BODY = frozenset({"end", "cancel", "ready"})
TYPES = frozenset({"req", "res", "err", "open", "item", "end", "more", "cancel", "msg", "ready"})


@dataclass(frozen=True, slots=True)
class Frame:
    t: str
    s: int = 0
    k: str = ""
    b: dict[str, Any] = field(default_factory=dict)


def valid_kind(kind: Any) -> bool:
    return isinstance(kind, str) and KIND_RE.fullmatch(kind) is not None


def encode(frame: Frame) -> bytes:
    """The frame's bytes; FrameError if it would not decode (a caller's bug or an unserializable body)."""
    data: dict[str, Any] = {"t": frame.t, "s": frame.s, "k": frame.k, "b": frame.b}
    _check(data)
    try:
        return orjson.dumps(data)
    except TypeError as exc:  # orjson.JSONEncodeError: a non-JSON value, a non-str key, a huge int
        raise FrameError("malformed", f"body is not JSON-serializable: {exc}") from None


def decode(data: bytes) -> Frame:
    try:
        obj = orjson.loads(data)
    except (orjson.JSONDecodeError, TypeError):
        raise FrameError("malformed", "frame is not JSON") from None
    _check(obj)
    return Frame(obj["t"], obj["s"], obj["k"], obj["b"])


def _check(obj: Any) -> None:
    if not isinstance(obj, dict) or set(obj) != _KEYS:
        raise FrameError("malformed", "a frame is an object with exactly t, s, k, b")
    t, s, k, b = obj["t"], obj["s"], obj["k"], obj["b"]
    if not isinstance(t, str) or t not in TYPES:
        raise FrameError("malformed", f"unknown frame type {str(t)[:32]!r}")
    if type(s) is not int or not 0 <= s <= MAX_STREAM_ID or (t != "more" and (s == 0) != (t in NO_STREAM)):
        raise FrameError("malformed", f"bad stream id for {t}")
    if t in WITH_KIND:
        if not valid_kind(k):
            raise FrameError("malformed", f"bad kind for {t}")
    elif k != "":
        raise FrameError("malformed", f"{t} frames carry no kind")
    if not isinstance(b, dict):
        raise FrameError("malformed", "body must be an object")
    if t in EMPTY_BODY and b:
        raise FrameError("malformed", f"{t} frames have an empty body")
    if t == "more":
        n = b.get("n")
        if set(b) != {"n"} or type(n) is not int or not 1 <= n <= MAX_CREDIT:
            raise FrameError("malformed", f"more is {{n: 1..{MAX_CREDIT}}}")
    elif t == "err" and (
        set(b) != {"message", "type"} or not isinstance(b["message"], str) or not valid_kind(b["type"])
    ):
        raise FrameError("malformed", "err is {message, type}")
