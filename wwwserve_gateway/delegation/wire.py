"""What travels between entry and executor on the overlay stream `wwwserve.delegate`.

The request: {id, endpoint, body, route, continuation[, trace]}. `route` lists the node ids it went
through, entry first and the sender last; an executor refuses a request whose route contains itself
(a loop) or is longer than MAX_HOPS. `trace`, sent only by a node that traces, is the W3C
`traceparent` of the sender's span (55 characters: version 00, trace id, span id, flags): the
executor's spans join the entry's trace.

The executor answers with stream items, the first at once:

    {"t": "accept", "route": [...]}      it (or a node it relays to) runs the request; the route
                                         ends with the executor
    {"t": "decline", "reason": str}      not now: the entry tries its next candidate
    {"t": "sse", "d": str}               whole SSE events of a streamed answer (no [DONE])
    {"t": "json", "d": str}              a whole non-streamed answer
    {"t": "error", "status": int, "d": str}  the backend refused it (an OpenAI error body)
    {"t": "wait"}                        nothing yet, still working (a heartbeat every HEARTBEAT_S)
    {"t": "receipt", "r": signed receipt}    the last item of a served request

The entry gives up on an executor silent for STALL_S (no item, not even a heartbeat): a frozen or
vanished executor is replaced in seconds, while a slow backend (a long prefill, a long answer that
is not streamed) keeps its request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from wwwserve_gateway.network.identity import NODE_ID
from wwwserve_gateway.plugin_api.backend import DELEGATED_ENDPOINTS, Endpoint

KIND = "wwwserve.delegate"
MAX_HOPS = 8
REQUEST_ID = re.compile(r"[0-9a-f]{32}")
ENDPOINTS = frozenset(e.value for e in DELEGATED_ENDPOINTS)
ITEM_TYPES = frozenset({"accept", "decline", "sse", "json", "error", "wait", "receipt"})
HEARTBEAT_S = 2.0
STALL_S = 10.0
TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
REQUEST_KEYS = frozenset({"id", "endpoint", "body", "route", "continuation"})


class WireError(ValueError):
    """A delegated request or item that breaks the protocol (the sender is at fault)."""


@dataclass(frozen=True, slots=True)
class DelegatedRequest:
    id: str
    endpoint: Endpoint
    body: dict[str, Any]
    route: tuple[str, ...]
    continuation: bool = False
    trace: str | None = None  # the sender's W3C traceparent

    def to_wire(self) -> dict[str, Any]:
        request = {
            "id": self.id,
            "endpoint": self.endpoint.value,
            "body": self.body,
            "route": list(self.route),
            "continuation": self.continuation,
        }
        return with_trace(request, self.trace)

    @property
    def entry(self) -> str:
        return self.route[0]


def parse_request(sender: str, me: str, raw: Any) -> DelegatedRequest:
    """Check a delegated request received from `sender`; raise WireError saying what is wrong."""
    if not isinstance(raw, dict) or not REQUEST_KEYS <= set(raw) <= REQUEST_KEYS | {"trace"}:
        raise WireError("a delegated request is {id, endpoint, body, route, continuation[, trace]}")
    rid, endpoint, body, route = raw["id"], raw["endpoint"], raw["body"], raw["route"]
    if not isinstance(rid, str) or not REQUEST_ID.fullmatch(rid):
        raise WireError("request id must be 32 hex characters")
    if endpoint not in ENDPOINTS:
        raise WireError(f"unknown endpoint {endpoint!r}")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise WireError("body must be an OpenAI request object with a model")
    if not isinstance(raw["continuation"], bool):
        raise WireError("continuation must be a boolean")
    hops = check_route(route)
    if hops[-1] != sender:
        raise WireError("the route must end with the node that sent the request")
    if me in hops:
        raise WireError("the route already contains this node (a loop)")
    if len(hops) >= MAX_HOPS:
        raise WireError(f"the route is longer than {MAX_HOPS} hops")
    trace = raw.get("trace")
    if trace is not None and trace_context(raw) is None:
        raise WireError("trace must be a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)")
    return DelegatedRequest(rid, Endpoint(endpoint), body, hops, raw["continuation"], trace)


def trace_context(raw: Any) -> str | None:
    """A request's `trace`, if it is a well-formed traceparent (bounded: a fixed 55 characters)."""
    trace = raw.get("trace") if isinstance(raw, dict) else None
    if isinstance(trace, str) and len(trace) == 55 and TRACEPARENT.fullmatch(trace):
        return trace
    return None


def with_trace(wire_request: dict[str, Any], traceparent: str | None) -> dict[str, Any]:
    """A request on the wire, with the sender's span as `trace` when it traces."""
    return wire_request if traceparent is None else {**wire_request, "trace": traceparent}


def check_route(route: Any) -> tuple[str, ...]:
    if not isinstance(route, list) or not route or len(route) > MAX_HOPS:
        raise WireError(f"route must be a list of 1 to {MAX_HOPS} node ids")
    if not all(isinstance(n, str) and NODE_ID.fullmatch(n) for n in route):
        raise WireError("route entries must be node ids")
    if len(set(route)) != len(route):
        raise WireError("a node appears twice in the route")
    return tuple(route)


def check_item(item: Any) -> tuple[str, Any]:
    """(type, payload) of an executor's item; raise WireError on anything malformed."""
    t = item.get("t") if isinstance(item, dict) else None
    if t not in ITEM_TYPES:
        raise WireError(f"unknown item type {t!r}")
    if t == "sse":
        d = item.get("d")
        if not isinstance(d, str) or not d.endswith("\n\n"):
            raise WireError("an sse item holds whole events")
        return t, d
    if t == "json":
        d = item.get("d")
        if not isinstance(d, str):
            raise WireError("a json item holds the answer's text")
        return t, d
    if t == "accept":
        return t, check_route(item.get("route"))
    if t == "decline":
        reason = item.get("reason")
        return t, reason if isinstance(reason, str) else ""
    if t == "error":
        status, d = item.get("status"), item.get("d")
        if not isinstance(status, int) or not 400 <= status <= 599 or not isinstance(d, str):
            raise WireError("an error item is {status: 4xx/5xx, d: error body}")
        return t, (status, d)
    if t == "wait":
        return t, None
    return t, item.get("r")


# -- builders: the executor's items, one per type ------------------------------------------------


def accept(route: tuple[str, ...]) -> dict[str, Any]:
    return {"t": "accept", "route": list(route)}


def decline(reason: str) -> dict[str, Any]:
    return {"t": "decline", "reason": reason}


def sse(events: str) -> dict[str, Any]:
    return {"t": "sse", "d": events}


def json_answer(text: str) -> dict[str, Any]:
    return {"t": "json", "d": text}


def error(status: int, body: str) -> dict[str, Any]:
    return {"t": "error", "status": status, "d": body}


def waiting() -> dict[str, Any]:
    return {"t": "wait"}


def receipt(record: dict[str, Any]) -> dict[str, Any]:
    return {"t": "receipt", "r": record}
