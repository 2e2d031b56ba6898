"""The built-in gossip plugin: the sans-IO membership core driven over the node's overlay.

`plugins/membership.py` decides what to send and what to believe; this module only moves its
messages (overlay fire-and-forget messages of kind "gossip"), keeps its clock ticking, and keeps the
node's own record current: the models it serves, its load summary and its advertised stake.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Mapping
from typing import Any

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from wwwserve_gateway.plugin_api import GossipDelegate, NodeAPI, PeerView
from wwwserve_gateway.plugins.gossip.membership import Membership, Outgoing

log = structlog.get_logger(__name__)

KIND = "gossip"
REJOIN_AFTER_ROUNDS = 1  # a lone node retries its bootstrap every round (one message)
# Every re-published record must reach every node, so N nodes re-publishing each round would cost
# O(N) bytes per node per round. Load therefore goes out only when its coarse state changes, at most
# this often; delegation asks executors directly and does not rely on fresh gossiped load.
LOAD_PUBLISH_ROUNDS = 5
LEAVE_FLUSH_S = 1.0


def overlay_url(url: str) -> str:
    """A node's overlay endpoint from its HTTP URL (or an overlay URL, unchanged)."""
    if url.startswith(("ws://", "wss://")):
        return url
    return url.replace("http", "ws", 1).rstrip("/") + "/overlay"


class SwimGossip:
    def __init__(self, node: NodeAPI, settings: Mapping[str, Any]) -> None:
        if settings:
            raise ValueError(f"the built-in gossip plugin takes no settings; got {sorted(settings)}")
        self.node = node
        self.params = node.genesis.gossip
        self.membership = Membership(
            node.identity, self.params, node.public_url, clock=time.monotonic, rng=random.Random()
        )
        self._published: dict[str, Any] | None = None
        self._rounds_since_load = 0
        self._sending: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None
        node.overlay.on_message(KIND, self._on_message)
        node.metrics.register(_MembershipCollector(self.membership))

    async def start(self) -> None:
        self._publish_own()
        self._deliver(self.membership.join(list(self.node.bootstrap)))
        self._loop = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        self._deliver(self.membership.leave())
        if self._sending:
            await asyncio.wait(self._sending, timeout=LEAVE_FLUSH_S)

    def add_delegate(self, name: str, delegate: GossipDelegate) -> None:
        self.membership.add_delegate(name, delegate)

    def peers(self) -> list[PeerView]:
        return self.membership.members()

    async def _run(self) -> None:
        interval = self.params.interval_s
        next_round = time.monotonic() + interval
        rounds_alone = 0
        while True:
            # Wake for each round, and between rounds when an indirect probe or a suspicion is due.
            wake = min(self.membership.next_deadline(), next_round)
            await asyncio.sleep(max(0.0, wake - time.monotonic()))
            try:
                if time.monotonic() >= next_round:
                    next_round += interval
                    self._publish_own()
                    rounds_alone = 0 if self.membership.alive_ids() else rounds_alone + 1
                    if self.node.bootstrap and rounds_alone >= REJOIN_AFTER_ROUNDS:
                        # No peer known (every bootstrap was unreachable, or all left): keep trying.
                        rounds_alone = 0
                        self._deliver(self.membership.join(list(self.node.bootstrap)))
                self._deliver(self.membership.tick())
            except Exception:
                log.exception("gossip round failed")

    def _own_fields(self) -> dict[str, Any]:
        policy = self.node.policy
        backends = list(self.node.backends)
        models = {}
        for backend in backends:
            if policy is not None and not policy.shares(backend.model_name):
                continue
            context = getattr(backend.params, "n_ctx", None) or backend.entry.model_info.model_extra.get(
                "max_input_tokens"
            )
            models[backend.model_name] = {
                "name": backend.model_name,
                "context_length": context,
                "price": None,
            }
        running = waiting = 0
        usage = 0.0
        for backend in backends:
            load = backend.state.load
            running += load.running if load else backend.state.in_flight
            waiting += load.waiting if load else 0
            usage = max(usage, load.usage if load else 0.0)
        stake = policy.advertised_stake() if policy is not None else 0.0
        return {
            "models": sorted(models.values(), key=lambda m: m["name"]),
            "load": {"running": running, "waiting": waiting, "usage": round(usage, 2)},
            "stake": round(stake, 3),
        }

    def _publish_own(self) -> None:
        """Re-sign the own record when models or stake change, or when the load's coarse state
        (idle, busy, queueing) changes and LOAD_PUBLISH_ROUNDS have passed since the last time."""
        fields = self._own_fields()
        last = self._published
        self._rounds_since_load += 1
        if last is not None:
            same_offer = all(fields[k] == last[k] for k in fields if k != "load")
            load_moved = _coarse(fields["load"]) != _coarse(last["load"])
            if same_offer and not (load_moved and self._rounds_since_load >= LOAD_PUBLISH_ROUNDS):
                return
        self._published = fields
        self._rounds_since_load = 0
        self.membership.set_own_fields(fields)

    async def _on_message(self, peer_id: str, body: dict) -> None:
        self._deliver(self.membership.receive(peer_id, body))

    def _deliver(self, outgoing: list[Outgoing]) -> None:
        for out in outgoing:
            task = asyncio.create_task(self._send(out))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, out: Outgoing) -> None:
        overlay = self.node.overlay
        try:
            if out.to:
                if out.url:
                    overlay.learn(out.to, overlay_url(out.url))
                await overlay.send(out.to, KIND, out.message)
            elif out.url:
                peer = await overlay.connect(overlay_url(out.url))
                await overlay.send(peer, KIND, out.message)
        except Exception as exc:  # the membership core treats silence as failure; nothing to do here
            log.debug("gossip send failed", to=out.to[:16] or out.url, error=str(exc))


def _coarse(load: dict[str, Any]) -> str:
    if load["waiting"]:
        return "queueing"
    return "busy" if load["running"] else "idle"


class _MembershipCollector:
    """Membership metrics, read from the core at scrape time."""

    def __init__(self, membership: Membership) -> None:
        self.membership = membership

    def collect(self):
        by_state = GaugeMetricFamily("wwwserve_gossip_members", "Known nodes by state", labels=["state"])
        counts: dict[str, int] = {"alive": 0, "suspect": 0, "dead": 0, "left": 0}
        for member in self.membership.members():
            counts[member.state] = counts.get(member.state, 0) + 1
        for state, count in counts.items():
            by_state.add_metric([state], count)
        yield by_state
        stats = CounterMetricFamily(
            "wwwserve_gossip_events", "Gossip messages, bytes and rejected updates", labels=["event"]
        )
        for name, value in sorted(self.membership.stats.items()):
            stats.add_metric([name], value)
        yield stats
