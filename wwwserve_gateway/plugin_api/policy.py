"""The policy slot: a provider's decisions about its own requests and its peers'."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from wwwserve_gateway.plugin_api.base import Plugin
from wwwserve_gateway.plugin_api.gossip import GossipDelegate
from wwwserve_gateway.plugin_api.requests import RequestInfo


class Decision(StrEnum):
    LOCAL = "local"  # serve on a local backend now (the engine may queue it)
    DELEGATE = "delegate"  # hand it to a peer the router draws
    RETRY = "retry"  # wait the policy's retry_after_s, then decide again
    REJECT = "reject"  # refuse: 429 to an app, a decline to a peer


class Policy(Plugin, GossipDelegate):
    """A provider's decisions. Subclass it and override what you need; every method has a default.

    Decisions are synchronous and must be quick: they run on the request path. The policy is also a
    gossip delegate: the stake it advertises goes into the node's record (`node_meta`).
    """

    retry_after_s: float = 0.5

    def decide(self, request: RequestInfo) -> Decision:
        """An app's request: serve locally, delegate, retry shortly or reject."""
        return Decision.LOCAL

    def accept(self, request: RequestInfo) -> Decision:
        """A peer's request: LOCAL runs it here, DELEGATE relays it onward (multi-hop), anything
        else declines it."""
        return Decision.REJECT

    def advertised_stake(self) -> float:
        """The stake this node offers to proof-of-stake draws now (routers cap it by the bonded
        stake). Asked once per gossip round."""
        return 0.0

    def shares(self, model: str) -> bool:
        """Whether peers may send this node requests for `model`."""
        return True

    def buys(self, model: str) -> bool:
        """Whether this node may delegate requests for `model` to peers."""
        return True

    def on_request_done(self, request: RequestInfo, where: str, seconds: float, ok: bool) -> None:
        """Told after every app request and every peer request served here: `where` is "local", or
        the executor's node id for a delegated request ("peer" when no executor answered)."""

    def node_meta(self) -> Mapping[str, Any]:
        return {"stake": round(self.advertised_stake(), 3)}
