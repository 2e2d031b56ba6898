"""Requests per second and latency percentiles over time, from the node's Prometheus metrics.

Sampled once per tick while the dashboard is watched: the counters and histograms are kept by the
request path anyway, so watching costs nothing per request. Percentiles come from the histograms'
bucket deltas over the tick, interpolated within a bucket as Prometheus' `histogram_quantile` does.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace

from prometheus_client import CollectorRegistry
from prometheus_client.samples import Sample

from wwwserve_gateway.web.ui.sources import RequestRecordLike

REQUESTS = "wwwserve_requests_total"
DELEGATED = "wwwserve_delegations_total"
PEER_REQUESTS = "wwwserve_peer_requests_total"
LATENCY = "wwwserve_request_duration_seconds_bucket"
TTFT = "wwwserve_time_to_first_token_seconds_bucket"
HISTORY = 600  # points kept: ten minutes at one a second


@dataclass(frozen=True, slots=True)
class Counts:
    """Cumulative counts read at one instant."""

    at: float
    requests: float = 0.0
    failed: float = 0.0
    delegated: float = 0.0
    served_for_peers: float = 0.0
    latency: tuple[tuple[float, float], ...] = ()  # (upper bound, cumulative count), ascending
    ttft: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True, slots=True)
class TrafficPoint:
    """One tick: rates per second and percentiles in milliseconds (None without requests)."""

    t: float
    rps: float
    local: float
    delegated: float
    served_for_peers: float
    failed: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


def quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The q-quantile of cumulative `(upper bound, count)` buckets, interpolated within its bucket."""
    ordered = list(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in ordered:
        if count >= rank:
            if math.isinf(upper):  # beyond the last finite bound: that bound is all we know
                return lower
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = upper, count
    return lower


def exact(q: float, ordered: Sequence[float]) -> float | None:
    """The q-quantile of sorted values (nearest rank); None without values."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(math.ceil(q * len(ordered)) - 1, 0))]


def _bucket_sums(samples: list[Sample]) -> tuple[tuple[float, float], ...]:
    sums: dict[float, float] = {}
    for s in samples:
        bound = float(s.labels["le"])
        sums[bound] = sums.get(bound, 0.0) + s.value
    return tuple(sorted(sums.items()))


def _delta(
    now: tuple[tuple[float, float], ...], before: tuple[tuple[float, float], ...]
) -> list[tuple[float, float]]:
    old = dict(before)
    return [(bound, count - old.get(bound, 0.0)) for bound, count in now]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


class TrafficSampler:
    """Reads the request metrics of one registry; keeps the last `HISTORY` points."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._metrics = registry.restricted_registry([REQUESTS, DELEGATED, PEER_REQUESTS, LATENCY, TTFT])
        self._last: Counts | None = None
        self.points: deque[TrafficPoint] = deque(maxlen=HISTORY)

    def read(self) -> Counts:
        requests = failed = delegated = served = 0.0
        latency: list[Sample] = []
        ttft: list[Sample] = []
        for metric in self._metrics.collect():
            for s in metric.samples:
                if s.name == REQUESTS:
                    requests += s.value
                    if int(s.labels.get("status", "0")) >= 400:
                        failed += s.value
                elif s.name == DELEGATED and s.labels.get("outcome") == "ok":
                    delegated += s.value
                elif s.name == PEER_REQUESTS and s.labels.get("outcome") == "served":
                    served += s.value
                elif s.name == LATENCY:
                    latency.append(s)
                elif s.name == TTFT:
                    ttft.append(s)
        return Counts(
            time.time(), requests, failed, delegated, served, _bucket_sums(latency), _bucket_sums(ttft)
        )

    def sample(self, records: Sequence[RequestRecordLike] = ()) -> TrafficPoint | None:
        """Take a reading; the point since the previous one (None for the first reading). With the
        node's recent request records, percentiles are exact over the requests that ended in the
        tick (the histograms' buckets are coarse, and delegated streams' TTFT is only in records)."""
        now = self.read()
        before, self._last = self._last, now
        if before is None:
            return None
        span = max(now.at - before.at, 1e-6)
        rate = lambda a, b: round(max(a - b, 0.0) / span, 3)  # noqa: E731
        latency = _delta(now.latency, before.latency)
        ttft = _delta(now.ttft, before.ttft)
        rps, failed, delegated = (
            rate(now.requests, before.requests),
            rate(now.failed, before.failed),
            rate(now.delegated, before.delegated),
        )
        point = TrafficPoint(
            t=round(now.at, 3),
            rps=rps,
            local=round(max(rps - delegated - failed, 0.0), 3),
            delegated=delegated,
            served_for_peers=rate(now.served_for_peers, before.served_for_peers),
            failed=failed,
            p50_ms=_ms(quantile(0.5, latency)),
            p95_ms=_ms(quantile(0.95, latency)),
            p99_ms=_ms(quantile(0.99, latency)),
            ttft_p50_ms=_ms(quantile(0.5, ttft)),
            ttft_p95_ms=_ms(quantile(0.95, ttft)),
        )
        ended = [r for r in records if before.at < r.started + r.latency_s <= now.at]
        if ended:
            latencies = sorted(r.latency_s for r in ended)
            ttfts = sorted(r.ttft_s for r in ended if r.ttft_s is not None)
            point = replace(
                point,
                p50_ms=_ms(exact(0.5, latencies)),
                p95_ms=_ms(exact(0.95, latencies)),
                p99_ms=_ms(exact(0.99, latencies)),
                ttft_p50_ms=_ms(exact(0.5, ttfts)),
                ttft_p95_ms=_ms(exact(0.95, ttfts)),
            )
        self.points.append(point)
        return point

    def totals(self) -> dict[str, float]:
        last = self._last or self.read()
        return {
            "requests": last.requests,
            "failed": last.failed,
            "delegated": last.delegated,
            "served_for_peers": last.served_for_peers,
        }
