"""Prometheus metrics of one node, kept in the node's own registry so several nodes share a process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from wwwserve_gateway.plugin_api.backend import Backend

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    def __init__(self) -> None:
        self.prometheus = CollectorRegistry(auto_describe=True)
        r = self.prometheus
        self.requests = Counter(
            "wwwserve_requests",
            "Requests answered, by endpoint, model and HTTP status",
            ["endpoint", "model", "status"],
            registry=r,
        )
        self.errors = Counter(
            "wwwserve_request_errors",
            "Requests that failed, by endpoint and OpenAI error type",
            ["endpoint", "type"],
            registry=r,
        )
        self.latency = Histogram(
            "wwwserve_request_duration_seconds",
            "Time from request to the end of the answer",
            ["endpoint", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "wwwserve_time_to_first_token_seconds",
            "Time from request to the first streamed chunk",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("wwwserve_requests_in_flight", "Requests being served now", registry=r)
        self.tokens = Counter(
            "wwwserve_tokens",
            "Tokens reported by backends",
            ["model", "kind"],
            registry=r,
        )
        self.client_disconnects = Counter(
            "wwwserve_client_disconnects",
            "Requests abandoned by their client before the answer ended",
            registry=r,
        )
        self.backend_ready = Gauge(
            "wwwserve_backend_ready", "1 when the deployment can serve", ["backend", "model"], registry=r
        )
        self.backend_in_flight = Gauge(
            "wwwserve_backend_in_flight",
            "Requests this gateway has at the deployment now",
            ["backend", "model"],
            registry=r,
        )
        self.backend_running = Gauge(
            "wwwserve_backend_running",
            "Requests running, as the backend reports",
            ["backend", "model"],
            registry=r,
        )
        self.backend_waiting = Gauge(
            "wwwserve_backend_waiting",
            "Requests queued, as the backend reports",
            ["backend", "model"],
            registry=r,
        )
        self.backend_usage = Gauge(
            "wwwserve_backend_usage",
            "Fraction of capacity (KV cache or slots) in use",
            ["backend", "model"],
            registry=r,
        )

        # Label children cached per label tuple: .labels() takes a lock and builds a key each call.
        self._done: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._ttft: dict[str, Histogram] = {}
        self._tokens: dict[str, tuple[Counter, Counter]] = {}

    def request_done(self, endpoint: str, model: str, status: int, seconds: float) -> None:
        key = (endpoint, model, status)
        children = self._done.get(key)
        if children is None:
            children = self._done[key] = (
                self.requests.labels(endpoint, model, str(status)),
                self.latency.labels(endpoint, model),
            )
        children[0].inc()
        children[1].observe(seconds)

    def first_token(self, model: str, seconds: float) -> None:
        child = self._ttft.get(model)
        if child is None:
            child = self._ttft[model] = self.ttft.labels(model)
        child.observe(seconds)

    def count_tokens(self, model: str, prompt: int, completion: int) -> None:
        children = self._tokens.get(model)
        if children is None:
            children = self._tokens[model] = (
                self.tokens.labels(model, "prompt"),
                self.tokens.labels(model, "completion"),
            )
        children[0].inc(prompt)
        children[1].inc(completion)

    def count_error(self, endpoint: str, kind: str) -> None:
        self.errors.labels(endpoint, kind).inc()

    def observe_backend(self, backend: Backend) -> None:
        labels = (backend.id, backend.model_name)
        self.backend_ready.labels(*labels).set(1 if backend.ready else 0)
        self.backend_in_flight.labels(*labels).set(backend.state.in_flight)
        load = backend.state.load
        if load is not None:
            self.backend_running.labels(*labels).set(load.running)
            self.backend_waiting.labels(*labels).set(load.waiting)
            self.backend_usage.labels(*labels).set(load.usage)

    def forget_backend(self, backend: Backend) -> None:
        for gauge in (
            self.backend_ready,
            self.backend_in_flight,
            self.backend_running,
            self.backend_waiting,
            self.backend_usage,
        ):
            try:
                gauge.remove(backend.id, backend.model_name)
            except KeyError:
                pass

    def render(self) -> bytes:
        return generate_latest(self.prometheus)
