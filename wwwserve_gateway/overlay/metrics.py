"""The overlay's Prometheus metrics, registered in the registry the node gives it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from wwwserve_gateway.overlay.errors import REJECT_REASONS
from wwwserve_gateway.overlay.frames import TYPES


class OverlayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.connections = Gauge(
            "wwwserve_overlay_connections", "Peers with an established overlay connection", registry=registry
        )
        self.buffered = Gauge(
            "wwwserve_overlay_buffered_bytes",
            "Bytes of stream items received from peers and not yet taken (bounded by the windows)",
            registry=registry,
        )
        self.rejected = Counter(
            "wwwserve_overlay_rejected",
            "Handshakes, frames and calls refused, by reason (all but busy close the connection)",
            ["reason"],
            registry=registry,
        )
        self.sent = Counter(
            "wwwserve_overlay_messages_sent", "Overlay frames sent, by type", ["type"], registry=registry
        )
        self.received = Counter(
            "wwwserve_overlay_messages_received",
            "Overlay frames received, by type",
            ["type"],
            registry=registry,
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for t in sorted(TYPES):
            self.sent.labels(t)
            self.received.labels(t)

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason if reason in REJECT_REASONS else "malformed").inc()
