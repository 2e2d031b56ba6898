"""uvicorn's httptools protocol with the limits it lacks, and errors in OpenAI's shape.

- **Connections**: at most `max_connections` open at once, `max_connections_per_source` of them from
  one client address. A connection beyond a cap is answered at once (503, or 429 for the per-source
  cap, with `Retry-After`) and closed. Websockets upgraded from HTTP (the overlay) keep their slot.
- **Deadlines**: a request whose headers are not complete `header_timeout` s after its first byte
  (or after the connection opened) is answered 408 and closed; so is one whose body is not complete
  `body_timeout` s after its headers. This is what stops slowloris clients; uvicorn's
  `timeout_keep_alive` only covers idle connections between requests.
- **Malformed framing** (an overflowing or negative Content-Length, Content-Length with chunked, bad
  syntax): uvicorn answers `text/plain`; here it is OpenAI's error JSON, still 400.

Each refusal is counted in `wwwserve_http_rejected_total{reason}`. A normal keep-alive request that
arrives in one piece arms no timer at all; only partial requests do.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from wwwserve_gateway.http.errors import error_body

REJECT_REASONS = (
    "max_connections",  # the node has max_connections open already (503)
    "source_connections",  # this client address has max_connections_per_source open already (429)
    "header_timeout",  # the request's headers were not complete within header_timeout (408)
    "body_timeout",  # the request's body was not complete within body_timeout (408)
    "malformed",  # the request's framing or syntax is invalid (400)
)


@dataclass(frozen=True)
class HttpLimits:
    max_connections: int = 2048
    max_connections_per_source: int = 256
    header_timeout: float = 10.0
    body_timeout: float = 60.0


class ConnectionGuard:
    """Open connections, in all and by client address, and the refusals counted in the registry."""

    def __init__(self, limits: HttpLimits, registry: CollectorRegistry) -> None:
        self.limits = limits
        self.open = 0
        self.by_source: dict[str, int] = {}
        self.rejected = Counter(
            "wwwserve_http_rejected",
            "HTTP connections and requests refused or cut off by the server's limits, by reason",
            ["reason"],
            registry=registry,
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        Gauge(
            "wwwserve_http_connections", "Open HTTP connections (websockets included)", registry=registry
        ).set_function(lambda: self.open)

    def admit(self, source: str) -> str | None:
        """Take a slot for a new connection from `source`, or say why not (a reason, counted)."""
        if self.open >= self.limits.max_connections:
            reason = "max_connections"
        elif self.by_source.get(source, 0) >= self.limits.max_connections_per_source:
            reason = "source_connections"
        else:
            self.open += 1
            self.by_source[source] = self.by_source.get(source, 0) + 1
            return None
        self.rejected.labels(reason).inc()
        return reason

    def release(self, source: str) -> None:
        self.open -= 1
        left = self.by_source.pop(source) - 1
        if left:
            self.by_source[source] = left

    def protocols(self) -> tuple[type[asyncio.Protocol], type[asyncio.Protocol]]:
        """The (http, ws) protocol classes to give uvicorn.Config, bound to this guard."""
        return (
            type("GuardedHttpProtocol", (GuardedHttpProtocol,), {"guard": self}),
            type("GuardedWebSocketProtocol", (GuardedWebSocketProtocol,), {"guard": self}),
        )


def _response(status: int, body: bytes, extra: bytes = b"") -> bytes:
    return b"".join(
        [
            STATUS_LINE[status],
            b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
            extra,
            b"connection: close\r\n\r\n",
            body,
        ]
    )


REFUSALS = {
    "max_connections": _response(
        503,
        error_body(
            "The server has too many open connections; retry shortly.", "api_error", None, "overloaded"
        ),
        b"retry-after: 1\r\n",
    ),
    "source_connections": _response(
        429,
        error_body(
            "Too many open connections from your address; reuse connections or retry shortly.",
            "rate_limit_error",
            None,
            "too_many_connections",
        ),
        b"retry-after: 1\r\n",
    ),
}
TIMEOUTS = {
    "header_timeout": _response(
        408,
        error_body("The request headers took too long to arrive.", "invalid_request_error", None, "timeout"),
    ),
    "body_timeout": _response(
        408, error_body("The request body took too long to arrive.", "invalid_request_error", None, "timeout")
    ),
}
BAD_REQUEST = _response(
    400,
    error_body(
        "Invalid HTTP request: malformed syntax or framing (e.g. a bad Content-Length, or Content-Length"
        " together with Transfer-Encoding).",
        "invalid_request_error",
        None,
        "invalid_http_request",
    ),
)

# Where a connection is in its current request, for the deadlines.
_HEADERS, _BODY, _OTHER = "header_timeout", "body_timeout", ""


class GuardedHttpProtocol(HttpToolsProtocol):
    guard: ConnectionGuard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.source: str | None = None  # set once admitted: whose slot to give back
        self.phase = _HEADERS
        self.phase_started: float | None = None  # None: waiting for a request's first byte
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        source = self.client[0] if self.client else ""
        refused = self.guard.admit(source)
        if refused is not None:
            transport.write(REFUSALS[refused])
            transport.close()
            return
        self.source = source
        self.phase_started = self.loop.time()  # a client that sends nothing is on the clock too
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.source is not None:
            self.guard.release(self.source)
            self.source = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.phase_started is None:
            self.phase_started = self.loop.time()
        super().data_received(data)
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        if self.parser.should_upgrade() and self._should_upgrade():
            self.phase = _OTHER  # a websocket: the overlay has its own handshake deadline
        else:  # a request without a body completes at once (on_message_complete)
            self.phase, self.phase_started = _BODY, self.loop.time()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self.phase, self.phase_started = _HEADERS, None  # the next request's clock starts at its first byte
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        # The websocket protocol takes the transport, and with it this connection's slot.
        self._disarm()
        self.phase = _OTHER
        source, self.source = self.source, None
        super().handle_websocket_upgrade()
        protocol = self.transport.get_protocol()
        if isinstance(protocol, GuardedWebSocketProtocol):
            protocol.source = source
        elif source is not None:
            self.guard.release(source)

    def send_400_response(self, msg: str) -> None:
        self._disarm()
        self.guard.rejected.labels("malformed").inc()
        self.transport.write(BAD_REQUEST)
        self.transport.close()

    def _arm(self) -> None:
        """Arm the deadline of the current phase, if it has one and the request is still incomplete."""
        if self.deadline is not None or self.phase == _OTHER or self.phase_started is None:
            return
        if self.transport.is_closing():
            return
        limits = self.guard.limits
        limit = limits.header_timeout if self.phase == _HEADERS else limits.body_timeout
        self.deadline = self.loop.call_at(self.phase_started + limit, self._expired)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expired(self) -> None:
        self.deadline = None
        reason = self.phase
        if not reason or self.transport.is_closing():
            return
        self.guard.rejected.labels(reason).inc()
        cycle = self.cycle
        if reason == _BODY and cycle is not None and not cycle.response_complete:
            # The app waits for the rest of the body: it sees a disconnect, and sends nothing more.
            answer = not cycle.response_started
            cycle.disconnected = True
            cycle.message_event.set()
        else:  # waiting for headers: answer unless an earlier response is still being written
            answer = cycle is None or cycle.response_complete
        if answer:
            self.transport.write(TIMEOUTS[reason])
        self.transport.close()


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """Gives the connection's slot back when the websocket closes."""

    guard: ConnectionGuard
    source: str | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.source is not None:
            self.guard.release(self.source)
            self.source = None
        super().connection_lost(exc)
