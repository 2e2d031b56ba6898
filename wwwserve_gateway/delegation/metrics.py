"""Counters of delegation, on the node's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class DelegationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.delegations = Counter(
            "wwwserve_delegations",
            "App requests this node delegated, by model and outcome (ok, failed, no_executor)",
            ["model", "outcome"],
            registry=registry,
        )
        self.attempts = Counter(
            "wwwserve_delegation_attempts",
            "Candidates asked, by outcome (accepted, declined, unreachable, timeout, invalid)",
            ["outcome"],
            registry=registry,
        )
        self.failovers = Counter(
            "wwwserve_failovers",
            "Executors that failed during a request, by stage (before_output, mid_stream)",
            ["stage"],
            registry=registry,
        )
        self.peer_requests = Counter(
            "wwwserve_peer_requests",
            "Requests from peers, by model and outcome (served, relayed, declined, refused, failed)",
            ["model", "outcome"],
            registry=registry,
        )
        self.peer_in_flight = Gauge(
            "wwwserve_peer_requests_in_flight",
            "Peers' requests this node is serving on its own backends now",
            registry=registry,
        )
        self.bad_receipts = Counter(
            "wwwserve_bad_receipts",
            "Executors caught misbehaving, by reason (bad_receipt: not paid; inflated_receipt: paid the "
            "verified part; garbage: an answer that is not OpenAI-shaped JSON)",
            ["reason"],
            registry=registry,
        )
