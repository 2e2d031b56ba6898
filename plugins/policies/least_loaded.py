"""Join the shortest queue without a coordinator: each node gossips how many requests it holds per
model, and requests go to where fewer are held.

- `busy`: the requests a node's backends of a model hold, running or queued in the engine, taken as
  the larger of the engine's last probe and the gateway's in-flight count (exact and immediate when
  every request to the engine goes through the gateway). Each node publishes it in its gossip record
  (`least_loaded: {model: busy}`) every round in which it changes. Unlike vLLM's KV usage it counts
  a reasoning request at admission, not minutes later when its output has filled the cache, and
  unlike the coarse `load` field it is republished on every change.
- An app's request: delegate when the local busy exceeds the least-loaded peer's by `min_gap`;
  else serve locally (the engine queues it). Never retry: a request waits in one queue only.
- A peer's request: accept while this node holds fewer than the requester published (so a request
  only moves towards a shorter queue, whichever peer the router drew) and no more than `slack` above
  what this node itself last published (so many requesters acting on the same stale record do not
  all pile onto it).
- Advertised stake: the bonded stake times `sharpness` to the power of how many more requests this
  node holds than the least-loaded node it knows (itself included): the proportional-to-stake draw
  then picks the shortest queue most of the time. A node more than about log(bonded)/log(1/sharpness)
  requests above the minimum falls below the router's newcomer weight and is drawn only to explore.

The estimates are counts, as the ideal scheduler's are: no per-hardware speed. Peers that publish no
`least_loaded` field are judged from their coarse `load` record (running + waiting).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field

from wwwserve_gateway.plugin_api.node import NodeAPI
from wwwserve_gateway.plugin_api.peers import PeerView
from wwwserve_gateway.plugin_api.policy import Decision
from wwwserve_gateway.plugin_api.requests import RequestInfo
from wwwserve_gateway.plugins.policies.base import (
    PolicySettings,
    StakedPolicy,
    alive_peers,
    backend_busy,
    ready_backends,
)

FIELD = "least_loaded"
MAX_PUBLISHED = 1_000_000  # a larger or malformed count reads as unknown


def published_busy(peer: PeerView, model: str) -> int | None:
    """What `peer` published for `model`: its `least_loaded` field, else its coarse load summary,
    else None (it serves the model but says nothing usable)."""
    field = peer.record.get(FIELD)
    if isinstance(field, Mapping):
        value = field.get(model)
        if type(value) is int and 0 <= value <= MAX_PUBLISHED:
            return value
    if "load" in peer.record:
        return peer.load.running + peer.load.waiting
    return None


class LeastLoadedSettings(PolicySettings):
    min_gap: int = Field(
        1, ge=1, description="delegate when the least-loaded peer holds this many fewer requests (>= 1)"
    )
    slack: int = Field(
        1, ge=0, description="accept peers' requests up to this many above the own published count (>= 0)"
    )
    sharpness: float = Field(
        0.5,
        gt=0,
        le=1,
        description="stake factor per request held above the least-loaded node, in (0, 1]; 1 ignores load",
    )


class LeastLoadedPolicy(StakedPolicy):
    """Decentralized join-the-shortest-queue on gossiped request counts. Deterministic."""

    Settings = LeastLoadedSettings
    settings: LeastLoadedSettings

    def __init__(self, node: NodeAPI, settings: LeastLoadedSettings) -> None:
        super().__init__(node, settings)
        self._published: dict[str, int] = {}

    # -- loads ----------------------------------------------------------------------------------
    def local_busy(self, model: str) -> int | None:
        """Requests this node's backends of `model` hold; None without a ready one."""
        backends = ready_backends(self.node, model)
        if not backends:
            return None
        return sum(backend_busy(b) for b in backends)

    def peer_loads(self, model: str) -> dict[str, int]:
        """Alive, staked peers serving `model` -> their published busy (those that publish one)."""
        out = {}
        for peer in alive_peers(self.node, model):
            busy = published_busy(peer, model)
            if busy is not None:
                out[peer.id] = busy
        return out

    def requester_busy(self, request: RequestInfo) -> int | None:
        """What the node that sent us `request` (the last hop of its route) published for its model."""
        if not request.route:
            return None
        peer = self.node.gossip.peer(request.route[-1])
        return None if peer is None else published_busy(peer, request.model)

    # -- decisions ------------------------------------------------------------------------------
    def decide(self, request: RequestInfo) -> Decision:
        model = request.model
        local = self.local_busy(model)
        if local is None:
            return self.delegate_or_wait(model)
        peers = self.peer_loads(model)
        if not peers or not self.can_buy(model):
            return Decision.LOCAL
        best = min(peers.values())
        return Decision.DELEGATE if local - best >= self.settings.min_gap else Decision.LOCAL

    def accept(self, request: RequestInfo) -> Decision:
        model = request.model
        if not self.shares(model):
            return Decision.REJECT
        local = self.local_busy(model)
        if local is None:
            return Decision.REJECT
        if local > self._published.get(model, 0) + self.settings.slack:
            return Decision.REJECT  # taken on more since peers last heard from us
        sender = self.requester_busy(request)
        if sender is not None and local + self.settings.min_gap > sender:
            return Decision.REJECT  # the request would not move to a shorter queue
        return Decision.LOCAL

    # -- what peers see -------------------------------------------------------------------------
    def shared_busy(self) -> dict[str, int]:
        models = sorted({b.model_name for b in self.shared_backends()})
        return {m: busy for m in models if (busy := self.local_busy(m)) is not None}

    def advertised_stake(self) -> float:
        """Bonded stake x sharpness ^ (requests held above the least-loaded node), over the shared
        models (the least excess among them)."""
        mine = self.shared_busy()
        if not mine:
            return 0.0
        excess = min(busy - min([busy, *self.peer_loads(model).values()]) for model, busy in mine.items())
        return self.bonded() * self.settings.sharpness**excess

    def node_meta(self) -> Mapping[str, Any]:
        self._published = self.shared_busy()
        return {"stake": round(self.advertised_stake(), 3), FIELD: dict(self._published)}
