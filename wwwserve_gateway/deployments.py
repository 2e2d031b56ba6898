"""The node's deployments: built from their entry points, chosen per request, leased while they
serve one, and added or removed while the node runs."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import math
import random
import time
from collections.abc import Collection, Iterator

import structlog

from wwwserve_gateway.config.schema import ModelEntry, RouterSettings
from wwwserve_gateway.http.errors import (
    BackendError,
    BackendUnavailable,
    BackendUnreachable,
    GatewayError,
    ModelNotFound,
    RateLimited,
    UpstreamError,
)
from wwwserve_gateway.plugin_api.backend import Backend, BackendContext, BackendLoad, Usage
from wwwserve_gateway.plugin_api.loading import backend_class

log = structlog.get_logger(__name__)

WINDOW_S = 60.0
LATENCY_WEIGHT = 0.2  # of the newest request in a deployment's latency average


def worth_another_deployment(exc: GatewayError) -> bool:
    """Whether another deployment might answer where this one failed before its first byte:
    unreachable, timed out, garbled, or an HTTP 5xx or 429; not the request's own fault (4xx)."""
    if isinstance(exc, UpstreamError):
        return exc.status >= 500 or exc.status == 429
    return isinstance(exc, BackendError)


def build_backend(entry: ModelEntry, ctx: BackendContext) -> Backend:
    cls = backend_class(entry.provider)
    return cls(entry, cls.Settings.model_validate(entry.litellm_params), ctx)


class Lease:
    """One request's hold on a deployment: counted in flight and against its rpm while held; its
    tokens count against its tpm once known."""

    __slots__ = ("backend",)

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def used(self, usage: Usage | None) -> None:
        if usage is not None and self.backend.settings.tpm and usage.total_tokens:
            self.backend.state.recent_tokens.append((time.monotonic(), usage.total_tokens))


