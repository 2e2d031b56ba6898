"""The built-in proof-of-stake router: peers are drawn with probability proportional to stake.

As in the paper's code (`select_node_by_pos`), the draw is Efraimidis-Spirakis weighted sampling
without replacement: each candidate gets the key -ln(U) / stake and the smallest keys come first.
The first pick has P(i) = stake_i / sum(stake), exactly, and the rest of the order is the same draw
repeated over the remaining peers, so the node can fail over down the list without a probe round.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Mapping

from pydantic import Field

from wwwserve_gateway.plugin_api.base import PluginSettings
from wwwserve_gateway.plugin_api.node import NodeAPI
from wwwserve_gateway.plugin_api.peers import PeerView
from wwwserve_gateway.plugin_api.requests import RequestInfo
from wwwserve_gateway.plugin_api.router import Router


def weighted_order(weights: Mapping[str, float], rng: random.Random, k: int | None = None) -> list[str]:
    """Up to `k` keys of `weights` (all if None) in a random order drawn without replacement, each
    next pick with probability proportional to its weight among those not yet picked (Plackett-Luce).

    Weights that are not finite and positive are left out. The same rng state and the same mapping
    order give the same result.
    """
    keyed: list[tuple[float, float, str]] = []
    for name, weight in weights.items():
        if not (math.isfinite(weight) and weight > 0):
            continue
        # expovariate(1) is -ln(U) with U in (0, 1]. The key is its log minus log(weight): the same
        # order as -ln(U) / weight, but a weight ratio beyond 1e308 cannot overflow to equal infs.
        exp = rng.expovariate(1.0)
        key = (math.log(exp) if exp > 0 else -math.inf) - math.log(weight)
        # A tie on the key (probability ~2^-53) is broken by a fresh uniform, never by the mapping's
        # order, so no peer gains from where it sits in the peer table.
        keyed.append((key, rng.random(), name))
    if k is None or k >= len(keyed):
        keyed.sort()
        return [name for _, _, name in keyed]
    # Only the first k are wanted: O(n log k) instead of a full sort.
    return [name for _, _, name in heapq.nsmallest(max(k, 0), keyed)]


class StakeRouterSettings(PluginSettings):
    max_attempts: int = Field(3, ge=1, description="how many peers to try per request, an integer >= 1")
    seed: int | None = Field(
        None, description="an integer seed for reproducible draws (tests, simulations); unset for random"
    )
    explore: float = Field(
        0.05,
        ge=0,
        le=0.5,
        description="the share of draws whose first candidate is a newcomer, drawn uniformly (0 to 0.5)",
    )
    newcomer_stake: float = Field(
        1.0,
        ge=0,
        description="a peer whose weight (advertised stake capped by bonded) is below this is a newcomer",
    )
    quality_span: float = Field(
        2.0,
        ge=1,
        description="the most a peer's quality score multiplies (or divides) its stake weight; 1 ignores quality",
    )


def quality_factor(rating: float, span: float) -> float:
    """2^((rating - 1500) / 400), clamped to [1/span, span]: a peer rated 400 Elo points above the
    start (it wins about 10 of 11 duels against one at the start) weighs twice its stake."""
    return min(max(2 ** ((rating - 1500) / 400), 1 / span), span)


def full(peer: PeerView) -> bool:
    """Whether a peer's own load record says a request sent now would queue: requests waiting in
    its engines, or every slot (KV cache, for vLLM-style engines) in use. Only bonded peers are
    judged by it, so a false record wins a liar no more than a place in the order among them."""
    return peer.load.waiting > 0 or peer.load.usage >= 1.0


class StakeRouter(Router):
    """Executor choice by proportional-to-stake draw over the alive peers that serve the model."""

    Settings = StakeRouterSettings
    settings: StakeRouterSettings

    def __init__(self, node: NodeAPI, settings: StakeRouterSettings) -> None:
        super().__init__(node, settings)
        self._rng = random.Random(settings.seed)

    def eligible(self, info: RequestInfo) -> dict[str, float]:
        """Candidate node id -> weight, in the gossip table's order, newcomers (weight 0 up to
        `newcomer_stake`) included. The weight is the advertised stake capped by the ledger's bonded
        stake (a node cannot claim stake it has not bonded) times its quality factor for the model
        (`quality_factor` of its duel rating, which the ledger folds)."""
        gossip, ledger = self.node.gossip, self.node.ledger
        # Self, the entry node and every relay (no loops), and nodes that already failed this request.
        excluded = {self.node.node_id, *info.route, *info.avoid}
        out: dict[str, float] = {}
        for peer in gossip.peers():
            if not peer.alive or peer.id in excluded or not peer.serves(info.model):
                continue
            # The ledger is consulted last: it is the most expensive check and most peers fail earlier.
            weight = min(peer.stake, ledger.account(peer.id).bonded)
            if ledger.can_delegate(peer.id):
                span = self.settings.quality_span
                out[peer.id] = weight * (
                    quality_factor(ledger.quality(peer.id, info.model), span) if span > 1 else 1
                )
        return out

    def candidates(self, info: RequestInfo) -> list[str]:
        """Up to max_attempts peers, best first, for the node to try in turn: by stake, except that
        with probability `explore` the first is a newcomer (a peer with no bonded stake) drawn
        uniformly. Newcomers are how an honest node without stake earns its first credits; the
        bounded share is all a swarm of fresh keys can take.

        It stays bounded while every staked peer advertises next to no stake, since otherwise
        saturating the honest nodes would hand the swarm every request. A bonded peer advertises
        next to nothing when it is full, but also while its stake ramps up after a start; its own
        load record tells the two apart. Those not `full` are tried first, in a random order, then
        the full ones by the shortest queue they report (a request moves to a shorter queue, and
        each policy's `accept` decides whether it is short enough). Only a network with no bonded
        peer at all draws newcomers freely."""
        weights = self.eligible(info)
        floor = self.settings.newcomer_stake
        staked = {n: w for n, w in weights.items() if w >= floor}
        held: list[str] = []  # bonded and not full, though advertising next to nothing
        queued: list[tuple[int, float, str]] = []  # bonded and full: (queue, tie-break, id)
        newcomers: list[str] = []
        for n in weights:
            if self.node.ledger.account(n).bonded < floor:
                newcomers.append(n)
                continue
            if n in staked:
                continue
            peer = self.node.gossip.peer(n)
            if peer is None:  # `eligible` read it from the same table: cannot happen
                continue
            if full(peer):
                queued.append((peer.load.running + peer.load.waiting, self._rng.random(), n))
            else:
                held.append(n)
        k = self.settings.max_attempts
        # The coin is tossed on every request, so a seed gives the same sequence whoever is there.
        explore = self._rng.random() < self.settings.explore
        if staked:
            order = weighted_order(staked, self._rng, k)
        elif held or queued:
            order = self._rng.sample(held, min(k, len(held))) + [n for *_, n in sorted(queued)]
        else:
            return self._rng.sample(newcomers, min(k, len(newcomers)))
        if newcomers and explore:
            order = [self._rng.choice(newcomers), *order]
        return order[:k]
