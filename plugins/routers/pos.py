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
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from wwwserve_gateway.config.problems import problems_from_validation
from wwwserve_gateway.plugin_api import NodeAPI, RequestInfo


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


class StakeRouterSettings(BaseModel):
    # strict: "3" or 3.0 in a config is a mistake worth reporting, not something to coerce.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    max_attempts: int = Field(3, ge=1, description="how many peers to try per request, an integer >= 1")
    seed: int | None = Field(
        None, description="an integer seed for reproducible draws (tests, simulations); unset for random"
    )


def _advertised_stake(record: Any, model: str) -> float:
    """The stake a gossiped record offers for `model`; 0.0 when it does not serve it or is malformed.

    Records come from the network, so every field is checked rather than trusted to have a shape.
    """
    if not isinstance(record, Mapping):
        return 0.0
    models = record.get("models")
    if not isinstance(models, list) or not any(
        isinstance(m, Mapping) and m.get("name") == model for m in models
    ):
        return 0.0
    stake = record.get("stake")
    # Only JSON numbers: a bool or a string is a malformed record, not a stake of 1 or "5".
    if isinstance(stake, bool) or not isinstance(stake, int | float):
        return 0.0
    stake = float(stake)
    return stake if math.isfinite(stake) and stake > 0 else 0.0


class StakeRouter:
    """Executor choice by proportional-to-stake draw over the alive peers that serve the model."""

    def __init__(self, node: NodeAPI, settings: Mapping[str, Any]) -> None:
        try:
            self.settings = StakeRouterSettings.model_validate(dict(settings))
        except ValidationError as exc:
            problems = problems_from_validation(exc, StakeRouterSettings, ("router", "settings"))
            raise ValueError("; ".join(str(p) for p in problems)) from None
        self.node = node
        self._rng = random.Random(self.settings.seed)

    def eligible(self, info: RequestInfo) -> dict[str, float]:
        """Candidate node id -> weight, in the gossip table's order. The weight is the advertised
        stake capped by the ledger's bonded stake: a node cannot claim stake it has not bonded."""
        gossip, ledger = self.node.gossip, self.node.ledger
        if gossip is None or ledger is None:
            raise RuntimeError("the pos router needs the gossip and ledger plugins to be built first")
        # Self, the entry node and every relay (no loops), and nodes that already failed this request.
        excluded = {self.node.identity.node_id, *info.route, *info.avoid}
        out: dict[str, float] = {}
        for peer in gossip.peers():
            if peer.state != "alive" or peer.id in excluded:
                continue
            advertised = _advertised_stake(peer.record, info.model)
            if advertised <= 0:
                continue
            # The ledger is consulted last: it is the most expensive check and most peers fail earlier.
            weight = min(advertised, float(ledger.account(peer.id)["bonded"]))
            if weight > 0 and ledger.can_delegate(peer.id):
                out[peer.id] = weight
        return out

    def candidates(self, info: RequestInfo) -> list[str]:
        """Up to max_attempts peers, best first, for the node to try in turn."""
        return weighted_order(self.eligible(info), self._rng, self.settings.max_attempts)
