"""A policy that compares estimated completion times instead of flipping coins.

Estimate for one more request on a server with `slots` parallel slots that holds `busy` requests:

    service * (1 + max(0, busy + 1 - slots) / slots)

`service` is an EWMA of observed seconds per (model, where) (`where` = "local" or the executor's
id), `service_s` before any observation. The new request counts itself: a full server makes it
wait about one service time per `slots` requests ahead of it.

Peers are judged from their gossiped load (`PeerView.load`: running and waiting summed, usage the
maximum, over all their backends). A record does not say how many slots a peer has, so it is
inferred as running / usage when both are positive (exact for llama.cpp, whose usage is busy slots
/ slots; an approximation for vLLM/SGLang, whose usage is KV-cache use) and taken as 1 otherwise,
which overestimates a busy peer's queue rather than underestimating it.
"""

from __future__ import annotations

from pydantic import Field

from wwwserve_gateway.plugin_api.backend import Backend
from wwwserve_gateway.plugin_api.node import NodeAPI
from wwwserve_gateway.plugin_api.peers import PeerView
from wwwserve_gateway.plugin_api.policy import Decision
from wwwserve_gateway.plugin_api.requests import RequestInfo
from wwwserve_gateway.plugins.policies.base import (
    PolicySettings,
    StakedPolicy,
    alive_peers,
    backend_busy,
    backend_capacity,
    ready_backends,
)

LOCAL = "local"


def infer_slots(running: float, usage: float, known: int = 1) -> int:
    """Parallel slots: what is known, or more when `running / usage` says so."""
    if running > 0 and usage > 0:
        return max(known, round(running / min(usage, 1.0)))
    return max(known, 1)


def wait_factor(busy: float, slots: int) -> float:
    """Completion time of one more request, in service times."""
    return 1.0 + max(0.0, busy + 1 - slots) / slots


def backend_slots(backend: Backend) -> int:
    load = backend.state.load
    if load is None:
        return backend_capacity(backend)
    return infer_slots(load.running, load.usage, backend_capacity(backend))


class CompletionTimeSettings(PolicySettings):
    service_s: float = Field(
        1.0, gt=0, description="seconds per request assumed before any is observed (> 0)"
    )
    rtt_s: float = Field(0.005, ge=0, description="seconds added to a peer's estimate for the network (>= 0)")
    margin: float = Field(
        0.2, ge=0, description="how much faster a peer must look before delegating, as a fraction (>= 0)"
    )
    accept_max_s: float | None = Field(
        None, gt=0, description="largest local estimate at which peers' requests are accepted (> 0, or null)"
    )
    ewma_alpha: float = Field(0.3, gt=0, le=1, description="weight of the newest observation, in (0, 1]")


class CompletionTimePolicy(StakedPolicy):
    """Serve where the request should finish first; accept peers' requests while the queue is short."""

    Settings = CompletionTimeSettings
    settings: CompletionTimeSettings

    def __init__(self, node: NodeAPI, settings: CompletionTimeSettings) -> None:
        super().__init__(node, settings)
        self.service: dict[tuple[str, str], float] = {}

    def service_estimate(self, model: str, where: str = LOCAL) -> float:
        return self.service.get((model, where), self.settings.service_s)

    def on_request_done(self, request: RequestInfo, where: str, seconds: float, ok: bool) -> None:
        # Failures say nothing about service time (a refused connection is fast).
        if not ok or seconds < 0:
            return
        key = (request.model, where)
        old = self.service.get(key)
        self.service[key] = seconds if old is None else old + self.settings.ewma_alpha * (seconds - old)

    def local_estimate(self, model: str) -> float | None:
        """Seconds one more request would take here; None without a ready local backend."""
        backends = ready_backends(self.node, model)
        if not backends:
            return None
        slots = sum(backend_slots(b) for b in backends)
        busy = sum(backend_busy(b) for b in backends)
        return self.service_estimate(model) * wait_factor(busy, slots)

    def peer_estimate(self, model: str, peer: PeerView) -> float:
        load = peer.load
        slots = infer_slots(load.running, load.usage)
        factor = wait_factor(load.running + load.waiting, slots)
        return self.service_estimate(model, peer.id) * factor + self.settings.rtt_s

    def best_peer_estimate(self, model: str) -> float | None:
        estimates = [self.peer_estimate(model, p) for p in alive_peers(self.node, model)]
        return min(estimates, default=None)

    def decide(self, request: RequestInfo) -> Decision:
        model = request.model
        local = self.local_estimate(model)
        if local is None:
            return self.delegate_or_wait(model)
        best = self.best_peer_estimate(model)
        if best is None or local <= best * (1 + self.settings.margin) or not self.can_buy(model):
            return Decision.LOCAL
        return Decision.DELEGATE

    def accept(self, request: RequestInfo) -> Decision:
        model = request.model
        if not self.shares(model):
            return Decision.REJECT
        local = self.local_estimate(model)
        limit = self.settings.accept_max_s or 2 * self.service_estimate(model)
        return Decision.LOCAL if local is not None and local <= limit else Decision.REJECT

    def advertised_stake(self) -> float:
        """Bonded stake times the fraction of shared slots free: a full node is not drawn."""
        backends = self.shared_backends()
        slots = sum(backend_slots(b) for b in backends)
        if not slots:
            return 0.0
        free = sum(max(0, backend_slots(b) - backend_busy(b)) for b in backends)
        return self.bonded() * free / slots
