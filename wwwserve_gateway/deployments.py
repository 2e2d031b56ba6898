"""The node's deployments: built from their entry points, chosen per request, leased while they
serve one, and added or removed while the node runs."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import structlog

from wwwserve_gateway.config.schema import ModelEntry
from wwwserve_gateway.http.errors import BackendUnavailable, ModelNotFound, RateLimited
from wwwserve_gateway.plugin_api.backend import Backend, BackendContext, BackendLoad, Usage
from wwwserve_gateway.plugin_api.loading import backend_class

log = structlog.get_logger(__name__)

WINDOW_S = 60.0


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
    """Deployments by model name. `pick` chooses the least busy ready one within its limits."""

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        self._by_id: dict[str, Backend] = {}
        self._by_model: dict[str, list[Backend]] = {}
        self._starting: dict[str, asyncio.Task[None]] = {}

    def __iter__(self) -> Iterator[Backend]:
        return iter(list(self._by_id.values()))

    def get(self, deployment_id: str) -> Backend | None:
        return self._by_id.get(deployment_id)

    def model_names(self) -> list[str]:
        return sorted(self._by_model)

    def serves(self, model: str) -> bool:
        return model in self._by_model

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

    def pick(self, model: str) -> Backend:
        candidates = self._by_model.get(model)
        if not candidates:
            raise ModelNotFound(f"The model '{model}' does not exist on this node", param="model")
        now = time.monotonic()
        best: Backend | None = None
        best_score = 0.0
        ready = limited = 0
        for backend in candidates:
            if not backend.ready:
                continue
            ready += 1
            if not _within_limits(backend, now):
                limited += 1
                continue
            load = backend.state.load
            score = backend.state.in_flight + (load.waiting if load else 0)
            if best is None or score < best_score:
                best, best_score = backend, score
        if best is not None:
            return best
        if ready and limited == ready:
            raise RateLimited(
                f"every deployment of '{model}' is at its rpm/tpm/parallel limit",
                headers={"retry-after": "1"},
            )
        raise BackendUnavailable(
            f"no backend for '{model}' is ready yet; retry shortly", headers={"retry-after": "1"}
        )

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
