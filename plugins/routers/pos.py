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


class StakeRouter(Router):
    """Executor choice by proportional-to-stake draw over the alive peers that serve the model."""

    Settings = StakeRouterSettings
    settings: StakeRouterSettings

    def __init__(self, node: NodeAPI, settings: StakeRouterSettings) -> None:
        super().__init__(node, settings)
        self._rng = random.Random(settings.seed)

    def eligible(self, info: RequestInfo) -> dict[str, float]:
        """Candidate node id -> weight, in the gossip table's order. The weight is the advertised
        stake capped by the ledger's bonded stake: a node cannot claim stake it has not bonded."""
        gossip, ledger = self.node.gossip, self.node.ledger
        # Self, the entry node and every relay (no loops), and nodes that already failed this request.
        excluded = {self.node.node_id, *info.route, *info.avoid}
        out: dict[str, float] = {}
        for peer in gossip.peers():
            if not peer.alive or peer.id in excluded or peer.stake <= 0 or not peer.serves(info.model):
                continue
            # The ledger is consulted last: it is the most expensive check and most peers fail earlier.
            weight = min(peer.stake, ledger.account(peer.id).bonded)
            if weight > 0 and ledger.can_delegate(peer.id):
                out[peer.id] = weight
        return out

    def candidates(self, info: RequestInfo) -> list[str]:
        """Up to max_attempts peers, best first, for the node to try in turn."""
        return weighted_order(self.eligible(info), self._rng, self.settings.max_attempts)
