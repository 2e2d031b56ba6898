"""The access log: one record per finished app request, kept for live views and logged as one line.

The dispatcher hands each finished request to `RequestRecords.add`: it is appended to a bounded
deque (the last `keep` requests, for `recent()`), logged as one structured event when the access
log is on (`node.access_log`), and offered to live subscribers. Subscribers get bounded queues: a
slow one loses records (counted in its `dropped`) instead of slowing requests down, and with nobody
subscribed a request costs one deque append and, with the log on, one log event.

The access log has its own structlog logger writing straight to stderr (one `write` per line), not
through the standard `logging` machinery the other events take: that path costs ~10x more per line
(measured in benchmarks/gateway_overhead.py, "access log cost"). Lines are JSON with
`node.log_format: json` and `key=value` pairs otherwise, with the same timestamp and level keys as
the rest of the node's log.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import orjson
import structlog

KEEP = 500
SUBSCRIBER_QUEUE = 1000


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One finished app request. `route` lists the node ids that served it, this node first;
    `deployment` is the local deployment that answered (None when delegated or refused)."""

    id: str
    started: float  # wall time (time.time()) at arrival
    endpoint: str  # "chat/completions", "completions", "embeddings", ...
    model: str
    deployment: str | None
    route: tuple[str, ...]
    status: int  # HTTP status; 499 when the app went away
    prompt_tokens: int
    completion_tokens: int
    latency_s: float  # arrival to the last byte sent
    ttft_s: float | None  # arrival to the first streamed byte; None unless streamed
    error: str | None  # why it failed, as the app was told; None on success

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Subscription:
    """A live feed of new records: `async for record in subscription`. Bounded: when its queue is
    full, new records are dropped (and counted) rather than waited for."""

    def __init__(self, owner: RequestRecords, maxsize: int) -> None:
        self._owner = owner
        self.queue: asyncio.Queue[RequestRecord] = asyncio.Queue(maxsize)
        self.dropped = 0

    def offer(self, record: RequestRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except asyncio.QueueFull:
            self.dropped += 1

    def __aiter__(self) -> AsyncIterator[RequestRecord]:
        return self

    async def __anext__(self) -> RequestRecord:
        return await self.queue.get()

    def close(self) -> None:
        self._owner.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RequestRecords:
    """The node's recent requests (`node.requests`) and the access log."""

    def __init__(
        self, keep: int = KEEP, *, access_log: bool = True, log_format: Literal["console", "json"] = "console"
    ) -> None:
        self._recent: deque[RequestRecord] = deque(maxlen=keep)
        self._subscribers: list[Subscription] = []
        self.access_log = access_log
        self._log = access_logger(log_format) if access_log else None

    def add(self, record: RequestRecord) -> None:
        self._recent.append(record)
        log = self._log
        if log is not None:
            log.info(
                "request",
                id=record.id,
                endpoint=record.endpoint,
                model=record.model,
                deployment=record.deployment,
                route=",".join(record.route),
                status=record.status,
                prompt_tokens=record.prompt_tokens,
                completion_tokens=record.completion_tokens,
                latency_ms=round(record.latency_s * 1000, 2),
                ttft_ms=None if record.ttft_s is None else round(record.ttft_s * 1000, 2),
                error=record.error,
            )
        for subscriber in self._subscribers:
            subscriber.offer(record)

    def recent(self, limit: int | None = None) -> list[RequestRecord]:
        """The kept records, oldest first (the last `limit` of them if given)."""
        records = list(self._recent)
        return records if limit is None else records[-limit:] if limit > 0 else []

    def __iter__(self) -> Iterator[RequestRecord]:
        return iter(list(self._recent))

    def __len__(self) -> int:
        return len(self._recent)

    def subscribe(self, maxsize: int = SUBSCRIBER_QUEUE) -> Subscription:
        """A live feed of records added from now on; close it (or use `with`) when done."""
        subscription = Subscription(self, maxsize)
        self._subscribers = [*self._subscribers, subscription]
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers = [s for s in self._subscribers if s is not subscription]


def access_logger(log_format: Literal["console", "json"]) -> Any:
    """A structlog logger that renders an event and writes it to stderr in one call."""
    if log_format == "json":
        renderer: Any = structlog.processors.JSONRenderer(serializer=_json)
    else:
        renderer = structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "event"])
    processors = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        renderer,
    ]
    return structlog.wrap_logger(structlog.WriteLogger(sys.stderr), processors=processors)


def _json(event: Any, **_: Any) -> str:
    return orjson.dumps(event).decode()


def wall_time(started_perf: float) -> float:
    """The wall time of a `time.perf_counter()` reading taken earlier."""
    return time.time() - (time.perf_counter() - started_perf)