class Deployments:
    """Deployments by model name (a model group). `pick` chooses a ready one within its limits and
    not cooling down, by the routing strategy; `failed` counts a failure and starts a cooldown
    (LiteLLM's allowed_fails and cooldown_time, from `router_settings`)."""

    def __init__(self, ctx: BackendContext, router: RouterSettings | None = None) -> None:
        self.ctx = ctx
        self.router = router or RouterSettings()
        self._by_id: dict[str, Backend] = {}
        self._by_model: dict[str, list[Backend]] = {}
        self._starting: dict[str, asyncio.Task[None]] = {}

    def __iter__(self) -> Iterator[Backend]:
        return iter(list(self._by_id.values()))

    def get(self, deployment_id: str) -> Backend | None:
        return self._by_id.get(deployment_id)

    def model_names(self) -> list[str]:
        return sorted({*self._by_model, *self.router.model_group_alias})

    def serves(self, model: str) -> bool:
        return self._group(model) is not None

    def group_name(self, model: str) -> str | None:
        """The model group that serves `model` (itself, an alias's target, or a wildcard group)."""
        if model in self._by_model:
            return model
        alias = self.router.model_group_alias.get(model)
        if alias is not None:
            return alias if alias in self._by_model else None
        for name in self._by_model:
            if "*" in name and fnmatch.fnmatchcase(model, name):
                return name
        return None

    def _group(self, model: str) -> list[Backend] | None:
        """The deployments that serve `model`: its group, an alias's group, or a wildcard group
        ("*", "openai/*") whose pattern it matches (the first listed)."""
        group = self._by_model.get(model)
        if group is None:
            alias = self.router.model_group_alias.get(model)
            if alias is not None:
                return self._by_model.get(alias)
            for name, backends in self._by_model.items():
                if "*" in name and fnmatch.fnmatchcase(model, name):
                    return backends
        return group

    async def add(self, entry: ModelEntry) -> Backend:
        """Register a deployment and start it in the background (model loads can take a while)."""
        if entry.deployment_id in self._by_id:
            raise ValueError(f"deployment {entry.deployment_id!r} exists already")
        backend = build_backend(entry, self.ctx)
        self._by_id[backend.id] = backend
        self._by_model.setdefault(backend.model_name, []).append(backend)
        self._starting[backend.id] = asyncio.create_task(self._start(backend))
        return backend

    async def _start(self, backend: Backend) -> None:
        try:
            await backend.start()
            log.info("backend started", backend=backend.id, model=backend.model_name)
        except Exception:
            log.exception("backend failed to start", backend=backend.id)

    async def remove(self, deployment_id: str) -> Backend:
        backend = self._by_id.pop(deployment_id)
        peers = self._by_model[backend.model_name]
        peers.remove(backend)
        if not peers:
            del self._by_model[backend.model_name]
        self._starting.pop(deployment_id).cancel()
        await backend.aclose()
        return backend

    async def aclose(self) -> None:
        await asyncio.gather(*(self.remove(i) for i in list(self._by_id)), return_exceptions=True)

    def pick(self, model: str, exclude: Collection[str] = ()) -> Backend:
        """A deployment of `model` to send a request to, leaving out those in `exclude` (tried
        already) and those cooling down."""
        candidates = self._by_model.get(model) or self._group(model)
        if not candidates:
            raise ModelNotFound(f"The model '{model}' does not exist on this node", param="model")
        now = time.monotonic()
        usable: list[Backend] = []
        ready = limited = cooling = 0
        cooldown_ends = math.inf
        for backend in candidates:
            if not backend.ready or backend.id in exclude:
                continue
            ready += 1
            until = backend.state.cooldown_until
            if until > now:
                cooling += 1
                cooldown_ends = min(cooldown_ends, until)
                continue
            if not _within_limits(backend, now):
                limited += 1
                continue
            usable.append(backend)
        if usable:
            return usable[0] if len(usable) == 1 else self._choose(usable)
        if cooling:
            wait = max(1, math.ceil(cooldown_ends - now))
            raise BackendUnavailable(
                f"every deployment of '{model}' failed recently; retry in {wait} s",
                headers={"retry-after": str(wait)},
            )
        if ready and limited == ready:
            raise RateLimited(
                f"every deployment of '{model}' is at its rpm/tpm/parallel limit",
                headers={"retry-after": "1"},
            )
        if exclude:
            raise BackendUnavailable(
                f"no other deployment of '{model}' is ready; retry shortly", headers={"retry-after": "1"}
            )
        raise BackendUnavailable(
            f"no backend for '{model}' is ready yet; retry shortly", headers={"retry-after": "1"}
        )

    def _choose(self, usable: list[Backend]) -> Backend:
        strategy = self.router.routing_strategy
        if strategy == "simple-shuffle":
            weights = [b.settings.weight or 1.0 for b in usable]
            return random.choices(usable, weights)[0]
        if strategy == "latency-based-routing":
            # Unmeasured deployments first (0), so that each gets measured.
            return min(usable, key=lambda b: (b.state.latency_s or 0.0, b.state.in_flight))
        best, best_score = usable[0], math.inf
        for backend in usable:
            load = backend.state.load
            score = backend.state.in_flight + (load.waiting if load else 0)
            if score < best_score:
                best, best_score = backend, score
        return best

    def available(self, backend: Backend, now: float | None = None) -> bool:
        """Ready and not cooling down."""
        return backend.ready and backend.state.cooldown_until <= (now or time.monotonic())

    def readiness(self) -> tuple[str, list[dict[str, object]]]:
        """For /health/ready: "ready" when every deployment can serve, "degraded" when some are
        cooling down after failures but every model still has one, "unavailable" when a model has
        none, "starting" while some have not started; and each deployment's state."""
        now = time.monotonic()
        backends: list[dict[str, object]] = []
        for b in self._by_id.values():
            left = max(0.0, b.state.cooldown_until - now)
            entry: dict[str, object] = {"id": b.id, "model": b.model_name, "ready": b.ready}
            entry["cooldown_s"] = round(left, 1) if left else None
            backends.append(entry)
        if not all(b.ready for b in self._by_id.values()):
            return "starting", backends
        if all(any(self.available(b, now) for b in group) for group in self._by_model.values()):
            cooling = any(b["cooldown_s"] for b in backends)
            return ("degraded" if cooling else "ready"), backends
        return "unavailable", backends

    def cooldown_left(self, backend: Backend) -> float:
        return max(0.0, backend.state.cooldown_until - time.monotonic())

    def failed(self, backend: Backend, exc: GatewayError) -> None:
        """Count a failure of `backend`, logged with its id (and the cause, which may name its
        address: the log is the operator's); past allowed_fails in a minute, or at once when it is
        unreachable or says 429, it cools down, unless it is its group's only deployment."""
        now = time.monotonic()
        state = backend.state
        state.failures.append(now)
        while state.failures and now - state.failures[0] > WINDOW_S:
            state.failures.popleft()
        cause = exc.__cause__
        log.warning(
            "deployment failed",
            deployment=backend.id,
            model=backend.model_name,
            status=exc.status,
            error=exc.message,
            cause=str(cause) if cause else None,
        )
        router = self.router
        at_once = isinstance(exc, BackendUnreachable) or exc.status == 429
        if len(self._by_model.get(backend.model_name, ())) < 2 or router.cooldown_time <= 0:
            return
        if at_once or len(state.failures) > router.allowed_fails:
            state.cooldown_until = now + router.cooldown_time
            state.failures.clear()
            log.warning(
                "deployment cooling down",
                deployment=backend.id,
                model=backend.model_name,
                seconds=router.cooldown_time,
            )

    @staticmethod
    def answered(backend: Backend, seconds: float) -> None:
        """A request answered in `seconds`: the latency-based strategy's measure."""
        state = backend.state
        last = state.latency_s
        state.latency_s = seconds if last is None else last + LATENCY_WEIGHT * (seconds - last)

    @staticmethod
    @contextlib.contextmanager
    def lease(backend: Backend) -> Iterator[Lease]:
        """Hold `backend` for one request: local serving and peers' requests alike go through here."""
        state = backend.state
        state.in_flight += 1
        if backend.settings.rpm:
            state.recent_requests.append(time.monotonic())
        try:
            yield Lease(backend)
        finally:
            state.in_flight -= 1

    async def poll_loads(self, interval: float, on_load) -> None:
        """Refresh each backend's load every `interval` seconds; `on_load(backend)` sees each result."""
        while True:
            # Taken once: readiness can change while the probes run.
            ready = [b for b in self._by_id.values() if b.ready]
            # A busy single-threaded server may take a while to answer: allow more than one interval.
            results = await asyncio.gather(
                *(asyncio.wait_for(b.probe_load(), timeout=max(interval, 5.0)) for b in ready),
                return_exceptions=True,
            )
            for backend, result in zip(ready, results, strict=True):
                backend.state.load = result if isinstance(result, BackendLoad) else None
                on_load(backend)
            await asyncio.sleep(interval)


def _within_limits(backend: Backend, now: float) -> bool:
    settings, state = backend.settings, backend.state
    if settings.max_parallel_requests and state.in_flight >= settings.max_parallel_requests:
        return False
    if settings.rpm:
        recent = state.recent_requests
        while recent and now - recent[0] > WINDOW_S:
            recent.popleft()
        if len(recent) >= settings.rpm:
            return False
    if settings.tpm:
        tokens = state.recent_tokens
        while tokens and now - tokens[0][0] > WINDOW_S:
            tokens.popleft()
        if sum(t for _, t in tokens) >= settings.tpm:
            return False
    return True
