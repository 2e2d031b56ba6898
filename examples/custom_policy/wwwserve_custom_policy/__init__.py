"""A custom wwwserve policy: serve locally up to a per-minute quota of requests, then delegate.

The quota counts every request this node runs on its own backends, the apps' and the peers' alike,
over a sliding window (60 s by default). Under the quota an app's request runs here; over it the
request goes to a peer (or is refused, with `over_quota: reject`). Peers' requests are accepted only
while the quota has room, and the node offers its bonded stake to the network's draws only then.

It is written against the public plugin API alone (`wwwserve_gateway.plugin_api`), as any
third-party policy would be, and registered in this package's pyproject.toml:

    [project.entry-points."wwwserve.policies"]
    quota = "wwwserve_custom_policy:QuotaPolicy"
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Literal

from pydantic import Field

from wwwserve_gateway.plugin_api import Decision, NodeAPI, PluginSettings, Policy, RequestInfo

__all__ = ["QuotaPolicy", "QuotaSettings"]


class QuotaSettings(PluginSettings):
    """The `policy.settings` this plugin takes. `PluginSettings` makes unknown keys and wrong types
    errors, which the node and `wwwserve check-config` report with the key named."""

    requests_per_minute: int = Field(
        ..., ge=1, description="requests this node runs locally per window, an integer >= 1"
    )
    window_s: float = Field(60.0, gt=0, description="the quota's sliding window in seconds (default 60)")
    over_quota: Literal["delegate", "reject"] = Field(
        "delegate", description="what happens to an app's request over the quota: delegate or reject"
    )
    bond: int = Field(
        0, ge=0, description="credits to bond at start, so that peers may draw this node (0: none)"
    )
    retry_after_s: float = Field(0.5, gt=0, description="seconds before a RETRY decision is asked again")


class QuotaPolicy(Policy):
    """Serve locally until `requests_per_minute` is used up, then hand requests to peers."""

    # Replaced in tests with a fake clock; time.monotonic never goes backwards.
    clock: Callable[[], float] = staticmethod(time.monotonic)

    Settings = QuotaSettings
    settings: QuotaSettings

    def __init__(self, node: NodeAPI, settings: QuotaSettings) -> None:
        super().__init__(node, settings)
        self.retry_after_s = settings.retry_after_s
        self._used: deque[float] = deque()  # when each local request in the window was admitted

    # -- the quota -----------------------------------------------------------------------------------
    def remaining(self) -> int:
        """Local requests still allowed in the current window."""
        horizon = self.clock() - self.settings.window_s
        while self._used and self._used[0] <= horizon:
            self._used.popleft()
        return max(self.settings.requests_per_minute - len(self._used), 0)

    def _take(self) -> bool:
        if self.remaining() == 0:
            return False
        self._used.append(self.clock())
        return True

    # -- the Policy interface ------------------------------------------------------------------------
    async def start(self) -> None:
        """Bond the configured stake (only what is missing, so a restart bonds nothing twice)."""
        if self.settings.bond == 0:
            return
        ledger = self.node.ledger
        missing = self.settings.bond - int(ledger.account(self.node.node_id).bonded)
        if missing > 0:
            await ledger.append_own("bond", {"amount": missing})

    def serves_locally(self, model: str) -> bool:
        return any(backend.model_name == model for backend in self.node.backends)

    def decide(self, request: RequestInfo) -> Decision:
        # A model with no local backend costs no quota: it can only go to a peer.
        if self.serves_locally(request.model) and self._take():
            return Decision.LOCAL
        if self.settings.over_quota == "delegate" and self.buys(request.model):
            return Decision.DELEGATE
        return Decision.REJECT

    def accept(self, request: RequestInfo) -> Decision:
        if self.shares(request.model) and self.serves_locally(request.model) and self._take():
            return Decision.LOCAL
        return Decision.REJECT

    def advertised_stake(self) -> float:
        # Offer stake only while there is room: a node over its quota would decline anyway.
        return float(self.settings.bond) if self.remaining() > 0 else 0.0
