"""The dashboard's state and its live feed.

One snapshot is built per tick (a second) and sent to every subscriber; ticks run only while
someone subscribes, so an unwatched node does no dashboard work at all. The request path never
calls into here: traffic is read from the metrics it keeps anyway, requests from the access
records' bounded deque.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import orjson
import structlog

from wwwserve_gateway.plugin_api.peers import PeerState
from wwwserve_gateway.web.ui.backends_view import backends_view
from wwwserve_gateway.web.ui.credits import CreditsTracker
from wwwserve_gateway.web.ui.network import OverlayLinks, Timeline, network_view
from wwwserve_gateway.web.ui.sources import DashboardSources, RequestRecordLike
from wwwserve_gateway.web.ui.traffic import TrafficSampler

log = structlog.get_logger(__name__)

TICK_S = 1.0
CREDITS_EVERY = 2  # ticks between reads of new ledger operations
LAG_EVERY = 5  # ticks between replication-lag probes of the peers
RECENT = 50
FAILURES = 20
POINTS = 300  # traffic points per snapshot: five minutes
QUEUE = 2  # snapshots a slow subscriber may have waiting; older ones are dropped


def request_row(record: RequestRecordLike) -> dict[str, Any]:
    return {
        "id": record.id,
        "started": round(record.started, 3),
        "endpoint": record.endpoint,
        "model": record.model,
        "deployment": record.deployment,
        "route": list(record.route),
        "status": record.status,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "latency_ms": round(record.latency_s * 1000, 2),
        "ttft_ms": None if record.ttft_s is None else round(record.ttft_s * 1000, 2),
        "error": record.error,
    }


class Dashboard:
    def __init__(self, sources: DashboardSources) -> None:
        self.sources = sources
        node = sources.node
        self.timeline = Timeline()
        node.gossip.subscribe(self.timeline.record)
        node.gossip.add_delegate("links", OverlayLinks(node.overlay))
        self.traffic = TrafficSampler(node.metrics)
        self.credits = CreditsTracker(node.ledger, node.node_id)
        self._subscribers: set[asyncio.Queue[bytes]] = set()
        self._task: asyncio.Task[None] | None = None
        self._ticks = 0

    # -- snapshots -----------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        node = self.sources.node
        balances = node.ledger.balances_view()
        return {
            "node": {
                "id": node.node_id,
                "url": node.public_url,
                "network": node.genesis.network_id,
                "network_name": node.genesis.name,
                "gossip_interval_s": node.genesis.gossip.interval_s,
                "uptime_s": round(time.time() - self.sources.started_at, 1),
                "now": round(time.time(), 3),
                "models": node.backends.model_names(),
                "watchers": len(self._subscribers),
            },
            "network": network_view(node, balances),
            "timeline": list(self.timeline.events)[-100:],
            "traffic": {
                "points": [p.as_dict() for p in list(self.traffic.points)[-POINTS:]],
                "totals": self.traffic.totals(),
            },
            "requests": self._requests(),
            "credits": self.credits.view(balances),
            "backends": backends_view(self.sources.backends),
        }

    def _requests(self) -> dict[str, Any]:
        log_ = self.sources.requests
        if log_ is None:
            return {"available": False, "recent": [], "failures": []}
        records = log_.recent()
        recent = [request_row(r) for r in records[-RECENT:]]
        failures = [request_row(r) for r in records if r.status >= 400][-FAILURES:]
        return {"available": True, "recent": recent[::-1], "failures": failures[::-1]}

    async def refresh(self) -> None:
        """One tick's reads: a traffic point, new ledger operations, now and then the lag."""
        self.traffic.sample(self.sources.requests.recent() if self.sources.requests is not None else ())
        node = self.sources.node
        if self._ticks % CREDITS_EVERY == 0:
            authors = sorted(node.ledger.balances_view())
            await asyncio.to_thread(self.credits.refresh, authors)
        if self._ticks % LAG_EVERY == 0:
            alive = [p.id for p in node.gossip.peers() if p.state is PeerState.ALIVE and p.id != node.node_id]
            await self.credits.refresh_lag(alive)
        self._ticks += 1

    # -- the live feed -------------------------------------------------------------------------------
    def subscribe(self) -> asyncio.Queue[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUE)
        self._subscribers.add(queue)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return queue

    def unsubscribe(self, queue: asyncio.Queue[bytes]) -> None:
        self._subscribers.discard(queue)

    async def _run(self) -> None:
        while self._subscribers:
            started = time.monotonic()
            try:
                await self.refresh()
                payload = orjson.dumps(self.snapshot())
            except Exception:  # a view that fails must not end the feed
                log.exception("dashboard tick failed")
                payload = None
            if payload is not None:
                for queue in list(self._subscribers):
                    if queue.full():
                        with contextlib.suppress(asyncio.QueueEmpty):
                            queue.get_nowait()
                    queue.put_nowait(payload)
            await asyncio.sleep(max(TICK_S - (time.monotonic() - started), 0.05))
        self._task = None
