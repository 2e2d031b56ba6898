"""What this node tells the network about its backends, through its gossip record: the models peers
may send it, and a load summary."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from wwwserve_gateway.deployments import Deployments
from wwwserve_gateway.plugin_api.gossip import GossipDelegate
from wwwserve_gateway.plugin_api.policy import Policy


def coarse(load: Mapping[str, Any]) -> str:
    if load["waiting"]:
        return "queueing"
    return "busy" if load["running"] else "idle"


class BackendOffer(GossipDelegate):
    """The `models` and `load` fields of the node's record.

    Every re-published record must reach every node, so N nodes re-publishing each round would cost
    O(N) bytes per node per round. Load therefore changes the record only when its coarse state
    (idle, busy, queueing) changes, and at most every `load_every_s`; delegation asks executors
    directly and does not rely on fresh gossiped load.
    """

    def __init__(
        self,
        backends: Deployments,
        policy: Policy,
        load_every_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backends = backends
        self.policy = policy
        self.load_every_s = load_every_s
        self.clock = clock
        self._load: dict[str, Any] | None = None
        self._load_at = 0.0

    def node_meta(self) -> Mapping[str, Any]:
        return {"models": self.models(), "load": self._published_load()}

    def models(self) -> list[dict[str, Any]]:
        offered: dict[str, dict[str, Any]] = {}
        now = time.monotonic()
        for backend in self.backends:
            # A model whose every deployment is cooling down after failures is withdrawn meanwhile.
            if not self.policy.shares(backend.model_name) or backend.state.cooldown_until > now:
                continue
            extra = backend.entry.model_info.model_extra or {}
            context = getattr(backend.settings, "n_ctx", None) or extra.get("max_input_tokens")
            offered[backend.model_name] = {"name": backend.model_name, "context_length": context}
        return sorted(offered.values(), key=lambda m: m["name"])

    def load(self) -> dict[str, Any]:
        running = waiting = 0
        usage = 0.0
        for backend in self.backends:
            probed = backend.state.load
            running += probed.running if probed else backend.state.in_flight
            waiting += probed.waiting if probed else 0
            usage = max(usage, probed.usage if probed else 0.0)
        return {"running": running, "waiting": waiting, "usage": round(usage, 2)}

    def _published_load(self) -> dict[str, Any]:
        now = self.clock()
        load = self.load()
        last = self._load
        if last is None or (coarse(load) != coarse(last) and now - self._load_at >= self.load_every_s):
            self._load, self._load_at = load, now
        return self._load  # type: ignore[return-value]
