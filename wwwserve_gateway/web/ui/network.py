"""The Network page's data: every known peer with its stake, balance and quality, the overlay's
connections as a graph, and a timeline of membership events."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

from wwwserve_gateway.overlay.overlay import Overlay
from wwwserve_gateway.plugin_api.gossip import GossipDelegate
from wwwserve_gateway.plugin_api.node import NodeAPI
from wwwserve_gateway.plugin_api.peers import MembershipEvent, MembershipEventKind

TIMELINE = 200  # membership events kept
LINK_PREFIX = 16  # hex digits of a peer id a link names: enough to tell peers apart, and small
MAX_LINKS = 64  # links a record carries (the record's size is bounded)
LINKS_FIELD = "links"


class OverlayLinks(GossipDelegate):
    """Adds `links` to this node's gossiped record: the peers it holds an overlay connection to (id
    prefixes), so every dashboard can draw the whole overlay. Connections change rarely, and the
    record is re-signed only when they do."""

    def __init__(self, overlay: Overlay) -> None:
        self.overlay = overlay

    def node_meta(self) -> Mapping[str, Any]:
        return {LINKS_FIELD: [p[:LINK_PREFIX] for p in self.overlay.connected()[:MAX_LINKS]]}


class Timeline:
    """The last membership events: joins, suspicions, refutations, deaths and leaves."""

    SHOWN = frozenset(MembershipEventKind) - {MembershipEventKind.UPDATED}

    def __init__(self, keep: int = TIMELINE) -> None:
        self.events: deque[dict[str, Any]] = deque(maxlen=keep)

    def record(self, event: MembershipEvent) -> None:
        if event.kind in self.SHOWN:
            self.events.append({"at": round(event.at, 3), "kind": event.kind.value, "id": event.peer.id})


def _links(record: Mapping[str, Any]) -> list[str]:
    value = record.get(LINKS_FIELD)
    if type(value) is not list:
        return []
    return [v for v in value[:MAX_LINKS] if type(v) is str and len(v) == LINK_PREFIX]


def network_view(node: NodeAPI, balances: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Peers (this node first) and the overlay graph's edges as pairs of full ids."""
    me = node.node_id
    ledger = node.ledger
    duels = any("duels" in account for account in balances.values())
    peers: list[dict[str, Any]] = []
    by_prefix: dict[str, str] = {}
    raw_links: dict[str, list[str]] = {}
    for peer in node.gossip.peers():
        account = balances.get(peer.id, {})
        by_prefix[peer.id[:LINK_PREFIX]] = peer.id
        raw_links[peer.id] = _links(peer.record)
        peers.append(
            {
                "id": peer.id,
                "self": peer.id == me,
                "url": peer.url,
                "state": peer.state.value,
                "models": sorted(peer.models),
                "load": {
                    "running": peer.load.running,
                    "waiting": peer.load.waiting,
                    "usage": peer.load.usage,
                },
                "stake": peer.stake,
                "bonded": account.get("bonded", 0.0),
                "balance": account.get("liquid", 0.0),
                "unbonding": account.get("unbonding", 0.0),
                "barred": bool(account.get("barred", False)),
                "quality": (
                    {m: round(ledger.quality(peer.id, m), 1) for m in sorted(peer.models)} if duels else None
                ),
                "duels": account.get("duels"),
                "age_s": round(peer.age_s, 3),
            }
        )
    peers.sort(key=lambda p: (not p["self"], p["id"]))
    raw_links[me] = [p[:LINK_PREFIX] for p in node.overlay.connected()]
    edges = {
        tuple(sorted((a, by_prefix[b])))
        for a, targets in raw_links.items()
        for b in targets
        if b in by_prefix and by_prefix[b] != a
    }
    return {"peers": peers, "links": sorted(edges), "duels": duels}
