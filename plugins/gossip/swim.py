"""The built-in gossip plugin: the sans-IO membership core driven over the node's overlay.

`membership.py` decides what to send and what to believe; this module only moves its messages
(overlay fire-and-forget messages of kind "gossip"), keeps its clock ticking, and keeps the node's
own record current with what the delegates contribute (`GossipDelegate.node_meta`: the models and
load from the node's backends, the stake from its policy), knowing none of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from pathlib import Path
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
REJOIN_AFTER_ROUNDS = 1  # a lone node retries its seeds every round (one message each)
LEAVE_FLUSH_S = 1.0
PEERS_FILE = "known_peers.json"  # in the data dir: the peers to rejoin through after a restart
MAX_REMEMBERED = 32
ALONE_WARNING_ROUNDS = 10  # a node with seeds that is still alone after this many rounds says so


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
        self._peers_file = node.data_dir / PEERS_FILE
        self._remembered: list[str] = _read_peers(self._peers_file)
        node.metrics.register(_MembershipCollector(self.membership))

    async def start(self) -> None:
        self.node.overlay.on_message(KIND, self._on_message)
        self._publish_own()
        seeds = self.seeds()
        if seeds:
            log.info("joining the network", seeds=seeds)
        else:
            log.info("first node of the network: waiting for peers to join through it")
        self._deliver(self.membership.join(seeds))
        self._loop = asyncio.create_task(self._run())

    def seeds(self) -> list[str]:
        """The bootstrap list and the peers this node last knew (a seed node has no bootstrap
        list, yet must find its network again after a restart)."""
        return list(dict.fromkeys([*self.node.bootstrap, *self._remembered]))

    def _remember(self) -> None:
        """Keep the live peers' URLs in the data dir (rewritten only when they change)."""
        urls = sorted({p.url for p in self.membership.members() if p.alive and p.id != self.node.node_id})
        urls = urls[:MAX_REMEMBERED]
        if not urls or urls == self._remembered:
            return
        self._remembered = urls
        try:
            tmp = self._peers_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(urls))
            tmp.replace(self._peers_file)
        except OSError as exc:
            log.warning("cannot remember the known peers", path=str(self._peers_file), error=str(exc))

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        self._remember()
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
        rounds_unjoined = 0  # rounds with seeds and no peer ever heard from
        joined = False
        while True:
            # Wake for each round, and between rounds when an indirect probe or a suspicion is due.
            wake = min(self.membership.next_deadline(), next_round)
            await asyncio.sleep(max(0.0, wake - time.monotonic()))
            try:
                if time.monotonic() >= next_round:
                    next_round += interval
                    self._publish_own()
                    alive = self.membership.alive_ids()
                    rounds_alone = 0 if alive else rounds_alone + 1
                    if alive and not joined:
                        joined = True
                        log.info("joined the network", peers=len(alive))
                    if alive:
                        self._remember()
                    seeds = self.seeds()
                    if seeds and rounds_alone >= REJOIN_AFTER_ROUNDS:
                        # No peer known (every seed was unreachable, or all left): keep trying.
                        rounds_alone = 0
                        self._deliver(self.membership.join(seeds))
                    rounds_unjoined = rounds_unjoined + 1 if seeds and not joined else 0
                    if rounds_unjoined == ALONE_WARNING_ROUNDS:
                        log.warning(
                            "no seed answers: this node is alone; still trying each round",
                            seeds=seeds,
                            rounds=rounds_unjoined,
                        )
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


def _read_peers(path: Path) -> list[str]:
    """The remembered peers' URLs; what this node wrote, yet read as untrusted (a list of URLs)."""
    try:
        urls = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(urls, list):
        return []
    return [
        u for u in urls if isinstance(u, str) and u.startswith(("http://", "https://", "ws://", "wss://"))
    ][:MAX_REMEMBERED]


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
