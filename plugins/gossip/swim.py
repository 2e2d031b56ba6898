"""The built-in gossip plugin: the sans-IO membership core driven over the node's overlay.

`membership.py` decides what to send and what to believe; this module only moves its messages
(overlay fire-and-forget messages of kind "gossip"), keeps its clock ticking, and keeps the node's
own record current with what the delegates contribute (`GossipDelegate.node_meta`: the models and
load from the node's backends, the stake from its policy), knowing none of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from wwwserve_gateway.plugin_api.base import PluginSettings
from wwwserve_gateway.plugin_api.gossip import GossipDelegate, GossipPlugin, MembershipListener
from wwwserve_gateway.plugin_api.node import NodeAPI
from wwwserve_gateway.plugin_api.peers import MembershipEvent, PeerState, PeerView
from wwwserve_gateway.plugins.gossip.membership import Membership, Outgoing

log = structlog.get_logger(__name__)

KIND = "gossip"
REJOIN_AFTER_ROUNDS = 1  # a lone node retries its bootstrap every round (one message)
LEAVE_FLUSH_S = 1.0


def overlay_endpoint(url: str) -> str:
    """A node's overlay endpoint from its HTTP URL (or an overlay URL, unchanged)."""
    if url.startswith(("ws://", "wss://")):
        return url
    return url.replace("http", "ws", 1).rstrip("/") + "/overlay"


class SwimGossip(GossipPlugin):
    """SWIM membership; its timings are network parameters (the genesis), so it has no settings."""

    Settings = PluginSettings

    def __init__(self, node: NodeAPI, settings: PluginSettings) -> None:
        super().__init__(node, settings)
        self.params = node.genesis.gossip
        self.membership = Membership(
            node.identity,
            self.params,
            node.public_url,
            clock=time.monotonic,
            rng=random.Random(),
            listener=self._notify,
        )
        self._delegates: dict[str, GossipDelegate] = {}
        self._listeners: list[MembershipListener] = []
        self._published: dict[str, Any] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None
        node.metrics.register(_MembershipCollector(self.membership))

    async def start(self) -> None:
        self.node.overlay.on_message(KIND, self._on_message)
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
        self._delegates[name] = delegate
        self.membership.add_delegate(name, delegate)

    def subscribe(self, listener: MembershipListener) -> None:
        self._listeners.append(listener)

    def peers(self) -> list[PeerView]:
        return self.membership.members()

    def peer(self, node_id: str) -> PeerView | None:
        return self.membership.member(node_id)

    def _notify(self, event: MembershipEvent) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("membership listener failed", event=event.kind.value)

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
        fields: dict[str, Any] = {}
        for name, delegate in self._delegates.items():
            try:
                fields.update(delegate.node_meta())
            except Exception:
                log.exception("a gossip delegate failed to give its record fields", delegate=name)
        return fields

    def _publish_own(self) -> None:
        """Re-sign the own record when what the delegates contribute changes."""
        fields = self._own_fields()
        if fields != self._published:
            self._published = fields
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
                    overlay.learn(out.to, overlay_endpoint(out.url))
                await overlay.send(out.to, KIND, out.message)
            elif out.url:
                peer = await overlay.connect(overlay_endpoint(out.url))
                await overlay.send(peer, KIND, out.message)
        except Exception as exc:  # the membership core treats silence as failure; nothing to do here
            log.debug("gossip send failed", to=out.to[:16] or out.url, error=str(exc))


class _MembershipCollector:
    """Membership metrics, read from the core at scrape time."""

    def __init__(self, membership: Membership) -> None:
        self.membership = membership

    def collect(self):
        by_state = GaugeMetricFamily("wwwserve_gossip_members", "Known nodes by state", labels=["state"])
        counts = dict.fromkeys(PeerState, 0)
        for member in self.membership.members():
            counts[member.state] += 1
        for state, count in counts.items():
            by_state.add_metric([state.value], count)
        yield by_state
        stats = CounterMetricFamily(
            "wwwserve_gossip_events", "Gossip messages, bytes and rejected updates", labels=["event"]
        )
        for name, value in sorted(self.membership.stats.items()):
            stats.add_metric([name], value)
        yield stats
